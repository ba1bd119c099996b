"""Throughput of `curate embed` against a naive loop and the compute ceiling, on the same pool.

    .venv/bin/python -m perf.bench_embed [--models curate-tiny,ViT-B-32] [--images 2000,128] [--repeats 2]

For each model (random init: speed does not depend on the weights) it builds one pool of real
JPEGs in the contract format (tests/pool_factory.py) and measures, side by side in this process:

  naive      single process: read tar -> PIL decode -> preprocess -> batch -> encode_image and
             encode_text (full context) under torch.no_grad (the simple path of clip-retrieval)
  curate     curate.embed.stage.Embedder.run (reads tars, decodes, embeds, writes parquet; the model is
             loaded before timing, as for the others) with each decode mode: DataLoader worker
             processes (the default, 1 on CPU), a thread pool ahead of the model, and inline
  ceiling    forward only on pre-decoded, pre-tokenized tensors: `plain` = encode_image +
             encode_text as open_clip does it; `curate` = the forward curate embed uses

Images/s counts every successful pool row (all methods process the same rows). Each method runs
`--repeats` times interleaved and the best time is kept (the machine is shared; best-of is the
usual noise filter). Prints a markdown table and appends nothing by itself; copy it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from curate.embed.stage import EmbedConfig, Embedder, load_jobs, encode_text_trimmed  # noqa: E402
from curate.clip.models import load_model  # noqa: E402
from curate.pool.io import decode_image, iter_samples, list_shards, read_shard_metadata  # noqa: E402
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


def predecode(lm, pool: Path, batch: int):
    out = []
    for tar, texts in rows_of(pool):
        samples = [s for s in iter_samples(tar) if s.key in texts]
        for i in range(0, len(samples), batch):
            c = samples[i:i + batch]
            imgs = []
            for s in c:
                try:
                    imgs.append(lm.preprocess(decode_image(s.image)))
                except ValueError:
                    pass
            out.append((torch.stack(imgs), lm.tokenizer([texts[s.key] for s in c]), len(c)))
    return out


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


def bench_model(arch: str, n_images: int, batch: int, repeats: int, image_size: int, work: Path) -> dict:
    n_shards = 4 if n_images >= 400 else 2
    per = n_images // n_shards
    pool = work / f"pool-{arch}"
    if pool.exists():
        shutil.rmtree(pool)
    make_pool(pool, n_shards=n_shards, per_shard=per, corrupt=1, failed=0, seed=1, image_size=image_size)
    lm = load_model(arch, None, "cpu")
    model_cl = lm.model.to(memory_format=torch.channels_last)
    cfg = EmbedConfig(pool=pool, model=arch, batch_size=batch, progress=False, device="cpu")
    embedder = Embedder(cfg, lm.model_id)
    embedder.loaded, embedder.device, embedder.model = lm, "cpu", model_cl
    with torch.inference_mode():
        embedder.dims = int(model_cl.encode_text(lm.tokenizer([""])).shape[-1])

    def run_curate(decode, loader_workers):
        shutil.rmtree(pool / "embeddings", ignore_errors=True)
        embedder.cfg.decode, embedder.cfg.loader_workers = decode, loader_workers
        res = embedder.run(load_jobs(list_shards(pool)))
        return sum(r["rows"] for r in res)

    batches = predecode(lm, pool, batch)
    methods = {
        "naive": lambda: naive(lm, pool, batch),
        "curate (decode thread pool, 2 threads)": lambda: run_curate("thread", 2),
        "curate (default: decode in 1 DataLoader process)": lambda: run_curate("process", 1),
        "curate (decode in 2 DataLoader processes)": lambda: run_curate("process", 2),
        "curate (inline decode, no overlap)": lambda: run_curate("inline", 0),
        "ceiling plain": lambda: ceiling_plain(lm.model, batches),
        "ceiling curate": lambda: ceiling_curate(model_cl, batches),
    }
    # warm-up (allocator, oneDNN kernels) on one batch
    ceiling_plain(lm.model, batches[:1])
    ceiling_curate(model_cl, batches[:1])
    best: dict[str, float] = {}
    count: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            t = time.perf_counter()
            count[name] = fn()
            dt = time.perf_counter() - t
            best[name] = min(best.get(name, float("inf")), dt)
    rows = {k: count[k] / best[k] for k in methods}
    return {"arch": arch, "images": count["naive"], "batch": batch, "ips": rows}


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
    print(f"torch threads={torch.get_num_threads()} cpus={os.cpu_count()} image_size={a.image_size}")
    out = []
    try:
        for arch, n, b in zip(a.models.split(","), a.images.split(","), a.batch.split(",")):
            r = bench_model(arch, int(n), int(b), a.repeats, a.image_size, work)
            out.append(r)
            ips = r["ips"]
            print(f"\n### {arch}: {r['images']} images, batch {r['batch']}, best of {a.repeats}")
            print("| method | images/s | vs naive | vs ceiling plain | vs ceiling curate |")
            print("|---|---:|---:|---:|---:|")
            for k, v in ips.items():
                print(f"| {k} | {v:.1f} | {v / ips['naive']:.2f}x | {v / ips['ceiling plain']:.2f} |"
                      f" {v / ips['ceiling curate']:.2f} |")
            sys.stdout.flush()
        from perf.result import bench_result, write

        first = out[0]["ips"]
        default = next(k for k in first if "default" in k)
        write(a.json, bench_result("embed", first[default], first["naive"], "images/s", baseline_name="naive loop",
                                   details={"models": out, "default_mode": default,
                                            "vs_forward_ceiling": first[default] / first["ceiling curate"]}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
