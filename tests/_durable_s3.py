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
to its client that is an unknown outcome, which S3 has too (a reply lost). What the
replay cannot restore: multipart uploads (a new upload id each time; keep objects
under ``part_size``), and the ``LastModified`` times (the replay's).

Usage: ``python tests/_durable_s3.py PORT LOG`` (127.0.0.1 only). Reads are not
logged and run concurrently, as moto's server runs them.
"""

from __future__ import annotations

import base64
import io
import json
import os
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


class Durable:
    """The WSGI middleware: log each write, then run it alone."""

    def __init__(self, app: Any, log: str) -> None:
        self.app = app
        self.fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("REQUEST_METHOD") not in WRITES:
            return self.app(environ, start_response)
        length = environ.get("CONTENT_LENGTH")
        stream = environ["wsgi.input"]
        body = stream.read(int(length)) if length else stream.read()
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        record = {
            "method": environ["REQUEST_METHOD"],
            "uri": environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ["PATH_INFO"],
            "headers": _headers(environ),
            "body": base64.b64encode(body).decode(),
        }
        with self.lock:
            # One write() of the whole line: a kill cannot leave half of it after a
            # whole one, only a last line cut short, which the replay skips.
            os.write(self.fd, (json.dumps(record) + "\n").encode())
            out: dict[str, Any] = {}

            def capture(status: str, headers: list[Any], exc_info: Any = None) -> Any:
                out["start"] = (status, headers, exc_info)
                return lambda data: None

            chunks = list(self.app(environ, capture))  # run it to the end, alone
        status, headers, exc_info = out["start"]
        start_response(status, headers, exc_info)
        return chunks


def replay(app: Any, log: str) -> int:
    """Run every logged write through ``app`` again, in order; return how many."""
    if not os.path.exists(log):
        return 0
    client = Client(app)
    done = 0
    with open(log, "rb") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the last line, cut short by a kill
            uri: str = record["uri"]
            path, _, query = uri.partition("?")
            response = client.open(
                path=path,
                query_string=query,
                method=record["method"],
                headers=record["headers"],
                data=base64.b64decode(record["body"]),
                environ_overrides={"RAW_URI": uri, "REQUEST_URI": uri},
            )
            response.close()
            done += 1
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
