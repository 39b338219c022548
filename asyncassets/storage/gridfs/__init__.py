"""GridFS storage: the spec's two collections, read and written in bounded memory."""

from .bucket import GridBucket
from .download import DownloadStream
from .spec import DEFAULT_BUFFER_SIZE, DEFAULT_CHUNK_SIZE
from .upload import UploadStream

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "DownloadStream",
    "GridBucket",
    "UploadStream",
]
