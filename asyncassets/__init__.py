"""asyncassets: an async MongoDB object-document mapper whose documents carry files.

Declare documents with mongoengine's fields, ``await`` every database call, and
attach files with :class:`~asyncassets.fields.FileField`, stored in GridFS.

.. code-block:: python

    import asyncassets
    from asyncassets import Document
    from asyncassets.fields import FileField, StringField

    class Animal(Document):
        genus = StringField()
        photo = FileField()

    asyncassets.connect("mongodb://127.0.0.1:27017/zoo")
    marmot = Animal(genus="Marmota")
    await marmot.photo.put(b"...", content_type="image/jpeg")
    await marmot.save()
"""

from mongoengine.errors import (
    DoesNotExist,
    FieldDoesNotExist,
    InvalidQueryError,
    MultipleObjectsReturned,
    NotUniqueError,
    OperationError,
    SaveConditionError,
    ValidationError,
)

from . import transfers
from .assets import Asset, AssetManager
from .connection import connect, disconnect, disconnect_all, get_client, get_db
from .document import (
    Document,
    DynamicDocument,
    DynamicEmbeddedDocument,
    EmbeddedDocument,
)
from .errors import (
    AssetExists,
    AssetNotFound,
    AsyncAssetsError,
    ChecksumMissing,
    CorruptFile,
    FileAlreadyExists,
    FileConflict,
    FileDeletedWhileReading,
    FileNotFound,
    FileNotLoaded,
    FileValidationError,
    GridFSError,
    IntegrityError,
    PendingFileMissing,
    StorageConflict,
    UploadClosed,
    UploadInterrupted,
)
from .fields import FileField, FileProxy, GridFSProxy, ImageField, ImageGridFsProxy, ImageProxy
from .ops import CheckReport, SweepReport, check, sweep_orphans
from .queryset import Q, QuerySet

__version__ = "0.1.0"

__all__ = [
    "Asset",
    "AssetExists",
    "AssetManager",
    "AssetNotFound",
    "AsyncAssetsError",
    "CheckReport",
    "ChecksumMissing",
    "CorruptFile",
    "Document",
    "DoesNotExist",
    "DynamicDocument",
    "DynamicEmbeddedDocument",
    "EmbeddedDocument",
    "FieldDoesNotExist",
    "FileAlreadyExists",
    "FileConflict",
    "FileDeletedWhileReading",
    "FileField",
    "FileNotFound",
    "FileNotLoaded",
    "FileProxy",
    "FileValidationError",
    "GridFSError",
    "GridFSProxy",
    "ImageField",
    "ImageGridFsProxy",
    "ImageProxy",
    "IntegrityError",
    "InvalidQueryError",
    "MultipleObjectsReturned",
    "NotUniqueError",
    "OperationError",
    "PendingFileMissing",
    "Q",
    "QuerySet",
    "SaveConditionError",
    "StorageConflict",
    "SweepReport",
    "UploadClosed",
    "UploadInterrupted",
    "ValidationError",
    "__version__",
    "check",
    "connect",
    "disconnect",
    "disconnect_all",
    "get_client",
    "get_db",
    "sweep_orphans",
    "transfers",
]
