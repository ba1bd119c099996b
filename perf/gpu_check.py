"""GPU readiness: the GPU paths of embed, near-duplicate search, k-means and training, measured in one run.

    PYTHONPATH=. python -m perf.gpu_check                      # on a CUDA machine, <= 4 minutes
    PYTHONPATH=. python -m perf.gpu_check --device cpu --quick # the same code paths at tiny sizes (tests)

Made to run from a source checkout on a machine that is not this project's venv: no internet, a torch
that is not the pinned one, and possibly no faiss, open_clip or open_clip_train. Each row says which
backend it used, and a missing library turns its rows into ``skipped (<library> not installed)``
instead of an error; only torch is required. Rows:

- ``embed_decode_pil``: JPEG decode + resize on the CPU with PIL (what the CPU embed path does).
- ``embed_decode``: the same with torchvision.io.decode_jpeg on the device (nvJPEG on CUDA), batched.
- ``embed_pipeline``: decode on the device + preprocess + ViT-B-32 image forward (bf16 autocast),
  images/s end to end; ``embed_forward_ceiling``: the forward alone on tensors already on the device.
  ViT-B-32 is open_clip's with random weights (torchvision's vit_b_32 stands in without open_clip).
- ``dedup_exact_torch`` / ``dedup_ivf_torch``: pairs with cosine >= threshold among n unit vectors
  with planted near-duplicates, by blocked matmul (exact) and by an IVF index (k-means cells, nprobe
  cells searched per query) written in torch; ``dedup_exact_faiss`` / ``dedup_ivf_faiss`` the same
  with faiss (GPU indexes on CUDA; skipped there when faiss has no GPU support). ``pairs_agree`` in
  the JSON says whether every search path found the same pairs.
- ``kmeans_torch`` / ``kmeans_faiss``: Lloyd iterations, points x iterations per second.
- ``train_curate`` / ``train_open_clip``: samples/s of `curate train` and of ``open_clip_train.main``
  on the same resampled shards at the ``debug`` scale's model (curate-debug), same batch, AMP on CUDA.

Prints one table and writes the rows as JSON (``--json``, default perf/gpu_check.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
ROWS = ("embed_decode_pil", "embed_decode", "embed_pipeline", "embed_forward_ceiling", "dedup_exact_torch",
        "dedup_ivf_torch", "dedup_exact_faiss", "dedup_ivf_faiss", "kmeans_torch", "kmeans_faiss", "train_curate",
        "train_open_clip")


@dataclass
class Sizes:
    images: int
    image_px: int
    batch: int
    n: int  # vectors for near-duplicate search and k-means
    d: int
    pairs: int
    nlist: int
    nprobe: int
    k: int  # k-means clusters
    iters: int
    train_steps: int
    train_batch: int
    clusters: int  # centres the vectors scatter around
    train_workers: int  # data loader processes per trainer (0 in the quick run: their start-up would dominate)


FULL = Sizes(images=2048, image_px=256, batch=256, n=1_000_000, d=512, pairs=10_000, nlist=4096, nprobe=16, k=4096,
             iters=10, train_steps=40, train_batch=256, clusters=2000,
             train_workers=2)
QUICK = Sizes(images=8, image_px=64, batch=4, n=4_000, d=64, pairs=20, nlist=16, nprobe=4, k=16, iters=3,
              train_steps=4, train_batch=8, clusters=16, train_workers=0)
THRESHOLD = 0.95


@dataclass
class Row:
    row: str
    status: str = "ok"  # ok / skipped / failed
    rate: float | None = None
    unit: str = ""
    backend: str = ""
    seconds: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


# ---------------------------------------------------------------- embed

def make_jpegs(n: int, px: int) -> list[bytes]:
    """Smooth random images (gradients + noise, like photos compress) as JPEG bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    yy, xx = np.mgrid[0:px, 0:px] / px
    for i in range(n):
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), xx * yy], -1) * 100 + 128
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def vit_b32(device: str):
    """(model taking normalised 224 px images, backend name): open_clip's ViT-B-32, random weights."""
    import torch

    if have("open_clip"):
        import open_clip

        m = open_clip.create_model("ViT-B-32", pretrained=None)
        return m.visual.to(device).eval(), "open_clip ViT-B-32 (random weights)"
    if have("torchvision"):
        import torchvision

        m = torchvision.models.vit_b_32(weights=None)
        m.heads = torch.nn.Identity()
        return m.to(device).eval(), "torchvision vit_b_32 stand-in (open_clip not installed)"
    return None, "neither open_clip nor torchvision installed"


MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation
STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(batch_u8, device: str):
    """uint8 (B, 3, H, W) on the device -> normalised float (B, 3, 224, 224)."""
    import torch
    import torch.nn.functional as F

    x = batch_u8.float().div_(255)
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def check_embed(sz: Sizes, device: str) -> list[Row]:
    import numpy as np
    import torch
    from PIL import Image

    jpegs = make_jpegs(sz.images, sz.image_px)
    rows = []

    def pil_decode():
        for b in jpegs:
            with Image.open(io.BytesIO(b)) as im:
                np.asarray(im.convert("RGB").resize((224, 224), Image.BICUBIC))
        return len(jpegs)

    _, dt = timed(pil_decode, "cpu")
    rows.append(Row("embed_decode_pil", rate=len(jpegs) / dt, unit="images/s", backend="PIL on 1 CPU core",
                    seconds=dt))

    tvio = None
    if have("torchvision"):
        import torchvision.io as tvio_mod

        tvio = tvio_mod
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]

    def dev_decode(batch_datas):
        imgs = tvio.decode_jpeg(batch_datas, device=device) if device.startswith("cuda") else \
            [tvio.decode_jpeg(d) for d in batch_datas]
        return torch.stack([i.to(device) for i in imgs])

    if tvio is None:
        rows.append(Row("embed_decode", status="skipped", note="torchvision not installed"))
    else:
        def decode_all():
            for i in range(0, len(datas), sz.batch):
                preprocess(dev_decode(datas[i: i + sz.batch]), device)
        dev_decode(datas[: min(2, len(datas))])  # warm-up (nvJPEG handles, kernels)
        _, dt = timed(decode_all, device)
        rows.append(Row("embed_decode", rate=len(datas) / dt, unit="images/s", seconds=dt,
                        backend=f"torchvision.io.decode_jpeg on {device}" + (" (nvJPEG)" if device.startswith("cuda") else "")))

    model, backend = vit_b32(device)
    if model is None:
        rows += [Row("embed_pipeline", status="skipped", note=backend),
                 Row("embed_forward_ceiling", status="skipped", note=backend)]
        return rows
    # bf16 autocast on CUDA; on a CPU the same path runs in fp32 (CPU bf16 without AMX is emulated, ~10x slower)
    gpu = device.startswith("cuda")
    amp = torch.autocast("cuda" if gpu else "cpu", dtype=torch.bfloat16, enabled=gpu)
    ready = torch.randn(sz.batch, 3, 224, 224, device=device)

    def forward(x):
        with torch.inference_mode(), amp:
            return model(x)

    forward(ready)  # warm-up
    n_fwd = max(sz.images // sz.batch, 1)
    _, dt = timed(lambda: [forward(ready) for _ in range(n_fwd)], device)
    ceiling = n_fwd * sz.batch / dt
    rows.append(Row("embed_forward_ceiling", rate=ceiling, unit="images/s", seconds=dt,
                    backend=f"{backend}, {'bf16 autocast' if gpu else 'fp32'}, batch {sz.batch}"))
    if tvio is None:
        rows.append(Row("embed_pipeline", status="skipped", note="torchvision not installed (no device decode)"))
        return rows

    def pipeline():
        for i in range(0, len(datas), sz.batch):
            forward(preprocess(dev_decode(datas[i: i + sz.batch]), device))

    _, dt = timed(pipeline, device)
    rate = len(datas) / dt
    rows.append(Row("embed_pipeline", rate=rate, unit="images/s", seconds=dt, backend=f"decode on {device} + {backend}",
                    note=f"{rate / ceiling:.0%} of the forward-only ceiling", extra={"of_ceiling": rate / ceiling}))
    return rows


# ---------------------------------------------------------------- near-duplicate search

def planted_vectors(n: int, d: int, pairs: int, device: str, clusters: int = 0):
    """n unit vectors (float32) around `clusters` random centres (within-cluster cosine ~0.5, like
    image embeddings: what lets IVF cells work) where `pairs` of them are near-copies of others
    (cosine 0.97-0.99)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, d, generator=g) / d ** 0.5
    if clusters:
        centres = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=1)
        x += centres[torch.randint(0, clusters, (n,), generator=g)]
    x = torch.nn.functional.normalize(x, dim=1)
    src = torch.randperm(n, generator=g)[: 2 * pairs]
    a, b = src[:pairs], src[pairs:]
    noise = torch.nn.functional.normalize(torch.randn(pairs, d, generator=g), dim=1)
    cos = 0.97 + 0.02 * torch.rand(pairs, 1, generator=g)
    noise = torch.nn.functional.normalize(noise - (noise * x[a]).sum(1, keepdim=True) * x[a], dim=1)
    x[b] = cos * x[a] + torch.sqrt(1 - cos * cos) * noise
    return x.to(device)


def _pairs_from(i_idx, j_idx) -> set[tuple[int, int]]:
    return {(min(int(i), int(j)), max(int(i), int(j))) for i, j in zip(i_idx, j_idx) if int(i) != int(j)}


def exact_pairs_torch(x, thr: float, block: int) -> set[tuple[int, int]]:
    """Every pair with cosine >= thr by blocked matmul (fp16 on CUDA, fp32 on CPU)."""
    import torch

    xs = x.half() if x.is_cuda else x
    out: set[tuple[int, int]] = set()
    for s in range(0, len(x), block):
        sims = xs[s: s + block] @ xs.T
        ii, jj = torch.nonzero(sims >= thr, as_tuple=True)
        keep = (ii + s) < jj  # each pair once, no self-pairs
        out |= _pairs_from((ii[keep] + s).tolist(), jj[keep].tolist())
    return out


def kmeans_torch(x, k: int, iters: int, seed: int = 0):
    """Lloyd's k-means on unit vectors (cosine assignment), all on x's device. Returns centroids."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cat([(x[s: s + 65536] @ c.T).argmax(1) for s in range(0, len(x), 65536)])
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        c = torch.nn.functional.normalize(c, dim=1)
    return c


def ivf_pairs_torch(x, thr: float, nlist: int, nprobe: int, iters: int) -> set[tuple[int, int]]:
    """IVF search in torch: cells by k-means, each vector compared with the vectors of its query's
    `nprobe` nearest cells (DataComp-scale dedup on a GPU without faiss-gpu)."""
    import torch

    train = x[torch.randperm(len(x), device=x.device)[: min(len(x), 64 * nlist)]]
    c = kmeans_torch(train, nlist, iters)
    cell = torch.cat([(x[s: s + 65536] @ c.T).argmax(1) for s in range(0, len(x), 65536)])
    order = torch.argsort(cell)
    starts = torch.searchsorted(cell[order], torch.arange(nlist + 1, device=x.device))
    xs = x.half() if x.is_cuda else x
    out: set[tuple[int, int]] = set()
    for l in range(nlist):  # queries grouped by their home cell; probes = the cells nearest its centroid
        q = order[starts[l]: starts[l + 1]]
        if not len(q):
            continue
        probes = (c[l: l + 1] @ c.T).topk(min(nprobe, nlist)).indices[0]
        cand = torch.cat([order[starts[p]: starts[p + 1]] for p in probes.tolist()])
        sims = xs[q] @ xs[cand].T
        ii, jj = torch.nonzero(sims >= thr, as_tuple=True)
        out |= _pairs_from(q[ii].tolist(), cand[jj].tolist())
    return out


def faiss_gpu_ok() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def faiss_pairs(x, thr: float, kind: str, nlist: int, nprobe: int, device: str) -> set[tuple[int, int]]:
    """The same pairs with faiss: k-NN (k=8) on a flat or IVF inner-product index, kept >= thr."""
    import faiss
    import numpy as np

    xb = np.ascontiguousarray(x.float().cpu().numpy())
    d = xb.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    if device.startswith("cuda"):
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    if kind != "flat":
        index.train(xb[np.random.default_rng(0).permutation(len(xb))[: min(len(xb), 64 * nlist)]])
        index.nprobe = nprobe
    index.add(xb)
    out: set[tuple[int, int]] = set()
    for s in range(0, len(xb), 65536):
        sims, ids = index.search(xb[s: s + 65536], 8)
        ii, jj = np.nonzero(sims >= thr)
        out |= _pairs_from(ii + s, ids[ii, jj])
    return out


def check_search(sz: Sizes, device: str) -> tuple[list[Row], dict[str, Any]]:
    x = planted_vectors(sz.n, sz.d, sz.pairs, device, clusters=sz.clusters)
    found: dict[str, set] = {}
    rows = []
    block = 2048 if device.startswith("cuda") else 1024  # 2048 x 1M fp16 similarities = 4 GB per block
    p, dt = timed(lambda: exact_pairs_torch(x, THRESHOLD, block), device)
    found["dedup_exact_torch"] = p
    rows.append(Row("dedup_exact_torch", rate=sz.n / dt, unit="vectors/s", seconds=dt, backend=f"torch matmul on {device}",
                    note=f"{len(p)} pairs (n={sz.n:,}, d={sz.d})"))
    p, dt = timed(lambda: ivf_pairs_torch(x, THRESHOLD, sz.nlist, sz.nprobe, sz.iters), device)
    found["dedup_ivf_torch"] = p
    rows.append(Row("dedup_ivf_torch", rate=sz.n / dt, unit="vectors/s", seconds=dt,
                    backend=f"torch IVF nlist {sz.nlist}, nprobe {sz.nprobe} on {device}", note=f"{len(p)} pairs"))
    kinds = (("dedup_exact_faiss", "flat"), ("dedup_ivf_faiss", "ivf"))
    if not have("faiss"):
        rows += [Row(r, status="skipped", note="faiss not installed (torch fallback above)") for r, _ in kinds]
    elif device.startswith("cuda") and not faiss_gpu_ok():
        rows += [Row(r, status="skipped", note="faiss without GPU support (install faiss-gpu; torch fallback above)")
                 for r, _ in kinds]
    else:
        for r, kind in kinds:
            p, dt = timed(lambda: faiss_pairs(x, THRESHOLD, kind, sz.nlist, sz.nprobe, device), device)
            found[r] = p
            rows.append(Row(r, rate=sz.n / dt, unit="vectors/s", seconds=dt,
                            backend=f"faiss {'GPU' if device.startswith('cuda') else 'CPU'} {kind}", note=f"{len(p)} pairs"))
    sets = list(found.values())
    agree = all(s == sets[0] for s in sets)
    exact = found["dedup_exact_torch"]
    info = {"pairs_agree": agree, "pairs": {k: len(v) for k, v in found.items()},
            "recall_vs_exact": {k: (len(v & exact) / len(exact) if exact else 1.0) for k, v in found.items()},
            "planted": sz.pairs}
    return rows, info


def check_kmeans(sz: Sizes, device: str) -> list[Row]:
    x = planted_vectors(sz.n, sz.d, 0, device, clusters=sz.clusters)
    rows = []
    _, dt = timed(lambda: kmeans_torch(x, sz.k, sz.iters), device)
    rows.append(Row("kmeans_torch", rate=sz.n * sz.iters / dt, unit="point-iterations/s", seconds=dt,
                    backend=f"torch on {device}", note=f"n={sz.n:,}, k={sz.k}, {sz.iters} iterations"))
    if not have("faiss"):
        rows.append(Row("kmeans_faiss", status="skipped", note="faiss not installed (torch k-means above)"))
        return rows
    import faiss

    gpu = device.startswith("cuda")
    if gpu and not faiss_gpu_ok():
        rows.append(Row("kmeans_faiss", status="skipped", note="faiss without GPU support (torch k-means above)"))
        return rows
    xb = x.float().cpu().numpy()
    km = faiss.Kmeans(sz.d, sz.k, niter=sz.iters, spherical=True, gpu=gpu, seed=0, max_points_per_centroid=10**9)
    _, dt = timed(lambda: km.train(xb), device)
    rows.append(Row("kmeans_faiss", rate=sz.n * sz.iters / dt, unit="point-iterations/s", seconds=dt,
                    backend=f"faiss.Kmeans {'GPU' if gpu else 'CPU'}"))
    return rows


# ---------------------------------------------------------------- training

_OPENCLIP_WRAPPER = (
    "import sys; from curate.clip.models import register_configs; register_configs(); "
    "from open_clip_train.main import main; main(sys.argv[1:])"
)


def check_train(sz: Sizes, device: str, work: Path) -> list[Row]:
    missing = [m for m in ("open_clip", "webdataset") if not have(m)]
    if missing:
        note = f"{' and '.join(missing)} not installed: curate train needs them"
        return [Row("train_curate", status="skipped", note=note), Row("train_open_clip", status="skipped", note=note)]
    sys.path.insert(0, str(REPO))
    from benchmark.scales import get_scale
    from curate.core import uids as uidlib
    from curate.reshard.stage import ReshardConfig, reshard
    from tests.pool_factory import make_pool

    sc = get_scale("debug")
    per_shard = max(64, sz.train_batch * 4)
    fp = make_pool(work / "pool", n_shards=2, per_shard=per_shard, corrupt=0, failed=0, image_size=64)
    uidlib.save(work / "subset" / "uids.npy", fp.success_uids())
    reshard(ReshardConfig(subset=work / "subset", pool=fp.pool, shard_size=per_shard, workers=1, progress=False))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    skip = min(2, sz.train_steps // 3)
    rows: list[Row] = []
    out = work / "curate"
    cmd = [sys.executable, "-m", "curate.cli", "train", "--data", str(work / "subset"), "--scale", "debug",
           "--out", str(out), "--workers", str(sz.train_workers), "--device", device, "--no-progress", "--unofficial",
           "--set", f"samples_seen={sz.train_steps * sz.train_batch}", "--set", f"batch_size={sz.train_batch}",
           "--set", "num_checkpoints=1"]
    tars = sorted(p.name for p in (work / "subset" / "shards").glob("*.tar"))
    first, last = tars[0].split(".")[0], tars[-1].split(".")[0]
    oc = [sys.executable, "-c", _OPENCLIP_WRAPPER,
          "--train-data", str(work / "subset" / "shards" / f"{{{first}..{last}}}.tar"), "--dataset-type", "webdataset",
          "--dataset-resampled", "--train-num-samples", str(sz.train_steps * sz.train_batch), "--epochs", "1",
          "--batch-size", str(sz.train_batch), "--model", sc.model, "--precision", "amp" if device != "cpu" else "fp32",
          "--workers", str(sz.train_workers), "--lr", str(sc.lr), "--warmup", str(sc.warmup), "--wd", str(sc.weight_decay),
          "--logs", str(work / "oc"), "--name", "check", "--log-every-n-steps", "1", "--save-frequency", "0",
          "--report-to", "", "--seed", "0"] + (["--device", "cpu"] if device == "cpu" else [])
    jobs = {"train_curate": cmd} | ({"train_open_clip": oc} if have("open_clip_train") else {})
    done: dict[str, tuple[int, str, float]] = {}
    for k, c in jobs.items():  # one after the other: each has the device to itself
        t = time.perf_counter()
        r = subprocess.run(c, cwd=REPO, env=env, capture_output=True, text=True)
        done[k] = (r.returncode, r.stderr, time.perf_counter() - t)
    how = f"{sz.train_workers} data workers"
    rc, err, wall = done["train_curate"]
    if rc != 0:
        rows.append(Row("train_curate", status="failed", note=err[-400:]))
    else:
        rates = [json.loads(x)["samples_per_s"] for x in (out / "log.jsonl").read_text().splitlines()]
        rows.append(Row("train_curate", rate=statistics.median(rates[skip:] or rates), unit="samples/s", seconds=wall,
                        backend=f"curate train, {sc.model}, batch {sz.train_batch}, {'AMP' if device != 'cpu' else 'fp32'}",
                        note=f"median of {len(rates[skip:] or rates)} steps; process wall {wall:.1f} s; {how}"))
    if "train_open_clip" not in done:
        rows.append(Row("train_open_clip", status="skipped", note="open_clip_train not installed"))
        return rows
    rc, err, wall = done["train_open_clip"]
    log = work / "oc" / "check" / "out.log"
    rates = [float(x) for x in re.findall(r"([\d.]+)/s/gpu", log.read_text())] if log.exists() else []
    if rc != 0 or not rates:
        rows.append(Row("train_open_clip", status="failed", note=(err or "no samples/s in its log")[-400:]))
    else:
        rows.append(Row("train_open_clip", rate=statistics.median(rates[skip:] or rates), unit="samples/s", seconds=wall,
                        backend=f"open_clip_train.main, {sc.model}, batch {sz.train_batch}, "
                                f"{'AMP' if device != 'cpu' else 'fp32'}",
                        note=f"median of {len(rates[skip:] or rates)} steps; process wall {wall:.1f} s; {how}"))
    return rows


# ---------------------------------------------------------------- the run

def run(device: str, quick: bool) -> dict[str, Any]:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu --quick to test the code paths)")
    sz = QUICK if quick else FULL
    t0 = time.time()
    rows: list[Row] = []
    search_info: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    checks: list[tuple[tuple[str, ...], Callable[[], list[Row]]]] = [
        (ROWS[:4], lambda: check_embed(sz, device)),
        (ROWS[4:8], lambda: (lambda r: (search_info.update(r[1]), r[0])[1])(check_search(sz, device))),
        (ROWS[8:10], lambda: check_kmeans(sz, device)),
        (ROWS[10:], lambda: check_train(sz, device, work)),
    ]
    try:
        for names, fn in checks:
            try:
                rows += fn()
            except Exception as e:  # a check that breaks on this machine is reported, the others still run
                rows += [Row(n, status="failed", note=f"{type(e).__name__}: {e}"[:400]) for n in names
                         if n not in {r.row for r in rows}]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    order = {n: i for i, n in enumerate(ROWS)}
    rows.sort(key=lambda r: order.get(r.row, len(order)))
    env = {"device": device, "quick": quick, "torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
           "libraries": {m: have(m) for m in ("torchvision", "open_clip", "open_clip_train", "faiss", "webdataset")}}
    return {"env": env, "sizes": asdict(sz), "rows": [asdict(r) for r in rows], "search": search_info,
            "seconds": round(time.time() - t0, 1)}


def table(result: dict[str, Any]) -> str:
    e = result["env"]
    lines = [f"gpu_check on {e['gpu'] or e['device']} (torch {e['torch']}, Python {e['python']}, "
             f"{'quick' if e['quick'] else 'full'} sizes, {result['seconds']} s); libraries: "
             + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in e["libraries"].items()),
             f"{'row':<23} {'status':<8} {'rate':>14} {'unit':<20} backend / note", "-" * 110]
    for r in result["rows"]:
        rate = f"{r['rate']:,.1f}" if r["rate"] is not None else "-"
        lines.append(f"{r['row']:<23} {r['status']:<8} {rate:>14} {r['unit']:<20} {r['backend']}"
                     + (f" | {r['note']}" if r["note"] else ""))
    s = result.get("search") or {}
    if s:
        lines.append(f"near-duplicate search paths agree: {s['pairs_agree']} (pairs {s['pairs']}, planted {s['planted']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (what the test suite runs with --device cpu)")
    ap.add_argument("--json", type=Path, default=REPO / "perf" / "gpu_check.json")
    a = ap.parse_args(argv)
    result = run(a.device, a.quick)
    print(table(result))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    try:
        from curate.core.atomic import write_json
    except ImportError:  # a checkout whose dependencies are not installed: write it plainly
        a.json.write_text(json.dumps(result, indent=1))
    else:
        write_json(a.json, result)
    print(f"wrote {a.json}")
    return 0 if all(r["status"] != "failed" for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
