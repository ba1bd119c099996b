"""Load: a 100,000-row pool end to end through `curate download` and `curate filter`, every row accounted for.

Made cheap on purpose (the point is accounting at volume, not download speed, which perf/ measures):
four 8x8 PNGs behind 9,000 distinct URLs (query strings) are really fetched over loopback HTTP, 1,000
URLs answer 404, and the other 90,000 rows are the kinds of input a crawl is full of and that are
rejected before any request: exact (url, caption) repeats, non-http schemes, empty captions. Then:

    input rows == metadata rows (pool verify, uid multiset == input's)
    pool-step ledger rows == input rows; each step: in == kept + dropped; subset rows == last step's kept
    every non-success metadata row is in the ledger as dropped with its status as the reason
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

N_ROWS = 100_000
N_FETCHED = 9_000  # distinct http URLs served
N_404 = 1_000
N_BAD_SCHEME = 4_000
N_EMPTY = 1_000


def test_100k_rows_download_and_filter_reconcile(tmp_path, serve_dir):
    from curate.core import uids as U
    from curate.pool.download import DownloadConfig, download
    from curate.filter.engine import FilterConfig, filter_pool
    from curate.pool.verify import verify_pool

    www = tmp_path / "www"
    www.mkdir()
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray((np.random.RandomState(i).rand(8, 8, 3) * 255).astype("uint8")).save(buf, "PNG")
        (www / f"i{i}.png").write_bytes(buf.getvalue())
    base = serve_dir(tmp_path)
    rng = np.random.default_rng(0)
    words = np.array("red blue cat dog tree house boat sun a the of big".split())
    urls, texts = [], []
    for i in range(N_FETCHED):
        urls.append(f"{base}/i{i % 4}.png?n={i}")
        texts.append(" ".join(rng.choice(words, size=int(rng.integers(1, 6)))) + f" {i}")
    urls += [f"{base}/missing{i}.png" for i in range(N_404)]
    texts += [f"a missing picture {i}" for i in range(N_404)]
    urls += [("file:///etc/passwd?", "ftp://x/", "javascript:alert(", "data:,")[i % 4] + str(i) for i in range(N_BAD_SCHEME)]
    texts += [f"bad scheme {i}" for i in range(N_BAD_SCHEME)]
    urls += [f"{base}/i0.png?empty={i}" for i in range(N_EMPTY)]
    texts += [" " if i % 2 else "" for i in range(N_EMPTY)]
    n_dup = N_ROWS - len(urls)
    src = rng.integers(0, N_FETCHED, size=n_dup)
    urls += [urls[j] for j in src]
    texts += [texts[j] for j in src]
    order = rng.permutation(N_ROWS)  # duplicates and rejects spread over every shard
    urls = [urls[j] for j in order]
    texts = [texts[j] for j in order]
    pq.write_table(pa.table({"url": urls, "text": texts}), tmp_path / "urls.parquet")

    pool = tmp_path / "pool"
    s = download(DownloadConfig(urls=tmp_path / "urls.parquet", out=pool, distributor="multiprocessing",
                                processes=2, threads=32, timeout=10.0, shard_size=10_000, image_size=8,
                                progress=False, echo=False, allow_loopback=True))
    counts = s["counts"]
    assert sum(counts.values()) == N_ROWS
    assert counts["success"] == N_FETCHED and counts["failed_to_download"] == N_404
    assert counts["rejected_bad_url"] == N_BAD_SCHEME
    assert sum(v for k, v in counts.items() if k.startswith("rejected_")) == N_ROWS - N_FETCHED - N_404
    expected_uids = [U.make_uid(u, t) for u, t in zip(urls, texts)]
    rep = verify_pool(pool, expected_uids=expected_uids)
    assert rep.ok, rep.table()
    meta = pq.read_table(pool / "metadata", columns=["uid", "status"])
    assert meta.num_rows == N_ROWS
    assert Counter(meta["uid"].to_pylist()) == Counter(expected_uids)

    (tmp_path / "r.yaml").write_text("name: load\nsteps:\n  - basic: {min_words: 3, min_side: 1, english: false}\n")
    f = filter_pool(FilterConfig(recipe=str(tmp_path / "r.yaml"), pool=str(pool), out=str(tmp_path / "subset"),
                                 progress=False, workers=1, report=False))
    assert f["pool_rows"] == N_ROWS and f["candidates"] == N_FETCHED
    led = pq.read_table(tmp_path / "subset" / "decisions.parquet").to_pandas()
    pool_step = led[led.step == "pool"]
    assert len(pool_step) == N_ROWS  # one ledger row per input row, rejected or not
    assert Counter(pool_step.reason[~pool_step.kept]) == Counter({k: v for k, v in counts.items() if k != "success"})
    for st in f["steps"]:
        assert st["in"] == st["kept"] + st["dropped"]
    basic = led[led.step == "0.basic"]
    assert len(basic) == N_FETCHED and 0 < basic.kept.sum() < N_FETCHED
    assert basic.reason[~basic.kept].notna().all()
    sub = pq.read_table(tmp_path / "subset" / "subset.parquet", columns=["uid"])
    assert sub.num_rows == f["kept"] == basic.kept.sum()
    assert sorted(sub["uid"].to_pylist()) == U.decode(U.load(tmp_path / "subset" / "uids.npy"))
    # the end-to-end equation: input rows = subset rows + recorded rejections (download + every step)
    rejected = int((~pool_step.kept).sum()) + int((~basic.kept).sum())
    assert N_ROWS == sub.num_rows + rejected
    man = json.loads((tmp_path / "subset" / "manifest.json").read_text())
    assert man["counts"]["pool_rows"] == N_ROWS
