"""Signed file URLs: what ``await proxy.url(expires=...)`` returns, and how it is checked.

For a file on S3 the URL is S3's own: a SigV4 presigned GET (at most 7 days), whose
signed ``response-content-type`` and ``response-content-disposition`` follow the
content policy (:mod:`asyncassets.files.policy`), or the storage's
``public_url`` joined with the object's key (no response headers of ours at
all). For GridFS and a local directory it points at
:func:`asyncassets.web.files_app`, which serves the file after checking the
URL's token::

    <base_url>/<token>          token = base64url(claims) "." base64url(HMAC-SHA256)

The claims name the file (connection alias, catalogue, file id) and carry the
SHA-256 of its bytes, the expiry and the disposition (inline, or attachment with a
file name); the HMAC covers all of them. So a URL that was altered is refused
(403), one past its expiry is refused (403), and one whose file now holds other
bytes is refused (403: revoked); a file deleted since is not found (404).

The key is process-wide: :func:`configure_urls` sets it (``files_app(secret=...)``
calls it). Give several keys to rotate: the first signs, every one is accepted,
so a key can be retired once the URLs it signed have expired.

Expiries are rounded up to a window (by default a tenth of the lifetime, at most
an hour), so a page rendered twice within a window gets the same URL and the
browser's cache keeps working.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import math
import re
import string
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import bson

from ..errors import SignatureInvalid, URLExpired, URLsNotConfigured
from ..storage.base import S3Storage
from ..storage.catalogue import compression_of, content_type_of, content_version
from ..storage.objects.store import location_key
from .policy import DEFAULT_POLICY, ContentPolicy, guess_media_type, parse_media_type

if TYPE_CHECKING:
    from ..storage.base import Storage

__all__ = [
    "SignedFile",
    "URLConfig",
    "configure_urls",
    "content_disposition",
    "expiry_for",
    "file_name",
    "file_url",
    "read_token",
    "sign_token",
    "url_config",
]

#: Shortest secret accepted, in bytes (HMAC-SHA256 keys should be at least this long).
MIN_SECRET_BYTES = 16
#: Upper bound of the automatic expiry window, in seconds.
MAX_AUTO_WINDOW = 3600
_CONTEXT = b"asyncassets-url-v1\0"
_TOKEN_LIMIT = 4096  # longer tokens are refused before any decoding


@dataclass(frozen=True)
class URLConfig:
    """How signed URLs are made and checked in this process.

    :ivar keys: the HMAC keys; the first signs, all verify.
    :ivar base_url: where :func:`~asyncassets.web.files_app` is mounted (``/files``,
        or an absolute ``https://media.example.com/files``).
    :ivar window: the expiry window in seconds; ``None``: a tenth of each URL's
        lifetime, between 1 second and an hour.
    """

    keys: tuple[bytes, ...]
    base_url: str
    window: float | None = None

    def __repr__(self) -> str:
        # Never the keys.
        return (
            f"URLConfig(base_url={self.base_url!r}, keys={len(self.keys)}, window={self.window!r})"
        )


_config: URLConfig | None = None


def _key(secret: Any) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"a URL signing secret must be str or bytes, not {type(secret).__name__}")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"a URL signing secret must be at least {MIN_SECRET_BYTES} bytes, got "
            f"{len(secret)}; generate one with `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'` and keep it out of the source"
        )
    return bytes(secret)


def configure_urls(
    secret: str | bytes | Sequence[str | bytes],
    *,
    base_url: str = "/files",
    window: float | None = None,
) -> URLConfig:
    """Set the process-wide key and base URL of signed file URLs.

    :param secret: the HMAC key, or a sequence of keys to rotate (the first signs,
        each one verifies).
    :param base_url: where :func:`~asyncassets.web.files_app` is mounted.
    :param window: round expiries up to a multiple of this many seconds; ``None``
        picks a tenth of each URL's lifetime (1 s to 1 hour), ``0`` turns rounding off.
    :returns: the configuration now in force (it replaces any earlier one).
    :raises ValueError: a secret shorter than 16 bytes, no secret, or a bad window.
    """
    global _config
    secrets = [secret] if isinstance(secret, (str, bytes, bytearray)) else list(secret)
    if not secrets:
        raise ValueError("configure_urls() needs at least one secret")
    keys = tuple(_key(s) for s in secrets)
    if not isinstance(base_url, str):
        raise TypeError(f"base_url must be a str, not {type(base_url).__name__}")
    if window is not None and (isinstance(window, bool) or not window >= 0):
        raise ValueError(f"window must be a number of seconds >= 0, or None, not {window!r}")
    _config = URLConfig(keys=keys, base_url=base_url.rstrip("/"), window=window)
    return _config


def url_config() -> URLConfig | None:
    """The configuration in force, or ``None`` when :func:`configure_urls` was not called."""
    return _config


def _require_config() -> URLConfig:
    if _config is None:
        raise URLsNotConfigured(
            "proxy.url() for a file in GridFS or a directory makes a URL for "
            "asyncassets.web.files_app, and no signing key is set: mount "
            "files_app(secret=..., base_url=...) or call "
            "asyncassets.web.configure_urls(secret=..., base_url=...) at start-up"
        )
    return _config


# -- expiry ---------------------------------------------------------------------


def _seconds(expires: Any) -> float:
    if isinstance(expires, dt.timedelta):
        return expires.total_seconds()
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        raise TypeError(
            f"expires must be seconds (int or float) or a datetime.timedelta, "
            f"not {type(expires).__name__}"
        )
    return float(expires)


def expiry_for(expires: float | dt.timedelta, window: float | None, now: float) -> int:
    """The expiry (seconds since the epoch) of a URL made at ``now`` to last ``expires``.

    Rounded up to a multiple of ``window`` (``None``: a tenth of the lifetime, 1 s
    to an hour; ``0``: no rounding), so the URL lasts at least ``expires`` and every
    URL for the same file made within one window is the same.

    :raises ValueError: ``expires`` is not positive.
    """
    seconds = _seconds(expires)
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"expires must be a positive, finite number of seconds, not {expires!r}")
    if window is None:
        window = min(MAX_AUTO_WINDOW, max(1.0, seconds / 10))
    end = now + seconds
    if window:
        end = math.ceil(end / window) * window
    return math.ceil(end)


# -- tokens ---------------------------------------------------------------------


@dataclass(frozen=True)
class SignedFile:
    """What a signed URL's token says (its claims).

    :ivar alias: the connection alias of the catalogue.
    :ivar collection: the catalogue (``<collection>.files``).
    :ivar file_id: the file's ``_id``.
    :ivar version: the file's content version (its SHA-256, hex) when signed.
    :ivar expires: expiry, seconds since the epoch.
    :ivar download: serve as an attachment (else inline).
    :ivar filename: the name to give in ``Content-Disposition`` (``None``: the file's).
    """

    alias: str
    collection: str
    file_id: Any
    version: str
    expires: int
    download: bool = False
    filename: str | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _unb64(text: str) -> bytes:
    """Decode the one spelling :func:`_b64` makes, or raise ``ValueError``.

    base64 lets one value be written many ways (padding or not, characters
    outside the alphabet skipped, ``+`` for ``-``, other values in the unused
    low bits of the last character); a signed URL has exactly one, so the
    decoded bytes must encode back to the very same text.
    """
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not the canonical base64url spelling")
    return data


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, _CONTEXT + payload, hashlib.sha256).digest()


def sign_token(claims: SignedFile, keys: Sequence[bytes] | None = None) -> str:
    """The token of ``claims``, signed with the first key (the configured ones by default).

    :raises URLsNotConfigured: no keys given and none configured.
    """
    key = (keys or _require_config().keys)[0]
    document: dict[str, Any] = {
        "c": claims.collection,
        "i": claims.file_id,
        "h": bson.Binary(bytes.fromhex(claims.version)),
        "e": claims.expires,
    }
    if claims.alias != "default":
        document["a"] = claims.alias
    if claims.download:
        document["d"] = True
    if claims.filename is not None:
        document["n"] = claims.filename
    payload = bson.encode(document)
    return f"{_b64(payload)}.{_b64(_mac(key, payload))}"


def read_token(
    token: str, keys: Sequence[bytes] | None = None, *, now: float | None = None
) -> SignedFile:
    """Check a token's signature and expiry; return its claims. No I/O.

    The signature is checked before anything in the token is decoded. A token
    has exactly one valid spelling, the one :func:`sign_token` made (unpadded
    base64url, canonical to its last bit): any other spelling of the same bytes
    (padding, ``+`` or ``/``, characters base64 would skip, other low bits in
    the last character) is refused like any alteration.

    :raises SignatureInvalid: malformed, altered, or signed with an unknown key.
    :raises URLExpired: the signature is good and the expiry has passed.
    :raises URLsNotConfigured: no keys given and none configured.
    """
    keys = keys or _require_config().keys
    if not isinstance(token, str) or len(token) > _TOKEN_LIMIT or token.count(".") != 1:
        raise SignatureInvalid("the URL's token is malformed")
    encoded_payload, encoded_mac = token.split(".")
    try:
        payload, mac = _unb64(encoded_payload), _unb64(encoded_mac)
    except (binascii.Error, ValueError) as exc:
        raise SignatureInvalid("the URL's token is malformed") from exc
    if not any(hmac.compare_digest(mac, _mac(key, payload)) for key in keys):
        raise SignatureInvalid(
            "the URL's signature does not match: it was altered, or signed "
            "with a key that is no longer configured"
        )
    try:
        document = bson.decode(payload)
        claims = SignedFile(
            alias=str(document.get("a", "default")),
            collection=str(document["c"]),
            file_id=document["i"],
            version=bytes(document["h"]).hex(),
            expires=int(document["e"]),
            download=bool(document.get("d", False)),
            filename=None if document.get("n") is None else str(document["n"]),
        )
    except (KeyError, TypeError, ValueError, bson.errors.BSONError) as exc:
        # Signed by us, so only a bug or another version's format gets here.
        raise SignatureInvalid(f"the URL's token has unexpected claims ({exc})") from exc
    now = time.time() if now is None else now
    if claims.expires <= now:
        raise URLExpired(
            f"the URL expired at {dt.datetime.fromtimestamp(claims.expires, dt.timezone.utc)}; "
            "ask for a new one",
            expired_at=claims.expires,
        )
    return claims


# -- Content-Disposition ----------------------------------------------------------


#: Longest file name given in ``Content-Disposition``, in UTF-8 bytes (what most
#: filesystems take): a longer stored name is cut, keeping its extension.
MAX_FILENAME_BYTES = 255
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,16}$")


def _clean_filename(filename: str) -> str:
    """The last path segment, without control characters (which could split a header)."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()


def _bounded(name: str) -> str:
    """``name`` cut to :data:`MAX_FILENAME_BYTES` of UTF-8, its extension kept."""
    if len(name.encode("utf-8", "surrogatepass")) <= MAX_FILENAME_BYTES:
        return name
    match = _EXTENSION.search(name)
    extension = match.group(0) if match else ""
    stem = name[: len(name) - len(extension)][:MAX_FILENAME_BYTES]
    while len((stem + extension).encode("utf-8", "surrogatepass")) > MAX_FILENAME_BYTES:
        stem = stem[:-1]
    return stem.rstrip() + extension


def file_name(filename: object) -> str:
    """The name a response gives a file: ``""`` for none, cleaned and bounded.

    Catalogue entries written by other tools may hold anything in ``filename``:
    what is not a string is no name; path separators and control characters are
    removed, and the rest is cut to :data:`MAX_FILENAME_BYTES`.
    """
    if not isinstance(filename, str) or not filename:
        return ""
    # Cut first, so a huge name costs no more than a short one to clean.
    return _bounded(_clean_filename(filename[-8 * MAX_FILENAME_BYTES :]))


#: What the ASCII stand-in of a name keeps: letters, digits, space and punctuation
#: that is neither a path separator, a quote, an escape, a parameter separator nor a
#: wildcard. Anything else becomes ``_``.
_FALLBACK_KEEPS = frozenset(string.ascii_letters + string.digits + " !#$&'()+,-.:=@[]^_{}~")


def _ascii_fallback(name: str) -> str:
    """The ``filename="..."`` stand-in of a name: plain ASCII, no separator, no quote.

    Decided after NFKD folding, which turns harmless characters into the very
    ones a name must not carry (U+FF0F FULLWIDTH SOLIDUS into ``/``, U+2100 ACCOUNT
    OF into ``a/c``, U+FF3C into ``\\``).
    """
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    cleaned = "".join(ch if ch in _FALLBACK_KEEPS else "_" for ch in folded).strip()
    # A name that lost everything but its extension still says what the file is.
    stem = cleaned.rsplit(".", 1)[0].strip(" ._")
    if not stem:
        extension = cleaned.rsplit(".", 1)[-1] if "." in cleaned else ""
        cleaned = "download" + (f".{extension}" if extension else "")
    return cleaned


def content_disposition(download: bool, filename: object) -> str:
    """A ``Content-Disposition`` value: ``inline`` or ``attachment``, with the file name.

    The name is given twice when it is not plain ASCII: ``filename="..."`` with an
    ASCII stand-in for old clients (accents dropped; letters, digits, space and
    ``!#$&'()+,-.:=@[]^_{}~`` kept, anything else, separators and quotes among
    them, made ``_`` after folding), and RFC 5987's
    ``filename*=UTF-8''...`` with the exact name, which browsers prefer. The name
    is cleaned by :func:`file_name` first (path separators and control characters
    removed, cut to :data:`MAX_FILENAME_BYTES`); a value that is not a string is
    no name. So the header stays short (under 1,100 characters) and cannot be split.
    """
    kind = "attachment" if download else "inline"
    name = file_name(filename)
    if not name:
        return kind
    fallback = _ascii_fallback(name)
    value = f'{kind}; filename="{fallback}"'
    if fallback != name:
        value += f"; filename*=UTF-8''{quote(name, safe='', errors='replace')}"
    return value


# -- making URLs ------------------------------------------------------------------


async def file_url(
    storage: Storage,
    alias: str,
    doc: Mapping[str, Any],
    *,
    expires: float | dt.timedelta = 3600,
    download: bool = False,
    filename: str | None = None,
    now: float | None = None,
    policy: ContentPolicy = DEFAULT_POLICY,
) -> str:
    """A URL a browser can fetch the file of catalogue entry ``doc`` from.

    What :meth:`FileProxy.url <asyncassets.fields.FileProxy.url>` returns:

    * S3 with ``public_url``: ``public_url`` + the object's key (no expiry, no
      disposition: the server's own headers apply);
    * S3 otherwise: a SigV4 presigned GET lasting ``expires`` (at most 7 days),
      with ``Content-Type`` and ``Content-Disposition`` set through the signed
      ``response-*`` parameters as ``policy`` decides for a link that carries
      neither ``nosniff`` nor ``sandbox``
      (:meth:`~asyncassets.files.policy.ContentPolicy.present_presigned`):
      inline only raster images, audio, video and ``text/plain`` the policy
      shows inline, everything else an attachment, under
      ``application/octet-stream`` unless its type is labelled; a compressed
      file is served with ``Content-Encoding: gzip``, which browsers undo;
    * GridFS or a directory: a URL of :func:`~asyncassets.web.files_app`, signed
      with the configured key (see the module's description).

    :param expires: seconds, or a ``timedelta``: the URL lasts at least this long
        (rounded up to the configured window, for cacheable URLs).
    :param download: ``Content-Disposition: attachment`` (a download) instead of inline.
    :param filename: the name the browser saves the file as; the stored one by default.
    :param now: the signing time (seconds since the epoch); the clock's by default.
    :param policy: what an S3 presigned link shows inline and under which type
        (:data:`~asyncassets.files.policy.DEFAULT_POLICY` by default, what
        ``proxy.url()`` uses); a ``files_app`` link is presented by the policy of
        the ``files_app`` serving it.
    :raises URLsNotConfigured: GridFS or a directory, and no key is configured.
    :raises ValueError: ``expires`` is not positive, or more than 7 days for S3.
    :raises StorageError: S3 could not sign (no credentials).
    """
    now = time.time() if now is None else now
    name = filename if filename is not None else doc.get("filename")
    if isinstance(storage, S3Storage):
        from ..storage.objects.s3 import S3Blobs, public_object_url

        key = location_key(doc)
        if key is None:
            raise SignatureInvalid(
                f"file {doc.get('_id')!r} has no object key in its catalogue entry, so no "
                "S3 URL can be made for it; run asyncassets.check()"
            )
        if storage.public_url:
            return public_object_url(storage.public_url, storage.prefix + key)
        blobs = storage.blobs()
        assert isinstance(blobs, S3Blobs)
        seconds = _seconds(expires)
        if not seconds > 0:
            raise ValueError(f"expires must be a positive number of seconds, not {expires!r}")
        # S3 sends no header of ours (no nosniff, no sandbox): what is not safe
        # without them goes as an attachment, under the policy's type.
        shown_name = file_name(name)
        shown = policy.present_presigned(
            parse_media_type(content_type_of(doc)) or guess_media_type(shown_name),
            download=bool(download),
        )
        return await blobs.presigned_get(
            key,
            expires=math.ceil(seconds),
            content_type=shown.content_type,
            content_disposition=content_disposition(not shown.inline, shown_name),
            content_encoding="gzip" if compression_of(doc) else None,
        )
    config = _require_config()
    claims = SignedFile(
        alias=alias,
        collection=storage.collection_name,
        file_id=doc["_id"],
        version=content_version(doc)[0],
        expires=expiry_for(expires, config.window, now),
        download=bool(download),
        # Cleaned and cut as the response would, so a long name cannot push the
        # token past what read_token() accepts.
        filename=None if filename is None else (file_name(filename) or None),
    )
    return f"{config.base_url}/{sign_token(claims, config.keys)}"
