"""Throughput of `curate download` vs bare `img2dataset.download`, side by side on the same offline pool.

    .venv/bin/python -m perf.bench_download [--pool work/bench_pool] [--processes 2] [--threads 32]
                                            [--shard-size 1000] [--image-size 256] [--repeats 2]

The pool is `curate pool build-offline` at full size (about 15k rows of real openclipart / Tux Paint /
Twemoji images with seeded web noise), built on first use and served by `curate pool serve` in its own
process so the server does not share a GIL with either downloader. Each run is a fresh subprocess
(cold start included: Ray start-up counts against curate), runs alternate A/B/B/A to cancel drift on a
shared machine, and peak RSS is the largest sum of RSS over the run's whole process tree (Ray's raylet
and workers, or img2dataset's process pool), sampled every 0.2 s.

Both sides use the same processes, threads, shard size, image size, resize mode (border), timeout,
sha256 hashing and no EXIF. curate additionally converts each shard to the contract layout, records
rejections, caps bytes/pixels/redirects and verifies the whole pool at the end: that is the overhead
being measured. Goal (issue 3): curate samples/s >= 0.9 x img2dataset samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def tree_rss(root: int) -> int:
    """Sum of VmRSS (bytes) over `root` and all its descendants."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            text = Path(f"/proc/{d}/status").read_text()
        except OSError:
            continue
        pid = int(d)
        for line in text.splitlines():
            if line.startswith("PPid:"):
                parents[pid] = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss[pid] = int(line.split()[1]) * 1024
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parents.items() if pp in tree and p not in tree}
        tree |= new
        grew = bool(new)
    return sum(rss.get(p, 0) for p in tree)


def timed_run(cmd: list[str], env: dict) -> dict:
    peak = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(proc.pid))
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    return {"seconds": seconds, "peak_rss_bytes": peak, "log_tail": out[-600:]}


def child_img2dataset(a) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    download(url_list=str(a.urls), input_format="parquet", url_col="url", caption_col="text",
             output_format="webdataset", output_folder=str(a.out), processes_count=a.processes,
             thread_count=a.threads, number_sample_per_shard=a.shard_size, image_size=a.image_size,
             resize_mode="border", timeout=a.timeout, retries=0, compute_hash="sha256", extract_exif=False,
             distributor="multiprocessing", enable_wandb=False)


def count_img2dataset(out: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.concat_tables([pq.read_table(p, columns=["status"]) for p in sorted(out.glob("*.parquet"))])
    from collections import Counter

    return dict(Counter(t["status"].to_pylist()))


def free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=Path, default=REPO / "work" / "bench_pool")
    ap.add_argument("--port", type=int, default=18642, help="port the pool is built for and served on")
    ap.add_argument("--work", type=Path, default=REPO / "work" / "bench_download")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (order alternates)")
    ap.add_argument("--distributor", default="ray", choices=["ray", "multiprocessing"])
    ap.add_argument("--quick", action="store_true", help="perf.run_all's size: 1 pair of runs, multiprocessing")
    ap.add_argument("--json", help="write the result (perf/result.py's shape) to this file")
    ap.add_argument("--child", choices=["img2dataset"], help=argparse.SUPPRESS)
    ap.add_argument("--urls", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.repeats, a.distributor = 1, "multiprocessing"
    if a.child == "img2dataset":
        return child_img2dataset(a)

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    base_url = f"http://127.0.0.1:{a.port}"
    if not (a.pool / "urls.parquet").exists():
        print(f"building the offline pool into {a.pool} (once) ...", flush=True)
        subprocess.run([PY, "-m", "curate.cli", "pool", "build-offline", "--out", str(a.pool), "--base-url", base_url],
                       env=env, check=True)
    if not free(a.port):
        raise SystemExit(f"port {a.port} is busy; pass --port (the pool is rebuilt for a new port)")
    server = subprocess.Popen([PY, "-m", "curate.cli", "pool", "serve", str(a.pool), "--port", str(a.port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base_url + "/", timeout=1)
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.1)
        import pyarrow.parquet as pq

        urls = a.pool / "urls.parquet"
        built_for = json.loads((a.pool / "pool_build.json").read_text())["base_url"].rstrip("/")
        if built_for != base_url:  # a pool built for another port: same rows, URLs pointed at our server
            import pyarrow.compute as pc

            t = pq.read_table(urls)
            t = t.set_column(t.schema.get_field_index("url"), "url",
                             pc.replace_substring(t["url"], built_for + "/", base_url + "/"))
            a.work.mkdir(parents=True, exist_ok=True)
            urls = a.work / "urls.parquet"
            pq.write_table(t, urls)
        rows = pq.read_metadata(urls).num_rows
        common = dict(processes=a.processes, threads=a.threads, shard_size=a.shard_size, image_size=a.image_size)
        print(f"pool: {rows} rows; settings: {common}, distributor={a.distributor}", flush=True)
        results: dict[str, list[dict]] = {"curate": [], "img2dataset": []}
        order = []
        for i in range(a.repeats):
            order += ["img2dataset", "curate"] if i % 2 == 0 else ["curate", "img2dataset"]
        for n, which in enumerate(order):
            out = a.work / f"{which}-{n}"
            shutil.rmtree(out, ignore_errors=True)
            if which == "curate":
                cmd = [PY, "-m", "curate.cli", "download", "--urls", str(urls), "--out", str(out),
                       "--processes", str(a.processes), "--threads", str(a.threads), "--shard-size", str(a.shard_size),
                       "--image-size", str(a.image_size), "--timeout", str(a.timeout), "--distributor", a.distributor,
                       "--allow-loopback"]
            else:
                cmd = [PY, "-m", "perf.bench_download", "--child", "img2dataset", "--urls", str(urls), "--out", str(out),
                       "--processes", str(a.processes), "--threads", str(a.threads), "--shard-size", str(a.shard_size),
                       "--image-size", str(a.image_size), "--timeout", str(a.timeout)]
            r = timed_run(cmd, env)
            if which == "curate":
                r["counts"] = json.loads((out / "pool.json").read_text())["counts"]
            else:
                r["counts"] = count_img2dataset(out)
            r["samples_per_s"] = rows / r["seconds"]
            results[which].append(r)
            print(f"  {which:<12} {r['seconds']:7.1f} s  {r['samples_per_s']:7.1f} rows/s  "
                  f"peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB  success {r['counts'].get('success', 0)}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        med = {k: statistics.median(x["samples_per_s"] for x in v) for k, v in results.items()}
        rss = {k: max(x["peak_rss_bytes"] for x in v) for k, v in results.items()}
        ratio = med["curate"] / med["img2dataset"]
        summary = {"rows": rows, "settings": common, "distributor": a.distributor,
                   "median_rows_per_s": {k: round(v, 1) for k, v in med.items()}, "ratio": round(ratio, 3),
                   "peak_rss_mib": {k: round(v / 2**20) for k, v in rss.items()},
                   "success": {k: [x["counts"].get("success", 0) for x in v] for k, v in results.items()},
                   "runs": {k: [round(x["seconds"], 1) for x in v] for k, v in results.items()}}
        print(json.dumps(summary, indent=2))
        print(f"ratio curate / img2dataset = {ratio:.3f} (goal >= 0.9)")
        from perf.result import bench_result, write

        write(a.json, bench_result("download", med["curate"], med["img2dataset"], "rows/s", baseline_name="img2dataset",
                                   goal=0.9, details=summary))
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
