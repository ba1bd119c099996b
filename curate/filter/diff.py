"""`curate diff SUBSET_A SUBSET_B`: how two filtered subsets differ, and which step made each difference.

Counts uids in A, in B, in both and in neither (of the pools' rows, from the ``pool`` step of the
ledgers), and for each uid kept by one subset but not the other, the top-level step of the other
subset's ledger that dropped it and its reason. Runs in DuckDB over the two ledgers, so it works
on 12.8M-row subsets without loading them into Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from curate.core.atomic import atomic_path
from curate.core.errors import CurateError

# Top-level ledger steps are "pool" and "<index>.<name>"; steps inside set operations have longer paths.
TOP_LEVEL = r"^(pool|[0-9]+\.[A-Za-z_][A-Za-z0-9_]*)$"


@dataclass
class DiffConfig:
    a: str
    b: str
    out: str | None = None  # optional parquet of differing uids
    show: int = 10


def _check(subset: Path) -> None:
    for f in ("subset.parquet", "decisions.parquet"):
        if not (subset / f).is_file():
            raise CurateError(f"{subset}: not a subset folder ({f} missing; run `curate filter` first)")


def _s(p: Path) -> str:
    return "'" + str(p).replace("'", "''") + "'"


def diff_subsets(cfg: DiffConfig) -> dict[str, Any]:
    """Compare two subsets; return counts, per-step breakdown and a few example uids."""
    import duckdb

    a, b = Path(cfg.a), Path(cfg.b)
    _check(a)
    _check(b)
    con = duckdb.connect()

    def run(q: str) -> list[tuple]:
        return con.execute(q).fetchall()

    for name, p in (("a", a), ("b", b)):
        run(f"CREATE VIEW sub_{name} AS SELECT DISTINCT uid FROM read_parquet({_s(p / 'subset.parquet')})")
        run(f"CREATE VIEW led_{name} AS SELECT * FROM read_parquet({_s(p / 'decisions.parquet')})")
        run(f"CREATE VIEW pool_{name} AS SELECT DISTINCT uid FROM led_{name} WHERE step = 'pool'")
        run(f"""CREATE VIEW drop_{name} AS SELECT uid, arg_min(step, step_index) AS step, arg_min(reason, step_index) AS reason
                FROM led_{name} WHERE NOT kept AND regexp_matches(step, '{TOP_LEVEL}') GROUP BY uid""")
    run("CREATE VIEW universe AS SELECT uid FROM pool_a UNION SELECT uid FROM pool_b "
        "UNION SELECT uid FROM sub_a UNION SELECT uid FROM sub_b")
    run("""CREATE TABLE cmp AS SELECT u.uid, sa.uid IS NOT NULL AS in_a, sb.uid IS NOT NULL AS in_b
           FROM universe u LEFT JOIN sub_a sa ON sa.uid = u.uid LEFT JOIN sub_b sb ON sb.uid = u.uid""")
    n_a, n_b, both, neither, total = run(
        "SELECT count(*) FILTER (WHERE in_a), count(*) FILTER (WHERE in_b), count(*) FILTER (WHERE in_a AND in_b), "
        "count(*) FILTER (WHERE NOT in_a AND NOT in_b), count(*) FROM cmp")[0]
    same_pool = run("SELECT count(*) FROM (SELECT uid FROM pool_a EXCEPT SELECT uid FROM pool_b)")[0][0] == 0 and \
        run("SELECT count(*) FROM (SELECT uid FROM pool_b EXCEPT SELECT uid FROM pool_a)")[0][0] == 0
    diff_q = """SELECT c.uid, c.in_a, c.in_b,
                  CASE WHEN c.in_a THEN 'B' ELSE 'A' END AS dropped_in,
                  coalesce(CASE WHEN c.in_a THEN db.step ELSE da.step END, 'not in that pool') AS step,
                  CASE WHEN c.in_a THEN db.reason ELSE da.reason END AS reason
                FROM cmp c LEFT JOIN drop_a da ON da.uid = c.uid LEFT JOIN drop_b db ON db.uid = c.uid
                WHERE c.in_a <> c.in_b"""
    by_step = run(f"SELECT dropped_in, step, count(*) FROM ({diff_q}) GROUP BY ALL ORDER BY dropped_in, count(*) DESC, step")
    examples = run(f"SELECT uid, dropped_in, step, reason FROM ({diff_q}) ORDER BY uid LIMIT {int(cfg.show)}")
    if cfg.out:
        with atomic_path(cfg.out, suffix=".parquet") as tmp:
            run(f"COPY ({diff_q} ORDER BY uid) TO {_s(tmp)} (FORMAT parquet)")
    return {
        "a": str(a), "b": str(b), "in_a": n_a, "in_b": n_b, "both": both, "only_a": n_a - both, "only_b": n_b - both,
        "neither": neither, "universe": total, "same_pool": same_pool,
        "by_step": [{"dropped_in": d, "step": s, "count": c} for d, s, c in by_step],
        "examples": [{"uid": u, "dropped_in": d, "step": s, "reason": r} for u, d, s, r in examples],
    }


@click.command("diff")
@click.argument("subset_a", type=click.Path(file_okay=False, exists=True))
@click.argument("subset_b", type=click.Path(file_okay=False, exists=True))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write every differing uid (uid, in_a, in_b, dropped_in, step, reason) to this parquet.")
@click.option("--show", default=10, show_default=True, help="How many differing uids to print.")
def diff_cmd(subset_a, subset_b, out, show):
    """Compare two subsets made by `curate filter`.

    \b
    Prints how many pool uids are in A, in B, in both and in neither, then for uids kept by only
    one subset, which step of the other subset's recipe dropped them (grouped, with examples).
    """
    r = diff_subsets(DiffConfig(subset_a, subset_b, out, show))
    click.echo(f"A {r['a']}: {r['in_a']} uids    B {r['b']}: {r['in_b']} uids")
    click.echo(f"both {r['both']}   only A {r['only_a']}   only B {r['only_b']}   neither {r['neither']}   "
               f"(of {r['universe']} pool uids{'' if r['same_pool'] else '; the two subsets come from different pools'})")
    for s in r["by_step"]:
        other = "A" if s["dropped_in"] == "B" else "B"
        click.echo(f"  only in {other}: {s['count']:>10}  dropped in {s['dropped_in']} by {s['step']}")
    for e in r["examples"]:
        click.echo(f"  {e['uid']}  dropped in {e['dropped_in']} at {e['step']}: {e['reason']}")
    if out:
        click.echo(f"wrote {out}")
