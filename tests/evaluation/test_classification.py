"""Zero-shot classification: accuracy from hand-made embeddings with a known answer, the labelled file's checks,
its staging through the real guarded download, and classification_eval through Dagster on tiny trained CLIPs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from ca_platform import layout
from ca_platform.assets import ALL_ASSETS, classification_eval, classification_set
from ca_platform.assets.partitions import register_training_sets
from ca_platform.demo.annotators import ShapesPreferenceConfig, preference_scene_keys
from ca_platform.demo.classification_set import CLASS_NAMES, sample_labelled_scenes, write_shapes_classification_set
from ca_platform.demo.image_server import ImageServer
from ca_platform.demo.shapes_pool import ShapesWorldConfig, pool_scene_keys, scene_key
from ca_platform.evaluation.classification import (
    TemplateError,
    class_embeddings,
    class_prompts,
    zero_shot_accuracy,
)
from ca_platform.evaluation.classification_set import (
    ClassificationSetError,
    current_classification_set,
    read_classification_file,
    stage_classification_set,
)
from ca_platform.evaluation.report import NotEvaluatedError, curation_rows, write_curation_report
from ca_platform.evaluation.report_text import curation_markdown
from ca_platform.ingest.download import DownloadSettings
from ca_platform.ingest.download_guard import GuardPolicy
from ca_platform.resources import ModelTrainingConfig, build_resources
from ca_platform.schemas import FULL
from ca_platform.scoring.registry import train_once
from ca_platform.storage import LocalStore, write_json
from ca_platform.training.clip import save_trained_clip, train_clip_on_tars
from ca_platform.training.tars import TrainingBudget
from tests.conftest import RoutesServer, png_bytes, write_download_tar

SETTINGS = DownloadSettings(thread_count=4, policy=GuardPolicy(allow_hosts=frozenset({"127.0.0.1"})))


def unit(*rows: list[float]) -> np.ndarray:
    array = np.asarray(rows, dtype=np.float64)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_top1_and_top5_of_hand_made_embeddings_with_a_known_answer() -> None:
    """Six classes on the axes of R^6; each image's similarity to every class is its own coordinates, so each
    image's rank among the classes is set by hand."""
    classes = np.eye(6)
    images = np.array(
        [
            [9, 1, 1, 1, 1, 1],  # class 0 first: right at 1 and 5
            [5, 4, 3, 2, 1, 0.5],  # true class 2 ranks third: wrong at 1, right at 5
            [6, 5, 4, 3, 2, 1],  # true class 5 ranks last of six: wrong at 1 and at 5
            [3, 3, 1, 1, 1, 1],  # true class 1 tied with class 0: a tie counts against it, wrong at 1
            [1, 1, 1, 1, 1, 1],  # a constant image: every class tied, wrong at 1 and at 5
        ],
        dtype=np.float64,
    )
    labels = np.array([0, 2, 5, 1, 3])
    accuracy = zero_shot_accuracy(images, classes, labels)
    assert accuracy.correct[1].tolist() == [True, False, False, False, False]
    assert accuracy.correct[5].tolist() == [True, True, False, True, False]
    assert accuracy.top1 == pytest.approx(1 / 5) and accuracy.top5 == pytest.approx(3 / 5)
    assert accuracy.predicted.tolist()[:3] == [0, 0, 0] and (accuracy.num_images, accuracy.num_classes) == (5, 6)


def test_with_fewer_classes_than_five_every_image_is_right_at_five() -> None:
    classes = unit([1, 0], [0, 1], [-1, -1])
    images = unit([1, 0.1], [1, 0.1], [0.2, 1])
    accuracy = zero_shot_accuracy(images, classes, np.array([0, 1, 2]))
    assert accuracy.correct[1].tolist() == [True, False, False]
    assert accuracy.top5 == 1.0 and accuracy.num_classes == 3


def test_a_class_is_the_normalised_mean_of_its_templates_normalised_embeddings() -> None:
    """Two templates per class: a long prompt embedding does not outweigh a short one, and the mean is unit."""
    prompts = np.array([[10.0, 0.0], [0.0, 1.0], [0.0, -3.0], [-0.5, 0.0]])  # class 0: +x, +y; class 1: -y, -x
    embedded = class_embeddings(prompts, classes=2)
    np.testing.assert_allclose(embedded, unit([1, 1], [-1, -1]))
    # the ensemble decides: an image on the diagonal is class 0 though it is closer to class 1's first prompt
    accuracy = zero_shot_accuracy(unit([0.3, 0.2]), embedded, np.array([0]))
    assert accuracy.top1 == 1.0
    with pytest.raises(ValueError, match="templates"):
        class_embeddings(prompts[:3], classes=2)


def test_prompts_put_each_class_name_in_every_template_class_by_class() -> None:
    assert class_prompts(["cat", "red circle"], ["a photo of a {}.", "{}"]) == [
        "a photo of a cat.",
        "cat",
        "a photo of a red circle.",
        "red circle",
    ]
    for bad in ([], ["a photo"], ["a {} and a {}"], ["a {} {0}"]):
        with pytest.raises(TemplateError):
            class_prompts(["cat"], bad)


A, B, C = "http://x/a.png", "http://x/b.png", "http://x/c.png"


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"url": [A, B]}, r"missing column\(s\) \['label'\]"),
        ({"label": ["cat", "dog"]}, r"missing column\(s\) \['url'\]"),
        ({"url": [A, B, C], "label": ["cat", " ", "dog"]}, r"empty label at rows \[2\]"),
        ({"url": [A, B], "label": [None, "dog"]}, r"empty label at rows \[1\]"),
        ({"url": [A, ""], "label": ["cat", "dog"]}, r"empty url at rows \[2\]"),
        ({"url": [A, B], "label": [3, 3]}, r"a single class \('3'\) in 2 rows"),
        (
            {"url": [A, B, A], "label": [1, 2, 2]},
            r"url 'http://x/a.png' has several labels \['1', '2'\] at rows \[1, 3\]",
        ),
        (
            {"url": [A, B, C], "label": [0, 1, 0], "name": ["cat", "dog", "kitten"]},
            r"label '0' has several names \['cat', 'kitten'\] at rows \[1, 3\]",
        ),
        (
            {"url": [A, B], "label": [0, 1], "name": ["cat", "cat"]},
            r"name 'cat' has several labels \['0', '1'\]",
        ),
        ({"url": [A, B], "label": [0, 1], "name": ["cat", None]}, r"empty name at rows \[2\]"),
    ],
)
def test_bad_labelled_files_are_named_with_their_rows(tmp_path: Path, columns: dict, message: str) -> None:
    path = tmp_path / "classes.parquet"
    pl.DataFrame(columns).write_parquet(path)
    with pytest.raises(ClassificationSetError, match=rf"classes\.parquet: {message}"):
        read_classification_file(path)


def test_a_file_that_is_not_parquet_is_named(tmp_path: Path) -> None:
    path = tmp_path / "classes.parquet"
    path.write_text("url,label\n")
    with pytest.raises(ClassificationSetError, match=r"classes\.parquet: not a readable parquet file"):
        read_classification_file(path)


def labelled_file(server: RoutesServer, path: Path, per_class: int = 2) -> Path:
    """Three classes (names from the optional column), `per_class` served images each, and one image of a fourth
    class that is gone (404); one image listed twice with the same label."""
    urls, labels, names = [], [], []
    for label, name in enumerate(("red circle", "blue square", "green star")):
        for i in range(per_class):
            body = png_bytes(24, 24, seed=10 * label + i)
            urls.append(server.add(f"/classes/{label}-{i}.png", body, Content_Type="image/png"))
            labels.append(label)
            names.append(name)
    urls += [server.url("/classes/gone.png"), urls[0]]
    labels += [3, 0]
    names += ["black cross", "red circle"]
    pl.DataFrame({"url": urls, "label": labels, "name": names}).write_parquet(path)
    return path


def test_the_labelled_set_is_staged_through_the_guarded_download_once(
    routes_server: RoutesServer, tmp_path: Path
) -> None:
    path = labelled_file(routes_server, tmp_path / "classes.parquet")
    store = LocalStore(tmp_path / "data")
    staged = stage_classification_set(store, path, SETTINGS, tmp_path / "scratch")
    assert staged.ledger.height == 7 and staged.downloaded == 6  # the repeated row is one image
    assert sorted(staged.ledger["status"].unique()) == ["failed_to_download", "success"]
    version, dataset = current_classification_set(store, tmp_path / "cache", tmp_path / "scratch2")
    assert version == staged.version and (tmp_path / "data" / layout.classification_prefix(version)).is_dir()
    assert dataset.class_names == ["red circle", "blue square", "green star", "black cross"]  # the gone one too
    assert dataset.class_labels == ["0", "1", "2", "3"] and dataset.not_downloaded == 1
    assert sorted(dataset.classes) == [0, 0, 1, 1, 2, 2] and len(dataset.images) == 6
    hits = sum(routes_server.hits.values())
    again = stage_classification_set(store, path, SETTINGS, tmp_path / "scratch3")
    assert again.version == version and sum(routes_server.hits.values()) == hits  # not downloaded again


def test_a_private_address_is_refused_by_the_guard_row_by_row(routes_server: RoutesServer, tmp_path: Path) -> None:
    path = labelled_file(routes_server, tmp_path / "classes.parquet", per_class=1)
    strict = DownloadSettings(thread_count=2)  # public addresses only: the loopback server is refused
    staged = stage_classification_set(LocalStore(tmp_path / "data"), path, strict, tmp_path / "scratch")
    assert staged.downloaded == 0 and staged.ledger.height == 4
    assert not routes_server.hits


def publish_tiny_clips(data: Path, tmp_path: Path, seeds: tuple[int, ...]) -> None:
    """Tiny CLIPs trained a few steps (one per seed) made current for the `full` variant, as clip_checkpoint
    would publish them."""
    tar = write_download_tar(tmp_path / "train.tar", [(f"{i:09d}", f"u{i}", f"picture {i}") for i in range(16)])
    store = LocalStore(data)
    for seed in seeds:

        def train_and_save(seed: int = seed) -> tuple[str, Path, dict]:
            trained = train_clip_on_tars([tar], TrainingBudget(samples_seen=32), image_size=32, batch_size=8, seed=seed)
            version, folder = save_trained_clip(trained, tmp_path / "clips")
            return version, folder, {"variant": FULL, "seed": seed}

        kind = layout.trained_model_kind(layout.CLIP_CHECKPOINT, FULL, seed)
        train_once(store, kind, f"test-{seed}", train_and_save, tmp_path / "scratch")


def test_classification_eval_through_dagster_on_tiny_trained_clips(routes_server: RoutesServer, tmp_path: Path) -> None:
    path = labelled_file(routes_server, tmp_path / "classes.parquet")
    data = tmp_path / "data"
    publish_tiny_clips(data, tmp_path, seeds=(0, 1))
    templates = ["a {}", "a picture of a {}"]
    resources = build_resources(
        "",
        str(data),
        ["127.0.0.1"],
        classes_uri=str(path),
        class_templates=templates,
        model_training=ModelTrainingConfig(seeds=2),
    )
    instance = DagsterInstance.ephemeral()
    register_training_sets(instance, [])  # `full`: a partition of the training sets, as score_threshold adds them
    staged = materialize(ALL_ASSETS, selection=[classification_set], resources=resources, instance=instance)
    assert staged.success
    result = materialize(
        ALL_ASSETS, selection=[classification_eval], partition_key=FULL, resources=resources, instance=instance
    )
    assert result.success
    metadata = result.asset_materializations_for_node("classification_eval")[0].metadata
    assert metadata["classes"].value == 4 and metadata["images"].value == 6 and metadata["seeds"].value == 2
    assert metadata["images_not_downloaded"].value == 1
    report = json.loads((data / layout.variant_report_key(layout.CLASSIFICATION_REPORT, FULL)).read_text())
    assert report["templates"] == templates and len(report["items"]) == 6 and set(report["per_item"]) == {"0", "1"}
    for seed, outcome in report["per_item"].items():
        assert len(outcome["top1"]) == len(outcome["top5"]) == 6 and set(outcome["top1"]) <= {0, 1}
        assert all(a <= b for a, b in zip(outcome["top1"], outcome["top5"]))  # right at 1 is right at 5
        assert report["per_seed"][seed] == {"top1": np.mean(outcome["top1"]), "top5": np.mean(outcome["top5"])}
    assert report["top1"] == pytest.approx(np.mean([report["per_seed"][s]["top1"] for s in "01"]))
    assert report["spread"]["top1"] == pytest.approx(np.std([report["per_seed"][s]["top1"] for s in "01"], ddof=1))
    assert set(report["per_class"]) == {"red circle", "blue square", "green star"}  # black cross: no image
    assert metadata["top1"].value == report["top1"]


def test_without_a_labelled_set_the_assets_refuse_and_say_how_to_give_one(tmp_path: Path) -> None:
    resources = build_resources("", str(tmp_path / "data"))
    instance = DagsterInstance.ephemeral()
    register_training_sets(instance, [])
    for asset, partition in ((classification_set, None), (classification_eval, FULL)):
        result = materialize(
            ALL_ASSETS,
            selection=[asset],
            partition_key=partition,
            resources=resources,
            instance=instance,
            raise_on_error=False,
        )
        assert not result.success
        (failure,) = [event for event in result.all_events if event.is_step_failure]
        assert "--eval-classes FILE or set CA_EVAL_CLASSES_URI" in str(failure.step_failure_data.error.message)


def write_variant_reports(data: Path, model_versions: dict[str, str], classified: dict[str, str] | None) -> None:
    """The full training set's retrieval and captioning reports as their assets write them (with per-item
    results), and (with `classified`, the CLIP versions it measured) its classification report on labelled set
    `v1`, each image's outcome included."""
    store, scratch = LocalStore(data), data.parent / "scratch"

    def evaluated(per_item: dict[str, list[float]], items: list[str]) -> dict[str, object]:
        return {
            **{metric: float(np.mean(values)) for metric, values in per_item.items()},
            "items": items,
            "per_item": {"0": per_item},
        }

    retrieval = evaluated({m: [1, 0] for m in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")}, ["e0", "e1"])
    retrieval_key = layout.variant_report_key(layout.RETRIEVAL_REPORT, FULL)
    write_json(store, retrieval_key, {**retrieval, "model_versions": model_versions}, scratch)
    captioning = evaluated({"cider": [0.1, 0.1], "bleu4": [0.2, 0.2]}, ["e0", "e1"])
    write_json(store, layout.variant_report_key(layout.CAPTIONING_REPORT, FULL), captioning, scratch)
    write_json(store, layout.CURRENT_CLASSIFICATION_KEY, {"version": "v1", "source": "x"}, scratch)
    if classified is not None:
        document = {
            **evaluated({"top1": [1, 0, 0, 0], "top5": [1, 1, 1, 0]}, ["c0", "c1", "c2", "c3"]),
            "spread": {"top1": 0.05, "top5": 0.0},
            "model_versions": classified,
            "classification_version": "v1",
        }
        write_json(store, layout.variant_report_key(layout.CLASSIFICATION_REPORT, FULL), document, scratch)


def test_the_report_adds_zero_shot_columns_of_the_same_clips_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_variant_reports(data, {"0": "clip-a"}, classified={"0": "clip-a"})
    store = LocalStore(data)
    assert "top-1" not in curation_markdown(curation_rows(store, tmp_path / "s"))  # without a labelled set: none
    report = write_curation_report(store, tmp_path / "s2", classification=True)
    row = report.rows[0]
    assert (row.top1, row.top5) == (0.25, 0.75)
    assert "| top-1 | top-5 |" in report.table and "| 0.250 [" in report.table and "| 0.750 [" in report.table
    # bootstrapped over the labelled images, not the evaluation set's
    assert row.labelled_items == 4 and row.evaluation_items == 2
    assert row.interval["top1"][0] <= 0.25 <= row.interval["top1"][1] and row.interval["top5"][1] <= 1.0
    assert "(top-1/top-5: the 4 labelled images)" in report.table
    assert json.loads((data / layout.CURATION_REPORT_KEY).read_text())[FULL]["top5"] == 0.75
    write_variant_reports(data, {"0": "clip-b"}, classified={"0": "clip-a"})  # retrained since it was classified
    with pytest.raises(NotEvaluatedError, match=r"full: classification_eval measured CLIP versions .*clip-a"):
        curation_rows(store, tmp_path / "s3", classification=True)


def test_the_demo_labelled_set_is_new_to_the_lineage_served_and_staged_whole(tmp_path: Path) -> None:
    """Scenes with one largest object, none in the pool or the preference set, served by the demo's image server
    and downloaded whole through the guard; the same seed gives the same file."""
    pool = ShapesWorldConfig(shards=2, rows_per_shard=60)
    avoid = pool_scene_keys(pool) | preference_scene_keys(ShapesPreferenceConfig(images=40, avoid_pool=pool))
    scenes = sample_labelled_scenes(60, avoid=avoid)
    assert not {scene_key(scene) for scene, _ in scenes} & avoid and len({scene_key(s) for s, _ in scenes}) == 60
    for scene, name in scenes:
        [large] = [obj for obj in scene.objects if obj.size == "large"]
        assert name == f"{large.colour} {large.shape}"

    world = tmp_path / "world"
    world.mkdir()
    with ImageServer(world) as server:
        path = write_shapes_classification_set(world, server.base_url, images=40, avoid=avoid)
        staged = stage_classification_set(LocalStore(tmp_path / "data"), path, SETTINGS, tmp_path / "scratch")
    assert staged.downloaded == 40 and staged.ledger.height == 40
    frame = read_classification_file(path)
    assert frame["name"].to_list() == [name for _, name in scenes[:40]]  # the file holds the sampled scenes
    assert all(CLASS_NAMES[int(label)] == name for label, name in zip(frame["label"], frame["name"]))
    again = write_shapes_classification_set(tmp_path / "again", "http://127.0.0.1:1", images=40, avoid=avoid)
    assert read_classification_file(again)["label"].to_list() == frame["label"].to_list()
