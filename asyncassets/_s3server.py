"""A local S3 server for tests: moto in server mode, run as a subprocess on ``127.0.0.1``.

Used by the test plugin (:mod:`asyncassets.testing`); needs ``moto[server]``
(in the ``test`` extra). moto keeps everything in memory: a restarted server
is empty. It accepts any credentials, does not check presigned signatures, and
enforces S3's 5 MiB minimum for every part of a multipart upload but the last.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from .embedded import _die_with_parent, _end_process, _free_port, _signal_group
from .errors import EmbeddedServerError

__all__ = ["FAKE_CREDENTIALS", "S3Server", "create_bucket", "delete_bucket", "unique_bucket_name"]

_HOST = "127.0.0.1"
_START_TIMEOUT = 30.0
_POLL_INTERVAL = 0.05

#: What moto is given: it accepts any, but botocore refuses to sign without some.
FAKE_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}
REGION = "us-east-1"


def unique_bucket_name(hint: str = "test") -> str:
    """A valid bucket name no other test uses: ``aa-<hint>-<12 hex digits>``."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in hint.lower()).strip("-")[:36]
    return f"aa-{slug or 'test'}-{uuid.uuid4().hex[:12]}".replace("--", "-")


class S3Server:
    """``python -m moto.server`` on a free loopback port, started and stopped on demand.

    :attr:`port` stays the same across :meth:`restart`, so clients made before a
    :meth:`kill` reach the new server (which is empty: moto keeps no data).
    """

    def __init__(self, port: int | None = None) -> None:
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int | None:
        """The port, once started."""
        return self._port

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        if self._port is None:
            raise EmbeddedServerError("The S3 server has not been started: call start() first.")
        return f"http://{_HOST}:{self._port}"

    @property
    def running(self) -> bool:
        """Whether the subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> S3Server:
        """Start the server and wait until it answers HTTP requests."""
        if self.running:
            return self
        try:
            import moto.server  # noqa: F401  (only to say clearly what is missing)
        except ImportError as exc:
            raise EmbeddedServerError(
                "The S3 test server needs moto: pip install 'moto[server]' (it is in "
                "asyncassets' test extra), or set S3_ENDPOINT_URL to a running "
                "S3-compatible server."
            ) from exc
        if self._port is None:
            self._port = _free_port()
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self._proc = subprocess.Popen(
            self._command(self._port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=preexec,  # only prctl(PR_SET_PDEATHSIG), before exec
        )
        self._wait_until_ready()
        return self

    def _command(self, port: int) -> list[str]:
        """The server's command line (a subclass may run moto another way)."""
        return [sys.executable, "-m", "moto.server", "-H", _HOST, "-p", str(port)]

    def _wait_until_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise EmbeddedServerError(
                    f"moto_server exited at start (port {self._port}):\n{err[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                    pass
            except (urllib.error.URLError, OSError):
                time.sleep(_POLL_INTERVAL)
                continue
            # Nobody reads stderr from now on: do not let a full pipe block moto.
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            return
        self.kill()
        raise EmbeddedServerError(
            f"moto_server did not answer on {self.endpoint_url} within {_START_TIMEOUT:.0f} s."
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _end_process(proc, timeout)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would: requests in flight fail."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    def restart(self) -> S3Server:
        """Kill the server and start an empty one on the same port."""
        self.kill()
        return self.start()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<S3Server {self._port and self.endpoint_url} {state}>"


def _client(endpoint_url: str, access_key_id: str, secret_access_key: str, region: str) -> Any:
    """A synchronous botocore S3 client (botocore comes with aiobotocore)."""
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )


def create_bucket(
    name: str, endpoint_url: str, access_key_id: str, secret_access_key: str, region: str
) -> None:
    """Create the bucket ``name``."""
    client = _client(endpoint_url, access_key_id, secret_access_key, region)
    try:
        arguments: dict[str, Any] = {"Bucket": name}
        if region != "us-east-1":
            arguments["CreateBucketConfiguration"] = {"LocationConstraint": region}
        client.create_bucket(**arguments)
    finally:
        client.close()


def delete_bucket(
    name: str, endpoint_url: str, access_key_id: str, secret_access_key: str, region: str
) -> None:
    """Abort the bucket's pending uploads, delete its objects, then the bucket itself.

    A bucket that no longer exists (a restarted moto is empty) is not an error.
    """
    from botocore.exceptions import ClientError

    client = _client(endpoint_url, access_key_id, secret_access_key, region)
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for upload in page.get("Uploads", ()):
                with contextlib.suppress(ClientError):
                    client.abort_multipart_upload(
                        Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": entry["Key"]} for entry in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise
    finally:
        client.close()


def environment_credentials() -> dict[str, str]:
    """Credentials for a server given by ``S3_ENDPOINT_URL``: the AWS variables, else fakes."""
    return {
        "access_key_id": os.environ.get("AWS_ACCESS_KEY_ID", FAKE_CREDENTIALS["access_key_id"]),
        "secret_access_key": os.environ.get(
            "AWS_SECRET_ACCESS_KEY", FAKE_CREDENTIALS["secret_access_key"]
        ),
    }
