"""``ContentPolicy``: what is inline, under which type, sandboxed; no I/O.

What browsers do with the headers is tested in Chromium
(tests/test_web_browser_policy.py); this pins the decisions and the
configuration's checks.
"""

from __future__ import annotations

import pytest

from asyncassets.web import DEFAULT_POLICY, INLINE_TYPES, PRESIGNED_INLINE_TYPES, ContentPolicy
from asyncassets.web.policy import MediaType, parse_media_type


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("image/png", MediaType("image/png")),
        ("  IMAGE/PNG  ", MediaType("image/png")),
        ("TEXT/XSL; charset=utf-8", MediaType("text/xsl", "utf-8")),
        ("text/plain ;\tCHARSET=\"ISO-8859-1\"", MediaType("text/plain", "iso-8859-1")),
        ("text/plain; charset=<script>", MediaType("text/plain")),
        ("text/plain; format=flowed", MediaType("text/plain")),
        ("multipart/x-mixed-replace; boundary=x", MediaType("multipart/x-mixed-replace")),
        ("text/html\r\nX-Evil: 1", None),
        ("text/html\x00", None),
        ("image/*", None),
        ("*/*", None),
        ("html", None),
        ("/html", None),
        ("text/", None),
        ("", None),
        (5, None),
        (b"text/html", None),
        (["text/html"], None),
        ("x" * 2000 + "/html", None),
    ],
)
def test_media_types_are_parsed_robustly(value: object, parsed: MediaType | None) -> None:
    assert parse_media_type(value) == parsed


@pytest.mark.parametrize(
    ("stored", "download", "sent", "inline", "sandbox"),
    [
        ("image/png", False, "image/png", True, True),
        ("Image/JPEG; q=1", False, "image/jpeg", True, True),
        ("audio/mpeg", False, "audio/mpeg", True, False),
        ("video/mp4", False, "video/mp4", True, False),
        ("video/mp4", True, "video/mp4", False, True),
        ("text/plain", False, "text/plain; charset=utf-8", True, True),
        ("text/plain; charset=Shift_JIS", False, "text/plain; charset=shift_jis", True, True),
        ("text/csv", False, "text/csv", False, True),
        ("application/pdf", False, "application/pdf", False, True),
        ("text/html", False, "application/octet-stream", False, True),
        ("TEXT/XSL; charset=utf-8", False, "application/octet-stream", False, True),
        ("image/svg+xml", False, "application/octet-stream", False, True),
        ("application/rss+xml", False, "application/octet-stream", False, True),
        ("text/javascript", False, "application/octet-stream", False, True),
        ("text/css", False, "application/octet-stream", False, True),
        (None, False, "application/octet-stream", False, True),
    ],
)
def test_the_default_policy(
    stored: str | None, download: bool, sent: str, inline: bool, sandbox: bool
) -> None:
    shown = DEFAULT_POLICY.present(parse_media_type(stored), download=download)
    assert (shown.content_type, shown.inline, shown.sandbox) == (sent, inline, sandbox)


def test_a_policy_can_show_pdfs_unsandboxed_and_html_only_sandboxed() -> None:
    policy = ContentPolicy(
        inline={*INLINE_TYPES, "application/pdf", "text/html"}, unsandboxed={"application/pdf"}
    )
    pdf = policy.present(MediaType("application/pdf"), download=False)
    assert (pdf.inline, pdf.sandbox) == (True, False)
    page = policy.present(MediaType("text/html"), download=False)
    assert (page.content_type, page.inline, page.sandbox) == ("text/html", True, True)
    # Audio and video are sandboxed once the policy no longer exempts them.
    assert policy.present(MediaType("video/mp4"), download=False).sandbox


@pytest.mark.parametrize(
    "unsandboxed",
    [
        {"text/html"},
        {"image/svg+xml"},
        {"application/xhtml+xml"},
        {"text/xml"},
        {"video/x-thing+xml"},
        {"application/javascript"},
        {"text/csv"},
    ],
)
def test_active_types_cannot_go_unsandboxed(unsandboxed: set[str]) -> None:
    with pytest.raises(ValueError, match="sandbox"):
        ContentPolicy(inline={*INLINE_TYPES, *unsandboxed}, unsandboxed=unsandboxed)


def test_bad_configuration_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="not in inline"):
        ContentPolicy(unsandboxed={"application/pdf"})
    with pytest.raises(ValueError, match="essence"):
        ContentPolicy(inline={"image/*"})
    with pytest.raises(ValueError, match="essence"):
        ContentPolicy(inline={"text/plain; charset=utf-8"})
    with pytest.raises(TypeError, match="collection"):
        ContentPolicy(inline="image/png")
    # A custom inline list without audio or video needs no unsandboxed list.
    assert ContentPolicy(inline={"image/png"}).unsandboxed == frozenset()


def test_a_presigned_link_is_inline_only_for_types_safe_without_nosniff() -> None:
    # S3 can send neither nosniff nor sandbox: a policy that shows PDFs and
    # (sandboxed) HTML inline still has presigned links save them.
    policy = ContentPolicy(
        inline={*INLINE_TYPES, "application/pdf", "text/html"}, unsandboxed={"application/pdf"}
    )
    for essence in ("application/pdf", "text/html"):
        shown = policy.present_presigned(MediaType(essence), download=False)
        assert (shown.content_type, shown.inline) == (essence, False)
    unknown = policy.present_presigned(MediaType("application/x-made-up"), download=False)
    assert (unknown.content_type, unknown.inline) == ("application/octet-stream", False)
    text = policy.present_presigned(MediaType("text/plain"), download=False)
    assert (text.content_type, text.inline) == ("text/plain; charset=utf-8", True)
    assert not policy.present_presigned(MediaType("image/png"), download=True).inline
    # And what is inline without those headers is passive, by kind.
    for essence in PRESIGNED_INLINE_TYPES:
        top, _, sub = essence.partition("/")
        passive_media = top in ("image", "audio", "video") and not any(
            mark in sub for mark in ("+", "xml", "svg")
        )
        assert essence == "text/plain" or passive_media, essence
