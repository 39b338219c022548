"""The deployment shape run and killed on one machine (issue #22): tests/_deployment.py.

Two uvicorn app processes, two ``asyncassets transfer`` workers, a sweeper every
few seconds with a 3 s grace, concurrent HTTP clients on GridFS, directory, S3
and queued fields; an app process, a transfer worker and once the S3 server
SIGKILLed at random moments and started again. ``DEPLOYMENT_SECONDS`` sets the
duration (60 by default), ``DEPLOYMENT_CLIENTS`` the clients (16),
``DEPLOYMENT_SEED`` the seed; ``-s`` prints the report. The same run by hand:
``python tests/_deployment.py --duration 300``.

Uses the session's MongoDB (``MONGODB_URI`` when set, a replica set included) and,
without ``S3_ENDPOINT_URL``, a moto server of its own behind a write-ahead log, so
that killing it loses nothing acknowledged; with ``S3_ENDPOINT_URL`` that server is
used and not killed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _deployment import Deployment, Settings, print_report

pytestmark = pytest.mark.slow


async def test_deployment_keeps_every_promise_under_kills(
    asyncassets_server_uri: str, tmp_path: Path
) -> None:
    settings = Settings(
        duration=float(os.environ.get("DEPLOYMENT_SECONDS", "60")),
        clients=int(os.environ.get("DEPLOYMENT_CLIENTS", "16")),
        seed=int(os.environ.get("DEPLOYMENT_SEED", "1")),
        uri=asyncassets_server_uri,
        s3_endpoint=os.environ.get("S3_ENDPOINT_URL"),
        workdir=tmp_path / "deployment",
    )
    report = await Deployment(settings).run()
    print_report(report)
    if os.environ.get("DEPLOYMENT_REPORT"):
        Path(os.environ["DEPLOYMENT_REPORT"]).write_text(json.dumps(report, indent=2))  # noqa: ASYNC240
    assert report["kills"].get("app process (SIGKILL)", 0) >= 1
    assert report["kills"].get("transfer worker (SIGKILL)", 0) >= 1
    if settings.s3_endpoint is None:
        assert report["kills"].get("S3 server (SIGKILL)", 0) == 1
    assert report["operations"] > 0
    assert report["violations"] == 0, json.dumps(report, indent=2)
