"""The file machinery: GridFS bucket access, streaming uploads and downloads, integrity."""
