"""Score analytics speed: the platform's DuckDB work over one model version's scores against one median pass.

A synthetic scores dataset (the SCORES schema, `--rows` pairs in `--shards` parquet files laid out as
`scores/reward_model/<version>/<shard>.parquet`, written in chunks so memory stays modest; scores are float32
normals, so ties occur as they do with a real model's outputs) is queried at `--threads` DuckDB threads:
- baseline: one exact `quantile_cont(score, 0.5)` over the files;
- the platform's work: the `score_histogram` and `score_quantiles` macros through the analytics database
  (views made by `analytics.ensure_views`), the global keep threshold from `compression.score_threshold`,
  and the export of the kept pairs (`COPY (SELECT * ... WHERE compression.kept_condition) TO ... parquet`).
Goal: total / baseline <= 3. Every figure is the best of --repeats rounds. Alternatives are timed too (not
in the total), so the choices below can be re-checked; figures from 10M rows, 2 threads, 2 cores:
- export: threshold-then-filter against `ORDER BY score DESC, uid, shard LIMIT k` (2.7x slower: a top-N
  sort of 3M rows with their strings); of the parquet writer's options PARQUET_VERSION V2 with snappy is the
  fastest compressed one (V1, DuckDB's default, takes 1.15-1.2x as long and writes 12% larger files; zstd
  1.2x, lz4_raw no faster; `preserve_insertion_order = false` and a sargable `score >= s AND ...` prefix
  on the condition gave no steady gain);
- quantiles: approx_quantile (t-digest) against exact quantile_cont: 0.7x the time, not enough to give up
  exact figures; one quantile_cont call with a list of quantiles against five calls: 2.5x faster, so the
  macro uses the list;
- histogram and per-shard quantiles in one pass against the two macros: 0.98x, no gain worth coupling
  two queries users ask for separately (the global quantiles' selection dominates, not the scan);
- the threshold as an exact selection (`selection_threshold` below) against `compression.score_threshold`:
  0.35x, the same cut (asserted).
Where the goal stands: the baseline reads one double column and selects once; the quantile macro alone
(a selection per shard plus a global one) and the export alone (reading every column, writing 3M rows) each
take about 3x that, so total / baseline <= 3 is out of reach for this set of steps whatever the threshold.

    .venv/bin/python benchmarks/analytics.py [--rows 10000000] [--shards 100] [--threads 2] [--keep 0.3]
        [--dir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ca_platform import analytics, compression, layout, schemas, score_queries
from ca_platform.schemas import REWARD_TOPK

SCORER = "reward_model"
VERSION = "bench-v1"
CHUNK_ROWS = 1_000_000  # rows generated and written at a time: memory stays near 100 MiB whatever --rows is
BUSY_LOAD = 0.5  # 1-minute load average per core, before the run, above which the machine counts as busy
HEX = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")
EXPORT_OPTIONS = "FORMAT parquet, PARQUET_VERSION V2"  # fastest of the writer options measured (module doc)
QUANTILES = "[0.05, 0.25, 0.5, 0.75, 0.95]"  # as score_quantiles asks for them


def write_scores(root: Path, rows: int, shards: int, seed: int = 0) -> None:
    """`rows` score rows over `shards` files; kept when a previous run left the same dataset in `root`."""
    stamp = root / "dataset.json"
    wanted = {"rows": rows, "shards": shards, "seed": seed, "version": VERSION}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return
    shutil.rmtree(root / layout.SCORES_DIR, ignore_errors=True)
    rng = np.random.default_rng(seed)
    arrow_types = {pl.String: pa.string(), pl.Float64: pa.float64()}
    arrow_schema = pa.schema([(name, arrow_types[type(dtype)]) for name, dtype in schemas.SCORES.items()])
    for index in range(shards):
        shard = f"part-{index:05d}"
        path = root / layout.scores_key(SCORER, VERSION, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        remaining = rows // shards + (1 if index < rows % shards else 0)
        with pq.ParquetWriter(path, arrow_schema, compression="zstd") as writer:
            while remaining > 0:
                n = min(remaining, CHUNK_ROWS)
                uids = np.ascontiguousarray(HEX[rng.integers(0, 256, size=(n, 12), dtype=np.uint8)]).view("S24")
                score = rng.normal(0.0, 1.0, n).astype(np.float32).astype(np.float64)
                columns = {
                    "uid": pa.array(uids.ravel(), pa.binary(24)).cast(pa.string()),
                    "shard": pa.array([shard] * n, pa.string()),
                    "scorer": pa.array([SCORER] * n, pa.string()),
                    "model_version": pa.array([VERSION] * n, pa.string()),
                    "score": pa.array(score),
                    "score_norm": pa.array(score),
                }
                writer.write_table(pa.table(columns, schema=arrow_schema))
                remaining -= n
    stamp.write_text(json.dumps(wanted))


def selection_threshold(
    files_root: Path, variant: str, model_version: str, keep_fraction: float, threads: int
) -> compression.ScoreThreshold:
    """The same cut as `compression.score_threshold`, found by selection instead of a top-k sort.

    The k-th best score is `quantile_disc` at the ascending position n - k (DuckDB's quantile_disc returns
    the element at position ceil(n * q) - 1, so q = (n - k + 0.5) / n selects it exactly); only the score
    column is read for that. Ties at that score are then ordered by uid and shard, reading only the tied rows.
    """
    relation, params = compression.ranked_pairs(files_root, variant, model_version)
    with duckdb.connect() as con:
        con.execute(f"SET threads = {threads}")
        total = con.execute(f"SELECT count(*) FROM ({relation})", params).fetchone()[0]
        kept = compression.keep_count(keep_fraction, total)
        if not kept:
            return compression.ScoreThreshold(variant, model_version, keep_fraction, total, 0, None, None, None)
        position = (total - kept + 0.5) / total
        score = con.execute(f"SELECT quantile_disc(score, ?) FROM ({relation})", [position, *params]).fetchone()[0]
        above = con.execute(f"SELECT count(*) FROM ({relation}) WHERE score > ?", [*params, score]).fetchone()[0]
        uid, shard = con.execute(
            f"SELECT uid, shard FROM ({relation}) WHERE score = ? ORDER BY uid, shard LIMIT 1 OFFSET ?",
            [*params, score, kept - above - 1],
        ).fetchone()
    return compression.ScoreThreshold(variant, model_version, keep_fraction, total, kept, score, uid, shard)


def best_of(repeats: int, step: Callable[[], Any]) -> tuple[float, Any]:
    """The shortest of `repeats` timed calls, and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = step()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=float, default=0.3)
    parser.add_argument(
        "--dir", type=Path, help="where the dataset is written (and reused); a temporary folder if unset"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.rows < args.shards or args.shards < 1:
        parser.error("--rows must be at least --shards, and --shards at least 1")

    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    print(f"{args.rows:,} rows in {args.shards} shards, {args.threads} DuckDB threads, {cores} cores, keep {args.keep}")
    print(
        f"load average before the run: {load:.2f}"
        + ("  (busy machine: figures may be slow)" if load > BUSY_LOAD * cores else "")
    )
    if args.threads != cores:
        print(f"note: compression.score_threshold opens its own connection at DuckDB's default ({cores} threads)")

    with tempfile.TemporaryDirectory(prefix="analytics-bench-") as scratch:
        root = args.dir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_scores(root, args.rows, args.shards)
        print(f"dataset ready in {time.perf_counter() - start:.1f} s under {root}")
        run(root, args)


def run(root: Path, args: argparse.Namespace) -> None:
    db = root / layout.ANALYTICS_DB
    analytics.ensure_views(db, root)
    with duckdb.connect(str(db)) as con:
        if score_queries.stale_macros(con):
            score_queries.install_macros(con)
    glob = (root / layout.scores_key(SCORER, VERSION, "*")).as_posix()
    files = f"read_parquet('{glob}')"
    export_dir = root / "export"
    export_dir.mkdir(exist_ok=True)
    repeats = args.repeats

    with duckdb.connect(str(db), read_only=True) as con:
        con.execute(f"SET threads = {args.threads}")

        def fetch(sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
            return con.execute(sql, params or []).fetchall()

        def export(condition: str, params: list[Any], options: str = EXPORT_OPTIONS) -> int:
            target = (export_dir / "kept.parquet").as_posix()
            return fetch(f"COPY (SELECT * FROM {files} WHERE {condition}) TO '{target}' ({options})", params)[0][0]

        baseline, median = best_of(repeats, lambda: fetch(f"SELECT quantile_cont(score, 0.5) FROM {files}")[0][0])
        steps: dict[str, float] = {}
        steps["score_histogram macro (20 bins)"], bins = best_of(
            repeats, lambda: fetch("SELECT * FROM score_histogram(?, ?)", [SCORER, VERSION])
        )
        steps["score_quantiles macro (per shard + all)"], quantiles = best_of(
            repeats, lambda: fetch("SELECT * FROM score_quantiles(?)", [SCORER])
        )
        steps["compression.score_threshold"], threshold = best_of(
            repeats, lambda: compression.score_threshold(root, REWARD_TOPK, VERSION, args.keep)
        )
        condition, params = compression.kept_condition(threshold)
        steps["export of the kept pairs (filter)"], exported = best_of(repeats, lambda: export(condition, params))
        assert sum(row[3] for row in bins) == args.rows and len(quantiles) == args.shards + 1
        assert exported == threshold.kept, (exported, threshold)

        alternatives: list[tuple[str, float, str]] = []
        seconds, fast = best_of(
            repeats, lambda: selection_threshold(root, REWARD_TOPK, VERSION, args.keep, args.threads)
        )
        assert fast == threshold, (fast, threshold)
        alternatives.append(("threshold by selection (same cut)", seconds, "compression.score_threshold"))
        seconds, _ = best_of(
            repeats,
            lambda: fetch(
                f"COPY (SELECT * FROM {files} ORDER BY score DESC, uid, shard LIMIT {threshold.kept}) "
                f"TO '{(export_dir / 'top.parquet').as_posix()}' ({EXPORT_OPTIONS})"
            ),
        )
        alternatives.append(("export by ORDER BY ... LIMIT k", seconds, "export of the kept pairs (filter)"))
        seconds, _ = best_of(repeats, lambda: export(condition, params, "FORMAT parquet"))
        alternatives.append(("export, parquet V1 (DuckDB's default)", seconds, "export of the kept pairs (filter)"))
        seconds, _ = best_of(
            repeats,
            lambda: fetch(
                f"SELECT model_version, shard, count(*), avg(score), approx_quantile(score, {QUANTILES}), "
                "min(score), max(score) FROM scores WHERE scorer = ? "
                "GROUP BY GROUPING SETS ((model_version, shard), (model_version))",
                [SCORER],
            ),
        )
        alternatives.append(("approx_quantile per shard + all", seconds, "score_quantiles macro (per shard + all)"))

        def one_pass() -> list[tuple[Any, ...]]:
            low, high = fetch("SELECT min(score), max(score) FROM scores WHERE scorer = ?", [SCORER])[0]
            return fetch(
                f"SELECT shard, count(*), avg(score), quantile_cont(score, {QUANTILES}), min(score), max(score), "
                "histogram(least(CAST(floor((score - ?) / ?) AS BIGINT), 19)) FROM scores WHERE scorer = ? "
                "GROUP BY GROUPING SETS ((shard), ())",
                [low, (high - low) / 20, SCORER],
            )

        seconds, _ = best_of(repeats, one_pass)
        together = steps["score_histogram macro (20 bins)"] + steps["score_quantiles macro (per shard + all)"]
        alternatives.append(("histogram + quantiles in one pass", seconds, f"both macros ({together:.3f} s)"))

    total = sum(steps.values())
    print(f"\nbaseline: exact median of {args.rows:,} scores ({median:.4f})   {baseline:8.3f} s")
    for name, seconds in steps.items():
        print(f"  {name:<42} {seconds:8.3f} s   {seconds / baseline:5.2f} x baseline")
    print(f"  {'total':<42} {total:8.3f} s")
    verdict = "met" if total / baseline <= 3 else "not met"
    print(f"total / baseline: {total / baseline:.2f}  (goal: at most 3, {verdict})")
    with_selection = total - steps["compression.score_threshold"] + alternatives[0][1]
    print(f"with the threshold by selection: total {with_selection:.3f} s, {with_selection / baseline:.2f} x baseline")
    print("\nalternatives (not in the total):")
    for name, seconds, against in alternatives:
        reference = steps.get(against)
        relative = f"{seconds / reference:5.2f} x {against}" if reference else f"against {against}"
        print(f"  {name:<42} {seconds:8.3f} s   {relative}")


if __name__ == "__main__":
    main()
