"""Object storages: a directory or an S3 bucket holds the bytes, MongoDB the catalogue.

:mod:`.blobs` says what a backend must do; :mod:`.filesystem` and :mod:`.s3` are
the backends; :mod:`.store` builds the catalogue and the guarantees on them;
:mod:`.keys` makes the keys.
"""
