"""Build a small POOL directory in exactly the docs/FORMATS.md "Pools" contract, for tests.

    from tests.pool_factory import make_pool
    fp = make_pool(tmp_path / "pool", n_shards=2, per_shard=20, corrupt=1, failed=2)
    fp.pool                       # Path to POOL/
    fp.success_uids(0)            # uids with status == "success" in shard 0 (includes the corrupt ones)
    fp.corrupt_uids, fp.failed_uids, fp.all_uids

Layout written (what the downloader produces):
    POOL/shards/{shard:08d}.tar       webdataset members {key}.jpg, {key}.txt, {key}.json (json has uid)
    POOL/metadata/{shard:08d}.parquet one row per input row: uid, url, text, shard, key, status,
                                      error_message, width, height, original_width, original_height, sha256

Per shard, `per_shard` input rows: the first `failed` of them (in a deterministic shuffled order)
have status "failed_to_download" and no sample in the tar; `corrupt` more have status "success"
but undecodable image bytes in the tar (alternately garbage bytes and a truncated JPEG), which is
what bit rot or a lying server leaves behind; the rest are real JPEGs of `image_size` pixels
(random shapes and colours, so every image differs). Everything is seeded: same arguments, same
bytes.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from curate.core.atomic import write_parquet
from curate.core.uids import make_uid

WORDS = (
    "red blue green small large cat dog tree house car boat flower star moon sun bird fish apple "
    "clock chair cup hat shoe key book lamp drum kite robot cloud mountain river bridge"
).split()

METADATA_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("url", pa.string()),
        ("text", pa.string()),
        ("shard", pa.int64()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("sha256", pa.string()),
    ]
)


@dataclass
class FakePool:
    """What `make_pool` wrote, so tests can reconcile counts and uids."""

    pool: Path
    n_shards: int
    rows: list[dict] = field(default_factory=list)  # every metadata row, in shard/key order

    @property
    def all_uids(self) -> list[str]:
        return [r["uid"] for r in self.rows]

    @property
    def corrupt_uids(self) -> list[str]:
        return [r["uid"] for r in self.rows if r["_corrupt"]]

    @property
    def failed_uids(self) -> list[str]:
        return [r["uid"] for r in self.rows if r["status"] != "success"]

    def success_uids(self, shard: int | None = None) -> list[str]:
        """uids with a sample in the tar (status success), optionally for one shard, in key order."""
        return [
            r["uid"] for r in self.rows if r["status"] == "success" and (shard is None or r["shard"] == shard)
        ]

    def image_bytes(self) -> dict[str, bytes]:
        """uid -> the exact image bytes stored in the tar (success rows only)."""
        return {r["uid"]: r["_image"] for r in self.rows if r["status"] == "success"}

    def texts(self) -> dict[str, str]:
        return {r["uid"]: r["text"] for r in self.rows}


def _random_image(rng: random.Random, size: int) -> "PIL.Image.Image":  # noqa: F821
    from PIL import Image, ImageDraw

    # Vary the aspect ratio a little so preprocessing (resize + center crop) is exercised.
    w = size
    h = max(8, int(size * rng.choice([1.0, 0.75, 1.25])))
    bg = tuple(rng.randrange(256) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randint(4, w // 2 + 4), y0 + rng.randint(4, h // 2 + 4)
        fill = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
    return img


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def make_pool(
    dir: str | Path,
    n_shards: int = 2,
    per_shard: int = 20,
    corrupt: int = 1,
    failed: int = 2,
    seed: int = 0,
    image_size: int = 64,
) -> FakePool:
    """Write a pool of `n_shards` shards with `per_shard` metadata rows each (see module doc).

    `corrupt` and `failed` are counts per shard; `per_shard - failed` samples are in each tar.
    """
    import hashlib

    if corrupt + failed > per_shard:
        raise ValueError("corrupt + failed must not exceed per_shard")
    pool = Path(dir)
    (pool / "shards").mkdir(parents=True, exist_ok=True)
    (pool / "metadata").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    fp = FakePool(pool=pool, n_shards=n_shards)
    n_corrupt_written = 0
    for shard in range(n_shards):
        order = list(range(per_shard))
        rng.shuffle(order)
        failed_idx = set(order[:failed])
        corrupt_idx = set(order[failed : failed + corrupt])
        rows = []
        tar_path = pool / "shards" / f"{shard:08d}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"  # img2dataset's key format (shard digits + index digits)
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
                url = f"http://127.0.0.1:8000/img/{shard}/{i}.jpg"
                uid = make_uid(url, text)
                row = dict(
                    uid=uid, url=url, text=text, shard=shard, key=key, status="success", error_message=None,
                    width=None, height=None, original_width=None, original_height=None, sha256=None,
                    _corrupt=False, _image=None,
                )
                if i in failed_idx:
                    row["status"] = "failed_to_download"
                    row["error_message"] = "HTTP Error 404: Not Found"
                    rows.append(row)
                    continue
                img = _random_image(rng, image_size)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                data = buf.getvalue()
                row.update(width=img.width, height=img.height, original_width=img.width, original_height=img.height)
                if i in corrupt_idx:
                    data = b"\x00this is not an image\xff" if n_corrupt_written % 2 == 0 else data[: len(data) // 3]
                    n_corrupt_written += 1
                    row["_corrupt"] = True
                row["sha256"] = hashlib.sha256(data).hexdigest()
                row["_image"] = data
                meta = {
                    "uid": uid, "url": url, "caption": text, "key": key, "status": "success",
                    "error_message": None, "width": row["width"], "height": row["height"],
                    "original_width": row["original_width"], "original_height": row["original_height"],
                    "sha256": row["sha256"],
                }
                _add_member(tar, f"{key}.jpg", data)
                _add_member(tar, f"{key}.txt", text.encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                rows.append(row)
        table = pa.Table.from_pylist(
            [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], schema=METADATA_SCHEMA
        )
        write_parquet(pool / "metadata" / f"{shard:08d}.parquet", table)
        fp.rows.extend(rows)
    return fp


def bomb_png(side: int) -> bytes:
    """A valid, complete 1-bit PNG declaring side x side pixels: a few hundred KB on disk, side**2 * 3 bytes
    once decoded to RGB. Used to check that every decoder refuses it by its header before allocating."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
