"""The recipes of docs/scaling.rst that the test servers can run.

The deployment shape itself (processes, handlers, sweeps) is run by
tests/test_deployment.py and its app, which the page includes; the replica-set
behaviour by tests/test_replica_set.py; the command lines by test_cli's check of
every documented command. Here: the bucket lifecycle rule, as the page shows it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from asyncassets._s3server import _client

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_lifecycle_rule_for_aborted_multipart_uploads_is_accepted_as_written(
    asyncassets_s3_bucket: Any,
) -> None:
    rule = json.loads((DOCS / "s3-lifecycle.json").read_text())
    b = asyncassets_s3_bucket
    client = _client(b.endpoint_url, b.access_key_id, b.secret_access_key, b.region)
    try:
        client.put_bucket_lifecycle_configuration(
            Bucket=b.name, LifecycleConfiguration=rule
        )
        (stored,) = client.get_bucket_lifecycle_configuration(Bucket=b.name)["Rules"]
    finally:
        client.close()
    assert stored["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert stored["Status"] == "Enabled"
    assert "Expiration" not in stored  # the catalogue decides what is live


def test_the_page_shows_the_deployment_tests_app_factory() -> None:
    page = (DOCS / "scaling.rst").read_text()
    assert ".. literalinclude:: ../tests/_deployment_app.py" in page
    assert "def create_app" in (DOCS.parent / "tests" / "_deployment_app.py").read_text()
