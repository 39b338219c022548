"""moto's S3 server with a write-ahead log: killed and started again, it lost nothing.

A real S3 (or MinIO) that crashes keeps what it acknowledged; moto keeps everything
in memory, so a killed moto comes back empty, and a test that kills it could only
ever check that data is *lost*. This script runs moto's own WSGI app behind a small
middleware that makes it durable the simple way:

* every request that can change something (``PUT``, ``POST``, ``DELETE``) is
  appended to a log file (one JSON line: method, raw URI, headers, body) before moto
  sees it, and such requests run one at a time, in the order they were logged;
* at start, the log is replayed into the app in-process, in that order, before the
  port is opened: the bucket is back as it was, the same keys holding the same
  bytes under the same ETags (an ETag is the MD5 of the body).

A request logged but cut short by the kill is replayed as if it had been applied:
to its client that is an unknown outcome, which S3 has too (a reply lost). A line
the kill cut in the middle of its ``write()`` (a part is megabytes of JSON, and
the kernel stops a large write at a fatal signal) was never run nor answered: the
replay drops it and truncates the log to its last whole line before the server
appends again, else the next run's first write would be glued to that fragment and
lost at the replay after (an acknowledged UploadPart gone: "parts missing").
Multipart uploads survive too: moto gives a replayed CreateMultipartUpload a new
upload id, so each one's id as its client saw it is logged (a line of its own,
after the request) and every later request naming it, replayed or live, is
rewritten to the id of this run. What the replay cannot restore: the
``LastModified`` times (the replay's), and an upload whose creation was logged
but whose id was not (its client never learnt it either).

Usage: ``python tests/_durable_s3.py PORT LOG`` (127.0.0.1 only). Reads are not
logged and run concurrently, as moto's server runs them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple
from werkzeug.test import Client

WRITES = frozenset({"PUT", "POST", "DELETE"})
_UPLOAD_ID = re.compile(rb"<UploadId>([^<]+)</UploadId>")
_ID_IN_QUERY = re.compile(r"(uploadId=)([^&]+)")


class UploadIds:
    """The multipart upload ids as clients saw them -> the ids of this run."""

    def __init__(self) -> None:
        self.current: dict[str, str] = {}

    def rewrite(self, uri_or_query: str) -> str:
        return _ID_IN_QUERY.sub(
            lambda m: m.group(1) + self.current.get(m.group(2), m.group(2)), uri_or_query
        )

    def as_clients_know(self, body: bytes) -> bytes:
        """A response naming uploads (ListMultipartUploads, ListParts) with the ids
        their clients know: a replayed upload's id of this run is never shown, as a
        real S3 never changes an upload's id (else a client, or the orphan sweep
        listing the bucket's uploads, takes a live upload for an unknown one)."""
        known = {now: first for first, now in self.current.items() if now != first}
        if not known:
            return body
        return _UPLOAD_ID.sub(
            lambda m: b"<UploadId>" + known.get(m.group(1).decode(), m.group(1).decode())
            .encode() + b"</UploadId>",
            body,
        )


IDS = UploadIds()


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    headers = {
        key[5:].replace("_", "-").title(): value
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").title()] = environ[key]
    return headers


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is in the file (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Durable:
    """The WSGI middleware: log each write, then run it alone."""

    def __init__(self, app: Any, log: str) -> None:
        self.app = app
        self.fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        # Logged as the client sent it: the replay maps the client's ids, never
        # those of a run before.
        sent_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ["PATH_INFO"]
        for name in ("QUERY_STRING", "RAW_URI", "REQUEST_URI"):
            if environ.get(name) and "uploadId=" in environ[name]:
                environ[name] = IDS.rewrite(environ[name])
        if environ.get("REQUEST_METHOD") not in WRITES:
            if not re.search(r"(^|&)(uploads|uploadId)(=|&|$)", environ.get("QUERY_STRING", "")):
                return self.app(environ, start_response)
            kept: dict[str, Any] = {}

            def keep(status: str, headers: list[Any], exc_info: Any = None) -> Any:
                kept["start"] = (status, headers, exc_info)
                return lambda data: None

            body = IDS.as_clients_know(b"".join(self.app(environ, keep)))
            status, headers, exc_info = kept["start"]
            headers = [(k, str(len(body)) if k.lower() == "content-length" else v)
                       for k, v in headers]
            start_response(status, headers, exc_info)
            return [body]
        length = environ.get("CONTENT_LENGTH")
        stream = environ["wsgi.input"]
        body = stream.read(int(length)) if length else stream.read()
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        record = {
            "method": environ["REQUEST_METHOD"],
            "uri": sent_uri,
            "headers": _headers(environ),
            "body": base64.b64encode(body).decode(),
        }
        with self.lock:
            # A kill can only cut the last line short (the replay drops it and
            # truncates the log there): nothing is answered before its line is whole.
            _write_all(self.fd, (json.dumps(record) + "\n").encode())
            out: dict[str, Any] = {}

            def capture(status: str, headers: list[Any], exc_info: Any = None) -> Any:
                out["start"] = (status, headers, exc_info)
                return lambda data: None

            chunks = list(self.app(environ, capture))  # run it to the end, alone
            query = environ.get("QUERY_STRING", "")
            if environ["REQUEST_METHOD"] == "POST" and re.search(r"(^|&)uploads(=|&|$)", query):
                found = _UPLOAD_ID.search(b"".join(chunks))
                if found:  # this run's id is the one its client knows
                    line = json.dumps({"upload_id": found.group(1).decode()}) + "\n"
                    _write_all(self.fd, line.encode())
                    IDS.current[found.group(1).decode()] = found.group(1).decode()
        status, headers, exc_info = out["start"]
        start_response(status, headers, exc_info)
        return chunks


def replay(app: Any, log: str) -> int:
    """Run every logged write through ``app`` again, in order; return how many."""
    if not os.path.exists(log):
        return 0
    client = Client(app)
    done = 0
    whole = 0  # the log's length up to the end of its last whole line
    created: str | None = None  # this run's id of the upload just replayed
    with open(log, "rb") as lines:
        for line in lines:
            if not line.endswith(b"\n"):
                break  # the last line, cut short by a kill: never run, never answered
            whole += len(line)
            record = json.loads(line)
            if "upload_id" in record:
                if created is not None:
                    IDS.current[record["upload_id"]] = created
                created = None
                continue
            uri: str = IDS.rewrite(record["uri"])
            path, _, query = uri.partition("?")
            response = client.open(
                path=path,
                query_string=query,
                method=record["method"],
                headers=record["headers"],
                data=base64.b64decode(record["body"]),
                environ_overrides={"RAW_URI": uri, "REQUEST_URI": uri},
            )
            found = _UPLOAD_ID.search(response.get_data())
            created = found.group(1).decode() if found and record["method"] == "POST" else None
            response.close()
            done += 1
    cut = os.path.getsize(log) - whole
    if cut:
        # Appended to, a fragment would swallow the next run's first line.
        os.truncate(log, whole)
        print(f"dropped a last line cut short by a kill ({cut} bytes)", file=sys.stderr)
    return done


def main(argv: Iterable[str]) -> None:
    port, log = list(argv)
    app = DomainDispatcherApplication(create_backend_app)
    replayed = replay(app, log)
    print(f"replayed {replayed} writes from {log}", file=sys.stderr, flush=True)
    run_simple(
        "127.0.0.1", int(port), Durable(app, log), threaded=True,
        request_handler=MotoRequestHandler,
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
