"""Offline pool build cost: serial cold build (baseline) vs 2-process cold build vs warm (cached) build.

    .venv/bin/python -m perf.offline_build [--size small|full] [--workers 2]

All three builds run side by side in this script into temporary folders with private render caches,
so the ratios compare like with like on whatever load the machine has. SVG rendering (cairosvg) is
the cost driver; the render cache makes a rebuild (same or another output folder) a file copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

from curate.pool.offline.build import OfflinePoolConfig, build_offline


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "pool_build.json"}


def run(size: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="curate-perf-offline-") as d:
        d = Path(d)
        res = {}
        for name, w, cache in (("cold_serial", 1, "cache_serial"), ("cold_parallel", workers, "cache"),
                               ("warm_parallel", workers, "cache")):
            t0 = time.perf_counter()
            s = build_offline(OfflinePoolConfig(out=d / name, size=size, seed=0, workers=w, cache_dir=d / cache,
                                                progress=False))
            res[name] = {"seconds": round(time.perf_counter() - t0, 1), "rows": s["rows"],
                         "render": s["render"], "timings": s["timings"], "skipped": s["skipped_images"], "digest": _digest(d / name)}
        first = res["cold_serial"]["digest"]
        for name, r in res.items():
            diff = sorted(k for k in first.keys() | r["digest"].keys() if first.get(k) != r["digest"].get(k))
            skipped = {k: [s["source_id"] for s in v["skipped"]] for k, v in res.items()}
            assert not diff, f"{name} differs from cold_serial in {len(diff)} files, e.g. {diff[:5]}; skipped: {skipped}"
        base = res["cold_serial"]["seconds"]
        return {
            "size": size,
            "rows": res["cold_serial"]["rows"],
            "seconds": {k: v["seconds"] for k, v in res.items()},
            "speedup_parallel_vs_serial": round(base / res["cold_parallel"]["seconds"], 2),
            "speedup_warm_vs_serial": round(base / res["warm_parallel"]["seconds"], 2),
            "render_jobs": res["cold_serial"]["render"]["render_jobs"],
            "render_cpu_seconds": res["cold_serial"]["render"]["render_cpu_seconds"],
            "identical_outputs": True,
            "timings": {k: v["timings"] for k, v in res.items()},
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=["small", "full"])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps(run(args.size, args.workers), indent=2))


if __name__ == "__main__":
    main()
