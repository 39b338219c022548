"""The embedded default's footprint, as a newcomer timing the command line sees it.

    python benchmarks/embedded_footprint.py    # 5 puts of 200 MiB; check --verify of 1 GiB
    python benchmarks/embedded_footprint.py --put-mib 50 --puts 2 --verify-mib 256

Runs the ``asyncassets`` command itself (``python -m asyncassets``) with no
``--uri``, so each command starts the embedded default server on a fresh data
directory (``ASYNCASSETS_DATA_DIR``, a temporary directory unless
``--data-dir`` names one) exactly as a user's command does, and stops it when
it ends. While each command runs, the server (the command's child process) is
sampled every 20 ms: its peak resident set is the kernel's high-water mark
(``VmHWM`` in ``/proc/<pid>/status``). The command's own peak is reported too.

Steps: ``--puts`` times ``put`` of a ``--put-mib`` file of random bytes (the
data directory's size on disk after each), ``rm`` of those files, then ``put``
of a ``--verify-mib`` file and ``check --verify``, which reads every byte of it
back. The size on disk
counts allocated blocks (``du``), not apparent sizes. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import MiB, fmt_table, loadavg, log, machine

REPO = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _hwm(pid: int) -> int | None:
    """The peak resident set of ``pid`` so far, in bytes (``VmHWM``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (as ``du`` counts them)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


def run_command(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``python -m asyncassets *args``; its time, exit status, and peak memory
    of the command and of the server it started."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncassets", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    peaks: dict[str, int] = {"server": 0, "command": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            own = _hwm(proc.pid)
            if own:
                peaks["command"] = max(peaks["command"], own)
            for child in _children(proc.pid):
                value = _hwm(child)
                if value:
                    peaks["server"] = max(peaks["server"], value)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode not in (0, 3):
        raise SystemExit(
            f"asyncassets {' '.join(args)} exited with {proc.returncode}:\n{err.decode()}"
        )
    return {
        "command": " ".join(args),
        "seconds": time.monotonic() - started,
        "exit": proc.returncode,
        "server_peak_rss": peaks["server"],
        "command_peak_rss": peaks["command"],
        "stdout": out.decode(errors="replace")[-400:],
    }


def _random_file(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--put-mib", type=int, default=200, help="size of each put (200)")
    parser.add_argument("--puts", type=int, default=5, help="how many puts (5)")
    parser.add_argument("--verify-mib", type=int, default=1024,
                        help="size of the file check --verify reads (1024)")
    parser.add_argument("--data-dir", help="the data directory (default: a fresh temporary one)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="aa-footprint-"))
    data_dir = Path(args.data_dir) if args.data_dir else work / "db"
    env = {k: v for k, v in os.environ.items() if k not in ("ASYNCASSETS_URI", "MONGODB_URI")}
    env["ASYNCASSETS_DATA_DIR"] = str(data_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    results: dict[str, Any] = {"machine": machine(), "load_before": loadavg(), "steps": []}
    rows = []
    try:
        small = _random_file(work / "put.bin", args.put_mib)
        for i in range(args.puts):
            step = run_command(["put", str(small)], env)
            step["disk_after"] = _disk_usage(data_dir)
            results["steps"].append(step)
            rows.append([f"put {args.put_mib} MiB (#{i + 1})", f"{step['seconds']:.1f}",
                         f"{step['server_peak_rss'] / MiB:.0f}",
                         f"{step['command_peak_rss'] / MiB:.0f}",
                         f"{step['disk_after'] / MiB:.0f}"])
            log(f"{rows[-1]}")
        small.unlink()
        ids = [s["stdout"].strip().splitlines()[-1] for s in results["steps"]]
        step = run_command(["rm", *ids], env)
        step["disk_after"] = _disk_usage(data_dir)
        results["steps"].append(step)
        rows.append([f"rm the {args.puts} files", f"{step['seconds']:.1f}",
                     f"{step['server_peak_rss'] / MiB:.0f}",
                     f"{step['command_peak_rss'] / MiB:.0f}",
                     f"{step['disk_after'] / MiB:.0f}"])
        log(f"{rows[-1]}")
        big = _random_file(work / "verify.bin", args.verify_mib)
        for command in (["put", str(big)], ["check", "--verify"]):
            step = run_command(command, env)
            step["disk_after"] = _disk_usage(data_dir)
            results["steps"].append(step)
            label = (f"put {args.verify_mib} MiB" if command[0] == "put"
                     else f"check --verify of {args.verify_mib} MiB")
            rows.append([label, f"{step['seconds']:.1f}",
                         f"{step['server_peak_rss'] / MiB:.0f}",
                         f"{step['command_peak_rss'] / MiB:.0f}",
                         f"{step['disk_after'] / MiB:.0f}"])
            log(f"{rows[-1]}")
        big.unlink()
    finally:
        results["load_after"] = loadavg()
        if not args.data_dir:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print(fmt_table(["step", "s", "server peak RSS MiB", "command peak RSS MiB",
                     "data dir on disk MiB"], rows))
    print(f"load average before: {results['load_before']}; after: {results['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
