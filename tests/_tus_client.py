"""tuspy, the tus client from PyPI, as its own process (tests/test_tus_faults.py).

``python tests/_tus_client.py URL FILE STORE DOC CHUNK RETRIES`` uploads FILE to the tus
server at URL in chunks of CHUNK bytes, remembering the upload's URL in STORE
(tuspy's ``FileStorage``), so that a second run resumes the upload a killed first
run began. Before its first chunk it prints ``start <offset>``, after each chunk
``offset <n>``, at the end ``done``; flushed, so the test can kill it at a chosen
point. With ``TUS_GO_AT`` (a Unix time) it waits until then after reading the
offset: racing clients all start from one offset, however slow their start.
"""

from __future__ import annotations

import os
import sys
import time

from tusclient import client
from tusclient.storage.filestorage import FileStorage


def main() -> None:
    url, path, store, doc, chunk, retries = sys.argv[1:7]
    tus = client.TusClient(url)
    uploader = tus.uploader(
        file_path=path,
        chunk_size=int(chunk),
        metadata={"doc": doc, "filename": "upload.bin"},
        store_url=True,
        url_storage=FileStorage(store),
        upload_checksum=True,
        retries=int(retries),
        retry_delay=1,
    )
    print(f"start {uploader.offset}", flush=True)
    go_at = os.environ.get("TUS_GO_AT")
    if go_at:
        # Racing clients: each has read the offset (HEAD) before either sends a byte.
        time.sleep(max(0.0, float(go_at) - time.time()))
    size = uploader.get_file_size()
    while uploader.offset < size:
        uploader.upload_chunk()
        print(f"offset {uploader.offset}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
