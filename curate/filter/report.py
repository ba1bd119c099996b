"""report.html for a filtered subset: what each step did, on what scores, to which samples.

One self-contained HTML file (images inlined as base64 PNG, no scripts, no external assets) so it
can be attached to an issue or opened from any machine:
- the funnel: rows in / kept per step (matplotlib bar chart + a table);
- for every step that computed a score, a histogram of the scores of the rows that reached it, the
  applied threshold marked;
- thumbnails of a few kept rows and a few dropped rows (with the step and reason that dropped
  them), read from the pool's shards when they exist (never extracted: members read in memory via
  `curate.pool.io`, images decoded under its pixel cap).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from curate.core.atomic import write_text
from curate.filter.duck import run_sql, sql_str
from curate.filter.step_record import StepRecord

N_THUMBS = 8
THUMB_PX = 96


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _funnel_png(steps: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(steps)))
    labels = [s["step"] for s in steps]
    y = np.arange(len(steps))[::-1]
    ax.barh(y, [s["in"] for s in steps], color="#d9d9d9", label="reached step")
    ax.barh(y, [s["kept"] for s in steps], color="#3a7bd5", label="kept")
    ax.set_yticks(y, labels)
    ax.set_xlabel("rows")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _hist_png(scores: np.ndarray, threshold: float | None, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.hist(scores, bins=60, color="#3a7bd5")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="#d62728", linestyle="--", label=f"threshold {threshold:.4f}")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("score")
    ax.set_ylabel("rows")
    return _png(fig)


def _thumbnails(pool: Path, rows: list[dict[str, Any]]) -> dict[str, str]:
    """uid -> base64 PNG thumbnail for rows whose shard tar exists; missing or bad images skipped."""
    from curate.pool.io import ImageDecodeError, decode_image, iter_samples

    by_shard: dict[int, dict[str, str]] = {}
    for r in rows:
        if r.get("shard") is not None and r.get("key"):
            by_shard.setdefault(int(r["shard"]), {})[str(r["key"])] = r["uid"]
    out: dict[str, str] = {}
    for shard, keys in by_shard.items():
        tar = pool / "shards" / f"{shard:08d}.tar"
        if not tar.is_file():
            continue
        errors: list[str] = []
        for s in iter_samples(tar, errors=errors):
            uid = keys.get(s.key)
            if uid is None or s.image is None:
                continue
            try:
                img = decode_image(s.image)
            except ImageDecodeError:
                continue
            img.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out[uid] = base64.b64encode(buf.getvalue()).decode("ascii")
            if len(out) >= len(rows):
                break
    return out


def write_report(out: Path, manifest: dict[str, Any], con, records: list[StepRecord]) -> Path:
    """Build OUT/report.html from the run's step files (sampled in DuckDB, so it is cheap at 12.8M rows).

    `con` is a DuckDB connection with the pool's metadata as the view ``meta``; `records` are the executed
    steps in order.
    """
    steps = manifest["counts"]["steps"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>curate report: "
        f"{html.escape(manifest['recipe']['name'])}</title><style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        ".thumbs{display:flex;flex-wrap:wrap;gap:8px}.t{width:150px;font-size:11px;word-wrap:break-word}</style></head><body>",
        f"<h1>Recipe {html.escape(manifest['recipe']['name'])}</h1>",
        f"<p>Pool {html.escape(manifest['pool'])}: {manifest['counts']['pool_rows']} rows, "
        f"{manifest['counts']['candidates']} downloaded; subset {manifest['counts']['subset']} rows. "
        f"Recipe hash {manifest['recipe_hash'][:16]}, models {html.escape(', '.join(manifest['model_ids']) or 'none')}.</p>",
        "<h2>Funnel</h2>",
        f"<img alt='funnel' src='data:image/png;base64,{_funnel_png(steps)}'>",
        "<table><tr><th>step</th><th>in</th><th>kept</th><th>dropped</th><th>threshold</th></tr>",
    ]
    for s in steps:
        thr = "" if s["threshold"] is None else f"{s['threshold']:.4f}"
        parts.append(f"<tr><td style='text-align:left'>{html.escape(s['step'])}</td><td>{s['in']}</td>"
                     f"<td>{s['kept']}</td><td>{s['dropped']}</td><td>{thr}</td></tr>")
    parts.append("</table><h2>Scores</h2>")
    for e in records:
        f = e.file
        n_scored = run_sql(con, f"SELECT count(score) FROM read_parquet({sql_str(f)})")[0][0]
        if not n_scored:
            continue
        # A uniform sample of at most 200k scores keeps the histogram cheap and faithful.
        sc = con.sql(f"SELECT score FROM read_parquet({sql_str(f)}) WHERE score IS NOT NULL AND isfinite(score) "
                         f"USING SAMPLE 200000 ROWS").fetchnumpy()["score"]
        parts.append(f"<h3>{html.escape(e.step)}</h3><img alt='scores {html.escape(e.step)}' "
                     f"src='data:image/png;base64,{_hist_png(np.asarray(sc, float), e.threshold, e.step)}'>")
    # Samples: the first kept and dropped rows by uid (deterministic), with the deciding step.
    kept = run_sql(con,
        f"SELECT m.uid, m.text, m.shard, m.key FROM read_parquet({sql_str(out / 'subset.parquet')}) m "
        f"ORDER BY m.uid LIMIT {N_THUMBS}")
    files = [(e.step, e.file) for e in records if e.step != "pool"]
    dropped = []
    if files:
        union = " UNION ALL ".join(f"SELECT uid, {sql_str(s)} AS step, reason FROM read_parquet({sql_str(f)}) WHERE NOT kept"
                                   for s, f in files)
        dropped = run_sql(con,
            f"SELECT d.uid, m.text, m.shard, m.key, d.step, d.reason FROM ({union}) d JOIN meta m ON m.uid = d.uid "
            f"ORDER BY d.uid LIMIT {N_THUMBS}")
    rows = [dict(uid=r[0], text=r[1], shard=r[2], key=r[3]) for r in kept + [tuple(d[:4]) for d in dropped]]
    thumbs = _thumbnails(Path(manifest["pool"]), rows)
    for title, items in (("Kept samples", [(r, None) for r in kept]), ("Dropped samples", [(d[:4], d) for d in dropped])):
        parts.append(f"<h2>{title}</h2><div class='thumbs'>")
        for r, d in items:
            img = (f"<img alt='' src='data:image/png;base64,{thumbs[r[0]]}'>" if r[0] in thumbs
                   else "<div style='height:96px;background:#eee'>no image in shards</div>")
            why = f"<br><b>{html.escape(d[4])}</b>: {html.escape(str(d[5]))}" if d else ""
            parts.append(f"<div class='t'>{img}<br>{html.escape(str(r[1])[:120])}{why}<br><code>{r[0][:12]}</code></div>")
        parts.append("</div>")
    parts.append("</body></html>")
    dest = out / "report.html"
    write_text(dest, "\n".join(parts))
    return dest
