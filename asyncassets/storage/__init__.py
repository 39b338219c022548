"""Where bytes live, knowing nothing of documents.

A :class:`Storage` says where a field's bytes live: :class:`GridFSStorage` (the
default), :class:`FileSystemStorage` or :class:`S3Storage` (:mod:`.base`), or
:class:`QueuedStorage`: saved locally first, moved to a remote storage in the
background (:mod:`.queued`). The files collection of MongoDB is the catalogue
of every stored file, whatever the storage (:mod:`.catalogue`); :mod:`.gridfs`
stores the bytes in the GridFS spec's chunks, :mod:`.objects` in a directory or
a bucket; :mod:`.read` is the one way stored bytes are read back.
"""

from .base import (
    FileSystemStorage,
    GridFSStorage,
    S3Storage,
    Storage,
    Store,
    Upload,
    default_collection_name,
)
from .gridfs import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_CHUNK_SIZE,
    DownloadStream,
    GridBucket,
    UploadStream,
)
from .objects.keys import DEFAULT_KEY_TEMPLATE
from .queued import QueuedStorage, QueuedStore
from .retry import Retry

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_KEY_TEMPLATE",
    "DownloadStream",
    "FileSystemStorage",
    "GridBucket",
    "GridFSStorage",
    "QueuedStorage",
    "QueuedStore",
    "Retry",
    "S3Storage",
    "Storage",
    "Store",
    "Upload",
    "UploadStream",
    "default_collection_name",
]
