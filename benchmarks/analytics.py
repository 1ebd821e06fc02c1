"""Score analytics speed: what a user runs to decide a cut and export it, against one exact median pass.

A synthetic scores dataset (the SCORES schema, `--rows` pairs in `--shards` parquet files laid out as
`scores/reward_model/<version>/<shard>.parquet`, written in chunks so memory stays modest; scores are float32
normals, so ties occur as they do with a real model's outputs; plus download ledgers of the same uids, 5%
failed, for random_topk) is queried at `--threads` DuckDB threads. The baseline is one exact
`quantile_cont(score, 0.5)` over the files. The work, at keep fraction `--keep`, is: the global quantiles
(p05..p95 in one `quantile_cont` list, with min, max and count), the keep threshold, the kept/dropped
histogram (40 bins, as the score_threshold asset draws it) and the export of the kept pairs (uid, shard,
score) to parquet by threshold-then-filter (`compression.kept_condition`). It is timed two ways; each round runs
every step once, and each figure is a step's best of `--repeats` rounds:
- platform functions: `compression.score_threshold`, `compression.score_histogram`, one quantile query and
  the export, as a user calls them (each function opens its own connection at DuckDB's default threads);
- fused passes, the fewest scans this set of answers needs: the count from parquet metadata; one aggregate
  giving min, max, the quantiles and the kept-th best score (N is known first, so the threshold's position
  joins the quantile list; see `cont_fraction_at`); one pass counting the histogram's bins with the pairs
  above and at that score; one read of the tied pairs alone for the uid and shard; the export.
Both give the same threshold, histogram and quantiles (asserted). Goal: total / baseline <= 3. The per-shard
`score_quantiles` macro, random_topk's threshold and the former sort-based threshold are timed as extras, and
the export's writer options and the fused aggregate's variants as alternatives, all outside the totals.

    .venv/bin/python benchmarks/analytics.py [--rows 10000000] [--shards 100] [--threads 2] [--keep 0.3]
        [--dir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
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

from ca_platform import analytics, layout, schemas
from ca_platform.analytics import queries as score_queries
from ca_platform.compression import threshold as compression
from ca_platform.compression.threshold import ScoreHistogram, ScoreThreshold
from ca_platform.schemas import RANDOM_TOPK, REWARD_TOPK, Status

SCORER = "reward_model"
VERSION = "bench-v1"
SEED = 0  # random_topk's seed
CHUNK_ROWS = 1_000_000  # rows generated and written at a time: memory stays near 100 MiB whatever --rows is
FAILED_SHARE = 0.05  # ledger rows that did not download, so random_topk ranks fewer pairs than the ledgers hold
BUSY_LOAD = 0.5  # 1-minute load average per core, before the run, above which the machine counts as busy
HEX = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")
QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]  # as score_quantiles reports them
BINS = 40  # score_histogram's default, the score_threshold asset's plot
EXPORT_COLUMNS = "uid, shard, score"
# The writer options of the export in the totals: parquet V2 (DuckDB writes V1 unless told) with snappy, one file,
# rows in file order; the alternatives below time the others
EXPORT_OPTIONS = "FORMAT parquet, PARQUET_VERSION V2"
# step names, as printed
BASELINE = "baseline"
THRESHOLD = "compression.score_threshold"
HISTOGRAM = f"compression.score_histogram ({BINS} bins)"
QUANTILE_QUERY = "quantiles: count, min, max, p05..p95 (1 list)"
EXPORT = "export of the kept pairs (uid, shard, score)"
METADATA = "count from parquet metadata"
AGGREGATE = "1 aggregate: min, max, p05..p95, kept-th score"
BIN_PASS = "1 pass: histogram bins, pairs above / at it"
TIE_PASS = "the tied pairs alone: uid, shard of the cut"
PER_SHARD = "score_quantiles macro (per shard + all)"
SORTED = "reward_topk threshold by top-k sort (former)"
RANDOM = "random_topk: compression.score_threshold"
RANDOM_SORTED = "random_topk threshold by top-k sort (former)"
SEPARATE_DISC = "aggregate with a separate quantile_disc"


def write_scores(root: Path, rows: int, shards: int, seed: int = 0) -> None:
    """`rows` score rows over `shards` files, and a ledger per shard with the same uids plus failed ones; kept
    when a previous run left the same dataset in `root`."""
    stamp = root / "dataset.json"
    wanted = {"rows": rows, "shards": shards, "seed": seed, "version": VERSION, "ledgers": FAILED_SHARE}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return
    shutil.rmtree(root / layout.SCORES_DIR, ignore_errors=True)
    shutil.rmtree(root / layout.DOWNLOADS_DIR, ignore_errors=True)
    rng = np.random.default_rng(seed)
    arrow_types = {pl.String: pa.string(), pl.Float64: pa.float64(), pl.Int32: pa.int32()}
    arrow_schema = pa.schema([(name, arrow_types[type(dtype)]) for name, dtype in schemas.SCORES.items()])
    ledger_schema = pa.schema([("uid", pa.string()), ("shard", pa.string()), ("status", pa.string())])
    for index in range(shards):
        shard = f"part-{index:05d}"
        path = root / layout.scores_key(SCORER, VERSION, shard)
        ledger_path = root / layout.download_rows_key(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        ledger_path.parent.mkdir(parents=True, exist_ok=True)
        remaining = rows // shards + (1 if index < rows % shards else 0)
        with (
            pq.ParquetWriter(path, arrow_schema, compression="zstd") as writer,
            pq.ParquetWriter(ledger_path, ledger_schema, compression="zstd") as ledger,
        ):
            while remaining > 0:
                n = min(remaining, CHUNK_ROWS)
                uids = pa.array(
                    np.ascontiguousarray(HEX[rng.integers(0, 256, size=(n, 12), dtype=np.uint8)]).view("S24").ravel(),
                    pa.binary(24),
                ).cast(pa.string())
                score = rng.normal(0.0, 1.0, n).astype(np.float32).astype(np.float64)
                columns = {
                    "uid": uids,
                    "shard": pa.array([shard] * n, pa.string()),
                    "scorer": pa.array([SCORER] * n, pa.string()),
                    "model_version": pa.array([VERSION] * n, pa.string()),
                    "score": pa.array(score),
                    "score_norm": pa.array(score),
                    "caption_source": pa.array([schemas.RAW_CAPTION] * n, pa.string()),
                    schemas.CAPTIONER_VERSION: pa.nulls(n, pa.string()),
                    schemas.CAPTION_RANK: pa.nulls(n, pa.int32()),
                }
                writer.write_table(pa.table(columns, schema=arrow_schema))
                status = np.where(rng.random(n) < FAILED_SHARE, Status.FAILED_TO_DOWNLOAD, Status.SUCCESS)
                ledger.write_table(
                    pa.table({"uid": uids, "shard": columns["shard"], "status": pa.array(status)}, ledger_schema)
                )
                remaining -= n
    stamp.write_text(json.dumps(wanted))


class StepTimes:
    """The shortest time of each named step over the rounds, in first-timed order.

    Every round runs every step once, so a burst from another process on the machine costs one round of a
    step, not all of its tries.
    """

    def __init__(self) -> None:
        self.best: dict[str, float] = {}

    def __call__(self, name: str, step: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = step()
        self.best[name] = min(self.best.get(name, float("inf")), time.perf_counter() - start)
        return result


def sorted_threshold(files_root: Path, variant: str, model_version: str, keep_fraction: float) -> ScoreThreshold:
    """The cut as `compression.score_threshold` found it before selection: a top-k sort of every pair."""
    relation, params = compression.ranked_pairs(files_root, variant, model_version)
    with duckdb.connect() as con:
        total = con.execute(f"SELECT count(*) FROM ({relation})", params).fetchone()[0]
        kept = compression.keep_count(keep_fraction, total)
        last = None
        if kept:
            last = con.execute(
                f"SELECT score, uid, shard FROM ({relation}) ORDER BY score DESC, uid ASC, shard ASC LIMIT 1 OFFSET ?",
                [*params, kept - 1],
            ).fetchone()
    score, uid, shard = last if last else (None, None, None)
    return ScoreThreshold(variant, model_version, keep_fraction, total, kept, score, uid, shard)


def cont_fraction_at(index: int, values: int) -> float | None:
    """A `quantile_cont` fraction q at which DuckDB returns the element at ascending `index` itself.

    DuckDB interpolates between the elements at floor and ceil of (values - 1) * q, computed in doubles, and
    returns the element unchanged when that product is a whole number; the exact quotient, or a neighbour a few
    ulps away, usually makes it so. None when none does (then a separate `quantile_disc` is needed).
    """
    if values == 1:
        return 0.0
    guess = index / (values - 1)
    candidates = [guess]
    for direction in (math.inf, -math.inf):
        q = guess
        for _ in range(4):
            q = math.nextafter(q, direction)
            candidates.append(q)
    return next((q for q in candidates if 0.0 <= q <= 1.0 and (values - 1) * q == index), None)


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
    if not 0.0 < args.keep <= 1.0:
        parser.error("--keep must be within (0, 1]: an empty cut has nothing to export")

    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    print(f"{args.rows:,} rows in {args.shards} shards, {args.threads} DuckDB threads, {cores} cores, keep {args.keep}")
    print(
        f"load average before the run: {load:.2f}"
        + ("  (busy machine: figures may be slow)" if load > BUSY_LOAD * cores else "")
    )
    if args.threads != cores:
        print(f"note: the compression functions open their own connections at DuckDB's default ({cores} threads)")

    with tempfile.TemporaryDirectory(prefix="analytics-bench-") as scratch:
        root = args.dir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_scores(root, args.rows, args.shards)
        print(f"dataset ready in {time.perf_counter() - start:.1f} s under {root}")
        run(root, args)
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")


def run(root: Path, args: argparse.Namespace) -> None:
    db = root / layout.ANALYTICS_DB
    analytics.ensure_views(db, root)
    with duckdb.connect(str(db)) as con:
        if score_queries.stale_macros(con):
            score_queries.install_macros(con)
    files = f"read_parquet('{(root / layout.scores_key(SCORER, VERSION, '*')).as_posix()}')"
    export_dir = root / "export"
    random_version = compression.random_version(SEED)
    timed = StepTimes()
    platform = [THRESHOLD, HISTOGRAM, QUANTILE_QUERY, EXPORT]
    fused = [METADATA, AGGREGATE, BIN_PASS, TIE_PASS, EXPORT]
    alternatives: dict[str, tuple[str, str]] = {}  # name: (the step it would replace, a note)

    with duckdb.connect(str(db), read_only=True) as con:
        con.execute(f"SET threads = {args.threads}")

        def fetch(sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
            return con.execute(sql, params or []).fetchall()

        def export(condition: str, params: list[Any], columns: str = EXPORT_COLUMNS, options: str = "") -> int:
            """COPY the kept pairs to export/kept.parquet (a folder of files with PER_THREAD_OUTPUT)."""
            shutil.rmtree(export_dir, ignore_errors=True)
            export_dir.mkdir()
            target = (export_dir / "kept.parquet").as_posix()
            sql = f"COPY (SELECT {columns} FROM {files} WHERE {condition}) TO '{target}' ({options or EXPORT_OPTIONS})"
            return con.execute(sql, params).fetchone()[0]

        def export_size() -> int:
            return sum(path.stat().st_size for path in export_dir.rglob("*.parquet"))

        def one_round() -> tuple[float, ScoreThreshold, int, ScoreThreshold]:
            """Every step once; (the median, the cut, the export's bytes, random_topk's cut)."""
            median = timed(BASELINE, lambda: fetch(f"SELECT quantile_cont(score, 0.5) FROM {files}")[0][0])

            # platform functions, in the order a user needs them: the cut, its histogram, the quantiles, the export
            threshold = timed(THRESHOLD, lambda: compression.score_threshold(root, REWARD_TOPK, VERSION, args.keep))
            histogram = timed(HISTOGRAM, lambda: compression.score_histogram(root, threshold, BINS))
            quantiles = f"SELECT count(*), min(score), max(score), quantile_cont(score, {QUANTILES}) FROM {files}"
            summary = timed(QUANTILE_QUERY, lambda: fetch(quantiles)[0])
            condition, condition_params = compression.kept_condition(threshold)
            exported = timed(EXPORT, lambda: export(condition, condition_params))
            exported_bytes = export_size()
            assert exported == threshold.kept, (exported, threshold)
            assert sum(histogram.kept) == threshold.kept and summary[0] == args.rows

            # fused passes
            total = timed(METADATA, lambda: fetch(f"SELECT count(*) FROM {files}")[0][0])
            kept = compression.keep_count(args.keep, total)
            fraction = cont_fraction_at(total - kept, total)
            disc_fraction = (total - kept + 0.5) / total  # as compression's selection asks quantile_disc
            if fraction is None:
                aggregate = f"list_append(quantile_cont(score, {QUANTILES}), quantile_disc(score, ?))"
                fraction = disc_fraction
            else:
                aggregate = f"quantile_cont(score, [{', '.join(map(str, QUANTILES))}, ?])"
            low, high, cuts = timed(
                AGGREGATE, lambda: fetch(f"SELECT min(score), max(score), {aggregate} FROM {files}", [fraction])[0]
            )
            score = cuts[-1]
            width = (high - low) / BINS or 1.0
            bins = timed(
                BIN_PASS,
                lambda: fetch(
                    f"SELECT least(CAST(floor((score - ?) / ?) AS INTEGER), ?) AS bin, count(*), "
                    f"count(*) FILTER (WHERE score > ?), count(*) FILTER (WHERE score = ?) FROM {files} GROUP BY bin",
                    [low, width, BINS - 1, score, score],
                ),
            )
            above = sum(row[2] for row in bins)
            # a window, not ORDER BY ... LIMIT 1 OFFSET: DuckDB's top-N pushes a dynamic filter on uid into the
            # scan, which then decodes every uid (1.7x the time here)
            _, uid, shard = timed(
                TIE_PASS,
                lambda: fetch(
                    f"SELECT score, uid, shard FROM (SELECT score, uid, shard, row_number() OVER (ORDER BY uid, shard) "
                    f"AS place FROM {files} WHERE score = ?) WHERE place = ?",
                    [score, kept - above],
                )[0],
            )
            fused_threshold = ScoreThreshold(REWARD_TOPK, VERSION, args.keep, total, kept, score, uid, shard)
            # (uid, shard) is the pairs' key, so the cut keeps kept - above of the tied pairs, all in one bin
            kept_per_bin, dropped_per_bin = [0] * BINS, [0] * BINS
            for index, pairs, higher, tied in bins:
                kept_per_bin[index] = higher + (kept - above if tied else 0)
                dropped_per_bin[index] = pairs - kept_per_bin[index]
            edges = [low + i * width for i in range(BINS + 1)]
            assert fused_threshold == threshold, (fused_threshold, threshold)
            assert ScoreHistogram(edges, kept_per_bin, dropped_per_bin) == histogram, (bins, histogram)
            assert (low, high, cuts[:-1]) == (summary[1], summary[2], summary[3]), (low, high, cuts, summary)

            # extras
            per_shard = timed(PER_SHARD, lambda: fetch("SELECT * FROM score_quantiles(?)", [SCORER]))
            assert len(per_shard) == args.shards + 1
            former = timed(SORTED, lambda: sorted_threshold(root, REWARD_TOPK, VERSION, args.keep))
            assert former == threshold, (former, threshold)
            random_cut = timed(
                RANDOM, lambda: compression.score_threshold(root, RANDOM_TOPK, random_version, args.keep)
            )
            former = timed(RANDOM_SORTED, lambda: sorted_threshold(root, RANDOM_TOPK, random_version, args.keep))
            assert former == random_cut, (former, random_cut)

            # alternatives, each against the step it would replace
            for name, columns, options in [
                ("export, parquet V1 (DuckDB's default)", EXPORT_COLUMNS, "FORMAT parquet"),
                ("export, V2 zstd", EXPORT_COLUMNS, f"{EXPORT_OPTIONS}, COMPRESSION zstd"),
                ("export, V2 uncompressed", EXPORT_COLUMNS, f"{EXPORT_OPTIONS}, COMPRESSION uncompressed"),
                ("export, V2 snappy, no dictionary", EXPORT_COLUMNS, f"{EXPORT_OPTIONS}, DICTIONARY_SIZE_LIMIT 0"),
                ("export, every column (SELECT *)", "*", EXPORT_OPTIONS),
                ("export, a file per thread", EXPORT_COLUMNS, f"{EXPORT_OPTIONS}, PER_THREAD_OUTPUT true"),
            ]:
                count = timed(name, lambda c=columns, o=options: export(condition, condition_params, c, o))
                assert count == threshold.kept
                alternatives[name] = (EXPORT, f"{export_size() / 2**20:.0f} MiB")
            con.execute("SET preserve_insertion_order = false")
            for name, options in [
                ("export, preserve_insertion_order = false", EXPORT_OPTIONS),
                ("export, that and uncompressed", f"{EXPORT_OPTIONS}, COMPRESSION uncompressed"),
            ]:
                count = timed(name, lambda o=options: export(condition, condition_params, options=o))
                assert count == threshold.kept
                alternatives[name] = (EXPORT, f"{export_size() / 2**20:.0f} MiB")
            con.execute("RESET preserve_insertion_order")
            separate = f"SELECT min(score), max(score), quantile_cont(score, {QUANTILES}), quantile_disc(score, ?)"
            timed(SEPARATE_DISC, lambda: fetch(f"{separate} FROM {files}", [disc_fraction]))
            alternatives[SEPARATE_DISC] = (AGGREGATE, "")
            return median, threshold, exported_bytes, random_cut

        for _ in range(args.repeats):
            median, threshold, exported_bytes, random_cut = one_round()

    best = timed.best
    baseline = best[BASELINE]
    print(f"\nbaseline: exact median of {args.rows:,} scores ({median:.4f})   {baseline:8.3f} s")
    for title, steps in [("platform functions", platform), ("fused passes", fused)]:
        print(f"{title}:")
        for name in steps:
            print(f"  {name:<50} {best[name]:8.3f} s   {best[name] / baseline:5.2f} x baseline")
        total_seconds = sum(best[name] for name in steps)
        ratio = total_seconds / baseline
        verdict = "met" if ratio <= 3 else "not met"
        print(f"  {'total':<50} {total_seconds:8.3f} s   {ratio:5.2f} x baseline  (goal <= 3: {verdict})")
    floor = best[AGGREGATE] + best[EXPORT]
    print(
        f"floor: the quantile aggregate and the export alone take {floor:.3f} s, {floor / baseline:.2f} x baseline; "
        f"the export writes {threshold.kept:,} rows, {exported_bytes / 2**20:.0f} MiB"
    )
    print("\nextras (not in the totals):")
    notes = {
        SORTED: f"{best[SORTED] / best[THRESHOLD]:.1f} x compression.score_threshold",
        RANDOM: f"{random_cut.total:,} pairs",
        RANDOM_SORTED: f"{best[RANDOM_SORTED] / best[RANDOM]:.1f} x the selection",
    }
    for name in (PER_SHARD, SORTED, RANDOM, RANDOM_SORTED):
        print(f"  {name:<50} {best[name]:8.3f} s   {best[name] / baseline:5.2f} x baseline   {notes.get(name, '')}")
    print("\nalternatives (not in the totals), against the step they would replace:")
    for name, (against, note) in alternatives.items():
        label = f"{name}: {note}" if note else name
        print(f"  {label:<50} {best[name]:8.3f} s   {best[name] / best[against]:5.2f} x that step")


if __name__ == "__main__":
    main()
