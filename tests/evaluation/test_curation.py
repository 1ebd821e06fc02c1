"""The whole lineage with an evaluation set, as a user runs it: `ca-platform run ... --keep 0.1,0.3,0.5 --eval ...
--eval-classes ...` on a pool where one shard's host is gone. Models on every training set (each variant at each k
of the compression curve), evaluated (zero-shot classification too), in one report for the healthy shards with a
table per k and the curve; the dead shard quarantined and named; a non-zero exit. One run serves the module's
tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from ca_platform import analytics, layout
from ca_platform.assets import ALL_ASSETS, VARIANT_CLASSIFICATION_ASSETS, VARIANT_MODEL_ASSETS
from ca_platform.assets.partitions import TRAINING_VARIANTS
from ca_platform.demo.annotators import ShapesPreferenceConfig, write_shapes_preferences
from ca_platform.resources import CaptioningConfig
from ca_platform.runner import build_resources, run_lineage
from ca_platform.schemas import FILTER_VARIANTS, FULL, KEEP_EVERY_IMAGE, RAW_TOPK_PLUS_RECAP, REWARD_BEST_CAPTION
from ca_platform.training.captioner import train_blip_captioner_on_tars
from ca_platform.training.clip import train_clip_on_tars
from ca_platform.training.tars import TrainingBudget
from tests.conftest import (
    BIN,
    RoutesServer,
    build_web_pool,
    cli_env,
    png_bytes,
    run_timed,
    write_evaluation_file,
    write_pool,
)

pytestmark = pytest.mark.slow
CONTRACT_KEYS = {"kept_fraction", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "cider"}
CURVE = (0.1, 0.3, 0.5)
# every ranking at every k, and once each the training sets that keep every pair or image
TRAINING_SETS = {FULL, *KEEP_EVERY_IMAGE} | {
    layout.training_set_key(variant, k)
    for variant in (*FILTER_VARIANTS, RAW_TOPK_PLUS_RECAP, REWARD_BEST_CAPTION)
    for k in CURVE
}


@dataclass(frozen=True)
class CliRun:
    data: Path
    done: subprocess.CompletedProcess[str]
    lines: list[tuple[float, str]]  # standard output, each line with the second it arrived
    pool: Path
    preferences: Path
    evaluation: Path
    dagster_home: Path  # the instance the command recorded its runs on
    classes: Path

    @property
    def resources(self) -> dict[str, object]:
        """What the command built from its arguments."""
        return self.resources_into(self.data)

    def resources_into(self, data: Path) -> dict[str, object]:
        """What the command builds from its arguments, with `data` as its data root."""
        return build_resources(
            str(self.pool),
            str(data),
            ["127.0.0.1"],
            preferences_uri=str(self.preferences),
            keep_fraction=CURVE,
            evaluation_uri=str(self.evaluation),
            classes_uri=str(self.classes),
            captioning=CaptioningConfig(enabled=True),
        )


def write_labelled_file(server: RoutesServer, path: Path) -> Path:
    """A labelled set of 9 served images in 3 named classes and one image that is gone."""
    urls = [
        server.add(f"/classes/{i}.png", png_bytes(28, 28, seed=900 + i), Content_Type="image/png") for i in range(9)
    ]
    names = ["a circle", "a square", "a star"]
    frame = pl.DataFrame(
        {"url": [*urls, server.url("/classes/gone.png")], "label": [i % 3 for i in range(10)]}
    ).with_columns(name=pl.col("label").map_elements(lambda label: names[label], return_dtype=pl.String))
    frame.write_parquet(path)
    return path


@pytest.fixture(scope="module")
def dead_shard_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliRun]:
    root = tmp_path_factory.mktemp("curation")
    server = RoutesServer()
    server.thread.start()
    try:
        pool = build_web_pool(root / "pool", server, rows_per_shard=12)
        dead = [server.url(f"/gone/{i}.png") for i in range(7)]  # a host whose images are all gone
        write_pool(pool, {"part-dead": {"url": dead, "caption": [f"lost {i}" for i in range(7)]}})
        evaluation, urls = write_evaluation_file(server, root / "eval.parquet", images=6, seed=500)
        second_references = pl.DataFrame({"url": urls[:2], "caption": ["a first", "a second"]})
        pl.concat([pl.read_parquet(evaluation), second_references]).write_parquet(evaluation)
        classes = write_labelled_file(server, root / "classes.parquet")
        preferences = write_shapes_preferences(root / "prefs", ShapesPreferenceConfig(images=40))
        data = root / "data"
        command = [str(BIN / "ca-platform"), "run", "--pool", str(pool), "--data", str(data)]
        command += ["--allow-host", "127.0.0.1", "--preferences", str(preferences), "--keep", "0.1,0.3,0.5"]
        command += ["--eval", str(evaluation), "--eval-classes", str(classes), "--recaption"]
        timed = run_timed(command, cli_env(root), root / "stderr.txt")
        yield CliRun(data, timed.done, timed.lines, pool, preferences, evaluation, root / "dagster_home", classes)
    finally:
        server.server.shutdown()
        server.server.server_close()


def test_the_run_reports_the_healthy_shards_names_the_dead_one_and_exits_non_zero(dead_shard_run: CliRun) -> None:
    done, data = dead_shard_run.done, dead_shard_run.data
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # after producing everything it could
    assert "part-dead (7 input rows) failed at downloads: " in done.stdout
    assert "success rate 0.000 is below the floor" in done.stdout
    assert "curation report" in done.stdout and "kept" in done.stdout
    quarantined = [json.loads(p.read_text()) for p in (data / layout.QUARANTINE_DIR).rglob("*.json")]
    assert [(q["shard"], q["step"]) for q in quarantined] == [("part-dead", "downloads")]
    db = data / layout.ANALYTICS_DB
    for view in ("scores", "subsets"):
        shards = analytics.query(db, f"SELECT DISTINCT shard FROM {view} ORDER BY shard").rows
        assert shards == [("part-00000",), ("part-00001",)], view
    thresholds = json.loads((data / layout.SCORE_THRESHOLD_REPORT_KEY).read_text())
    assert all(t["excluded"] == ["part-dead"] for t in thresholds.values())  # the cut names what it left out
    # every input row is accounted for: the healthy shards' ledgers, the quarantined shard's rows with its reason
    assert analytics.query(db, "SELECT count(*) FROM downloads").rows == [(24,)]
    rejected = next((data / layout.REJECTED_DIR / "downloads" / "part-dead").iterdir())
    assert json.loads((rejected / "audit.json").read_text())["shard"] == "part-dead"


def test_the_run_says_each_stage_and_shard_as_it_goes_and_is_never_silent_for_long(dead_shard_run: CliRun) -> None:
    lines = dead_shard_run.lines
    text = [line for _, line in lines]
    report_starts = next(i for i, line in enumerate(text) if line.startswith("pool "))
    first_stage = next(seconds for seconds, line in lines if line.startswith("spine: "))
    assert first_stage < 15, text[:5]
    gaps = [(b[0] - a[0], a[1]) for a, b in zip(lines[:report_starts], lines[1 : report_starts + 1])]
    assert max(gaps)[0] <= 30, max(gaps)
    for expected in (
        r"^spine part-dead: FAILED: ",
        r"^spine part-\d+: ok in [\d.]+ s \(.*downloaded_shard: \d+ rows in [\d.]+ s \([\d.]+/s\)",
        r"^reward model: training on preferences: \d+ samples in [\d.]+ s \([\d.]+/s\), loss [\d.]+$",
        r"^scores part-\d+: ok in .*reward_scores: \d+ pairs in",
        r"^captions: \d+ of \d+ ok in [\d.]+ s$",
        r"^clip_checkpoint full seed 0: training: started, \d+ samples$",
        rf"^models: {len(TRAINING_SETS)} of {len(TRAINING_SETS)} ok in",
    ):
        assert any(re.search(expected, line) for line in text[:report_starts]), expected


def test_the_report_lists_every_training_set_as_measured_with_an_equal_budget(dead_shard_run: CliRun) -> None:
    reports = dead_shard_run.data / layout.REPORTS_DIR
    curation = json.loads((reports / "curation_report.json").read_text())
    assert set(curation) == TRAINING_SETS
    thresholds = json.loads((dead_shard_run.data / layout.SCORE_THRESHOLD_REPORT_KEY).read_text())
    for key, threshold in thresholds.items():  # every ranking cut at every k: exactly round(k * N) of its pool
        if threshold["variant"] != RAW_TOPK_PLUS_RECAP:  # which adds the recaptions clearing the CLIP cut
            assert threshold["kept"] == int(threshold["keep_fraction"] * threshold["total"] + 0.5), key
        assert curation[key]["keep_fraction"] == layout.parse_training_set_key(key)[1]
    for variant, figures in curation.items():
        assert CONTRACT_KEYS <= set(figures), variant
        assert all(0.0 <= figures[k] <= 1.0 for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")), variant
        assert figures["cider"] >= 0.0
        retrieval = json.loads((reports / "retrieval" / f"{variant}.json").read_text())
        assert retrieval["i2t_r1"] == figures["i2t_r1"]  # the report shows what the evaluation measured
        # with its interval over the evaluation images (per-image results stored by both evaluations) and verdicts
        assert len(retrieval["items"]) == retrieval["num_images"] == figures["evaluation_items"] == 6
        low, high = figures["interval"]["i2t_r1"]
        assert low <= figures["i2t_r1"] <= high and figures["interval"].keys() >= CONTRACT_KEYS - {"kept_fraction"}
        # compared with full and with clipscore_topk at its own k (at every k for a set without one)
        cut_at = figures["keep_fraction"]
        clipscore = {f"clipscore_topk@{c}" for c in ([cut_at] if cut_at is not None else CURVE)}
        assert set(figures["versus"]) == ({"full"} | clipscore) - {variant}, variant
    assert curation["full"]["kept_fraction"] == 1.0
    assert curation["reward_topk@0.5"]["kept_fraction"] == pytest.approx(0.5)
    assert curation["reward_topk@0.1"]["kept_fraction"] < curation["reward_topk@0.3"]["kept_fraction"] < 0.5
    assert (reports / "curation_report.png").stat().st_size > 0
    assert (dead_shard_run.data / layout.CURATION_CURVE_PLOT_KEY).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a table per k: each point of the curve beside full and the sets that keep every image
    tables = (reports / "curation_report.md").read_text().split("### keep fraction k = ")[1:]
    assert [table.split("\n", 1)[0] for table in tables] == ["0.1", "0.3", "0.5"]
    for k, table in zip(CURVE, tables):
        shown = {line.split(" | ")[0].removeprefix("| ") for line in table.splitlines() if line.startswith("| ")}
        assert shown - {"variant", "---"} == {key for key in TRAINING_SETS if "@" not in key or key.endswith(f"@{k}")}
    assert "keep fraction k = 0.3:" in dead_shard_run.done.stdout  # the terminal's tables too, and the curve
    curve = dead_shard_run.done.stdout.split(f"the compression curve ({layout.CURATION_CURVE_PLOT_KEY}):\n")[1]
    assert curve.startswith("(I->T R@5 / T->I R@5 / CIDEr-D / zero-shot top-1 at each keep fraction)\nranking ")
    assert re.match(r".*\nranking +k = 0\.1 +k = 0\.3 +k = 0\.5\n", curve)
    assert re.search(r"^reward_topk( +[\d.]+ / [\d.]+ / [\d.]+ / [\d.]+){3}$", curve, re.MULTILINE)
    seen = {
        json.loads((dead_shard_run.data / layout.current_model_key(layout.trained_model_kind(m, v, 0))).read_text())[
            "metrics"
        ]["samples_seen"]
        for m in ("clip_checkpoint", "blip_checkpoint")
        for v in TRAINING_SETS
    }
    # equal budget: every training set's models saw the same number of samples at every k, 3 passes over the pool
    pool = thresholds["reward_topk@0.1"]["total"] + thresholds["reward_topk@0.1"]["removed"]
    assert seen == {3 * pool}


def test_the_report_gives_every_training_set_its_clips_zero_shot_accuracy(dead_shard_run: CliRun) -> None:
    reports = dead_shard_run.data / layout.REPORTS_DIR
    curation = json.loads((reports / "curation_report.json").read_text())
    for variant, figures in curation.items():
        assert 0.0 <= figures["top1"] <= figures["top5"] <= 1.0, variant
        classification = json.loads((reports / "classification" / f"{variant}.json").read_text())
        retrieval = json.loads((reports / "retrieval" / f"{variant}.json").read_text())
        assert classification["model_versions"] == retrieval["model_versions"]  # the same CLIPs
        assert (classification["num_images"], classification["num_classes"]) == (9, 3)
        assert classification["images_not_downloaded"] == 1
        assert figures["top1"] == classification["top1"] == sum(classification["per_item"]["0"]["top1"]) / 9
        assert figures["top5"] == 1.0  # three classes: every image is right at five
        # bootstrapped over the labelled images, and compared within the training set's k as the other figures
        assert figures["labelled_items"] == 9 and figures["evaluation_items"] == 6
        low, high = figures["interval"]["top1"]
        assert low <= figures["top1"] <= high
        assert all("top1" in compared for compared in figures["versus"].values()), variant
    assert "| top-1 | top-5 |" in (reports / "curation_report.md").read_text()
    assert "top-1" in dead_shard_run.done.stdout


def test_tiny_models_learn_from_the_subset_tars(dead_shard_run: CliRun) -> None:
    """A tiny CLIP and a tiny BLIP trained a few dozen steps on the real subset tars: their losses fall."""
    tars = sorted((dead_shard_run.data / layout.SUBSETS_DIR / "reward_topk@0.5").glob("*/*.tar"))
    budget = TrainingBudget(samples_seen=240)
    for train, rate in ((train_clip_on_tars, 2e-3), (train_blip_captioner_on_tars, 5e-3)):
        losses = np.asarray(train(tars, budget, image_size=32, batch_size=8, learning_rate=rate).metrics["loss"])
        assert losses[-5:].mean() < losses[:5].mean(), train.__name__


def test_a_second_run_reuses_everything_and_still_quarantines_the_dead_shard(dead_shard_run: CliRun) -> None:
    """With the command's own settings, the evaluation set is not downloaded again and no model is trained
    again: data and settings are the same."""
    data = dead_shard_run.data
    versions = {
        v: json.loads((data / layout.current_model_key(layout.trained_model_kind("clip_checkpoint", v, 0))).read_text())
        for v in TRAINING_SETS
    }
    evaluation_ledger = next((data / layout.EVALUATION_DIR).glob("*/rows.parquet")).stat().st_mtime_ns
    again = run_lineage(dead_shard_run.resources, compress=True)  # in this process: the same resources
    assert not again.success and list(again.quarantined) == ["part-dead"]
    assert next((data / layout.EVALUATION_DIR).glob("*/rows.parquet")).stat().st_mtime_ns == evaluation_ledger
    for variant, version in versions.items():
        kind = layout.trained_model_kind("clip_checkpoint", variant, 0)
        assert json.loads((data / layout.current_model_key(kind)).read_text()) == version


def test_the_same_inputs_give_the_same_curation_report(dead_shard_run: CliRun, tmp_path: Path) -> None:
    """The command's settings into a fresh data root, run again here (tests/platform/test_cli.py shows that the
    command and `build_resources` build the same resources): the downloads complete in another order, yet every
    model sees the same batches (samples are read in canonical order) and the report repeats to the last digit."""
    again_run = run_lineage(dead_shard_run.resources_into(tmp_path / "data"), compress=True)
    assert not again_run.success and list(again_run.quarantined) == ["part-dead"]  # the dead shard again
    again = json.loads((tmp_path / "data" / layout.CURATION_REPORT_KEY).read_text())
    assert again == json.loads((dead_shard_run.data / layout.CURATION_REPORT_KEY).read_text())


def test_the_ui_shows_the_curve_and_backfills_one_point_of_it_by_its_partition_key(
    dead_shard_run: CliRun, tmp_path: Path
) -> None:
    """On the instance the command ran on: every training set is a partition (score_threshold registered them),
    the report's materialization carries the tables and the curve, and one point, `reward_topk@0.3`, whose models
    are gone from a copy of the data root, is materialized alone by its key: trained again to the same checkpoints
    and evaluations, no other point touched."""
    data = tmp_path / "data"
    shutil.copytree(dead_shard_run.data, data)
    point = "reward_topk@0.3"
    models = (layout.CLIP_CHECKPOINT, layout.BLIP_CHECKPOINT)
    before = {
        model: json.loads((data / layout.current_model_key(layout.trained_model_kind(model, point, 0))).read_text())
        for model in models
    }
    for model in models:
        shutil.rmtree(data / layout.model_root(layout.trained_model_kind(model, point, 0)))
    retrieval = data / layout.variant_report_key(layout.RETRIEVAL_REPORT, point)
    evaluated = json.loads(retrieval.read_text())
    retrieval.unlink()
    untouched = {p: p.stat().st_mtime_ns for p in (data / layout.MODELS_DIR).rglob("current.json")}
    point_assets = [*VARIANT_MODEL_ASSETS, *VARIANT_CLASSIFICATION_ASSETS]  # with the run's labelled set

    with DagsterInstance.from_config(str(dead_shard_run.dagster_home)) as instance:
        assert set(instance.get_dynamic_partitions(TRAINING_VARIANTS)) == TRAINING_SETS
        shown = instance.get_latest_materialization_event(AssetKey("curation_report")).asset_materialization.metadata
        assert shown["curve"].value.startswith("![compression curve](data:image/png;base64,")
        assert "### keep fraction k = 0.5" in shown["table"].value
        result = materialize(
            ALL_ASSETS,
            selection=point_assets,
            partition_key=point,
            instance=instance,
            resources=dead_shard_run.resources_into(data),
            raise_on_error=False,
        )
    assert result.success
    done = {(e.asset_key.to_user_string(), e.partition) for e in result.get_asset_materialization_events()}
    assert done == {(asset.key.to_user_string(), point) for asset in point_assets}
    for model in models:
        again = json.loads((data / layout.current_model_key(layout.trained_model_kind(model, point, 0))).read_text())
        assert again["version"] == before[model]["version"]  # the same recipe trains the same checkpoint
    assert json.loads(retrieval.read_text()) == evaluated
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
