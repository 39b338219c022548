"""asyncassets benchmarks: one command, a fresh server per section, a table and a JSON file.

    python benchmarks/run.py                 # documents, throughput, concurrency, ranged,
                                             # listing, peers; on-disk server, 2G cache
    python benchmarks/run.py --quick         # a fast smoke run (smaller, fewer rounds, no peers)
    python benchmarks/run.py --memory        # also memory at 128 MiB, 512 MiB and 1 GiB
    python benchmarks/run.py --storage memory --cache-size 8G   # an in-memory server

Contenders alternate round by round against the same server; the results are medians
and ratios against raw PyMongo (``AsyncMongoClient``, ``AsyncGridFSBucket``) and, for
documents, sync mongoengine, because absolute figures on a shared machine are noise.
See docs/performance.rst.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # measure this tree's asyncassets
sys.path.insert(0, str(HERE))

import _harness  # noqa: E402
from _harness import CommandCounter, MiB, fmt_table, log  # noqa: E402

import asyncassets  # noqa: E402

SECTIONS = ("documents", "throughput", "concurrency", "ranged", "listing", "memory", "peers")
DB = "asyncassets_bench"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and few rounds: a smoke run of every section but peers",
    )
    p.add_argument(
        "--doc-sizes",
        type=_ints,
        default=None,
        help="documents loaded per read case (1000,10000; 200,2000 with --quick)",
    )
    p.add_argument(
        "--doc-calls", type=int, default=None, help="first()/get() calls per round (500)"
    )
    p.add_argument(
        "--doc-writes", type=int, default=None, help="documents saved per write case (500)"
    )
    p.add_argument("--doc-bulk", type=int, default=None, help="documents per bulk insert (10000)")
    p.add_argument(
        "--doc-cases",
        type=lambda text: [part.strip() for part in text.split("|") if part.strip()],
        default=None,
        help="run only the document cases whose label contains one of these "
        "|-separated texts (labels have commas), e.g. 'FileField|content type'; "
        "no profile then",
    )
    p.add_argument(
        "--no-profile",
        dest="doc_profile",
        action="store_false",
        help="skip the cProfile of the 10,000-document loads",
    )
    p.add_argument("--size-mib", type=int, default=None, help="throughput file size (64)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per measurement (7)")
    p.add_argument(
        "--min-read-mib",
        type=int,
        default=256,
        help="throughput: each read sample reads the file until it moved this much (256)",
    )
    p.add_argument("--concurrency", type=_ints, default=None, help="task counts (100,500)")
    p.add_argument(
        "--concurrency-rounds",
        type=int,
        default=None,
        help="rounds per task count (2; 1 with --quick)",
    )
    p.add_argument("--ranged-size-mib", type=int, default=None, help="ranged-read file (1024)")
    p.add_argument("--listing", type=int, default=None, help="documents to list (1000)")
    p.add_argument("--memory", action="store_true", help="run the memory section")
    p.add_argument(
        "--memory-sizes",
        type=_ints,
        default=None,
        help="MiB streamed in and out per memory run (128,512,1024)",
    )
    p.add_argument(
        "--no-memory-raw",
        dest="memory_raw",
        action="store_false",
        help="skip raw PyMongo in the memory section (measured by default)",
    )
    p.add_argument(
        "--memory-budget",
        type=float,
        default=900.0,
        help="seconds the memory section may take; sizes left are skipped",
    )
    p.add_argument(
        "--peers",
        dest="peers",
        action="store_true",
        default=None,
        help="run the peers section (default unless --quick)",
    )
    p.add_argument("--no-peers", dest="peers", action="store_false")
    p.add_argument(
        "--peer-meta",
        type=int,
        default=1000,
        help="documents of the peers' metadata listing (1000; 0 skips it)",
    )
    p.add_argument(
        "--peer-budget", type=float, default=600.0, help="seconds for peers, installs included"
    )
    p.add_argument(
        "--peer-venvs",
        default=None,
        help="reuse peer virtualenvs in this directory instead of a temporary one",
    )
    p.add_argument(
        "--only", default=None, help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}"
    )
    p.add_argument(
        "--storage",
        choices=("disk", "memory"),
        default="disk",
        help="the server keeps its data on disk (default; SecantusDB with --sync-on-commit) "
        "or in memory",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="where on-disk servers keep their data, one fresh directory per section "
        "(default: a temporary directory, removed afterwards)",
    )
    p.add_argument(
        "--cache-size",
        default=None,
        help="SecantusDB's WiredTiger cache (default 2G on disk, 8G in memory, where it "
        "must hold all data; '' for the server's own default of 1G)",
    )
    p.add_argument(
        "--no-pin-server-malloc",
        dest="pin_server_malloc",
        action="store_false",
        help="start the server with glibc's default malloc settings (pinned by default: "
        "left dynamic, raw PyMongo's 16 MiB GridFS batches page-fault in some server "
        "processes and not in others; see _harness.SERVER_MALLOC_ENV)",
    )
    p.add_argument("--json", default=None, help="where to write the JSON (benchmarks/results/)")
    a = p.parse_args(argv)
    q = a.quick
    a.size_mib = a.size_mib or (16 if q else 64)
    a.rounds = a.rounds or (3 if q else 7)
    a.concurrency = a.concurrency or ([100] if q else [100, 500])
    a.concurrency_rounds = a.concurrency_rounds or (1 if q else 2)
    a.ranged_size_mib = a.ranged_size_mib or (64 if q else 1024)
    a.listing = a.listing or (200 if q else 1000)
    a.memory_sizes = a.memory_sizes or ([32, 128] if q else [128, 512, 1024])
    a.doc_sizes = a.doc_sizes or ([200, 2000] if q else [1000, 10000])
    a.doc_calls = a.doc_calls or (100 if q else 500)
    a.doc_writes = a.doc_writes or (200 if q else 500)
    a.doc_bulk = a.doc_bulk or (2000 if q else 10000)
    if a.cache_size is None:
        a.cache_size = "2G" if a.storage == "disk" else "8G"
    if a.peers is None:
        a.peers = not q
    if a.only:
        a.sections = [s.strip() for s in a.only.split(",")]
        bad = [s for s in a.sections if s not in SECTIONS]
        if bad:
            p.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    else:
        a.sections = [
            s for s in SECTIONS if (s != "memory" or a.memory) and (s != "peers" or a.peers)
        ]
    return a


async def bench_section(
    args: argparse.Namespace, section: str, uri: str, out: dict[str, Any]
) -> None:
    counter = CommandCounter()
    asyncassets.connect(host=uri, db=DB, alias="default", event_listeners=[counter])
    try:
        if section == "documents":
            import documents

            log(
                f"documents: {args.doc_sizes} documents, {args.rounds} rounds, "
                f"3 contenders in their own processes"
            )
            out["documents"] = await asyncio.to_thread(
                documents.run,
                uri,
                DB + "_documents",
                args.doc_sizes,
                args.rounds,
                args.doc_calls,
                args.doc_writes,
                args.doc_bulk,
                args.doc_profile,
                log,
                args.doc_cases,
            )
        elif section == "throughput":
            import throughput

            log(f"throughput: {args.size_mib} MiB x {args.rounds} rounds")
            out["throughput"] = await throughput.run(
                args.size_mib * MiB, args.rounds, log, args.min_read_mib * MiB
            )
        elif section == "concurrency":
            import concurrency

            log(f"concurrency: {args.concurrency} tasks x {args.concurrency_rounds} rounds")
            out["concurrency"] = await concurrency.run(
                args.concurrency, args.concurrency_rounds, log
            )
        elif section == "ranged":
            import ranged

            log(f"ranged: 1 KiB from the middle of {args.ranged_size_mib} MiB")
            out["ranged"] = await ranged.run(args.ranged_size_mib * MiB, args.rounds, counter, log)
        elif section == "listing":
            import listing

            log(f"listing: {args.listing} documents")
            out["listing"] = await listing.run(args.listing, args.rounds, counter, log)
        elif section == "memory":
            import memory

            who = ["asyncassets", "raw"] if args.memory_raw else ["asyncassets"]
            log(f"memory: {args.memory_sizes} MiB, {who}, budget {args.memory_budget:.0f} s")
            out["memory"] = await asyncio.to_thread(
                memory.run, uri, DB + "_memory", args.memory_sizes, who, args.memory_budget, log
            )
        elif section == "peers":
            import peers

            log(f"peers: {args.size_mib} MiB, budget {args.peer_budget:.0f} s")
            out["peers"] = await peers.run(
                uri,
                DB + "_peers",
                args.size_mib,
                args.rounds,
                args.peer_budget,
                args.peer_venvs,
                log,
                args.peer_meta,
            )
    finally:
        await asyncassets.disconnect()


def report(out: dict[str, Any]) -> str:
    parts = []
    if "documents" in out:
        rows = []
        for r in out["documents"]["rows"]:
            med = r["median_s"]
            lo_raw, hi_raw = r["vs_raw_range"] or [float("nan")] * 2
            lo_me, hi_me = r["vs_mongoengine_range"] or [float("nan")] * 2
            cpu_us = r.get("cpu_us_per_op") or dict.fromkeys(med, float("nan"))
            rows.append(
                [
                    r["case"],
                    med["raw"] * 1000,
                    med["asyncassets"] * 1000,
                    med["mongoengine"] * 1000,
                    r["vs_raw"],
                    f"{lo_raw:.2f}-{hi_raw:.2f}",
                    r["vs_mongoengine"],
                    f"{lo_me:.2f}-{hi_me:.2f}",
                    "/".join(f"{cpu_us[n]:.0f}" for n in ("raw", "asyncassets", "mongoengine")),
                ]
            )
        text = (
            "Documents (medians, ms; vs X = X time / asyncassets time, above 1: asyncassets "
            "faster; range = per-round ratios)\n"
            + fmt_table(
                [
                    "case",
                    "raw ms",
                    "aa ms",
                    "mongoengine ms",
                    "vs raw",
                    "range",
                    "vs mongoengine",
                    "range",
                    "client CPU us/op raw/aa/me",
                ],
                rows,
            )
        )
        for case, errors in out["documents"]["errors"].items():
            text += f"\nerrors in {case}: {errors[:3]}"
        parts.append(text)
    if "throughput" in out:
        rows = [
            [
                r["op"],
                f"{r['size_bytes'] // MiB} MiB",
                r["raw_MBps"],
                r["asyncassets_MBps"],
                r["ratio"],
                f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}",
            ]
            for r in out["throughput"]
        ]
        parts.append(
            "Throughput (MB/s, medians; ratio = raw PyMongo GridFS time / asyncassets "
            "time; rounds = lowest-highest ratio of one round)\n"
            + fmt_table(["op", "size", "raw MB/s", "asyncassets MB/s", "ratio", "rounds"], rows)
        )
    if "concurrency" in out:
        rows = []
        for r in out["concurrency"]:
            a, w = r["asyncassets"], r["raw"]
            rows.append(
                [
                    r["tasks"],
                    r["op"],
                    w["MBps"],
                    a["MBps"],
                    r["ratio"],
                    w["p50_ms"],
                    a["p50_ms"],
                    w["p99_ms"],
                    a["p99_ms"],
                    f"{w['errors']}/{a['errors']}",
                    f"{w['rss_growth_mib']:.0f}/{a['rss_growth_mib']:.0f}",
                    f"{w['rss_growth_mib'] / r['tasks']:.2f}/"
                    f"{a['rss_growth_mib'] / r['tasks']:.2f}",
                ]
            )
        parts.append(
            "Concurrency: N tasks x 1 MiB on one client (raw / asyncassets)\n"
            + fmt_table(
                [
                    "tasks",
                    "op",
                    "raw MB/s",
                    "aa MB/s",
                    "ratio",
                    "raw p50 ms",
                    "aa p50 ms",
                    "raw p99 ms",
                    "aa p99 ms",
                    "errors raw/aa",
                    "client RSS growth MiB raw/aa",
                    "MiB per task in flight raw/aa",
                ],
                rows,
            )
        )
    if "ranged" in out:
        g = out["ranged"]
        rows = [
            [r["case"], r["chunks_read"], sum(r["commands"].values()), r["median_ms"]]
            for r in g["rows"]
        ]
        parts.append(
            f"Ranged read: 1 KiB at offset {g['offset']} of a {g['file_size'] // MiB} MiB "
            f"file ({g['chunk_size'] // 1024} KiB chunks)\n"
            + fmt_table(["case", "chunks read", "commands", "median ms"], rows)
        )
    if "listing" in out:
        g = out["listing"]
        rows = [
            [
                r["case"],
                r["documents"],
                r["files_queries"],
                r["files_getmores"],
                r["commands_total"],
                r["median_ms"],
            ]
            for r in g["rows"]
        ]
        parts.append(
            "Listing with file metadata\n"
            + fmt_table(
                ["case", "docs", "files find", "files getMore", "all commands", "median ms"], rows
            )
            + f"\nentries-with-documents speed-up: {g['speedup']:.1f}x"
        )
    if "memory" in out:
        rows = []
        for r in out["memory"]:
            if "in" not in r:
                rows.append(
                    [
                        r["size_mib"],
                        r["contender"],
                        r.get("skipped") or r.get("error"),
                        "",
                        "",
                        "",
                        "",
                        "",
                    ]
                )
                continue
            rows.append(
                [
                    r["size_mib"],
                    r["contender"],
                    r["in"]["rss_growth_mib"],
                    r["in"]["tracemalloc_peak_mib"],
                    r["out"]["rss_growth_mib"],
                    r["out"]["tracemalloc_peak_mib"],
                    r["in"]["MBps"],
                    r["out"]["MBps"],
                ]
            )
        parts.append(
            "Memory while streaming (MiB; RSS growth sampled every 5 ms)\n"
            + fmt_table(
                [
                    "file MiB",
                    "who",
                    "in: RSS",
                    "in: tracemalloc",
                    "out: RSS",
                    "out: tracemalloc",
                    "in MB/s",
                    "out MB/s",
                ],
                rows,
            )
        )
    if "peers" in out:
        g = out["peers"]
        rows = [
            [
                r["contender"],
                r["rounds"],
                r["put_MBps"],
                r["read_MBps"],
                r["asyncassets_speedup_put"],
                r["asyncassets_speedup_read"],
            ]
            for r in g["rows"]
        ]
        text = f"Peers, {g['size_mib']} MiB put / read (speed-up = peer time / asyncassets time)\n"
        text += fmt_table(
            ["contender", "rounds", "put MB/s", "read MB/s", "aa speed-up put", "aa speed-up read"],
            rows,
        )
        for name, why in g["skipped"].items():
            text += f"\nskipped {name}: {why}"
        if "meta" in g:
            m = g["meta"]
            text += (
                f"\n\nPeers, load {m['n']:,} documents and read each file's content type "
                "(speed-up = peer time / asyncassets time)\n"
            )
            text += fmt_table(
                ["contender", "rounds", "median ms", "aa speed-up"],
                [
                    [r["contender"], r["rounds"], r["median_s"] * 1000, r["asyncassets_speedup"]]
                    for r in m["rows"]
                ],
            )
        parts.append(text)
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = "python benchmarks/run.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    out: dict[str, Any] = {
        "command": command.strip(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _harness.machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }
    log(f"machine: {out['machine']}")
    t0 = time.monotonic()
    path = (
        Path(args.json)
        if args.json
        else (HERE / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    out["machine"]["server_storage"] = args.storage
    out["machine"]["server_cache"] = args.cache_size
    out["machine"]["server_malloc_env"] = (
        _harness.SERVER_MALLOC_ENV if args.pin_server_malloc else "glibc defaults"
    )
    out["loadavg_before"] = _harness.loadavg()
    for section in args.sections:
        # A fresh server per section (and a fresh data directory on disk): a server's
        # memory and files only grow with the data written and deleted, and one
        # section must not slow the next.
        with contextlib.ExitStack() as stack:
            data_dir = None
            if args.storage == "disk":
                data_dir = tempfile.mkdtemp(prefix=f"aa-bench-{section}-", dir=args.data_dir)
                stack.callback(shutil.rmtree, data_dir, True)
            server = stack.enter_context(
                _harness.embedded_server(args.cache_size, data_dir, args.pin_server_malloc)
            )
            out["machine"]["server"] = server.kind
            where = f"on disk in {data_dir}" if data_dir else "in memory"
            log(f"[{section}] {server.kind} {where}, cache {args.cache_size}, {server.uri}")
            s0 = time.monotonic()
            asyncio.run(bench_section(args, section, server.uri, out))
            # The server's own CPU time and page faults over the section.
            out.setdefault("server_process", {})[section] = _harness.proc_stat(server.pid)
            out.setdefault("section_seconds", {})[section] = time.monotonic() - s0
        out["seconds"] = time.monotonic() - t0
        path.write_text(json.dumps(out, indent=2, default=str))  # partial results survive
    out["loadavg_after"] = _harness.loadavg()
    table = report(out)
    print(table)
    out["table"] = table
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nload average before: {out['loadavg_before']}, after: {out['loadavg_after']}")
    print(f"\nJSON: {path}  ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
