"""What a ``FileField`` accepts: one import for the validation helpers.

The checks live in three modules by concern: :mod:`.sniffing` (content types),
:mod:`.names` (stored file names) and :mod:`.rules` (a field's upload options and
the guard every upload runs through). This module gathers their public names.
"""

from .names import MAX_FILENAME_BYTES, FilenameTemplate, sanitize_filename
from .rules import COMPRESSED_TYPES, UploadGuard, UploadRules
from .sniffing import (
    HEAD_SIZE,
    SIGNATURES,
    content_type_matches,
    guess_content_type,
    sniff_content_type,
)

__all__ = [
    "COMPRESSED_TYPES",
    "HEAD_SIZE",
    "MAX_FILENAME_BYTES",
    "SIGNATURES",
    "FilenameTemplate",
    "UploadGuard",
    "UploadRules",
    "content_type_matches",
    "guess_content_type",
    "sanitize_filename",
    "sniff_content_type",
]
