"""The shapes world must be a faithful, reproducible stand-in for a noisy web pool.

These tests write real files and talk to a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ca_platform.demo.image_server import ImageServer
from ca_platform.demo.shapes_pool import NoiseMix, ShapesWorldConfig, ShapesWorldPool, generate_pool, read_truth
from ca_platform.demo.shapes_world import (
    NOISE_KINDS,
    Scene,
    SceneObject,
    describe,
    make_noisy_caption,
    normalise_caption,
    perturb_scene,
    render_scene,
    sample_scene,
    scene_from_json,
    scene_to_json,
)

BASE_URL = "http://127.0.0.1:8123"
CONFIG = ShapesWorldConfig(seed=7, shards=2, rows_per_shard=200, image_size=48)

# Ignore any proxy settings of the environment: requests go to 127.0.0.1 only.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes, str]:
    with _OPENER.open(url, timeout=timeout) as response:
        return response.status, response.read(), response.headers.get("Content-Type", "")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> ShapesWorldPool:
    return generate_pool(tmp_path_factory.mktemp("shapes"), BASE_URL, CONFIG)


@pytest.fixture(scope="module")
def truth(pool: ShapesWorldPool) -> pl.DataFrame:
    return read_truth(pool.truth_dir)


@pytest.fixture(scope="module")
def pool_frame(pool: ShapesWorldPool) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(path) for path in pool.shard_paths])


def _local_path(pool: ShapesWorldPool, url: str) -> Path:
    return pool.root / url.removeprefix(BASE_URL + "/")


def test_same_config_gives_byte_identical_files(tmp_path: Path) -> None:
    config = ShapesWorldConfig(seed=3, shards=2, rows_per_shard=40, image_size=32)
    first = generate_pool(tmp_path / "a", BASE_URL, config)
    second = generate_pool(tmp_path / "b", BASE_URL, config)
    for a_dir, b_dir in [(first.pool_dir, second.pool_dir), (first.truth_dir, second.truth_dir)]:
        names = sorted(p.name for p in a_dir.iterdir())
        assert names == sorted(p.name for p in b_dir.iterdir())
        for name in names:
            assert (a_dir / name).read_bytes() == (b_dir / name).read_bytes(), name
    images = sorted(p.name for p in first.images_dir.iterdir())
    assert images == sorted(p.name for p in second.images_dir.iterdir())
    assert all((first.images_dir / n).read_bytes() == (second.images_dir / n).read_bytes() for n in images)

    other_seed = generate_pool(tmp_path / "c", BASE_URL, ShapesWorldConfig(seed=4, shards=2, rows_per_shard=40))
    assert other_seed.shard_paths[0].read_bytes() != first.shard_paths[0].read_bytes()


def test_rerun_into_same_directory_removes_stale_output(tmp_path: Path) -> None:
    generate_pool(tmp_path, BASE_URL, ShapesWorldConfig(shards=3, rows_per_shard=10, image_size=16))
    smaller = generate_pool(tmp_path, BASE_URL, ShapesWorldConfig(shards=1, rows_per_shard=10, image_size=16))
    assert sorted(smaller.pool_dir.iterdir()) == list(smaller.shard_paths)
    assert len(list(smaller.truth_dir.iterdir())) == 1
    assert all(p.name.startswith("00000-") for p in smaller.images_dir.iterdir())


def test_pool_schema_is_url_and_caption_only(pool: ShapesWorldPool) -> None:
    assert [p.name for p in pool.shard_paths] == ["shard-00000.parquet", "shard-00001.parquet"]
    for path in pool.shard_paths:
        frame = pl.read_parquet(path)
        assert frame.columns == ["url", "caption"]
        assert frame.schema == pl.Schema({"url": pl.String, "caption": pl.String})
        assert frame.height == CONFIG.rows_per_shard
        assert frame.null_count().row(0) == (0, 0)


def test_truth_is_row_aligned_with_pool(pool: ShapesWorldPool, truth: pl.DataFrame, pool_frame: pl.DataFrame) -> None:
    assert pool.rows == CONFIG.rows == truth.height == pool_frame.height
    assert truth.columns == ["url", "true_caption", "noise_kind", "link_kind", "scene_json", "copy_of", "copy_kind"]
    assert truth["copy_of"].null_count() == truth.height  # no planted copies unless asked
    assert truth["url"].to_list() == pool_frame["url"].to_list()
    assert pool_frame["url"].n_unique() == pool.rows
    assert all(url.startswith(f"{BASE_URL}/images/") and url.endswith(".png") for url in pool_frame["url"])
    for scene_json, true_caption in truth.select("scene_json", "true_caption").head(50).iter_rows():
        scene = scene_from_json(scene_json)
        assert 1 <= len(scene.objects) <= 3
        assert describe(scene) == true_caption
        assert scene_to_json(scene) == scene_json


def test_planted_copies_show_the_scene_of_the_row_they_copy_in_turn_exact_reencoded_resized(tmp_path: Path) -> None:
    config = ShapesWorldConfig(seed=7, shards=1, rows_per_shard=60, image_size=32, duplicate_fraction=0.1)
    world = generate_pool(tmp_path, BASE_URL, config)
    truth = read_truth(world.truth_dir)
    scenes = dict(zip(truth["url"], truth["scene_json"]))
    copies = truth.filter(pl.col("copy_of").is_not_null())
    assert copies.height == 6 and sorted(copies["copy_kind"].value_counts().rows()) == [
        ("exact", 2),
        ("reencoded", 2),
        ("resized", 2),
    ]
    for url, source, kind in copies.select("url", "copy_of", "copy_kind").iter_rows():
        assert scenes[url] == scenes[source] and source not in set(copies["url"])
        with Image.open(world.images_dir / url.rsplit("/", 1)[1]) as copy:
            with Image.open(world.images_dir / source.rsplit("/", 1)[1]) as original:
                expected = {"exact": (original.format, 32), "reencoded": ("JPEG", 32), "resized": (original.format, 48)}
                assert (copy.format, copy.width) == expected[kind]
                if kind == "exact":
                    assert np.array_equal(np.asarray(copy), np.asarray(original))


def test_noise_kinds_follow_configured_mix(truth: pl.DataFrame) -> None:
    counts = dict(truth["noise_kind"].value_counts().iter_rows())
    assert set(counts) == set(NOISE_KINDS)
    for kind, fraction in CONFIG.noise.fractions().items():
        assert abs(counts[kind] / truth.height - fraction) < 0.05, (kind, counts)


def test_captions_match_their_noise_kind(truth: pl.DataFrame, pool_frame: pl.DataFrame) -> None:
    rows = truth.with_columns(caption=pool_frame["caption"]).iter_rows(named=True)
    for row in rows:
        caption, true_caption = normalise_caption(row["caption"]), row["true_caption"]
        kind = row["noise_kind"]
        if kind == "clean":
            assert caption == true_caption
        elif kind in ("other_image", "wrong_attribute"):
            assert caption != true_caption
            assert caption.startswith(("a ", "an "))
        elif kind == "partial":
            assert caption != true_caption
            assert len(caption) < len(true_caption)
        else:
            assert caption != true_caption


def test_wrong_attribute_changes_exactly_one_word_slot() -> None:
    rng = np.random.default_rng(11)
    for _ in range(200):
        scene = sample_scene(rng)
        wrong = perturb_scene(scene, rng)
        assert describe(wrong) != describe(scene)
        changed = sum(a != b for a, b in zip(scene.objects, wrong.objects))
        changed += wrong.background_colour != scene.background_colour
        assert changed == 1
        caption = make_noisy_caption(scene, "wrong_attribute", rng)
        assert normalise_caption(caption) != describe(scene)


def test_describe_is_compositional() -> None:
    scene = Scene(
        objects=(
            SceneObject("circle", "red", "large", "left"),
            SceneObject("square", "blue", "small", "bottom"),
        ),
        background_colour="yellow",
        background_pattern="striped",
    )
    assert (
        describe(scene)
        == "a large red circle on the left and a small blue square at the bottom, on a striped yellow background"
    )
    orange = Scene((SceneObject("star", "orange", "small", "center"),), "gray", "plain")
    partial_texts = {make_noisy_caption(orange, "partial", np.random.default_rng(i)) for i in range(30)}
    assert any(normalise_caption(t).startswith("an orange star") for t in partial_texts)
    with pytest.raises(ValueError):
        make_noisy_caption(scene, "nonsense", np.random.default_rng(0))


def test_failure_links_are_missing_or_corrupt_files(pool: ShapesWorldPool, truth: pl.DataFrame) -> None:
    counts = dict(truth["link_kind"].value_counts().iter_rows())
    failures = counts.get("missing", 0) + counts.get("corrupt", 0)
    assert counts["missing"] > 0 and counts["corrupt"] > 0
    expected = CONFIG.missing_fraction + CONFIG.corrupt_fraction
    assert abs(failures / truth.height - expected) < 0.02
    for url, link_kind in truth.select("url", "link_kind").iter_rows():
        path = _local_path(pool, url)
        if link_kind == "missing":
            assert not path.exists()
        else:
            assert path.is_file()


def test_images_decode_at_configured_size(pool: ShapesWorldPool, truth: pl.DataFrame) -> None:
    ok = truth.filter(pl.col("link_kind") == "ok").head(40)
    for url, scene_json in ok.select("url", "scene_json").iter_rows():
        with Image.open(_local_path(pool, url)) as image:
            image.load()
            assert image.format == "PNG"
            assert image.size == (CONFIG.image_size, CONFIG.image_size)
            assert image.mode == "RGB"
        assert len(scene_from_json(scene_json).objects) >= 1
    corrupt = truth.filter(pl.col("link_kind") == "corrupt")["url"].to_list()
    for url in corrupt:
        with pytest.raises(Exception):
            Image.open(_local_path(pool, url)).load()


def test_jpg_format_and_rendering_is_pure(tmp_path: Path) -> None:
    config = ShapesWorldConfig(seed=1, shards=1, rows_per_shard=12, image_size=40, image_format="jpg")
    result = generate_pool(tmp_path, BASE_URL, config)
    names = [p.name for p in result.images_dir.iterdir()]
    assert names and all(n.endswith(".jpg") for n in names)
    scene = sample_scene(np.random.default_rng(5))
    assert render_scene(scene, 40).tobytes() == render_scene(scene, 40).tobytes()
    assert render_scene(scene, 40).size == (40, 40)


def test_noise_mix_is_configurable(tmp_path: Path) -> None:
    config = ShapesWorldConfig(
        shards=1,
        rows_per_shard=50,
        image_size=16,
        noise=NoiseMix(clean=1, other_image=0, wrong_attribute=0, partial=0, boilerplate=1),
        missing_fraction=0.0,
        corrupt_fraction=0.0,
    )
    truth = read_truth(generate_pool(tmp_path, BASE_URL, config).truth_dir)
    assert dict(truth["noise_kind"].value_counts().iter_rows()) == {"clean": 25, "boilerplate": 25}
    assert set(truth["link_kind"]) == {"ok"}
    with pytest.raises(ValueError):
        ShapesWorldConfig(missing_fraction=0.7, corrupt_fraction=0.5)


def test_server_serves_ok_missing_and_corrupt_links(pool: ShapesWorldPool, truth: pl.DataFrame) -> None:
    by_kind = {kind: group["url"][0] for (kind,), group in truth.group_by("link_kind")}
    with ImageServer(pool.root) as server:
        assert server.base_url.startswith("http://127.0.0.1:")

        def live(url: str) -> str:
            return url.replace(BASE_URL, server.base_url)

        status, body, content_type = _get(live(by_kind["ok"]))
        assert status == 200 and content_type == "image/png"
        assert body == _local_path(pool, by_kind["ok"]).read_bytes()
        assert Image.open(io.BytesIO(body)).size == (CONFIG.image_size, CONFIG.image_size)

        with pytest.raises(urllib.error.HTTPError) as missing:
            _get(live(by_kind["missing"]))
        assert missing.value.code == 404

        status, body, _ = _get(live(by_kind["corrupt"]))
        assert status == 200
        assert body == _local_path(pool, by_kind["corrupt"]).read_bytes()
        with pytest.raises(Exception):
            Image.open(io.BytesIO(body)).load()


def test_server_handles_concurrent_requests_quietly(
    pool: ShapesWorldPool, truth: pl.DataFrame, capfd: pytest.CaptureFixture[str]
) -> None:
    urls = truth["url"].head(128).to_list()
    with ImageServer(pool.root) as server:

        def fetch(url: str) -> int:
            try:
                return _get(url.replace(BASE_URL, server.base_url))[0]
            except urllib.error.HTTPError as error:
                return error.code

        with ThreadPoolExecutor(max_workers=64) as executor:
            statuses = list(executor.map(fetch, urls))
    expected = [404 if kind == "missing" else 200 for kind in truth["link_kind"].head(128)]
    assert statuses == expected
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_server_start_stop_and_delay(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hi")
    server = ImageServer(tmp_path, delay_s=0.3)
    with pytest.raises(RuntimeError):
        server.base_url
    server.start()
    url = f"{server.base_url}/hello.txt"
    started = time.monotonic()
    assert _get(url)[1] == b"hi"
    assert time.monotonic() - started >= 0.3
    server.stop()
    server.stop()
    assert not server.running
    with pytest.raises(urllib.error.URLError):
        _get(url, timeout=2)


def test_scene_json_round_trip_keeps_equality() -> None:
    scene = sample_scene(np.random.default_rng(2))
    assert scene_from_json(scene_to_json(scene)) == scene
    assert json.loads(scene_to_json(scene))["background_pattern"] in ("plain", "striped", "dotted")
    with pytest.raises(ValueError):
        SceneObject("blob", "red", "large", "left")
