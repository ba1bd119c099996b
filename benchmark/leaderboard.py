"""The local leaderboard: a DuckDB file with one row per (submission, scale, seed) and one per task result.

Why DuckDB: ranking, seed aggregation (mean, sample std) and per-task comparisons are plain SQL over two small
tables, the file is a single portable artefact, and the same tables load in pandas/polars for anyone's own plots.

    submissions(name, scale, seed, recipe, arch, official, subset_size, unique_uids, uids_sha256, average,
                n_tasks, n_missing, bundle, created_at, added_at)
    results(name, scale, seed, key, dataset, metric, score)      score = the value of the task's main metric

`curate leaderboard` prints the ranking (mean ± std of the average over seeds), `--html` a page with the plots
inlined (average vs subset size, per-task bars, seed spread). `curate compare A B` (defined here, analysed by
benchmark.compare) tests whether B beats A; `curate leaderboard --compare A B` is its alias.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import click

from curate.core import atomic
from curate.core.errors import CurateError

SCHEMA = """
CREATE TABLE IF NOT EXISTS submissions (
    name VARCHAR NOT NULL, scale VARCHAR NOT NULL, seed BIGINT NOT NULL,
    recipe VARCHAR, arch VARCHAR, official BOOLEAN, subset_size BIGINT, unique_uids BIGINT, uids_sha256 VARCHAR,
    average DOUBLE, n_tasks INTEGER, n_missing INTEGER, bundle VARCHAR, created_at VARCHAR,
    added_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (name, scale, seed)
);
CREATE TABLE IF NOT EXISTS results (
    name VARCHAR NOT NULL, scale VARCHAR NOT NULL, seed BIGINT NOT NULL,
    key VARCHAR NOT NULL, dataset VARCHAR, metric VARCHAR, score DOUBLE,
    PRIMARY KEY (name, scale, seed, key)
);
"""


def default_db() -> Path:
    """$CURATE_LEADERBOARD, else $XDG_DATA_HOME/curate/leaderboard.duckdb (~/.local/share/...)."""
    env = os.environ.get("CURATE_LEADERBOARD")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "curate" / "leaderboard.duckdb"


def connect(db: Path, read_only: bool = False):
    import duckdb

    db = Path(db)
    if read_only and not db.is_file():
        raise CurateError(f"{db}: no leaderboard yet; add one with `curate submit RUN --db {db}`")
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(db), read_only=read_only)
    except duckdb.Error as e:
        raise CurateError(f"{db}: cannot open leaderboard database ({e})") from None
    if not read_only:
        con.execute(SCHEMA)
    return con


def add_bundle(db: Path, bundle: Path) -> dict:
    """Insert (or replace) one bundle's rows: the same name/scale/seed submitted again replaces the old rows."""
    from benchmark.results import average_score, main_value, read_json, read_results

    bundle = Path(bundle)
    decl = read_json(bundle / "bundle.json", "bundle declaration")
    results = read_results(bundle / "results.jsonl")
    avg, missing = average_score(results)
    seed = decl.get("seed")
    row = dict(
        name=decl["name"], scale=str(decl["scale"]), seed=int(seed) if seed is not None else 0,
        recipe=decl.get("recipe"), arch=decl.get("arch"), official=bool(decl.get("official")),
        subset_size=int(decl["subset_size"]), unique_uids=decl.get("unique_uids"), uids_sha256=decl.get("uids_sha256"),
        average=avg, n_tasks=len(results) - len(missing), n_missing=len(missing), bundle=str(bundle.resolve()),
        created_at=decl.get("created_at"),
    )
    con = connect(db)
    try:
        con.execute("BEGIN TRANSACTION")
        key = (row["name"], row["scale"], row["seed"])
        con.execute("DELETE FROM results WHERE name = ? AND scale = ? AND seed = ?", key)
        con.execute("DELETE FROM submissions WHERE name = ? AND scale = ? AND seed = ?", key)
        cols = list(row)
        con.execute(f"INSERT INTO submissions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [row[c] for c in cols])
        con.executemany(
            "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(*key, r["key"], r.get("dataset"), r["main_metric"] if isinstance(r.get("main_metric"), str) else None,
              main_value(r)) for r in results],
        )
        con.execute("COMMIT")
    finally:
        con.close()
    return row


@dataclass
class Standing:
    rank: int
    name: str
    scale: str
    seeds: int
    mean: float | None
    std: float | None  # sample std over seeds (None with one seed)
    subset_size: int
    n_tasks: int
    official: bool


def standings(db: Path, scale: str | None = None) -> list[Standing]:
    """Submissions ranked by mean average over seeds (ties broken by name)."""
    con = connect(db, read_only=True)
    try:
        where = "WHERE scale = ?" if scale else ""
        rows = con.execute(
            f"""SELECT name, scale, count(*) AS seeds, avg(average) AS mean, stddev_samp(average) AS std,
                       CAST(round(avg(subset_size)) AS BIGINT) AS size, max(n_tasks) AS n_tasks, bool_and(official)
                FROM submissions {where}
                GROUP BY name, scale
                ORDER BY mean DESC NULLS LAST, name""",
            [scale] if scale else [],
        ).fetchall()
    finally:
        con.close()
    return [Standing(i + 1, *r) for i, r in enumerate(rows)]


def compare(db: Path, a: str, b: str, scale: str | None = None) -> list[tuple[str, float | None, float | None, float | None]]:
    """Per-task (key, mean A, mean B, B - A) over seeds, plus an 'average' row; tasks of either side included."""
    con = connect(db, read_only=True)
    try:
        names = {r[0] for r in con.execute("SELECT DISTINCT name FROM submissions").fetchall()}
        for n in (a, b):
            if n not in names:
                raise CurateError(f"--compare: no submission named {n!r} in {db} (have: {', '.join(sorted(names)) or 'none'})")
        scale_sql = "AND scale = ?" if scale else ""
        params = [a, *( [scale] if scale else [] ), b, *( [scale] if scale else [] )]
        rows = con.execute(
            f"""WITH ta AS (SELECT key, avg(score) m FROM results WHERE name = ? {scale_sql} GROUP BY key),
                     tb AS (SELECT key, avg(score) m FROM results WHERE name = ? {scale_sql} GROUP BY key)
                SELECT coalesce(ta.key, tb.key) AS key, ta.m, tb.m, tb.m - ta.m
                FROM ta FULL OUTER JOIN tb ON ta.key = tb.key ORDER BY key""",
            params,
        ).fetchall()
        avg = con.execute(
            f"""SELECT (SELECT avg(average) FROM submissions WHERE name = ? {scale_sql}),
                       (SELECT avg(average) FROM submissions WHERE name = ? {scale_sql})""",
            params,
        ).fetchone()
    finally:
        con.close()
    out = [tuple(r) for r in rows]
    delta = avg[1] - avg[0] if avg[0] is not None and avg[1] is not None else None
    out.append(("average", avg[0], avg[1], delta))
    return out


def db_side(db: Path, name: str, scale: str | None = None):
    """A submission's seeds as a benchmark.compare Side (per-task main metrics, bundle paths)."""
    from benchmark.compare import side_from_rows

    con = connect(db, read_only=True)
    try:
        scales = [r[0] for r in con.execute("SELECT DISTINCT scale FROM submissions WHERE name = ? ORDER BY scale",
                                            [name]).fetchall()]
        if not scales:
            names = sorted(r[0] for r in con.execute("SELECT DISTINCT name FROM submissions").fetchall())
            raise CurateError(f"no run folder or submission named {name!r} in {db} "
                              f"(submissions: {', '.join(names) or 'none'})")
        if scale is None and len(scales) > 1:
            raise CurateError(f"{name!r} is on the leaderboard at scales {', '.join(scales)}; choose one with --scale")
        sc = scale or scales[0]
        if sc not in scales:
            raise CurateError(f"{name!r} has no submission at scale {sc!r} (has: {', '.join(scales)})")
        rows = con.execute(
            """SELECT r.seed, r.key, r.metric, r.score, s.bundle FROM results r
               JOIN submissions s ON r.name = s.name AND r.scale = s.scale AND r.seed = s.seed
               WHERE r.name = ? AND r.scale = ? ORDER BY r.seed, r.key""", [name, sc]).fetchall()
    finally:
        con.close()
    return side_from_rows(name, rows)


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def format_standings(rows: list[Standing]) -> str:
    head = f"{'#':>3}  {'submission':<28} {'scale':<8} {'seeds':>5} {'average (mean ± std)':>22} {'size':>9} {'tasks':>5}"
    lines = [head, "-" * len(head)]
    for s in rows:
        spread = f"{_fmt(s.mean)} ± {_fmt(s.std)}" if s.std is not None else _fmt(s.mean)
        mark = "" if s.official else " (unofficial)"
        lines.append(f"{s.rank:>3}  {(s.name + mark)[:28]:<28} {s.scale[:8]:<8} {s.seeds:>5} {spread:>22} "
                     f"{s.subset_size:>9} {s.n_tasks:>5}")
    return "\n".join(lines)


def format_compare(a: str, b: str, rows) -> str:
    w = max([len(r[0]) for r in rows] + [8])
    c = max(len(a), len(b), 10)
    head = f"{'task':<{w}} {a:>{c}} {b:>{c}} {'delta (B-A)':>12}"
    lines = [head, "-" * len(head)]
    for key, ma, mb, d in rows:
        lines.append(f"{key:<{w}} {_fmt(ma):>{c}} {_fmt(mb):>{c}} {_fmt(d, '+.4f'):>12}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- HTML

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_html(db: Path, out: Path, scale: str | None = None) -> Path:
    """A self-contained page: the ranking table and three plots as inline PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = standings(db, scale)
    con = connect(db, read_only=True)
    try:
        where = "WHERE scale = ?" if scale else ""
        p = [scale] if scale else []
        per_seed = con.execute(f"SELECT name, scale, seed, average, subset_size FROM submissions {where} ORDER BY name, seed", p).fetchall()
        tasks = con.execute(
            f"SELECT name, scale, key, avg(score), stddev_samp(score) FROM results {where} "
            "GROUP BY name, scale, key ORDER BY key, name", p).fetchall()
    finally:
        con.close()
    label = {(s.name, s.scale): (s.name if len({x.scale for x in rows}) <= 1 else f"{s.name} [{s.scale}]") for s in rows}
    order = [(s.name, s.scale) for s in rows]
    imgs = []
    if rows:
        # average vs subset size, error bars = std over seeds
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for s in rows:
            ax.errorbar(s.subset_size, s.mean if s.mean is not None else float("nan"), yerr=s.std or 0, fmt="o", capsize=4,
                        label=label[(s.name, s.scale)])
        ax.set_xlabel("subset size (samples)")
        ax.set_ylabel("average main metric")
        ax.set_title("Average score vs subset size (mean ± std over seeds)")
        ax.legend(fontsize=8)
        imgs.append(("Average vs subset size", _png(fig)))
        # per-task bars
        keys = sorted({t[2] for t in tasks})
        if keys:
            fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(keys) * max(1, len(order)) / 2), 4))
            width = 0.8 / max(1, len(order))
            for i, sub in enumerate(order):
                vals = {t[2]: (t[3], t[4]) for t in tasks if (t[0], t[1]) == sub}
                xs = [k + i * width for k in range(len(keys))]
                ys = [vals.get(k, (float("nan"), None))[0] or 0.0 for k in keys]
                es = [vals.get(k, (None, None))[1] or 0.0 for k in keys]
                ax.bar(xs, ys, width, yerr=es, capsize=2, label=label[sub])
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))])
            ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("main metric (mean over seeds)")
            ax.set_title("Per-task scores")
            ax.legend(fontsize=8)
            imgs.append(("Per-task scores", _png(fig)))
        # seed spread
        fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(order) + 1.5))
        for i, sub in enumerate(order):
            ys = [r[3] for r in per_seed if (r[0], r[1]) == sub and r[3] is not None]
            ax.scatter(ys, [i] * len(ys), alpha=0.8)
            if ys:
                ax.plot([min(ys), max(ys)], [i, i], color="grey", lw=1)
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([label[s] for s in order], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("average main metric, one dot per seed")
        ax.set_title("Seed spread")
        imgs.append(("Seed spread", _png(fig)))
    esc = html.escape
    trs = "".join(
        f"<tr><td>{s.rank}</td><td>{esc(s.name)}</td><td>{esc(s.scale)}</td><td>{s.seeds}</td>"
        f"<td>{_fmt(s.mean)}</td><td>{_fmt(s.std)}</td><td>{s.subset_size}</td><td>{s.n_tasks}</td>"
        f"<td>{'yes' if s.official else 'no'}</td></tr>"
        for s in rows
    )
    seed_trs = "".join(
        f"<tr><td>{esc(r[0])}</td><td>{esc(r[1])}</td><td>{r[2]}</td><td>{_fmt(r[3])}</td><td>{r[4]}</td></tr>" for r in per_seed)
    figs = "".join(f"<h2>{esc(t)}</h2><img alt='{esc(t)}' src='{src}'>" for t, src in imgs)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>curate leaderboard</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:3px 8px;text-align:right}}td:nth-child(2),th:nth-child(2){{text-align:left}}</style></head><body>
<h1>curate leaderboard{(' — scale ' + esc(scale)) if scale else ''}</h1>
<p>Average = unweighted mean of each task's main metric (DataComp's rule); mean ± sample std over seeds.</p>
<table><tr><th>#</th><th>submission</th><th>scale</th><th>seeds</th><th>average</th><th>std</th><th>subset size</th>
<th>tasks</th><th>official</th></tr>{trs}</table>
{figs}
<h2>All seeds</h2><table><tr><th>submission</th><th>scale</th><th>seed</th><th>average</th><th>subset size</th></tr>{seed_trs}</table>
<p><small>database: {esc(str(db))}</small></p></body></html>
"""
    atomic.write_text(out, page)
    return Path(out)


# ----------------------------------------------------------------------------------------------- CLI

@click.command("leaderboard")
@click.option("--scale", help="Only submissions at this scale.")
@click.option("--html", "html_out", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write an HTML page with plots (average vs subset size, per-task bars, seed spread).")
@click.option("--compare", "compare_names", nargs=2, metavar="A B",
              help="Alias of `curate compare A B`: per-task, per-group and average B - A with 95% intervals and tests.")
@click.option("--db", type=click.Path(path_type=Path, dir_okay=False),
              help="Leaderboard DuckDB file (default $CURATE_LEADERBOARD or ~/.local/share/curate/leaderboard.duckdb).")
@click.option("--add", "add", multiple=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Add a submission bundle directory first (repeatable); `curate submit` does this for you.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranking as JSON lines instead of a table.")
def leaderboard_command(scale: str | None, html_out: Path | None, compare_names: tuple[str, str] | None, db: Path | None,
                        add: tuple[Path, ...], as_json: bool) -> None:
    """Show the local leaderboard: submissions ranked by their average over tasks (mean ± std over seeds).

    One row per submission and seed is stored in a DuckDB file; query it with any DuckDB client.
    """
    db = db or default_db()
    for b in add:
        add_bundle(db, b)
    if compare_names:
        run_compare(db, list(compare_names), scale)
        return
    rows = standings(db, scale)
    if as_json:
        for s in rows:
            click.echo(json.dumps(s.__dict__))
    elif rows:
        click.echo(format_standings(rows))
    else:
        click.echo(f"no submissions{' at scale ' + scale if scale else ''} in {db}")
    if html_out:
        write_html(db, html_out, scale)
        click.echo(f"wrote {html_out}")



def run_compare(db: Path, specs: list[str], scale: str | None = None, min_effect: float | None = None,
                as_json: bool = False, seed: int = 0) -> list[dict]:
    """Load each side (path(s) or submission name) and print benchmark.compare's report."""
    from benchmark import compare as C

    sides = [C.load_side(spec, lambda name: db_side(db, name, scale)) for spec in specs]
    reports = C.compare(sides[0], sides[1:], C.MIN_EFFECT if min_effect is None else min_effect, seed=seed)
    if as_json:
        click.echo(C.to_json(reports))
    else:
        click.echo("\n\n".join(C.format_report(r) for r in reports))
    return reports


@click.command("compare")
@click.argument("sides", nargs=-1, required=True, metavar="A B [C ...]")
@click.option("--db", type=click.Path(path_type=Path, dir_okay=False),
              help="Leaderboard DuckDB file for submission names (default $CURATE_LEADERBOARD or "
                   "~/.local/share/curate/leaderboard.duckdb).")
@click.option("--scale", help="Scale of the submissions named (needed when a name is at several scales).")
@click.option("--min-effect", type=click.FloatRange(min=0, min_open=True), default=0.005, show_default=True,
              help="Smallest difference worth detecting: the seeds per side that 80% power needs are computed for it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the item bootstrap.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparisons as JSON.")
def compare_command(sides: tuple[str, ...], db: Path | None, scale: str | None, min_effect: float, seed: int,
                    as_json: bool) -> None:
    """Is B better than A, by how much, how sure? Each of B, C, ... is compared with A.

    \b
    A side is a RUN folder, a results .jsonl, a submission bundle, several of them joined with commas (one per
    seed), or a submission name on the leaderboard (all its seeds). Per shared task, per DataComp group and on
    the average: B - A, its 95% interval, a p-value (Holm-corrected over the call) and a one-line verdict.
    With one seed per side the seed variance is unknown: no recipe verdict, only whether the two models
    differ on these items (paired bootstrap over the per-item results).
    """
    if len(sides) < 2:
        raise click.UsageError("give at least two sides: A B [C ...]")
    run_compare(db or default_db(), list(sides), scale, min_effect, as_json, seed)
