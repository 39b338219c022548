"""Memory while streaming large files in and out, each measurement in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _harness import Progress

WORKER = Path(__file__).resolve().parent / "memory_worker.py"


def run(
    uri: str,
    db: str,
    sizes_mib: list[int],
    contenders: list[str],
    budget_s: float,
    progress: Progress,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    for size in sizes_mib:
        for who in contenders:
            left = budget_s - (time.monotonic() - started)
            if left <= 0:
                rows.append(
                    {
                        "size_mib": size,
                        "contender": who,
                        "skipped": f"memory time budget of {budget_s:.0f} s used up",
                    }
                )
                progress(f"  memory {size} MiB {who}: skipped, time budget used up")
                continue
            t0 = time.monotonic()
            try:
                proc = subprocess.run(
                    [sys.executable, str(WORKER), uri, db, str(size), who],
                    capture_output=True,
                    text=True,
                    timeout=left,
                )
            except subprocess.TimeoutExpired:
                rows.append(
                    {
                        "size_mib": size,
                        "contender": who,
                        "skipped": f"did not finish within the remaining {left:.0f} s",
                    }
                )
                progress(f"  memory {size} MiB {who}: timed out")
                continue
            if proc.returncode != 0:
                rows.append(
                    {
                        "size_mib": size,
                        "contender": who,
                        "error": proc.stderr.strip().splitlines()[-1:],
                    }
                )
                progress(f"  memory {size} MiB {who}: failed: {proc.stderr[-500:]}")
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall_s"] = time.monotonic() - t0
            rows.append(row)
            progress(
                f"  memory {size} MiB {who}: in {row['in']['rss_growth_mib']:.1f} MiB RSS, "
                f"out {row['out']['rss_growth_mib']:.1f} MiB RSS ({row['wall_s']:.0f} s)"
            )
    return rows
