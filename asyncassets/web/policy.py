"""The content policy, as :mod:`asyncassets.web` uses it: see :mod:`asyncassets.files.policy`.

The policy is defined below the web layer, so that S3 presigned links
(``proxy.url()``) follow it without Starlette installed; this module keeps its
names where the web layer's users import them from.
"""

from __future__ import annotations

from ..files.policy import (
    DEFAULT_POLICY,
    INLINE_TYPES,
    LABELLED_TYPES,
    PRESIGNED_INLINE_TYPES,
    UNSANDBOXED_TYPES,
    ContentPolicy,
    MediaType,
    Presentation,
    guess_media_type,
    parse_media_type,
)

__all__ = [
    "DEFAULT_POLICY",
    "INLINE_TYPES",
    "LABELLED_TYPES",
    "PRESIGNED_INLINE_TYPES",
    "UNSANDBOXED_TYPES",
    "ContentPolicy",
    "MediaType",
    "Presentation",
    "guess_media_type",
    "parse_media_type",
]
