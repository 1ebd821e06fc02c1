"""Running the lineage for every shard of a pool: what `ca-platform run` and the demo do.

It goes through the same asset definitions the Dagster UI shows: one Dagster run per shard and stage (one per
pool-wide stage), on the instance of DAGSTER_HOME when set (so the runs appear in the UI's history) or a
temporary one. Per-shard runs go to the engine (ca_platform.engine): on Ray they run concurrently, each in a
Ray worker wherever the cluster has room, with the same instance, so Dagster records every shard's own
materialization, checks and failure exactly as a backfill from the UI would. Pool-wide stages run here.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagster import AssetsDefinition, DagsterInstance, SourceAsset, materialize

from ca_platform import analytics, layout, quarantine, schemas
from ca_platform.assets import (
    ALL_ASSETS,
    CAPTION_ANALYTICS_ASSETS,
    CAPTIONER_ASSETS,
    CLASSIFICATION_SET_ASSETS,
    DEDUP_ASSETS,
    EVALUATION_SET_ASSETS,
    PINNED_REWARD_ASSETS,
    REPORT_ASSETS,
    REWARD_ASSETS,
    SHARD_CAPTION_ASSETS,
    SHARD_SCORE_ASSETS,
    SHARD_SUBSET_ASSETS,
    SOURCE_ASSETS,
    SPINE_ASSETS,
    THRESHOLD_ASSETS,
    VARIANT_CLASSIFICATION_ASSETS,
    VARIANT_MODEL_ASSETS,
)
from ca_platform.assets.partitions import POOL_SHARDS, register_training_sets
from ca_platform.engine import Engine, EngineSettings, InlineEngine, Work, WorkerLost, current_placement, open_engine
from ca_platform.evaluation.classification_set import read_classification_file
from ca_platform.evaluation.report_rows import CurationRow, curve_fractions
from ca_platform.evaluation.report_text import curation_text, curve_text, per_k_tables
from ca_platform.ingest.download import done_shards, is_done
from ca_platform.ingest.pool import PoolShard, discover_shards
from ca_platform.preferences.files import validate_preference_file
from ca_platform.progress import say, throughput_line
from ca_platform.quarantine import QuarantinedShard
from ca_platform.resources import (
    CaptioningConfig,
    DownloadConfig,
    EvaluationConfig,
    PlatformStorage,
    PreferencesConfig,
    ResourceRecipe,
    recipe_of,
    resources_from_recipe,
)
from ca_platform.resources import build_resources as build_resources  # the one factory, for callers of the runner
from ca_platform.scoring.registry import registered_reward_checkpoint
from ca_platform.storage import DataStore, read_json

if TYPE_CHECKING:
    from dagster._core.instance.ref import InstanceRef

POOL_WIDE = "(pool)"  # the target of a run of unpartitioned assets


@dataclass(frozen=True)
class ShardStage:
    assets: Sequence[AssetsDefinition]
    work: Work  # a Ray task, a call on a scorer actor that keeps its model loaded, or a training task
    # The step a shard is quarantined for when its worker is lost for good (no process was left to record it);
    # that step's next success releases it. None for partitions that are not shards (training variants).
    step: str | None


# The stages run per partition, by name, so that a worker in another process can be told which one to run.
SHARD_STAGES = {
    "spine": ShardStage(SPINE_ASSETS, "task", layout.DOWNLOAD_STEP),
    "scores": ShardStage(SHARD_SCORE_ASSETS, "scorer", layout.scores_step(schemas.REWARD_MODEL)),
    "captions": ShardStage(SHARD_CAPTION_ASSETS, "scorer", layout.CAPTION_STEP),
    "subsets": ShardStage(SHARD_SUBSET_ASSETS, "task", layout.SUBSET_STEP),
    # per training set (full, each variant at each k): its CLIP and BLIP and their evaluations, side by side
    "models": ShardStage(VARIANT_MODEL_ASSETS, "trainer", None),
    # the same with a labelled set: its CLIP's zero-shot classification too, in the same run
    "models+classification": ShardStage([*VARIANT_MODEL_ASSETS, *VARIANT_CLASSIFICATION_ASSETS], "trainer", None),
}


@dataclass
class StageRun:
    target: str  # the partition, or POOL_WIDE
    success: bool
    checks: dict[str, bool] = field(default_factory=dict)  # "asset:check" -> passed
    error: str | None = None
    already_done: bool = False  # not run: the shard's spine is published from the same pool file
    placement: str | None = None  # the host (and Ray node) the run ran on
    seconds: float = 0.0  # the Dagster run's wall time
    throughputs: list[str] = field(default_factory=list)  # what each asset materialized did, and how fast

    def line(self, stage: str) -> str:
        """One line saying how the run ended, for the terminal."""
        target = "" if self.target == POOL_WIDE else f" {self.target}"
        outcome = "ok" if self.success else f"FAILED: {self.error or 'a check failed'}"
        done = "; ".join(self.throughputs)
        return f"{stage}{target}: {outcome} in {self.seconds:.1f} s" + (f" ({done})" if done else "")


@dataclass
class LineageRun:
    storage: PlatformStorage
    runs: list[StageRun]
    quarantined: dict[str, list[QuarantinedShard]] = field(default_factory=dict)  # left in quarantine at the end
    engine: str = ""  # where the per-shard runs ran, in words
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage, in the order run

    @property
    def success(self) -> bool:
        return all(r.success for r in self.runs) and not self.quarantined


@contextmanager
def lineage_instance(instance: DagsterInstance | None, engine: EngineSettings) -> Iterator[DagsterInstance]:
    """The instance the runs are recorded on: the one given, else DAGSTER_HOME's, else (for the inline engine)
    an ephemeral one or (on Ray, whose workers are other processes and must share it) a temporary one."""
    if instance is not None:
        if engine.kind == "ray" and instance.is_ephemeral:
            raise ValueError(
                "the Ray engine records each shard's run from a worker process: give a persistent "
                "Dagster instance (DAGSTER_HOME), not an ephemeral one"
            )
        yield instance
    elif os.environ.get("DAGSTER_HOME") or engine.kind == "inline":
        yield default_instance()
    else:
        with tempfile.TemporaryDirectory(prefix="ca-dagster-") as home, DagsterInstance.local_temp(home) as temp:
            yield temp


def default_instance() -> DagsterInstance:
    return DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else DagsterInstance.ephemeral()


def register_shards(pool: DataStore, instance: DagsterInstance) -> list[PoolShard]:
    """Add every shard of the pool as a partition; returns all shards."""
    shards = discover_shards(pool)
    known = set(instance.get_dynamic_partitions(POOL_SHARDS))
    new = [s.key for s in shards if s.key not in known]
    if new:
        instance.add_dynamic_partitions(POOL_SHARDS, new)
    return shards


def _materialize(
    selection: Sequence[AssetsDefinition | SourceAsset],
    resources: dict[str, object],
    instance: DagsterInstance,
    partition_key: str | None,
    log_level: str,
) -> StageRun:
    started = time.monotonic()
    result = materialize(
        ALL_ASSETS,
        selection=selection,
        partition_key=partition_key,
        instance=instance,
        resources=resources,
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
    )
    checks = {f"{e.asset_key.to_user_string()}:{e.check_name}": e.passed for e in result.get_asset_check_evaluations()}
    error = None
    if not result.success:
        failures = [ev for ev in result.all_events if ev.is_step_failure]
        error = "; ".join(_root_cause(ev.step_failure_data.error) for ev in failures) or "run failed"
    success = result.success and all(checks.values())
    return StageRun(
        partition_key or POOL_WIDE,
        success,
        checks,
        error,
        placement=current_placement().describe(),
        seconds=time.monotonic() - started,
        throughputs=[
            line
            for event in result.get_asset_materialization_events()
            if (line := throughput_line(event.asset_key.to_user_string(), event.materialization.metadata))
        ],
    )


@dataclass(frozen=True)
class ShardStageRun:
    """One per-shard stage as a Dagster run, picklable so that it runs in a Ray worker: the resources travel as
    their configuration and the instance as its reference."""

    stage: str  # a key of SHARD_STAGES
    recipe: ResourceRecipe
    instance_ref: InstanceRef
    log_level: str

    def __call__(self, shard: str) -> StageRun:
        with DagsterInstance.from_ref(self.instance_ref) as instance:
            resources = resources_from_recipe(self.recipe)
            return _materialize(SHARD_STAGES[self.stage].assets, resources, instance, shard, self.log_level)


def run_lineage(
    resources: dict[str, object],
    instance: DagsterInstance | None = None,
    log_level: str = "WARNING",
    compress: bool = False,
    force: bool = False,
    engine: EngineSettings | None = None,
) -> LineageRun:
    """Materialize the lineage: every shard's spine, then (with a preference file, or a pinned checkpoint)
    the reward model and its baselines once, every downloaded shard's reward and CLIP scores and image
    fingerprints, and (with `compress`) dedup and decontamination against the evaluation set, the global cut of
    every subset variant and each shard's compressed subsets, and (with an evaluation set as well) per training
    variant a CLIP and a BLIP, their evaluations and the curation report; one run per shard, variant and stage.
    With recaptioning on (the `captioning` resource), the captioner and every healthy shard's synthetic captions
    and their scores come before the cut, which then covers the caption variants too. Per-shard runs go to the
    engine (`engine`, default from the environment: an embedded local Ray), concurrently as far as its CPUs
    allow. A shard whose spine is already published from the same pool file is not downloaded again unless
    `force`. A shard that fails is quarantined and the pool-wide stages proceed over the healthy ones; the run's
    `success` stays False while any shard is quarantined.

    The preference file is validated whole first (format and every image), so a bad one raises
    PreferenceFormatError listing every problem within seconds, before any shard is registered or downloaded;
    so is a labelled classification set's file (ClassificationSetError) and its templates (TemplateError).
    """
    storage, downloader = resources["storage"], resources["downloader"]
    preferences, evaluation = resources["preferences"], resources["evaluation"]
    assert isinstance(storage, PlatformStorage) and isinstance(preferences, PreferencesConfig)
    assert isinstance(evaluation, EvaluationConfig) and isinstance(downloader, DownloadConfig)
    if preferences.uri:
        with tempfile.TemporaryDirectory(prefix="ca-preferences-") as fetched:
            policy = downloader.settings().policy
            validate_preference_file(Path(preferences.uri), policy, Path(fetched), image_root=preferences.image_root)
    if evaluation.classes_uri:  # a bad labelled set or template fails now, not after the models have trained
        from ca_platform.evaluation.classification import check_templates  # torch, through retrieval's metrics

        check_templates(evaluation.class_templates)
        read_classification_file(Path(evaluation.classes_uri))
    settings = engine or EngineSettings.from_env()
    with lineage_instance(instance, settings) as dagster_instance:
        driver = _StageDriver(open_engine(settings), resources, dagster_instance, log_level)
        try:
            runs = driver.run(compress, force)
        finally:
            driver.engine.close()
    analytics.ensure_views(storage.analytics_db(), storage.analytics_root())
    quarantined = quarantine.quarantined(storage.data_store())
    return LineageRun(storage, runs, quarantined, driver.engine.describe(), driver.seconds)


def _import_scoring(_: str) -> None:
    """What a scorer's first shard would otherwise wait for: Dagster and the definitions, great_expectations,
    torch and transformers (the model itself loads with the first shard, once the reward model exists)."""
    import great_expectations  # noqa: F401
    import transformers  # noqa: F401

    import ca_platform.scoring.streaming  # noqa: F401


@dataclass
class _StageDriver:
    """Runs the lineage's stages in order on one instance: per-shard stages through the engine, pool-wide ones
    here; records each stage's wall time."""

    engine: Engine
    resources: dict[str, object]
    instance: DagsterInstance
    log_level: str
    seconds: dict[str, float] = field(default_factory=dict)

    def per_shard(self, stage: str, shards: Sequence[str], label: str | None = None) -> list[StageRun]:
        """One run per shard of `stage`, through the engine (concurrently on Ray); results in the shards' order.
        A shard whose worker was lost for good fails here and is quarantined; the others go on. `label` names the
        stage in progress lines and wall times (default: `stage`)."""
        spec = SHARD_STAGES[stage]
        stage_key, stage = stage, label or stage
        if isinstance(self.engine, InlineEngine):  # same process: the resources and instance as they are
            run: Callable[[str], StageRun] = lambda key: _materialize(  # noqa: E731
                spec.assets, self.resources, self.instance, key, self.log_level
            )
        else:
            run = ShardStageRun(stage_key, recipe_of(self.resources), self.instance.get_ref(), self.log_level)
        storage = self.resources["storage"]
        assert isinstance(storage, PlatformStorage)
        started = time.monotonic()
        if shards:
            say(f"{stage}: {len(shards)} runs ({', '.join(shards[:4])}{', ...' if len(shards) > 4 else ''})")
        finished: dict[str, StageRun] = {}
        for shard, result in self.engine.map_shards(run, shards, spec.work, label=stage):
            if isinstance(result, WorkerLost):
                if spec.step is not None:
                    quarantine.record(storage.data_store(), shard, spec.step, str(result), run_id="(worker lost)")
                result = StageRun(shard, False, error=f"{stage}: {result}")
            finished[shard] = result
            say(result.line(stage))
        self._took(stage, started)
        if shards:
            ok = sum(run.success for run in finished.values())
            say(f"{stage}: {ok} of {len(shards)} ok in {time.monotonic() - started:.1f} s")
        return [finished[shard] for shard in shards]

    def pool_wide(
        self, stage: str, selection: Sequence[AssetsDefinition | SourceAsset], key: str | None = None
    ) -> StageRun:
        started = time.monotonic()
        say(f"{stage}: started")
        run = _materialize(selection, self.resources, self.instance, key, self.log_level)
        self._took(stage, started)
        say(run.line(stage))
        return run

    def _took(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.monotonic() - started

    def run(self, compress: bool, force: bool) -> list[StageRun]:
        storage, preferences = self.resources["storage"], self.resources["preferences"]
        assert isinstance(storage, PlatformStorage) and isinstance(preferences, PreferencesConfig)
        shards = register_shards(storage.pool_store(), self.instance)
        done = done_shards(storage.data_store())
        to_download = [s.key for s in shards if force or not is_done(done, s.key, s.fingerprint)]
        spine = {run.target: run for run in self.per_shard("spine", to_download)}
        runs = [spine.get(s.key) or StageRun(s.key, True, already_done=True) for s in shards]
        with tempfile.TemporaryDirectory() as scratch:
            pinned = registered_reward_checkpoint(storage.data_store(), Path(scratch)) is not None
        if not (preferences.uri or pinned):
            return runs
        self.engine.start_scorers(sum(1 for r in runs if r.success), _import_scoring)
        models = self.pool_wide("reward models", REWARD_ASSETS if preferences.uri else PINNED_REWARD_ASSETS)
        runs.append(models)
        if not models.success:
            return runs
        scored = self.per_shard("scores", [r.target for r in runs if r.success and r.target != POOL_WIDE])
        runs += scored
        healthy = [run.target for run in scored if run.success]
        if not (compress and healthy):  # failed shards are quarantined: the cut proceeds over the healthy ones
            return runs
        evaluation = self.resources["evaluation"]
        assert isinstance(evaluation, EvaluationConfig)
        if evaluation.uri:  # first: decontamination removes its images from the pool
            runs.append(self.pool_wide("evaluation set", EVALUATION_SET_ASSETS))
            if not runs[-1].success:
                return runs
            if evaluation.classes_uri:
                runs.append(self.pool_wide("classification set", CLASSIFICATION_SET_ASSETS))
                if not runs[-1].success:
                    return runs
        runs.append(self.pool_wide("dedup", DEDUP_ASSETS))
        if not runs[-1].success:
            return runs
        captioning = self.resources["captioning"]
        assert isinstance(captioning, CaptioningConfig)
        if captioning.enabled:
            captioner = self.pool_wide("captioner", CAPTIONER_ASSETS)
            runs.append(captioner)
            if not captioner.success:
                return runs
            captioned = self.per_shard("captions", healthy)
            runs += captioned
            healthy = [run.target for run in captioned if run.success]
            if not healthy:
                return runs
            runs.append(self.pool_wide("caption analytics", CAPTION_ANALYTICS_ASSETS))
        threshold = self.pool_wide("threshold", THRESHOLD_ASSETS)
        runs.append(threshold)
        if not threshold.success:
            return runs
        subsets = self.per_shard("subsets", healthy)
        runs += subsets
        if evaluation.uri and all(run.success for run in subsets):
            runs += self._train_and_evaluate()
        return runs

    def _train_and_evaluate(self) -> list[StageRun]:
        """Per training set (full, and every cut: each variant at each keep fraction) its CLIP and BLIP and their
        evaluations (zero-shot classification too with a labelled set), side by side on the engine, then the
        report."""
        storage, evaluation = self.resources["storage"], self.resources["evaluation"]
        assert isinstance(storage, PlatformStorage) and isinstance(evaluation, EvaluationConfig)
        cut = _read_report(storage, layout.SCORE_THRESHOLD_REPORT_KEY) or {}
        # score_threshold registered them on this instance; again here, for a cut published by another one
        training_sets = register_training_sets(self.instance, cut)
        stage = "models+classification" if evaluation.classes_uri else "models"
        runs = self.per_shard(stage, training_sets, label="models")
        if all(run.success for run in runs):
            runs.append(self.pool_wide("report", REPORT_ASSETS))
        return runs


def observe_registrations(resources: dict[str, object], instance: DagsterInstance | None = None) -> StageRun:
    """Record the pinned reward checkpoint's version on the instance, for the automation sensor to act on."""
    return _materialize(SOURCE_ASSETS, resources, instance or default_instance(), None, "WARNING")


def _root_cause(error: Any) -> str:
    """The innermost error's message: the asset's own exception, not Dagster's wrapper around it."""
    while error is not None and error.cause is not None:
        error = error.cause
    return str(error.message).strip() if error is not None else "unknown error"


def report(run: LineageRun) -> str:
    """A short text report: rows, downloads, failures by reason, checks, and the reward stage's results."""
    db = run.storage.analytics_db()
    totals = analytics.query(
        db, "SELECT count(DISTINCT shard), count(*), count(*) FILTER (status = 'success') FROM downloads"
    ).rows[0]
    by_status = analytics.query(
        db,
        "SELECT status, count(*) AS n, any_value(error) AS example_reason FROM downloads "
        "WHERE status <> 'success' GROUP BY status ORDER BY n DESC",
    )
    lines = [
        f"pool {run.storage.pool_uri} -> data {run.storage.data_uri}",
        *_engine_lines(run),
        f"shards: {totals[0]}, rows: {totals[1]}, downloaded: {totals[2]}, not downloaded: {totals[1] - totals[2]}",
        *_already_done_line(run),
        "",
        "not downloaded, by reason:",
        by_status.as_text() if by_status.rows else "(none)",
    ]
    scores = analytics.query(
        db,
        "SELECT scorer, model_version, count(*) AS pairs, round(avg(score), 4) AS mean_score "
        "FROM scores GROUP BY ALL ORDER BY ALL",
    )
    if scores.rows:
        lines += ["", "scores (DuckDB view `scores`):", scores.as_text()]
    lines += _dedup_lines(run.storage)
    thresholds = _read_report(run.storage, layout.SCORE_THRESHOLD_REPORT_KEY)
    if thresholds:
        lines += ["", "compressed subsets (DuckDB view `subsets`; every cut comes after dedup):"]
        width = max(map(len, thresholds))
        thresholds = {key: thresholds[key] for key in layout.in_training_set_order(thresholds)}
        for key, threshold in thresholds.items():
            kept, total = threshold["kept"], threshold["total"]
            ratio = total / kept if kept else float("inf")
            lines.append(
                f"  {key:{width}s} keep {threshold['keep_fraction']}: kept {kept} of {total} pairs, dropped "
                f"{total - kept} ({ratio:.1f}x smaller), ranked by {threshold['model_version']}"
            )
        # one column per training set: its variant's membership rows at its k (the keys are written by the
        # platform, and quoted as identifiers; the values are parameters)
        cuts = [(t["variant"], t["keep_fraction"]) for t in thresholds.values()]
        kept_at = 'count(*) FILTER (variant = ? AND keep_fraction = ? AND kept) AS "{}"'
        columns = ", ".join(kept_at.format(key) for key in thresholds)
        per_shard = analytics.query(
            db,
            f"SELECT shard, count(*) FILTER (variant = ? AND keep_fraction = ?) AS pairs, {columns} "
            "FROM subsets GROUP BY shard ORDER BY shard",
            [*cuts[0], *(value for cut in cuts for value in cut)],
        )
        lines += [per_shard.as_text()]
    lines += _caption_lines(run.storage)
    accuracy = _read_report(run.storage, layout.PREFERENCE_ACCURACY_REPORT_KEY)
    if accuracy:
        lines += [
            "",
            f"held-out preference accuracy: within an image ({accuracy['pairs']} human-ordered pairs, ties "
            f"excluded); across images ({accuracy['cross_image_pairs']} pairs of one image's top caption and "
            "another's bottom one):",
        ]
        lines += [
            f"  {kind:14s} {accuracy[kind]:.3f}  across {accuracy['cross_image'][kind]:.3f}" for kind in schemas.SCORERS
        ]
    lines += ["", "checks (runs passed / runs):"]
    names = sorted({name for r in run.runs for name in r.checks})
    width = max(map(len, names), default=0)
    for name in names:
        passed = sum(1 for r in run.runs if r.checks.get(name))
        evaluated = sum(1 for r in run.runs if name in r.checks)
        lines.append(f"  {name:{width}s}  {passed}/{evaluated}")
    for r in run.runs:
        if not r.success:
            failed = [n for n, ok in r.checks.items() if not ok]
            lines.append(f"  FAILED {r.target}: {r.error or 'checks failed: ' + ', '.join(failed)}")
    lines += _quarantine_lines(run.quarantined)
    lines.append(f'\nDuckDB: {db}  (try: ca-platform sql --data {run.storage.data_uri} "SELECT ...")')
    curation = _read_report(run.storage, layout.CURATION_REPORT_KEY)
    if curation:
        rows = [CurationRow(variant=key, **curation[key]) for key in layout.in_training_set_order(curation)]
        lines += [
            "",
            f"curation report ({layout.CURATION_TABLE_KEY}; models trained on each training set, equal samples seen; "
            f"the compression curve: {layout.CURATION_CURVE_PLOT_KEY}):",
            per_k_tables(rows, curation_text, "keep fraction k = {k:g}:"),
        ]
        if curve_fractions(rows):
            lines += ["", f"the compression curve ({layout.CURATION_CURVE_PLOT_KEY}):", curve_text(rows)]
    return "\n".join(lines)


def _caption_lines(storage: PlatformStorage) -> list[str]:
    """Raw against synthetic captions (caption_analytics), when the pool was recaptioned."""
    figures = _read_report(storage, layout.CAPTION_ANALYTICS_KEY)
    if not figures:
        return []
    lines = ["", f"captions (DuckDB view `captions`; synthetic ones by captioner {figures['captioner_version']}):"]
    header = ("source", "captions", "words/caption", "vocabulary", "distinct 3-grams", "mean reward", "mean CLIP")
    rows = [
        [
            s["source"],
            s["captions"],
            f"{s['mean_words']:.1f}",
            s["vocabulary"],
            f"{s['distinct_trigram_ratio']:.3f}",
            "n/a" if s["reward_mean"] is None else f"{s['reward_mean']:.3f}",
            "n/a" if s["clip_mean"] is None else f"{s['clip_mean']:.3f}",
        ]
        for s in figures["sources"]
    ]
    lines.append(analytics.QueryResult(list(header), [tuple(row) for row in rows]).as_text())
    share = figures["raw_preferred_share"]
    if share is not None:
        lines.append(
            f"the reward model prefers the raw caption for {share:.1%} of {figures['images_compared']} images "
            "(reward_best_caption keeps the caption it prefers)"
        )
    return lines


def _dedup_lines(storage: PlatformStorage) -> list[str]:
    """How many images each dedup step removed before the cuts (views `duplicates`, `dedup_removals`)."""
    report = _read_report(storage, layout.DEDUP_REPORT_KEY)
    if not report:
        return []
    counts = report["counts"]
    removed = ", ".join(f"{counts[f'{kind}_duplicates']} {kind} duplicates" for kind in schemas.DUPLICATE_KINDS)
    return [
        "",
        "dedup (DuckDB views `duplicates`, `dedup_removals`; try: SELECT * FROM largest_duplicate_groups()):",
        f"  {counts['images']} downloaded images: removed {counts[schemas.EVAL_CONTAMINATION]} copies of evaluation "
        f"images, then {removed}; {counts['kept']} kept for the cuts",
    ]


def _quarantine_lines(held: dict[str, list[QuarantinedShard]]) -> list[str]:
    """The quarantined shards, each failed step with the shard's input rows and the reason."""
    if not held:
        return []
    lines = ["", f"quarantined shards ({len(held)}; left out of the cut and what follows it until they succeed):"]
    for entries in held.values():
        for e in entries:
            rows = "unknown" if e.rows is None else e.rows
            lines.append(f"  {e.shard} ({rows} input rows) failed at {e.step}: {e.reason.splitlines()[0][:300]}")
    return lines


def _engine_lines(run: LineageRun) -> list[str]:
    """Where the work ran: the engine, and how many per-shard and per-variant runs each host / Ray node took."""
    placements = Counter(r.placement for r in run.runs if r.placement and r.target != POOL_WIDE)
    by_node = ", ".join(f"{where}: {n}" for where, n in sorted(placements.items()))
    stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in run.stage_seconds.items())
    return [
        f"engine: {run.engine}",
        *([f"runs by node (per shard and per variant): {by_node}"] if by_node else []),
        *([f"stage wall times: {stages}"] if stages else []),
    ]


def _already_done_line(run: LineageRun) -> list[str]:
    done = [r.target for r in run.runs if r.already_done]
    if not done:
        return []
    return [f"already downloaded from the same pool files, not run again (--force re-runs them): {', '.join(done)}"]


def _read_report(storage: PlatformStorage, key: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as scratch:
        return read_json(storage.data_store(), key, Path(scratch))
