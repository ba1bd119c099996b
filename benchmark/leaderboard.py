"""The local leaderboard: a DuckDB file with one row per (submission, scale, seed) and one per task result.

Why DuckDB: ranking, seed aggregation and per-task comparisons are plain SQL over two small tables, the file is a
single portable artefact, and the same tables load in pandas/polars for anyone's own plots.

    submissions(name, scale, seed, recipe, arch, official, subset_size, unique_uids, uids_sha256, average,
                n_tasks, n_missing, bundle, created_at, added_at,
                recipe_hash, pool_success_share, pool_completeness,                       <- schema 2
                item_low, item_high, item_method, item_draws)
    results(name, scale, seed, key, dataset, metric, score, chance, item_low, item_high, n_items)
    leaderboard_meta(key, value)                  key "schema_version"
    score = the value of the task's main metric; chance = its chance level where known

Honest ranking (issue 18): entries are grouped by recipe hash and scale (the submission name is the label; two
names with one recipe hash are one recipe) and shown with the mean over seeds, a 95% interval and the number of
seeds. The interval is the t interval over seeds (benchmark.stats.seed_interval: valid with 3 seeds, where a
bootstrap over 3 seeds covers ~70%); with one seed it is the item-level bootstrap interval of that one model when
its bundle carries per-item results (marked "items", it says nothing about seed variance), else "n=1". The rank
shown beside the position is what is *separable*: every pair of recipes at a scale is tested on the per-seed
averages over the tasks both scored (stats.seed_difference, two-sample t with pooled seed variance), the p-values
are Holm-corrected over all pairs, and a recipe's separable rank is 1 + the number of recipes that beat it
significantly; "tied with" lists the recipes it cannot be told apart from. Overlapping intervals are not used:
two 95% intervals can overlap while the difference is significant.

Old leaderboard files are migrated in place when opened (columns added, `schema_version` recorded); their rows
keep working (recipe_hash NULL groups by name, no item interval, completeness unknown).

`curate leaderboard` prints the ranking, `--html` a page with the plots inlined (average vs subset size with 95%
error bars, per-task and per-task-group bars with intervals and each task's chance level, seed spread).
`curate compare A B` (defined here, analysed by benchmark.compare) tests whether B beats A; `curate leaderboard
--compare A B` is its alias.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from curate.core import atomic
from curate.core.errors import CurateError

SCHEMA_VERSION = 2
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
CREATE TABLE IF NOT EXISTS leaderboard_meta (key VARCHAR PRIMARY KEY, value VARCHAR);
"""
# schema 1 (the tables above as first released) -> 2: columns added, never changed or dropped, so a file
# written by either version reads with either query set once migrated.
MIGRATIONS: dict[int, list[tuple[str, str, str]]] = {
    2: [("submissions", "recipe_hash", "VARCHAR"), ("submissions", "pool_success_share", "DOUBLE"),
        ("submissions", "pool_completeness", "VARCHAR"), ("submissions", "item_low", "DOUBLE"),
        ("submissions", "item_high", "DOUBLE"), ("submissions", "item_method", "VARCHAR"),
        ("submissions", "item_draws", "INTEGER"),
        ("results", "chance", "DOUBLE"), ("results", "item_low", "DOUBLE"), ("results", "item_high", "DOUBLE"),
        ("results", "n_items", "BIGINT")],
}
ALPHA = 0.05  # separability: Holm-corrected p below this


def default_db() -> Path:
    """$CURATE_LEADERBOARD, else $XDG_DATA_HOME/curate/leaderboard.duckdb (~/.local/share/...)."""
    env = os.environ.get("CURATE_LEADERBOARD")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "curate" / "leaderboard.duckdb"


def schema_version(con) -> int:
    """1 for a file from before versioning (it has no leaderboard_meta table), else the recorded version."""
    has = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'leaderboard_meta'").fetchone()[0]
    if not has:
        return 1
    row = con.execute("SELECT value FROM leaderboard_meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 1


def migrate(con) -> int:
    """Bring an open (writable) leaderboard to SCHEMA_VERSION; returns the version it had."""
    con.execute(SCHEMA)
    old = schema_version(con)
    if old > SCHEMA_VERSION:
        raise CurateError(f"leaderboard schema {old} is newer than this curate's ({SCHEMA_VERSION}); upgrade curate")
    for version in range(old + 1, SCHEMA_VERSION + 1):
        for table, col, typ in MIGRATIONS.get(version, []):
            con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {col} {typ}")
    con.execute("INSERT OR REPLACE INTO leaderboard_meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
    return old


def connect(db: Path, read_only: bool = False):
    """Open the leaderboard; an older file is migrated first (briefly opened writable), so every query below
    can rely on the current columns."""
    import duckdb

    db = Path(db)
    if read_only and not db.is_file():
        raise CurateError(f"{db}: no leaderboard yet; add one with `curate submit RUN --db {db}`")
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(db), read_only=read_only)
        if not read_only:
            migrate(con)
            return con
        if schema_version(con) < SCHEMA_VERSION:
            con.close()
            try:
                w = duckdb.connect(str(db))
                migrate(w)
                w.close()
            except duckdb.Error as e:
                raise CurateError(f"{db}: leaderboard schema {SCHEMA_VERSION - 1} needs migrating to "
                                  f"{SCHEMA_VERSION}, which needs write access ({e})") from None
            con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error as e:
        raise CurateError(f"{db}: cannot open leaderboard database ({e})") from None
    return con


# ----------------------------------------------------------------------------------------------- chance levels

def _chance_from_count(task, mm: str, count: int | None) -> float | None:
    """A random scorer's main metric from the number of candidates: classes (classification) or images
    (retrieval, one caption each). None where the metric is not a function of that count."""
    from benchmark.metrics import chance_mrr
    from benchmark.tasks import RETRIEVAL, WINOGAVIL

    if not count:
        return None
    if task.type == RETRIEVAL:
        return {"mean_recall@1": 1.0 / count, "mean_mrr": chance_mrr(count)}.get(mm)
    if task.type == WINOGAVIL:
        return None
    if mm in ("acc1", "mean_per_class_recall"):
        return 1.0 / count
    return chance_mrr(count) if mm == "mrr" else None


def chance_level(key: str, meta: dict | None = None, evalsets_root: Path | None = None) -> float | None:
    """The main metric a random scorer gets on task `key`, where it can be known; None otherwise.

    In order: the registry's `random_score` (DataComp's table; Fashion-MNIST and Digits 0.1); from the task's
    per-item metadata (`n_classes`: 1/C for acc1 and mean per-class recall, H_C/C for MRR; retrieval `n`
    images: recall@1 = 1/n, MRR = H_n/n); from the built eval set under `evalsets_root` (default
    benchmark.evalsets's root): its build.json "chance" for this metric, else the same formulas from
    build.json's n or classnames.txt, else the recorded "main" (build.json, offline_suite_v2.json; a set
    built before its task's main metric changed records the old metric's, so the formulas come first).
    The same definition as benchmark.evalsets.chance_levels.
    """
    from benchmark.tasks import RETRIEVAL, TASKS

    task = TASKS.get(key)
    if task is None or not task.scored:
        return None
    if task.random_score is not None:
        return float(task.random_score)
    mm = task.main_metric
    meta = meta or {}
    got = _chance_from_count(task, mm, meta.get("n") if task.type == RETRIEVAL else meta.get("n_classes"))
    if got is None and task.type != RETRIEVAL:
        got = _chance_from_count(task, mm, task.num_classes)
    if got is not None:
        return got
    try:
        if evalsets_root is None:
            from benchmark.evalsets import default_evalsets_dir

            evalsets_root = default_evalsets_dir()
        folder = Path(evalsets_root) / task.folder
        build = json.loads((folder / "build.json").read_text()) if (folder / "build.json").is_file() else {}
        chance = build.get("chance") or {}
        if chance.get(mm) is not None:
            return float(chance[mm])
        names = folder / "classnames.txt"
        if task.type == RETRIEVAL:
            got = _chance_from_count(task, mm, build.get("n"))
        elif names.is_file():
            got = _chance_from_count(task, mm, sum(1 for line in names.read_text(encoding="utf-8").splitlines()
                                                   if line.strip()))
        if got is not None:
            return got
        main = chance.get("main")
        if main is None and (Path(evalsets_root) / "offline_suite_v2.json").is_file():
            suite = json.loads((Path(evalsets_root) / "offline_suite_v2.json").read_text())
            main = (((suite.get("tasks") or {}).get(key) or {}).get("chance") or {}).get("main")
        if main is not None:
            return float(main)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return None


# ----------------------------------------------------------------------------------------------- item intervals

def item_cells(results_file: Path, results: list[dict]) -> tuple[dict, dict]:
    """({key: stats.TaskCells}, {key: item metadata}) for the scored registered tasks of a results file that
    have per-item files (RUN/eval_results.items/ or BUNDLE/results.items/) of the same model."""
    from benchmark import stats as S
    from benchmark.evaluate import items_path, main_metric_cells, read_items, task_as_scored
    from benchmark.results import main_value
    from benchmark.tasks import TASKS

    cells, metas = {}, {}
    for r in results:
        key = r["key"]
        if key not in TASKS or main_value(r) is None or not items_path(results_file, key).is_file():
            continue
        try:
            items, meta = read_items(results_file, key, model_id=r.get("model_id"))
            stat, cols = main_metric_cells(task_as_scored(TASKS[key], r), items)
        except CurateError:
            continue
        cells[key] = S.TaskCells.of(stat, cols)
        metas[key] = meta
    return cells, metas


def bundle_intervals(bundle: Path, results: list[dict], draws: int | None = None) -> dict:
    """Item-level 95% intervals of one model (a bundle's per-item files): per task and, when every scored task
    has items, of the average. {"tasks": {key: Interval}, "average": Interval|None, "meta": {key: meta}}."""
    from benchmark import stats as S
    from benchmark.results import main_value

    cells, metas = item_cells(Path(bundle) / "results.jsonl", results)
    if not cells:
        return {"tasks": {}, "average": None, "meta": metas}
    out = S.intervals(cells, draws=draws or S.DRAWS, seed=0)
    scored = {r["key"] for r in results if main_value(r) is not None}
    avg = out["average"] if scored == set(cells) else None
    return {"tasks": out["tasks"], "average": avg, "meta": metas}


# ----------------------------------------------------------------------------------------------- adding

def _bundle_recipe_hash(bundle: Path, decl: dict) -> str | None:
    """The filter recipe's hash: bundle.json's (curate submit >= schema 2), else the bundled manifest's."""
    from benchmark.results import first, read_json

    if decl.get("recipe_hash"):
        return str(decl["recipe_hash"])
    man = bundle / "manifest.json"
    if man.is_file():
        try:
            h = first(read_json(man, "filter manifest"), "recipe_hash", "recipe_sha256")
        except CurateError:
            return None
        return str(h) if h else None
    return None


def add_bundle(db: Path, bundle: Path) -> dict:
    """Insert (or replace) one bundle's rows: the same name/scale/seed submitted again replaces the old rows."""
    from benchmark.results import average_score, main_value, read_json, read_results

    bundle = Path(bundle)
    decl = read_json(bundle / "bundle.json", "bundle declaration")
    results = read_results(bundle / "results.jsonl")
    avg, missing = average_score(results)
    seed = decl.get("seed")
    comp = decl.get("pool_completeness") if isinstance(decl.get("pool_completeness"), dict) else None
    iv = bundle_intervals(bundle, results)
    a = iv["average"]
    row = dict(
        name=decl["name"], scale=str(decl["scale"]), seed=int(seed) if seed is not None else 0,
        recipe=decl.get("recipe"), arch=decl.get("arch"), official=bool(decl.get("official")),
        subset_size=int(decl["subset_size"]), unique_uids=decl.get("unique_uids"), uids_sha256=decl.get("uids_sha256"),
        average=avg, n_tasks=len(results) - len(missing), n_missing=len(missing), bundle=str(bundle.resolve()),
        created_at=decl.get("created_at"), recipe_hash=_bundle_recipe_hash(bundle, decl),
        pool_success_share=comp.get("success_share") if comp else None,
        pool_completeness=json.dumps(comp, sort_keys=True) if comp else None,
        item_low=a.low if a else None, item_high=a.high if a else None, item_method=a.method if a else None,
        item_draws=a.draws if a else None,
    )
    res_rows = []
    for r in results:
        t = iv["tasks"].get(r["key"])
        res_rows.append((row["name"], row["scale"], row["seed"], r["key"], r.get("dataset"),
                         r["main_metric"] if isinstance(r.get("main_metric"), str) else None, main_value(r),
                         chance_level(r["key"], iv["meta"].get(r["key"])),
                         t.low if t else None, t.high if t else None, t.n if t else r.get("n")))
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
            "INSERT INTO results (name, scale, seed, key, dataset, metric, score, chance, item_low, item_high, n_items) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", res_rows)
        con.execute("COMMIT")
    finally:
        con.close()
    return row


# ----------------------------------------------------------------------------------------------- standings

@dataclass
class Standing:
    rank: int  # position by mean (ties broken by name)
    name: str  # the label: the submission name(s) of this recipe hash at this scale
    scale: str
    seeds: int
    mean: float | None
    std: float | None  # sample std over seeds (None with one seed)
    subset_size: int
    n_tasks: int
    official: bool
    low: float | None = None  # 95% interval of the mean (see `interval`)
    high: float | None = None
    interval: str = "n=1"  # "seeds" (t over seeds), "items" (one model, item bootstrap) or "n=1" (none)
    recipe_hash: str | None = None
    separable_rank: int = 1  # 1 + recipes at this scale that beat this one significantly (Holm over pairs)
    tied_with: list[str] = field(default_factory=list)  # recipes not separable from this one
    untested: list[str] = field(default_factory=list)  # pairs with no test possible (1 + 1 seeds, no shared task)
    pool_success_share: float | None = None  # mean over seeds; None when unknown for any seed
    completeness_note: str | None = None


@dataclass
class _Group:
    key: tuple
    names: list[str]
    scale: str
    seeds: list[int]
    averages: list[float | None]
    sizes: list[int]
    n_tasks: list[int]
    official: list[bool]
    recipe_hash: str | None
    item: tuple | None  # (low, high) with one seed
    shares: list[float | None]
    notes: list[str | None]


def _groups(db: Path, scale: str | None) -> tuple[list[_Group], dict]:
    """Submissions grouped by (recipe hash, scale) and {group key: {seed label: {task: score}}}."""
    con = connect(db, read_only=True)
    try:
        where = "WHERE scale = ?" if scale else ""
        p = [scale] if scale else []
        subs = con.execute(
            f"""SELECT name, scale, seed, coalesce(recipe_hash, 'name:' || name) AS gk, recipe_hash, average,
                       subset_size, n_tasks, official, item_low, item_high, pool_success_share, pool_completeness
                FROM submissions {where} ORDER BY name, seed""", p).fetchall()
        res = con.execute(f"SELECT name, scale, seed, key, score FROM results {where}", p).fetchall()
    finally:
        con.close()
    groups: dict[tuple, _Group] = {}
    member: dict[tuple, tuple] = {}
    for (name, sc, seed, gk, rh, avg, size, nt, off, ilo, ihi, share, comp) in subs:
        g = groups.get((gk, sc))
        if g is None:
            g = groups[(gk, sc)] = _Group((gk, sc), [], sc, [], [], [], [], [], rh, None, [], [])
        if name not in g.names:
            g.names.append(name)
        g.seeds.append(seed)
        g.averages.append(avg)
        g.sizes.append(size)
        g.n_tasks.append(nt)
        g.official.append(bool(off))
        g.item = (ilo, ihi) if ilo is not None and ihi is not None else None
        g.shares.append(share)
        note = None
        if comp:
            try:
                note = json.loads(comp).get("note")
            except ValueError:
                note = None
        g.notes.append(note)
        member[(name, sc, seed)] = (gk, sc)
    scores: dict[tuple, dict] = {}
    for name, sc, seed, key, score in res:
        gk = member.get((name, sc, seed))
        if gk is not None and score is not None:
            scores.setdefault(gk, {}).setdefault((name, seed), {})[key] = score
    return list(groups.values()), scores


def _label(g: _Group) -> str:
    return " / ".join(g.names)


def separability(groups: list[_Group], scores: dict, level: float = 0.95) -> dict:
    """Pairwise recipe tests at each scale: {(key_i, key_j): Holm-adjusted p or None (no test possible)}.

    Each pair is compared on the per-seed average over the tasks every seed of both scored (so recipes scored
    on different task sets are compared on what they share), with the two-sample t of stats.seed_difference;
    1 + 1 seeds (seed variance unknown) or no shared task give no test. Holm runs over all tested pairs.
    """
    from benchmark import stats as S

    pairs, ps = [], []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if a.scale != b.scale:
                continue
            sa, sb = list(scores.get(a.key, {}).values()), list(scores.get(b.key, {}).values())
            p = None
            if sa and sb and len(sa) + len(sb) >= 3:
                shared = set.intersection(*[set(s) for s in sa + sb])
                if shared:
                    ks = sorted(shared)
                    xa = [float(np.mean([s[k] for k in ks])) for s in sa]
                    xb = [float(np.mean([s[k] for k in ks])) for s in sb]
                    p = S.seed_difference(xa, xb, level).p_value
            pairs.append((a.key, b.key))
            ps.append(np.nan if p is None or not np.isfinite(p) else p)
    adj = S.holm(ps) if ps else np.array([])
    return {pair: (None if np.isnan(q) else float(q)) for pair, q in zip(pairs, adj)}


def standings(db: Path, scale: str | None = None) -> list[Standing]:
    """Recipes (recipe hash x scale) ranked by mean average over seeds (ties broken by name), each with its 95%
    interval, separable rank and the recipes it is tied with (see the module docstring)."""
    from benchmark import stats as S

    groups, scores = _groups(db, scale)
    out = []
    for g in groups:
        vals = [v for v in g.averages if v is not None]
        mean = float(np.mean(vals)) if vals else None
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        low = high = None
        kind = "n=1"
        if len(vals) >= 2:
            iv = S.seed_interval(vals)
            low, high, kind = iv.low, iv.high, "seeds"
        elif len(g.seeds) == 1 and g.item is not None:
            low, high, kind = g.item[0], g.item[1], "items"
        known = [s for s in g.shares if s is not None]
        share = float(np.mean(known)) if known and len(known) == len(g.shares) else None
        notes = sorted({n for n in g.notes if n})
        out.append(Standing(0, _label(g), g.scale, len(g.seeds), mean, std, int(round(float(np.mean(g.sizes)))),
                            max(g.n_tasks), all(g.official), low, high, kind, g.recipe_hash,
                            pool_success_share=share, completeness_note="; ".join(notes)[:300] or None))
    order = sorted(range(len(out)), key=lambda i: (-(out[i].mean if out[i].mean is not None else -math.inf),
                                                   out[i].name))
    out = [out[i] for i in order]
    groups = [groups[i] for i in order]
    sep = separability(groups, scores)
    by_key = {g.key: (g, s) for g, s in zip(groups, out)}
    for pos, (g, s) in enumerate(zip(groups, out)):
        s.rank = pos + 1
        beaten = 0
        for other in groups:
            if other.key == g.key or other.scale != g.scale:
                continue
            p = sep.get((g.key, other.key), sep.get((other.key, g.key)))
            o = by_key[other.key][1]
            if p is None:
                s.untested.append(o.name)
                s.tied_with.append(o.name)
            elif p >= ALPHA:
                s.tied_with.append(o.name)
            elif (o.mean or 0) > (s.mean or 0):
                beaten += 1
        s.separable_rank = beaten + 1
    return out

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
        comp = dict(con.execute("SELECT seed, pool_completeness FROM submissions WHERE name = ? AND scale = ?",
                                [name, sc]).fetchall())
    finally:
        con.close()
    side = side_from_rows(name, rows)
    for s in side.seeds:  # the pool completeness each bundle recorded (benchmark.compare warns on a gap)
        raw = comp.get(s.seed)
        try:
            s.completeness = json.loads(raw) if raw else None
        except ValueError:
            s.completeness = None
    return side


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _interval_text(s: Standing) -> str:
    if s.low is None or s.high is None:
        return "n=1"
    return f"[{_fmt(s.low)}, {_fmt(s.high)}]" + (" items" if s.interval == "items" else "")


def _share_text(s: Standing) -> str:
    return "?" if s.pool_success_share is None else f"{s.pool_success_share:.1%}"


def format_standings(rows: list[Standing]) -> str:
    head = (f"{'#':>3}  {'submission':<28} {'scale':<8} {'seeds':>5} {'average (mean ± std)':>22} "
            f"{'95% interval':>24} {'sep.rank':>8} {'pool ok':>7} {'size':>9} {'tasks':>5}  tied with")
    lines = [head, "-" * len(head)]
    for s in rows:
        spread = f"{_fmt(s.mean)} ± {_fmt(s.std)}" if s.std is not None else _fmt(s.mean)
        mark = "" if s.official else " (unofficial)"
        tied = ", ".join(s.tied_with) if s.tied_with else "-"
        lines.append(f"{s.rank:>3}  {(s.name + mark)[:28]:<28} {s.scale[:8]:<8} {s.seeds:>5} {spread:>22} "
                     f"{_interval_text(s):>24} {s.separable_rank:>8} {_share_text(s):>7} {s.subset_size:>9} "
                     f"{s.n_tasks:>5}  {tied[:60]}")
    lines.append("95% interval: t over seeds; 'items' = one seed, item bootstrap of that model (seed variance "
                 "unknown); n=1 = none. sep.rank = 1 + recipes significantly better (pairwise t over seeds, Holm).")
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


def task_groups(keys: list[str]) -> dict[str, list[str]]:
    """The task groups present among `keys`: DataComp's (benchmark.tasks groups_of) and the offline suite
    v2's (in_domain / style_shift / out_of_domain, SUITE_V2_GROUPS), in that order."""
    from benchmark.tasks import SUITE_V2_GROUPS, TASKS, groups_of

    order = {k: i for i, k in enumerate(TASKS)}
    out = groups_of(sorted((k for k in keys if k in TASKS), key=order.__getitem__))  # registry order
    for g, members in SUITE_V2_GROUPS.items():
        have = [k for k in members if k in keys]
        if have:
            out[g] = sorted(set(out.get(g, [])) | set(have))
    return out


def _task_table(db: Path, scale: str | None, standing: list[Standing]):
    """Per (recipe label, task): (mean, low, high, kind) and each task's chance level."""
    from benchmark import stats as S

    groups, scores = _groups(db, scale)
    con = connect(db, read_only=True)
    try:
        where = "WHERE scale = ?" if scale else ""
        p = [scale] if scale else []
        extra = con.execute(f"SELECT name, scale, seed, key, item_low, item_high, chance FROM results {where}",
                            p).fetchall()
    finally:
        con.close()
    chance: dict[str, float] = {}
    item: dict[tuple, tuple] = {}
    for name, sc, seed, key, lo, hi, ch in extra:
        if ch is not None:
            chance[key] = ch
        if lo is not None and hi is not None:
            item[(name, sc, seed, key)] = (lo, hi)
    keys = sorted({k for per in scores.values() for s in per.values() for k in s})
    for k in keys:
        if k not in chance:
            c = chance_level(k)
            if c is not None:
                chance[k] = c
    label = {g.key: _label(g) for g in groups}
    table: dict[tuple, dict] = {}
    for g in groups:
        per_seed = scores.get(g.key, {})
        for k in keys:
            vals = [s[k] for s in per_seed.values() if k in s]
            if not vals:
                continue
            lo = hi = None
            kind = "n=1"
            if len(vals) >= 2:
                iv = S.seed_interval(vals)
                lo, hi, kind = iv.low, iv.high, "seeds"
            elif len(per_seed) == 1:
                (name, seed), = per_seed.keys()
                if (name, g.scale, seed, k) in item:
                    (lo, hi), kind = item[(name, g.scale, seed, k)], "items"
            table[(label[g.key], g.scale, k)] = {"mean": float(np.mean(vals)), "low": lo, "high": hi,
                                                 "kind": kind, "seeds": [float(v) for v in vals]}
    return keys, table, chance, groups, scores


def _yerr(means, lows, highs) -> np.ndarray:
    """Asymmetric error bars; NaN (nothing drawn) where no interval is known (one seed, no items)."""
    lo = [max(m - l, 0.0) if l is not None and m is not None else np.nan for m, l in zip(means, lows)]
    hi = [max(h - m, 0.0) if h is not None and m is not None else np.nan for m, h in zip(means, highs)]
    return np.array([lo, hi], dtype=np.float64)


def _bars(ax, keys: list[str], order: list[tuple], table: dict, chance: dict, title: str,
          first: tuple[str, dict] | None = None) -> None:
    """Grouped bars per task (one per recipe) with 95% error bars and a black tick at each task's chance level;
    `first` = (label, {recipe: (mean, low, high)}) prepends a column (a group's average)."""
    cols = ([first[0]] if first else []) + keys
    width = 0.8 / max(1, len(order))
    for i, (lab, sc) in enumerate(order):
        means, lows, highs = [], [], []
        if first:
            m, lo, hi = first[1].get((lab, sc), (None, None, None))
            means.append(m), lows.append(lo), highs.append(hi)
        for k in keys:
            t = table.get((lab, sc, k))
            means.append(t["mean"] if t else None)
            lows.append(t["low"] if t else None)
            highs.append(t["high"] if t else None)
        xs = [c + i * width for c in range(len(cols))]
        ys = [m if m is not None else 0.0 for m in means]
        err = _yerr(means, lows, highs)
        name = lab if len({o[1] for o in order}) <= 1 else f"{lab} [{sc}]"
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=name if np.isfinite(err).any() else f"{name} (n=1)")
    marked = False
    for c, k in enumerate(cols):
        if k in chance:
            ax.hlines(chance[k], c - width / 2, c + 0.8 - width / 2, colors="black", linestyles="dashed", lw=1.2,
                      label=None if marked else "chance level")
            marked = True
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cols))])
    ax.set_xticklabels(cols, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("main metric (mean, 95% interval)")
    ax.set_title(title)
    ax.legend(fontsize=7)


def write_html(db: Path, out: Path, scale: str | None = None) -> Path:
    """A self-contained page: the ranking table and the plots as inline PNGs: average vs subset size and
    per-task scores (95% error bars, chance levels), seed spread, and one per task group present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmark import stats as S

    rows = standings(db, scale)
    con = connect(db, read_only=True)
    try:
        where = "WHERE scale = ?" if scale else ""
        p = [scale] if scale else []
        per_seed = con.execute(
            f"SELECT name, scale, seed, average, subset_size, pool_success_share, recipe_hash FROM submissions {where} "
            "ORDER BY name, seed", p).fetchall()
    finally:
        con.close()
    keys, table, chance, groups, scores = _task_table(db, scale, rows)
    multi_scale = len({x.scale for x in rows}) > 1
    label = {(s.name, s.scale): (s.name if not multi_scale else f"{s.name} [{s.scale}]") for s in rows}
    order = [(s.name, s.scale) for s in rows]
    gkey = {(_label(g), g.scale): g.key for g in groups}
    imgs = []
    if rows:
        # average vs subset size, error bars = 95% interval (seeds; items with one seed)
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for s in rows:
            m = s.mean if s.mean is not None else float("nan")
            ax.errorbar(s.subset_size, m, yerr=_yerr([s.mean], [s.low], [s.high]), fmt="o", capsize=4,
                        label=label[(s.name, s.scale)] + ("" if s.interval == "seeds" else f" ({s.interval})"))
        ax.set_xlabel("subset size (samples)")
        ax.set_ylabel("average main metric")
        ax.set_title("Average score vs subset size (mean, 95% interval)")
        ax.legend(fontsize=8)
        imgs.append(("Average vs subset size", _png(fig)))
        if keys:
            fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(keys) * max(1, len(order)) / 2), 4))
            _bars(ax, keys, order, table, chance, "Per-task scores (95% interval; dashed: chance level)")
            imgs.append(("Per-task scores", _png(fig)))
        # seed spread
        fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(order) + 1.5))
        for i, sub in enumerate(order):
            g = next((x for x in groups if (_label(x), x.scale) == sub), None)
            ys = [v for v in (g.averages if g else []) if v is not None]
            ax.scatter(ys, [i] * len(ys), alpha=0.8)
            if ys:
                ax.plot([min(ys), max(ys)], [i, i], color="grey", lw=1)
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([label[s] for s in order], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("average main metric, one dot per seed")
        ax.set_title("Seed spread")
        imgs.append(("Seed spread", _png(fig)))
        # one plot per task group: the group's average (t over seeds of the per-seed group mean) and its tasks
        for gname, members in task_groups(keys).items():
            avg = {}
            for sub in order:
                per = list(scores.get(gkey[sub], {}).values())
                vals = [float(np.mean([s[k] for k in members])) for s in per if all(k in s for k in members)]
                if not vals:
                    continue
                iv = S.seed_interval(vals) if len(vals) >= 2 else None
                avg[sub] = (float(np.mean(vals)), iv.low if iv else None, iv.high if iv else None)
            fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * (len(members) + 1) * max(1, len(order)) / 2), 4))
            _bars(ax, members, order, table, chance, f"Task group {gname} (95% interval; dashed: chance level)",
                  first=(f"{gname} average", avg))
            imgs.append((f"Task group: {gname}", _png(fig)))
    esc = html.escape
    trs = "".join(
        f"<tr><td>{s.rank}</td><td>{esc(s.name)}</td><td>{esc(s.scale)}</td><td>{s.seeds}</td>"
        f"<td>{_fmt(s.mean)}</td><td>{esc(_interval_text(s))}</td><td>{_fmt(s.std)}</td><td>{s.separable_rank}</td>"
        f"<td style='text-align:left'>{esc(', '.join(s.tied_with) or '-')}</td>"
        f"<td title='{esc(s.completeness_note or '')}'>{esc(_share_text(s))}</td><td>{s.subset_size}</td>"
        f"<td>{s.n_tasks}</td><td>{'yes' if s.official else 'no'}</td></tr>"
        for s in rows
    )
    seed_trs = "".join(
        f"<tr><td>{esc(r[0])}</td><td>{esc(r[1])}</td><td>{r[2]}</td><td>{_fmt(r[3])}</td><td>{r[4]}</td>"
        f"<td>{'?' if r[5] is None else format(r[5], '.1%')}</td><td>{esc((r[6] or '-')[:12])}</td></tr>"
        for r in per_seed)
    chance_trs = "".join(f"<tr><td>{esc(k)}</td><td>{_fmt(chance.get(k))}</td></tr>" for k in keys)
    figs = "".join(f"<h2>{esc(t)}</h2><img alt='{esc(t)}' src='{src}'>" for t, src in imgs)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>curate leaderboard</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:3px 8px;text-align:right}}td:nth-child(2),th:nth-child(2){{text-align:left}}</style></head><body>
<h1>curate leaderboard{(' — scale ' + esc(scale)) if scale else ''}</h1>
<p>Average = unweighted mean of each task's main metric (DataComp's rule). One row per recipe (recipe hash and
scale; the submission name is the label). 95% interval: t interval over seeds; with one seed, the item-level
bootstrap interval of that one model when its bundle carries per-item results (marked "items": seed variance
unknown), else n=1. Separable rank: 1 + the number of recipes at the same scale that are significantly better
(two-sample t over seeds on the tasks both scored, Holm-corrected over all pairs); "tied with" lists those it
cannot be told apart from (one seed each: no test). Pool ok: share of the pool's input rows that downloaded
("?" when unknown, e.g. imported DataComp metadata).</p>
<table><tr><th>#</th><th>submission</th><th>scale</th><th>seeds</th><th>average</th><th>95% interval</th><th>std</th>
<th>separable rank</th><th>tied with</th><th>pool ok</th><th>subset size</th><th>tasks</th><th>official</th></tr>{trs}</table>
{figs}
<h2>Chance levels</h2><table><tr><th>task</th><th>chance (main metric)</th></tr>{chance_trs}</table>
<h2>All seeds</h2><table><tr><th>submission</th><th>scale</th><th>seed</th><th>average</th><th>subset size</th>
<th>pool ok</th><th>recipe hash</th></tr>{seed_trs}</table>
<p><small>database: {esc(str(db))}</small></p></body></html>
"""
    atomic.write_text(out, page)
    return Path(out)


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
    """Show the local leaderboard: recipes ranked by their average over tasks, with the 95% interval over seeds,
    the rank that paired tests can separate and the recipes each is tied with.

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
                as_json: bool = False, seed: int = 0, completeness_tolerance: float | None = None) -> list[dict]:
    """Load each side (path(s) or submission name) and print benchmark.compare's report."""
    from benchmark import compare as C

    sides = [C.load_side(spec, lambda name: db_side(db, name, scale)) for spec in specs]
    tol = C.COMPLETENESS_TOLERANCE if completeness_tolerance is None else completeness_tolerance
    reports = C.compare(sides[0], sides[1:], C.MIN_EFFECT if min_effect is None else min_effect, seed=seed,
                        completeness_tolerance=tol)
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
@click.option("--completeness-tolerance", type=click.FloatRange(min=0, max=1), default=0.02, show_default=True,
              help="Warn when two entries' pools differ in completeness (share of the pool's input rows "
                   "downloaded) by more than this.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparisons as JSON.")
def compare_command(sides: tuple[str, ...], db: Path | None, scale: str | None, min_effect: float, seed: int,
                    completeness_tolerance: float, as_json: bool) -> None:
    """Is B better than A, by how much, how sure? Each of B, C, ... is compared with A.

    \b
    A side is a RUN folder, a results .jsonl, a submission bundle, several of them joined with commas (one per
    seed), or a submission name on the leaderboard (all its seeds). Per shared task, per DataComp group and on
    the average: B - A, its 95% interval, a p-value (Holm-corrected over the call) and a one-line verdict.
    Warns when the two sides' pools were unequally complete (--completeness-tolerance).
    With one seed per side the seed variance is unknown: no recipe verdict, only whether the two models
    differ on these items (paired bootstrap over the per-item results).
    """
    if len(sides) < 2:
        raise click.UsageError("give at least two sides: A B [C ...]")
    run_compare(db or default_db(), list(sides), scale, min_effect, as_json, seed, completeness_tolerance)
