"""Calibrate the CPU scale `tiny`: does a run at its fixed hyperparameters learn something measurable?

Builds a throwaway webdataset from real offline images (Tux Paint stamps with their English captions,
Twemoji with their names; read by curate.pool.offline.sources), holds out ~15% of the items (by group, so an
emoji and its skin-tone variants stay together), trains `curate train --scale tiny` on the rest and
measures image->text and text->image recall@5 on the held-out items against chance and against the
same architecture untrained.

    nice .venv/bin/python -m perf.calibrate_tiny --work /tmp/calib --seeds 0 [--scale tiny]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

HELDOUT_FRACTION = 0.15


def _held_out(item) -> bool:
    key = (item.group or item.source_id).encode()
    return int(hashlib.sha256(b"calib:" + key).hexdigest()[:8], 16) / 0xFFFFFFFF < HELDOUT_FRACTION


def build(work: Path) -> tuple[Path, list[dict]]:
    """Write work/train/shards/*.tar and return the held-out items as (jpeg bytes, caption)."""
    from curate.pool.offline.sources import (SourcePaths, encode_image, read_tuxpaint, read_twemoji, render_svg,
                                        resize_png)
    from curate.core.uids import make_uid

    done = work / "heldout.json"
    if done.exists():
        held = json.loads(done.read_text())
        for h in held:
            h["jpg"] = (work / "heldout" / h["file"]).read_bytes()
        return work / "train", held
    paths = SourcePaths().resolved()
    items = read_tuxpaint(paths.tuxpaint) + read_twemoji(paths.twemoji)
    (work / "train" / "shards").mkdir(parents=True, exist_ok=True)
    (work / "heldout").mkdir(parents=True, exist_ok=True)
    held, n_train, shard, tf = [], 0, 0, None
    for it in items:
        try:
            raw = it.path.read_bytes()
            png = render_svg(raw, 80, 4_000_000, 10.0) if it.is_svg else resize_png(raw, 80, 4_000_000)
            jpg = encode_image(png, "jpg")
        except Exception:  # a source image that does not render is simply left out of the calibration set
            continue
        if _held_out(it):
            name = f"{len(held):05d}.jpg"
            (work / "heldout" / name).write_bytes(jpg)
            held.append({"file": name, "caption": it.caption, "source": it.source, "jpg": jpg})
            continue
        if tf is None or n_train % 1000 == 0:
            if tf is not None:
                tf.close()
            tf = tarfile.open(work / "train" / "shards" / f"{shard:08d}.tar", "w")
            shard += 1
        uid = make_uid(f"file://{it.source}/{it.source_id}", it.caption)
        for ext, data in (("jpg", jpg), ("txt", it.caption.encode()), ("json", json.dumps({"uid": uid}).encode())):
            ti = tarfile.TarInfo(f"{uid}.{ext}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        n_train += 1
    tf.close()
    done.write_text(json.dumps([{k: v for k, v in h.items() if k != "jpg"} for h in held]))
    print(f"calibration set: {n_train} train items in {shard} shards, {len(held)} held out")
    return work / "train", held


def recall_at(model_arch: str, weights: str | None, held: list[dict], k: int = 5) -> dict:
    """Held-out retrieval: image->text against the unique captions, and text->image."""
    import numpy as np
    import torch
    from PIL import Image

    from curate.clip.models import load_model

    lm = load_model(model_arch, weights, device="cpu")
    caps = sorted({h["caption"] for h in held})
    cap_idx = {c: i for i, c in enumerate(caps)}
    with torch.no_grad():
        imgs = torch.stack([lm.preprocess(Image.open(io.BytesIO(h["jpg"])).convert("RGB")) for h in held])
        ie = torch.cat([lm.model.encode_image(imgs[i:i + 256], normalize=True) for i in range(0, len(imgs), 256)])
        te = torch.cat([lm.model.encode_text(lm.tokenizer(caps[i:i + 256]), normalize=True)
                        for i in range(0, len(caps), 256)])
    sims = (ie @ te.T).numpy()
    truth = np.array([cap_idx[h["caption"]] for h in held])
    topk = np.argsort(-sims, axis=1)[:, :k]
    i2t = float(np.mean([truth[i] in topk[i] for i in range(len(held))]))
    # text->image: for each unique caption, is one of its images in the top k images?
    topk_img = np.argsort(-sims.T, axis=1)[:, :k]
    t2i = float(np.mean([any(truth[j] == c for j in topk_img[c]) for c in range(len(caps))]))
    return {"i2t_R@5": round(i2t, 4), "t2i_R@5": round(t2i, 4), "n_images": len(held), "n_captions": len(caps),
            "chance_i2t_R@5": round(k / len(caps), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/curate_calib"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--scale", default="tiny")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from benchmark.scales import get_scale
    from benchmark.train import TrainConfig, train

    data, held = build(args.work)
    sc = get_scale(args.scale)
    results = {"untrained": recall_at(sc.model, None, held)}
    print("untrained", results["untrained"], flush=True)
    for seed in args.seeds:
        out = args.work / "runs" / f"{args.scale}-seed{seed}"
        t0 = time.perf_counter()
        info = train(TrainConfig(data=data, scale=args.scale, out=out, seed=seed, workers=args.workers, resume=True))
        r = recall_at(sc.model, str(out / "final.pt"), held)
        r["train_seconds"] = info.get("seconds_this_session") or round(time.perf_counter() - t0, 1)
        results[f"seed{seed}"] = r
        print(f"seed {seed}", r, flush=True)
    (args.work / f"calibration_{args.scale}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
