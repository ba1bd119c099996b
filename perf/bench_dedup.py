"""Benchmark: `dedup` on 1,000,000 x 512 embeddings with 10,000 planted near-duplicate pairs.

    .venv/bin/python -m perf.bench_dedup                      # full size (~10 min on 2 busy cores)
    .venv/bin/python -m perf.bench_dedup --n 100000 --pairs 1000 --sample 20000   # quick look
    .venv/bin/python -m perf.bench_dedup --concurrent   # both sides at once: compare CPU seconds
    .venv/bin/python -m perf.bench_dedup --quality POOL --truth BUILD/truth.parquet  # offline pool quality
    nice -n 5 .venv/bin/python -m perf.bench_dedup --memory [--json r.json]   # the filter process's memory alone

--memory (issue 20, item 4): the planted 1,000,000 x 512 vectors are written first, by a separate process, as a
DataComp-format pool (float16 `b32_img` in uncompressed npz members, i.e. .npy arrays at an offset; 4 parquet +
npz pairs; `curate pool import-datacomp`), then a fresh child runs `curate filter --recipe R --pool POOL` in-process
with R = one step, ``dedup: {on: image, threshold: 0.95, model: ViT-B-32}``: the engine reads the vectors the way
it reads any DataComp pool's (curate.pool.pool.batch_vectors -> curate.pool.datacomp), applies the filter and writes
its ledger and subset. Its peak RSS is the parent's os.wait4 ru_maxrss (the parent stays small: a child inherits
its parent's high-water mark at fork); a thread samples VmRSS every 10 ms and the phases (load, normalise, train,
assign/add, search, pairs, group, decide, outputs) are marked by wrapping the functions that run them. Recall and
false drops are read back from the run's decisions.parquet. ``--source DIR`` runs the child from another tree
(e.g. ``git archive HEAD``) to measure before a change.

What is measured, each side in its own child process (so peak RSS is that side's alone):
* ours: the real `filters.dedup.DedupFilter.apply` (``index: auto`` -> IVF at this size) on the
  full set: wall time, peak RSS, recall of the planted pairs (both ends in one group), and how many
  rows were dropped beyond the planted ones (false duplicates).
* baseline: exact search (faiss IndexFlatIP self-kNN, the same `near_pairs` code with
  ``index: flat``) on a uniform random sample of ``--sample`` rows. Exact self-search costs
  O(n^2 d), so its time at full size is extrapolated as t_sample x (n / sample)^2. Running it on 1M
  directly would take hours on this machine, which is the point of the comparison.

Data: unit vectors drawn around 2,000 random cluster centres (within-cluster cosine ~0.5, like
CLIP embeddings, not uniform noise), then for each planted pair the second row is replaced by a
copy of the first perturbed to cosine U(0.955, 0.995) (all above the 0.95 threshold), so the
ground truth is known. Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_data(n: int, d: int, pairs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float32)
    step = 100_000
    for s in range(0, n, step):
        e = min(n, s + step)
        x[s:e] = rng.standard_normal((e - s, d), dtype=np.float32) / np.sqrt(d)
        x[s:e] += centres[rng.integers(0, len(centres), e - s)]
        x[s:e] /= np.linalg.norm(x[s:e], axis=1, keepdims=True)
    ends = rng.choice(n, 2 * pairs, replace=False)
    src, dst = ends[:pairs], ends[pairs:]
    v = x[src]
    g = rng.standard_normal((pairs, d), dtype=np.float32)
    g -= (g * v).sum(1, keepdims=True) * v
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    cos = rng.uniform(0.955, 0.995, (pairs, 1)).astype(np.float32)
    x[dst] = cos * v + np.sqrt(1 - cos**2) * g
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    return x, src, dst


def child_ours(args) -> dict:
    import pyarrow as pa

    from filters.base import Batch
    from filters.dedup import DedupFilter

    x, src, dst = make_data(args.n, args.d, args.pairs)
    n = len(x)
    uids = [f"{i:032x}" for i in range(n)]
    table = pa.table({"uid": uids, "sha256": [f"{i:064x}" for i in range(n)], "text": [""] * n,
                      "shard": np.zeros(n, np.int64), "key": [f"{i:09d}" for i in range(n)]})
    f = DedupFilter(DedupFilter.Params(on="image", threshold=0.95, index=args.index))
    f.setup({"seed": 0})
    t0, c0 = time.perf_counter(), time.process_time()
    res = f.apply(Batch(table, image_emb=x))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    keeper = np.arange(n)
    dropped = np.flatnonzero(~res.keep)
    for r in dropped:
        keeper[r] = int(res.reason[r][len("duplicate of "):][:32], 16)
    recall = float(np.mean(keeper[src] == keeper[dst]))
    planted_dst = np.zeros(n, bool)
    planted_dst[src] = planted_dst[dst] = True
    return {"wall_s": wall, "cpu_s": cpu, "recall": recall, "dropped": int(len(dropped)),
            "dropped_outside_planted": int((~res.keep & ~planted_dst).sum()),
            "index": f.last_index.describe()}


def child_exact(args) -> dict:
    from curate.lib import faiss_index

    x, src, dst = make_data(args.n, args.d, args.pairs)
    rng = np.random.default_rng(1)
    idx = np.sort(rng.choice(len(x), args.sample, replace=False))
    xs = np.ascontiguousarray(x[idx])
    del x
    t0, c0 = time.perf_counter(), time.process_time()
    i, j, _, choice = faiss_index.near_pairs(xs, 0.95, index="flat")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    pos = {int(v): k for k, v in enumerate(idx)}
    both = [(pos[a], pos[b]) for a, b in zip(src.tolist(), dst.tolist()) if a in pos and b in pos]
    found = set(zip(i.tolist(), j.tolist()))
    rec = float(np.mean([(min(a, b), max(a, b)) in found for a, b in both])) if both else float("nan")
    return {"wall_s": wall, "cpu_s": cpu, "pairs_in_sample": len(both), "recall_in_sample": rec, "index": choice.describe()}


def truth_root(truth) -> dict[str, str]:
    """uid -> the uid of the original it (transitively) duplicates, itself if none."""
    parent = dict(zip(truth["uid"], truth["duplicate_of"]))
    root = {}
    for u in parent:
        r, hops = u, 0
        while parent.get(r) and hops < 100:
            r, hops = parent[r], hops + 1
        root[u] = r
    return root


def thumbnails(pool: Path, uids: list[str]) -> np.ndarray:
    """16x16 RGB thumbnails of the pool's shard images, centred and L2-normalised, aligned with uids."""
    import io
    import tarfile

    from PIL import Image

    feats: dict[str, np.ndarray] = {}
    for tar in sorted((pool / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}
            for name, m in members.items():
                if not name.endswith(".json"):
                    continue
                uid = json.loads(tf.extractfile(m).read())["uid"]
                jpg = members.get(name[:-5] + ".jpg")
                if jpg is None:
                    continue
                try:
                    with Image.open(io.BytesIO(tf.extractfile(jpg).read())) as im:
                        a = np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR), np.float32).ravel()
                except OSError:
                    continue
                a -= a.mean()
                feats[uid] = a / max(np.linalg.norm(a), 1e-6)
    nan = np.full(16 * 16 * 3, np.nan, np.float32)
    return np.stack([feats.get(u, nan) for u in uids])


def quality(args) -> None:
    """Recall / precision of `dedup` against the offline pool builder's injected duplicates."""
    import duckdb
    import pyarrow.parquet as pq

    from filters.base import Batch
    from filters.dedup import DedupFilter

    pool = Path(args.quality)
    models = sorted(p.name for p in (pool / "embeddings").iterdir() if p.is_dir())
    mid = args.model_id or models[0]
    con = duckdb.connect()
    t = con.sql(f"""SELECT m.uid, m.sha256, m.text, m.shard, m.key, e.clip_score, e.image_emb, e.text_emb
                    FROM read_parquet('{pool}/metadata/*.parquet') m
                    JOIN read_parquet('{pool}/embeddings/{mid}/*.parquet') e USING (uid)
                    WHERE m.status = 'success' ORDER BY m.uid""").to_arrow_table()
    def vec(col):
        return np.array([np.nan * np.ones(t[col].type.list_size) if v is None else v
                         for v in t[col].to_pylist()], dtype=np.float32)
    img, txt = vec("image_emb"), vec("text_emb")
    if args.embed == "thumbnails":
        img = thumbnails(pool, t["uid"].to_pylist())
        mid = "thumbnails (16x16 RGB, centred; a stand-in for a trained image tower)"
    table = t.drop_columns(["image_emb", "text_emb"])
    truth = pq.read_table(args.truth).to_pydict()
    root = truth_root(truth)
    noise = dict(zip(truth["uid"], truth["noise"]))
    uids = table["uid"].to_pylist()
    present = set(uids)
    # Injected duplicates whose original also made it into the pool (both downloaded).
    dups = [u for u in uids if root.get(u, u) != u and root[u] in present]
    print(f"# dedup quality on {pool} ({len(uids)} downloaded rows, embeddings {mid}); "
          f"{len(dups)} injected duplicates with their original downloaded")
    print("| threshold | on | dropped | recall (exact / near) | precision |")
    print("|---|---|---|---|---|")
    for on in ("image",):
        for thr in args.thresholds:
            f = DedupFilter(DedupFilter.Params(on=on, threshold=thr))
            f.setup({"seed": 0})
            res = f.apply(Batch(table, image_emb=img, text_emb=txt))
            keeper = {}
            for u, k, r in zip(uids, res.keep, res.reason):
                keeper[u] = u if k else r[len("duplicate of "):][:32]
            hit = [keeper[u] == keeper[root[u]] for u in dups]
            exact = [h for u, h in zip(dups, hit) if noise.get(u) == "exact_dup"]
            nearh = [h for u, h in zip(dups, hit) if noise.get(u) != "exact_dup"]
            dropped = [u for u, k in zip(uids, res.keep) if not k]
            correct = sum(root.get(u, u) == root.get(keeper[u], keeper[u]) for u in dropped)
            print(f"| {thr} | {on} | {len(dropped)} | {np.mean(hit):.3f} ({np.mean(exact):.3f} of {len(exact)} / "
                  f"{np.mean(nearh):.3f} of {len(nearh)}) | {correct / max(1, len(dropped)):.3f} |")


# ---------------------------------------------------------------- --memory: the filter process alone

MEM_FILES = 4  # parquet + npz pairs (DataComp's small pool: ~490k rows a file)


def memory_pool(work: Path, n: int, d: int, pairs: int, files: int = MEM_FILES) -> tuple[Path, Path]:
    """A DataComp-format pool whose b32_img vectors are `make_data`'s planted set (float16, as DataComp
    publishes them, in uncompressed npz members = .npy files at an offset), imported in place.

    Written once per (n, d, pairs, files) and reused. Returns (pool, truth.npz with src/dst row numbers)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from datacomp_factory import write_datacomp_file

    from curate.core.atomic import write_json
    from curate.pool.datacomp import ImportConfig, import_datacomp

    src_dir, pool, truth = work / "datacomp_metadata", work / "pool", work / "truth.npz"
    marker = work / "bench_memory.json"
    want = {"n": n, "d": d, "pairs": pairs, "files": files, "seed": 0}
    if not (marker.exists() and json.loads(marker.read_text()) == want and truth.exists()):
        t = time.time()
        for f in src_dir.glob("*"):
            f.unlink()
        x, src, dst = make_data(n, d, pairs)
        sizes = [n // files + (1 if i < n % files else 0) for i in range(files)]
        start = 0
        for i, m in enumerate(sizes):
            stem = f"{i:010d}"
            write_datacomp_file(src_dir, stem, m, seed=i, npz=False)
            img = x[start:start + m].astype(np.float16)
            small = np.zeros((m, 2), np.float16)
            # b32_txt: the image vectors again (dedup on image never reads them; they only make the pair valid)
            np.savez(src_dir / f"{stem}.npz", b32_img=img, b32_txt=img, l14_img=small, l14_txt=small)
            start += m
        del x
        np.savez(truth, src=src, dst=dst)
        write_json(marker, want)
        print(f"generated {n:,} x {d} (float16) in {files} DataComp files in {time.time() - t:.0f} s -> {src_dir}",
              flush=True)
    import_datacomp(ImportConfig(metadata_dir=src_dir, out=pool, check_uids=False))
    return pool, truth


def rss_mib() -> float:
    """Resident set size now (VmRSS), MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseRecorder:
    """Peak RSS per phase of the dedup step, from outside the code under test.

    Phases are marked by wrapping the module functions each phase runs (whichever of them the code
    has: the names differ between versions of filters/dedup.py and curate/lib/faiss_index.py); a
    thread samples VmRSS every 10 ms so a phase's own peak is seen even when ru_maxrss was set earlier."""

    def __init__(self, first: str):
        import threading

        self.phase = first
        self.rows: list[dict] = []
        self.peak = rss_mib()
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.01):
            r = rss_mib()
            with self._lock:
                self.peak = max(self.peak, r)

    def mark(self, nxt: str) -> None:
        r = rss_mib()
        with self._lock:
            self.rows.append({"phase": self.phase, "end_s": round(time.perf_counter() - self.t0, 2),
                              "peak_in_phase_mib": round(max(self.peak, r)), "rss_at_end_mib": round(r),
                              "ru_maxrss_at_end_mib": round(maxrss_mib())})
            self.phase, self.peak = nxt, r

    def wrap(self, module, name: str, phase: str | None, after: str | None = None) -> None:
        """Mark `phase` (if given) when module.name is called and `after` (if given) when it returns."""
        import functools

        fn = getattr(module, name, None)
        if fn is None:
            return

        @functools.wraps(fn)
        def wrapped(*a, **k):
            if phase:
                self.mark(phase)
            try:
                return fn(*a, **k)
            finally:
                if after:
                    self.mark(after)

        setattr(module, name, wrapped)

    def stop(self) -> list[dict]:
        self.mark("end")
        self._stop.set()
        return self.rows


def child_filter(args) -> dict:
    """`curate filter --recipe R --pool POOL` (in-process, as users run it) with R = one dedup step."""
    base = rss_mib()  # the interpreter + numpy (ru_maxrss would start at the parent's high-water mark)
    import faiss  # noqa: F401  (what a dedup step imports; counted in the baseline)

    import filters.dedup as dedup_mod
    from curate.cli import main as curate_main
    from curate.core.atomic import write_text
    from curate.lib import faiss_index

    imports = rss_mib()
    rec = PhaseRecorder("engine: open the pool, metadata query, vectors from the npz")
    # The phases, by the functions that run them (old and new names; missing ones are skipped).
    orig_apply = dedup_mod.DedupFilter.apply

    def apply(self, batch):
        rec.mark("dedup: exact groups + normalise")
        try:
            return orig_apply(self, batch)
        finally:
            rec.mark("engine: ledger, subset.parquet, uids.npy, manifest")

    dedup_mod.DedupFilter.apply = apply
    # before issue 20's item 4: build_index (train) -> add_preassigned -> _big_batch_knn; after: ivf_self_knn ->
    # train_index -> assign_cells -> the cell-by-cell search
    rec.wrap(faiss_index, "build_index", "train (IVF k-means)", after="assign + add (a copy into faiss)")
    rec.wrap(faiss_index, "_big_batch_knn", "search (self-kNN)", after="pairs (threshold, dedup)")
    rec.wrap(faiss_index, "train_index", "train (IVF k-means)", after="assign cells")
    rec.wrap(faiss_index, "assign_cells", "assign cells", after="search (self-kNN, cell by cell)")
    rec.wrap(faiss_index, "ivf_self_knn", None, after="pairs (threshold, dedup)")
    rec.wrap(faiss_index, "connected_components", "group (connected components)", after="decide (keeper, reasons)")
    out = Path(args.out)
    recipe = out.parent / "dedup_memory.yaml"
    write_text(recipe, 'name: dedup_memory\nsteps:\n  - dedup: {"on": image, threshold: 0.95, model: ViT-B-32}\n')
    t0, c0 = time.perf_counter(), time.process_time()
    curate_main(["filter", "--recipe", str(recipe), "--pool", args.pool, "--out", str(out), "--no-report"],
                standalone_mode=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    phases = rec.stop()
    return {"wall_s": wall, "cpu_s": cpu, "baseline_interpreter_mib": round(base),
            "baseline_imports_mib": round(imports), "phases": phases}


def memory_recall(pool: Path, truth: Path, out: Path) -> dict:
    """Recall of the planted pairs from the run's ledger (both ends kept in one group) and false drops."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    uids = pa_concat_uids(pool)
    row = {u: i for i, u in enumerate(uids)}
    t = pq.read_table(out / "decisions.parquet", columns=["uid", "step", "kept", "reason"])
    t = t.filter(pc.equal(t["step"], t["step"][len(t) - 1]))  # the dedup step's rows (the last step)
    keeper = np.arange(len(uids))
    dropped = 0
    for u, k, r in zip(t["uid"].to_pylist(), t["kept"].to_pylist(), t["reason"].to_pylist()):
        if not k:
            keeper[row[u]] = row[r[len("duplicate of "):][:32]]
            dropped += 1
    tr = np.load(truth)
    src, dst = tr["src"], tr["dst"]
    planted = np.zeros(len(uids), bool)
    planted[src] = planted[dst] = True
    return {"recall": float(np.mean(keeper[src] == keeper[dst])), "dropped": dropped,
            "dropped_outside_planted": int(((keeper != np.arange(len(uids))) & ~planted).sum())}


def pa_concat_uids(pool: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [u for f in sorted((pool / "metadata").glob("*.parquet")) for u in pq.read_table(f, columns=["uid"])["uid"].to_pylist()]


def memory(args) -> None:
    """Parent of --memory: write the pool (not measured), run the filter in a fresh child, wait4 its peak."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # Written by another process: a child inherits its parent's RSS high-water mark at fork (Linux), so
    # this process must stay small for the child's ru_maxrss to be the filter's own.
    subprocess.run([sys.executable, "-m", "perf.bench_dedup", "--child", "generate", "--work", str(work), "--n",
                    str(args.n), "--d", str(args.d), "--pairs", str(args.pairs)], cwd=ROOT, check=True)
    pool, truth = work / "pool", work / "truth.npz"
    out = work / "out"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    load0 = os.getloadavg()
    parent_mib = maxrss_mib()
    cmd = [sys.executable, "-m", "perf.bench_dedup", "--child", "filter", "--pool", str(pool), "--out", str(out)]
    t0 = time.perf_counter()
    with open(work / "child.out", "w") as so, open(work / "child.err", "w") as se:
        proc = subprocess.Popen(cmd, cwd=args.source or ROOT, stdout=so, stderr=se)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak, nothing of this process's
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write((work / "child.err").read_text()[-5000:])
        raise SystemExit("filter child failed")
    res = json.loads((work / "child.out").read_text().strip().splitlines()[-1])
    res["peak_rss_mib"] = round(usage.ru_maxrss / 1024)
    res.update(memory_recall(pool, truth, out))
    data_mib = args.n * args.d * 4 / 2**20
    res.update({"n": args.n, "d": args.d, "pairs": args.pairs, "float32_vectors_mib": round(data_mib),
                "ratio_to_float32": round(res["peak_rss_mib"] / data_mib, 2), "child_wall_s": round(wall, 1),
                "load_avg_start": load0, "load_avg_end": os.getloadavg(), "source": str(args.source or ROOT),
                "parent_maxrss_at_start_mib": round(parent_mib),
                "command": " ".join(sys.argv)})
    print(f"# bench_dedup --memory: `curate filter` with one dedup step on a DataComp-format pool of {args.n:,} x "
          f"{args.d} (float16 npz), {args.pairs:,} planted pairs; load avg {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"peak RSS {res['peak_rss_mib']:,.0f} MiB = {res['ratio_to_float32']:.2f}x the float32 vectors "
          f"({data_mib:,.0f} MiB); interpreter {res['baseline_interpreter_mib']} MiB, + imports "
          f"{res['baseline_imports_mib']} MiB; recall {res['recall']:.4f}, dropped {res['dropped']:,} "
          f"(outside planted pairs {res['dropped_outside_planted']:,}); filter wall {res['wall_s']:.0f} s, "
          f"CPU {res['cpu_s']:.0f} s")
    print("| phase | ends at (s) | peak RSS in phase (MiB) | RSS at end (MiB) | ru_maxrss at end (MiB) |")
    print("|---|---|---|---|---|")
    for p in res["phases"]:
        print(f"| {p['phase']} | {p['end_s']} | {p['peak_in_phase_mib']:,} | {p['rss_at_end_mib']:,} | "
              f"{p['ru_maxrss_at_end_mib']:,} |")
    if args.json:
        from curate.core.atomic import write_json

        write_json(args.json, res)


def start_child(side: str, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "perf.bench_dedup", "--child", side, "--n", str(args.n), "--d", str(args.d),
           "--pairs", str(args.pairs), "--sample", str(args.sample), "--index", args.index]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_child(side: str, proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.stderr.write(err)
        raise SystemExit(f"{side} child failed")
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=100_000)
    ap.add_argument("--index", default="auto")
    ap.add_argument("--child", choices=["ours", "exact", "filter", "generate"])
    ap.add_argument("--memory", action="store_true",
                    help="peak RSS of `curate filter` with one dedup step alone, per phase, on a DataComp-format pool")
    ap.add_argument("--work", default="/tmp/curate_bench_dedup_memory", help="where --memory writes its pool")
    ap.add_argument("--source", help="run the --memory child from this source tree (e.g. a `git archive HEAD` "
                                     "copy, to measure before a change)")
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--concurrent", action="store_true",
                    help="run both sides at once (each still its own process; compare CPU seconds, not wall)")
    ap.add_argument("--quality", metavar="POOL", help="measure recall/precision on a downloaded + embedded pool")
    ap.add_argument("--truth", help="the offline pool builder's truth.parquet (with --quality)")
    ap.add_argument("--model-id", help="embeddings folder to use (default: the pool's first)")
    ap.add_argument("--embed", choices=["pool", "thumbnails"], default="pool",
                    help="image vectors: the pool's embeddings, or pixel thumbnails read from its shards")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    ap.add_argument("--quick", action="store_true", help="perf.run_all's size: 20,000 x 512, 200 pairs, sample 5,000")
    ap.add_argument("--json", help="write the result (perf/result.py's shape) to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.pairs, args.sample = 20_000, 200, 5_000
    if args.quality:
        quality(args)
        return
    if args.memory:
        memory(args)
        return
    if args.child == "filter":
        print(json.dumps(child_filter(args)))
        return
    if args.child == "generate":
        memory_pool(Path(args.work), args.n, args.d, args.pairs)
        return
    if args.child:
        res = child_ours(args) if args.child == "ours" else child_exact(args)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    if args.concurrent:
        procs = {side: start_child(side, args) for side in ("ours", "exact")}
        ours, exact = (finish_child(side, procs[side]) for side in ("ours", "exact"))
    else:
        ours = finish_child("ours", start_child("ours", args))
        exact = finish_child("exact", start_child("exact", args))
    scale = (args.n / args.sample) ** 2
    exact_full = exact["wall_s"] * scale
    data_mib = args.n * args.d * 4 / 2**20
    print(f"# bench_dedup: n={args.n:,} d={args.d} planted pairs={args.pairs:,} cores={os.cpu_count()} "
          f"{'both sides concurrently' if args.concurrent else 'one side after the other'}, "
          f"({platform.processor() or platform.machine()}), load avg at end {os.getloadavg()[0]:.1f}")
    print(f"ours ({ours['index']}): dedup wall {ours['wall_s']:.1f} s, peak RSS {ours['peak_rss_mib']:.0f} MiB "
          f"(the float32 embeddings alone are {data_mib:.0f} MiB), recall of planted pairs {ours['recall']:.4f}, "
          f"rows dropped {ours['dropped']:,} (outside planted pairs: {ours['dropped_outside_planted']:,})")
    print(f"exact ({exact['index']}) on a {args.sample:,} sample: {exact['wall_s']:.1f} s, peak RSS "
          f"{exact['peak_rss_mib']:.0f} MiB, recall on the {exact['pairs_in_sample']} planted pairs inside "
          f"the sample {exact['recall_in_sample']:.4f}")
    print(f"exact extrapolated to n={args.n:,}: {exact['wall_s']:.1f} s x ({args.n:,}/{args.sample:,})^2 = "
          f"{exact_full:,.0f} s ({exact_full / 3600:.1f} h)")
    cpu_full = exact["cpu_s"] * scale
    print(f"CPU seconds (robust to other load on the machine): ours {ours['cpu_s']:.0f}, exact on the sample "
          f"{exact['cpu_s']:.0f} -> extrapolated {cpu_full:,.0f}")
    print(f"speed-up vs exact: {exact_full / ours['wall_s']:.1f}x wall, {cpu_full / ours['cpu_s']:.1f}x CPU")
    from perf.result import bench_result, write

    # CPU seconds: the exact side is extrapolated from its sample, and CPU is robust to other load
    write(args.json, bench_result("dedup", ours["cpu_s"], cpu_full, "CPU s", higher_is_better=False,
                                  baseline_name="exact IndexFlatIP (extrapolated)",
                                  details={"n": args.n, "recall": ours["recall"], "peak_rss_mib": ours["peak_rss_mib"],
                                           "data_mib": data_mib, "exact_sample": args.sample, "ours": ours,
                                           "exact": exact}))


if __name__ == "__main__":
    main()
