"""Throughput of `curate embed` against the pipeline limit, a naive loop and the compute ceiling.

    .venv/bin/python -m perf.bench_embed [--models curate-tiny,ViT-B-32] [--images 2000,128] [--repeats 2]

For each model (random init: speed does not depend on the weights) it builds one pool of JPEGs in the
contract format (tests/pool_factory.py) and measures, in this process:

  costs      each alone, in process CPU-seconds per image (time.process_time, so a loaded machine
             inflates them less than wall time): (a) the loader's work with the decoder embed really
             uses -- read the tar, decode_image, the model's preprocess, stack, tokenize (ShardBatches,
             iterated inline with 1 torch thread, as in a DataLoader worker) -- once with full decode and
             once with the JPEG draft decode (`decode_image(draft_size=S)`, S from
             curate.embed.stage.draft_side); (b) the forward curate embed runs (image + trimmed text
             towers) on pre-decoded tensors, with 1 torch thread (its CPU work without OpenMP's
             spin-waits) and with the default thread count for reference.
  limit      cores / (a + b) images/s for each decoder, cores = os.cpu_count(): what a pipeline that
             keeps every core busy with nothing but this work could reach. Every mode's images/s is
             reported as a fraction of the limit of the decoder it uses (goal: >= 0.8).
  naive      single process: read tar -> PIL decode -> preprocess -> batch -> encode_image and
             encode_text (full context) under torch.no_grad (the simple path of clip-retrieval)
  curate     curate.embed.stage.Embedder.run (reads tars, decodes, embeds, writes parquet; the model
             is loaded before timing) in each decode mode (DataLoader processes, thread pool, inline),
             with full and with draft decode
  ceiling    forward only on pre-decoded, pre-tokenized tensors: `plain` = encode_image + encode_text
             as open_clip does it; `curate` = the forward curate embed uses
  drift      how far draft decode moves the image embeddings: max and mean (1 - cosine) between the
             full-decode and draft-decode embeddings, float32, on the pool and on real photographs
             (crops of the photos shipped with scikit-learn and matplotlib, re-encoded as JPEG at
             256-640 px; skipped when those packages are absent).

Images/s counts every successful pool row. Each method runs `--repeats` times interleaved and the
best time is kept; its process + children CPU-seconds are printed too, and the load average at the
start and end, because the machine is shared. Prints markdown tables; copy them to RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from curate.clip.models import load_model  # noqa: E402
from curate.embed.stage import EmbedConfig, Embedder, ShardBatches, draft_side, encode_text_trimmed, load_jobs  # noqa: E402
from curate.pool.io import MAX_IMAGE_PIXELS, decode_image, iter_samples, list_shards, read_shard_metadata  # noqa: E402
from tests.pool_factory import make_pool  # noqa: E402


def rows_of(pool: Path) -> list[tuple[Path, dict[str, str]]]:
    out = []
    for s in list_shards(pool):
        t = read_shard_metadata(s, columns=["key", "text"], success_only=True)
        out.append((s.tar, dict(zip(t["key"].to_pylist(), t["text"].to_pylist()))))
    return out


def naive(lm, pool: Path, batch: int) -> int:
    model, pre, tok = lm.model, lm.preprocess, lm.tokenizer
    n = 0

    def flush(imgs, texts):
        with torch.no_grad():
            if imgs:
                F.normalize(model.encode_image(torch.stack(imgs)), dim=-1).numpy()
            F.normalize(model.encode_text(tok(texts)), dim=-1).numpy()

    for tar, texts in rows_of(pool):
        imgs, caps = [], []
        for s in iter_samples(tar):
            if s.key not in texts:
                continue
            try:
                imgs.append(pre(decode_image(s.image)))
            except ValueError:
                pass
            caps.append(texts[s.key])
            n += 1
            if len(caps) == batch:
                flush(imgs, caps)
                imgs, caps = [], []
        if caps:
            flush(imgs, caps)
    return n


def curate_forward(model, images, tokens):
    with torch.inference_mode():
        if images is not None:
            x = images.contiguous(memory_format=torch.channels_last)
            F.normalize(model.encode_image(x), dim=-1).numpy()
        F.normalize(encode_text_trimmed(model, tokens), dim=-1).numpy()


def loader_batches(lm, pool: Path, batch: int, draft: int | None) -> list[dict]:
    """Every batch exactly as embed's loader makes it (ShardBatches), iterated inline in this process."""
    sb = ShardBatches(load_jobs(list_shards(pool)), lm.preprocess, lm.tokenizer, batch, MAX_IMAGE_PIXELS,
                      draft_size=draft)
    return list(sb)


def cpu_per_image(fn, n: int, threads: int, repeats: int) -> float:
    """Least process CPU-seconds of `fn()` over `repeats` runs, per image, at `threads` torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = float("inf")
        for _ in range(repeats):
            t = time.process_time()
            fn()
            best = min(best, time.process_time() - t)
        return best / n
    finally:
        torch.set_num_threads(old)


def photo_jpegs(n_per_photo: int = 20, seed: int = 0) -> list[bytes]:
    """Real photographs for the drift check: seeded crops of the photos scikit-learn and matplotlib ship,
    resized to a longest side of 256-640 px and re-encoded as JPEG (quality 90, as img2dataset writes)."""
    from PIL import Image

    found = []
    for mod, rel in (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
                     ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")):
        try:
            p = Path(__import__(mod).__file__).parent / rel
        except ImportError:
            continue
        if p.exists():
            found.append(p)
    rng = random.Random(seed)
    out = []
    for p in found:
        im = Image.open(p).convert("RGB")
        W, H = im.size
        for _ in range(n_per_photo):
            f = rng.uniform(0.5, 1.0)
            w, h = int(W * f), min(H, int(H * f * rng.choice([0.75, 1.0, 1.25])))
            x0, y0 = rng.randrange(W - w + 1), rng.randrange(H - h + 1)
            c = im.crop((x0, y0, x0 + w, y0 + h))
            s = rng.choice([256, 384, 512, 640]) / max(c.size)
            c = c.resize((max(1, round(c.size[0] * s)), max(1, round(c.size[1] * s))), Image.LANCZOS)
            buf = io.BytesIO()
            c.save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def _decodes(data: bytes) -> bool:
    try:
        decode_image(data)
        return True
    except ValueError:
        return False


def drift(lm, model_cl, datas: list[bytes], side: int | None) -> dict:
    """max / mean (1 - cosine) of image embeddings, full decode vs draft decode, float32."""
    datas = [b for b in datas if _decodes(b)]  # the pool's corrupt images have no embedding either way
    if side is None or not datas:
        return {"images": len(datas), "reduced": 0, "max_1_minus_cos": 0.0, "mean_1_minus_cos": 0.0}
    full = [decode_image(b) for b in datas]
    draft = [decode_image(b, draft_size=side) for b in datas]
    cos = []
    for i in range(0, len(datas), 32):
        with torch.inference_mode():
            a = torch.stack([lm.preprocess(x) for x in full[i:i + 32]]).contiguous(memory_format=torch.channels_last)
            b = torch.stack([lm.preprocess(x) for x in draft[i:i + 32]]).contiguous(memory_format=torch.channels_last)
            cos.append((F.normalize(model_cl.encode_image(a), dim=-1) * F.normalize(model_cl.encode_image(b), dim=-1)).sum(1))
    d = 1 - torch.cat(cos).double()
    return {"images": len(datas), "reduced": sum(x.size != y.size for x, y in zip(full, draft)),
            "max_1_minus_cos": float(d.max()), "mean_1_minus_cos": float(d.mean())}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bench_model(arch: str, n_images: int, batch: int, repeats: int, image_size: int, work: Path,
                photos: list[bytes]) -> dict:
    n_shards = 4 if n_images >= 400 else 2
    per = n_images // n_shards
    pool = work / f"pool-{arch}"
    if pool.exists():
        shutil.rmtree(pool)
    make_pool(pool, n_shards=n_shards, per_shard=per, corrupt=1, failed=0, seed=1, image_size=image_size)
    lm = load_model(arch, None, "cpu")
    side = draft_side(lm.preprocess)
    model_cl = lm.model.to(memory_format=torch.channels_last)
    cfg = EmbedConfig(pool=pool, model=arch, batch_size=batch, progress=False, device="cpu")
    embedder = Embedder(cfg, lm.model_id)
    embedder.loaded, embedder.device, embedder.model = lm, "cpu", model_cl
    with torch.inference_mode():
        embedder.dims = int(model_cl.encode_text(lm.tokenizer([""])).shape[-1])

    def run_curate(decode, loader_workers, draft, model_threads=None):
        shutil.rmtree(pool / "embeddings", ignore_errors=True)
        embedder.cfg.decode, embedder.cfg.loader_workers, embedder.cfg.jpeg_draft = decode, loader_workers, draft
        # the model's intra-op threads: "auto" = what `curate embed` picks (EmbedConfig.model_threads None),
        # else explicit (None here = torch's default, every core)
        embedder.cfg.model_threads = None if model_threads == "auto" else (model_threads or torch.get_num_threads())
        res = embedder.run(load_jobs(list_shards(pool)))
        return sum(r["rows"] for r in res)

    # --- per-image CPU costs, each alone (the loader's with each decoder; the forward on pre-decoded tensors)
    n_rows = sum(len(t) for _, t in rows_of(pool))
    batches = loader_batches(lm, pool, batch, None)
    fwd = [(b["images"], b["tokens"]) for b in batches]
    curate_forward(model_cl, *fwd[0])  # warm-up (allocator, oneDNN kernels)
    cores = os.cpu_count() or 1
    costs = {
        "loader full": cpu_per_image(lambda: loader_batches(lm, pool, batch, None), n_rows, 1, repeats),
        "loader draft": cpu_per_image(lambda: loader_batches(lm, pool, batch, side), n_rows, 1, repeats),
        "forward (1 thread)": cpu_per_image(lambda: [curate_forward(model_cl, *f) for f in fwd], n_rows, 1, repeats),
        f"forward ({torch.get_num_threads()} threads)": cpu_per_image(
            lambda: [curate_forward(model_cl, *f) for f in fwd], n_rows, torch.get_num_threads(), repeats),
    }
    limit = {"full": cores / (costs["loader full"] + costs["forward (1 thread)"]),
             "draft": cores / (costs["loader draft"] + costs["forward (1 thread)"])}

    ceil_batches = [(b["images"], b["tokens"], len(b["rows"])) for b in batches]
    methods = {
        "naive": (lambda: naive(lm, pool, batch), "full"),
        "curate, 1 DataLoader process, full decode": (lambda: run_curate("process", 1, False), "full"),
        "curate, 2 DataLoader processes, full decode": (lambda: run_curate("process", 2, False), "full"),
        "curate, inline, full decode": (lambda: run_curate("inline", 0, False), "full"),
        "curate, 1 DataLoader process, draft": (lambda: run_curate("process", 1, True), "draft"),
        "curate, 2 DataLoader processes, draft": (lambda: run_curate("process", 2, True), "draft"),
        "curate default: 1 DataLoader process, draft, model on threads - 1": (
            lambda: run_curate("process", 1, True, "auto"), "draft"),
        "curate, thread pool (2 threads), draft": (lambda: run_curate("thread", 2, True), "draft"),
        "curate, inline, draft": (lambda: run_curate("inline", 0, True), "draft"),
        "ceiling plain": (lambda: ceiling_plain(lm.model, ceil_batches), None),
        "ceiling curate": (lambda: ceiling_curate(model_cl, ceil_batches), None),
    }
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    count: dict[str, int] = {}
    for _ in range(repeats):
        for name, (fn, _) in methods.items():
            c0, t = time.process_time() + children_cpu(), time.perf_counter()
            count[name] = fn()
            dt = time.perf_counter() - t
            if dt < best.get(name, float("inf")):
                best[name], cpu[name] = dt, time.process_time() + children_cpu() - c0
    ips = {k: count[k] / best[k] for k in methods}
    drifts = {"pool": drift(lm, model_cl, [s.image for tar, _ in rows_of(pool) for s in iter_samples(tar)], side),
              "photos": drift(lm, model_cl, photos, side)}
    return {"arch": arch, "images": count["naive"], "batch": batch, "image_size": image_size, "draft_side": side,
            "cores": cores, "costs_cpu_s_per_image": costs, "limit": limit, "ips": ips,
            "decoder": {k: v[1] for k, v in methods.items()}, "cpu_s": cpu, "drift": drifts}


def ceiling_plain(model, batches) -> int:
    with torch.no_grad():
        for imgs, toks, _ in batches:
            F.normalize(model.encode_image(imgs), dim=-1).numpy()
            F.normalize(model.encode_text(toks), dim=-1).numpy()
    return sum(b[2] for b in batches)


def ceiling_curate(model_cl, batches) -> int:
    for imgs, toks, _ in batches:
        curate_forward(model_cl, imgs, toks)
    return sum(b[2] for b in batches)


def print_model(r: dict, repeats: int) -> None:
    ips, lim = r["ips"], r["limit"]
    print(f"\n### {r['arch']}: {r['images']} images ({r['image_size']} px JPEGs), batch {r['batch']}, best of {repeats}, "
          f"draft side {r['draft_side']}")
    print("\nper-image costs, process CPU-seconds, each measured alone:\n")
    print("| cost | ms CPU / image |\n|---|---:|")
    for k, v in r["costs_cpu_s_per_image"].items():
        print(f"| {k} | {v * 1e3:.3f} |")
    print(f"\npipeline limit = {r['cores']} cores (os.cpu_count) / (loader + forward at 1 thread): "
          f"full decode {lim['full']:.0f} img/s, draft decode {lim['draft']:.0f} img/s\n")
    print("| method | images/s | vs its limit | vs naive | vs ceiling curate | CPU-s |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, v in ips.items():
        dec = r["decoder"][k]
        vs = f"{v / lim[dec]:.2f}" if dec else "-"
        print(f"| {k} | {v:.1f} | {vs} | {v / ips['naive']:.2f}x | {v / ips['ceiling curate']:.2f} | {r['cpu_s'][k]:.2f} |")
    for where, d in r["drift"].items():
        print(f"\ndraft vs full decode, image embeddings, {where}: {d['images']} images ({d['reduced']} decoded at reduced "
              f"scale), max 1-cos {d['max_1_minus_cos']:.2e}, mean {d['mean_1_minus_cos']:.2e}")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="curate-tiny,ViT-B-32")
    ap.add_argument("--images", default="2000,128", help="pool rows per model (comma list, same order)")
    ap.add_argument("--batch", default="128,32")
    ap.add_argument("--image-size", type=int, default=256, help="stored JPEG side (DataComp stores 512)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="perf.run_all's size: curate-tiny, 400 images, 1 repeat")
    ap.add_argument("--json", help="write the result (perf/result.py's shape) to this file")
    a = ap.parse_args()
    if a.quick:
        a.models, a.images, a.batch, a.repeats = "curate-tiny", "400", "100", 1
    work = Path(tempfile.mkdtemp(prefix="bench_embed-"))
    load0 = os.getloadavg()
    print(f"torch threads={torch.get_num_threads()} cpus={os.cpu_count()} image_size={a.image_size} "
          f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    out = []
    photos = photo_jpegs()
    try:
        for arch, n, b in zip(a.models.split(","), a.images.split(","), a.batch.split(",")):
            r = bench_model(arch, int(n), int(b), a.repeats, a.image_size, work, photos)
            out.append(r)
            print_model(r, a.repeats)
        load1 = os.getloadavg()
        print(f"\nload average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
        from perf.result import bench_result, write

        first = out[0]
        default = "curate default: 1 DataLoader process, draft, model on threads - 1"
        write(a.json, bench_result("embed", first["ips"][default], first["limit"]["draft"], "images/s",
                                   baseline_name="pipeline limit (cores / CPU-s per image)",
                                   ratio_name="fraction of the pipeline limit", goal=0.8,
                                   details={"models": out, "default_mode": default, "load_start": load0,
                                            "load_end": load1,
                                            "vs_naive": first["ips"][default] / first["ips"]["naive"],
                                            "vs_forward_ceiling": first["ips"][default] / first["ips"]["ceiling curate"]}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
