"""`curate download` of 100,000 rows against a flaky web: rows/s, statuses by fault, recovered by retry.

    .venv/bin/python -m perf.bench_flaky_web [--rows 100000] [--fault-share 0.2] [--timeout 2]
                                             [--processes 2] [--threads 32] [--json FILE]

Every row is a real request over loopback HTTP to `curate pool serve`, run in its own process (so it does
not share a GIL with the downloader) with `--request-log`. Four small JPEGs sit behind 100,000 distinct URLs
(a query string per row, so the server counts each row's requests on its own). A seeded share of the rows
(--fault-share, split evenly over the faults of curate.pool.serve.FAULTS) goes through
`/_fault/<kind>/<seed>/<n>/...` with a burst length n of 1 or 2, the rest are plain. The bench then runs
`--retry-failed` until no transient row is left (at most --max-retries runs) and reports:

- the first run's rows/s (every row requested, faults included) and each retry run's rows and seconds;
- per fault kind: statuses after the first run, failure classes (transient / permanent), final statuses;
- how many transient rows the retries recovered, and how many requests a permanent row got after the
  first run (from the server's request log; the goal is 0);
- `uptime` before and after (the machine may be shared; the load average says how much).

Each row's expected outcome is FAULTS[kind]; the bench counts the rows that differ (the goal is 0).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_rows(n_rows: int, share: float, seed: int, base: str) -> list[dict]:
    from curate.pool.serve import FAULTS, fault_path

    rng = random.Random(seed)
    kinds = [k for k in FAULTS if k != "none"]
    rows = []
    for i in range(n_rows):
        kind = kinds[rng.randrange(len(kinds))] if rng.random() < share else "none"
        burst = rng.randint(1, 2)
        img = f"i{i % 4}.jpg"
        path = fault_path(kind, rng.randrange(1 << 30), burst, img) if kind != "none" else f"/{img}"
        rows.append({"url": f"{base}{path}?r={i}", "text": f"picture {i} {kind}", "kind": kind, "n": burst})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--fault-share", type=float, default=0.2, help="share of rows behind a fault route")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=2.0, help="the downloader's whole-request timeout (s)")
    ap.add_argument("--stall-seconds", type=float, default=3.0, help="server: a stall lasts this long (> timeout)")
    ap.add_argument("--trickle-seconds", type=float, default=3.0, help="server: a trickle lasts this long (> timeout)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--max-retries", type=int, default=3, help="--retry-failed runs at most")
    ap.add_argument("--work", type=Path, default=REPO / "work" / "bench_flaky_web")
    ap.add_argument("--json", help="write the result to this file")
    a = ap.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from curate.core.atomic import write_json
    from curate.pool.download import DownloadConfig, download, failure_class
    from curate.pool.serve import FAULTS

    load_before = uptime()
    shutil.rmtree(a.work, ignore_errors=True)
    www = a.work / "site" / "www"
    www.mkdir(parents=True)
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray((np.random.RandomState(i).rand(12, 12, 3) * 255).astype("uint8")).save(buf, "JPEG")
        (www / f"i{i}.jpg").write_bytes(buf.getvalue())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_file = a.work / "requests.jsonl"
    server = subprocess.Popen([PY, "-m", "curate.cli", "pool", "serve", str(a.work / "site"), "--port", str(port),
                               "--stall-seconds", str(a.stall_seconds), "--trickle-seconds", str(a.trickle_seconds),
                               "--request-log", str(log_file)],
                              env={**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = []
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/i0.jpg", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        rows = make_rows(a.rows, a.fault_share, a.seed, base)
        urls = a.work / "urls.parquet"
        pq.write_table(pa.table({"url": [r["url"] for r in rows], "text": [r["text"] for r in rows]}), urls)
        pool = a.work / "pool"

        def cfg(**kw) -> DownloadConfig:
            return DownloadConfig(urls=urls, out=pool, distributor="multiprocessing", processes=a.processes,
                                  threads=a.threads, timeout=a.timeout, retries=0, shard_size=a.shard_size,
                                  image_size=8, progress=False, echo=False, allow_loopback=True, **kw)

        def statuses() -> dict[str, tuple[str, str | None]]:
            t = pq.read_table(pool / "metadata", columns=["text", "status", "error_message"]).to_pylist()
            return {r["text"]: (r["status"], failure_class(r["status"], r["error_message"])) for r in t}

        t0 = time.time()
        download(cfg())
        runs.append({"run": "first", "rows": a.rows, "seconds": round(time.time() - t0, 1), "started": t0,
                     "finished": time.time()})
        first = statuses()
        for k in range(a.max_retries):
            transient = sum(1 for st, cls in statuses().values() if cls == "transient")
            if not transient:
                break
            t = time.time()
            download(cfg(retry_failed=True))
            runs.append({"run": f"retry {k + 1}", "rows": transient, "seconds": round(time.time() - t, 1),
                         "started": t, "finished": time.time()})
        final = statuses()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    load_after = uptime()

    requests = [json.loads(x) for x in log_file.read_text().splitlines()]
    first_end = runs[0]["finished"]
    by_kind: dict[str, dict] = defaultdict(lambda: {"rows": 0, "first": Counter(), "class": Counter(),
                                                    "final": Counter(), "recovered_by_retry": 0})
    mismatched = []
    for r in rows:
        d = by_kind[r["kind"]]
        st1, cls1 = first[r["text"]]
        st2, _ = final[r["text"]]
        d["rows"] += 1
        d["first"][st1] += 1
        d["class"][cls1 or "-"] += 1
        d["final"][st2] += 1
        d["recovered_by_retry"] += int(st1 != "success" and st2 == "success")
        f = FAULTS[r["kind"]]
        if (st1, cls1, st2) != (f.first, f.failure, f.final):
            mismatched.append({"text": r["text"], "kind": r["kind"], "first": st1, "class": cls1, "final": st2})
    permanent_paths = {r["url"][len(base):] for r in rows if FAULTS[r["kind"]].failure == "permanent"}
    late_permanent = sum(1 for q in requests if q["t"] > first_end and q["path"] in permanent_paths)
    first_run = runs[0]
    result = {
        "rows": a.rows, "fault_share": a.fault_share, "seed": a.seed, "timeout_s": a.timeout,
        "stall_s": a.stall_seconds, "trickle_s": a.trickle_seconds, "processes": a.processes, "threads": a.threads,
        "first_run_seconds": first_run["seconds"], "first_run_rows_per_s": round(a.rows / first_run["seconds"], 1),
        "retry_runs": [{k: v for k, v in x.items() if k in ("run", "rows", "seconds")} for x in runs[1:]],
        "statuses_after_first_run": dict(Counter(s for s, _ in first.values())),
        "statuses_final": dict(Counter(s for s, _ in final.values())),
        "by_fault": {k: {**v, "first": dict(v["first"]), "class": dict(v["class"]), "final": dict(v["final"])}
                     for k, v in sorted(by_kind.items())},
        "recovered_by_retry": sum(v["recovered_by_retry"] for v in by_kind.values()),
        "transient_left": sum(1 for _, cls in final.values() if cls == "transient"),
        "requests_total": len(requests), "requests_to_permanent_rows_after_first_run": late_permanent,
        "rows_not_as_expected": len(mismatched), "mismatch_examples": mismatched[:10],
        "uptime_before": load_before, "uptime_after": load_after,
    }
    print(json.dumps(result, indent=1))
    if a.json:
        write_json(a.json, result)


if __name__ == "__main__":
    main()
