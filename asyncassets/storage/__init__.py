"""Where bytes live, knowing nothing of documents.

The files collection of MongoDB is the catalogue of every stored file
(:mod:`.catalogue`); :mod:`.gridfs` stores the bytes in the GridFS spec's chunks;
:mod:`.read` is the one way stored bytes are read back.
"""

from .gridfs import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_CHUNK_SIZE,
    DownloadStream,
    GridBucket,
    UploadStream,
)

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "DownloadStream",
    "GridBucket",
    "UploadStream",
]
