"""Preference files must load only when every row is usable, and say exactly what to fix otherwise.

Real files throughout; image URLs are served by a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ca_platform.demo.annotators import (
    ShapesPreferenceConfig,
    _claim_text,
    _competition_ranking,
    _full_claim,
    sample_shapes_preferences,
    write_shapes_preferences,
)
from ca_platform.demo.image_server import ImageServer
from ca_platform.demo.shapes_pool import ShapesWorldConfig, generate_pool, pool_scene_keys, read_truth, scene_key
from ca_platform.demo.shapes_world import describe, sample_scene, scene_from_json
from ca_platform.ingest.download_guard import GuardPolicy
from ca_platform.preferences.files import (
    MAX_LISTED_PROBLEMS,
    PreferenceFormatError,
    read_preferences,
    resolve_images,
    write_preferences,
)
from ca_platform.preferences.pairs import PreferenceItem
from tests.conftest import DripServer, elapsed_in, png_bytes

GOOD = {"image": "a.png", "captions": ["a red circle", "a blue square", "IMG_1.jpg"], "ranking": [1, 3, 2]}
LOCAL_ONLY = GuardPolicy(allow_hosts=frozenset({"127.0.0.1"}))


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def problems_of(path: Path) -> PreferenceFormatError:
    with pytest.raises(PreferenceFormatError) as caught:
        read_preferences(path)
    return caught.value


# --- reading -------------------------------------------------------------------------------------------


def test_reads_jsonl_rows_with_line_numbers_ignoring_blank_lines_and_extra_fields(tmp_path: Path) -> None:
    second = {"image": "http://example.com/b.jpg", "captions": ["x", "y"], "ranking": [2, 1], "annotator": "ann-3"}
    path = write_lines(tmp_path / "prefs.jsonl", [GOOD, "", "   ", second])

    items = read_preferences(path)

    assert items == [
        PreferenceItem("a.png", tuple(GOOD["captions"]), (1, 3, 2), row=1),
        PreferenceItem("http://example.com/b.jpg", ("x", "y"), (2, 1), row=4),
    ]


def test_reads_parquet(tmp_path: Path) -> None:
    table = pa.table(
        {
            "image": pa.array(["a.png", "b.png"], pa.string()),
            "captions": pa.array([["p", "q", "r"], ["s", "t"]], pa.list_(pa.string())),
            "ranking": pa.array([[1, 2, 2], [2, 1]], pa.list_(pa.int64())),
            "note": pa.array(["extra", None], pa.string()),
        }
    )
    pq.write_table(table, tmp_path / "prefs.parquet")

    items = read_preferences(tmp_path / "prefs.parquet")

    assert items == [
        PreferenceItem("a.png", ("p", "q", "r"), (1, 2, 2), row=1),
        PreferenceItem("b.png", ("s", "t"), (2, 1), row=2),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_write_preferences_round_trips(tmp_path: Path, suffix: str) -> None:
    items = [
        PreferenceItem("images/a.png", ("un chat", "a dog"), (1, 2), row=1),
        PreferenceItem("images/b.png", ("x", "y", "z"), (2, 2, 1), row=2),
    ]
    path = write_preferences(items, tmp_path / f"out{suffix}", [{"sources": ["clean", "partial"]}, {}])
    assert read_preferences(path) == items


BAD_ROWS = [
    ('{"image": "a.png", "captions": ["x", "y"], "ranking": [1, 2]', "invalid JSON"),
    ('["a.png", ["x", "y"], [1, 2]]', "expected a JSON object"),
    ({"captions": ["x", "y"], "ranking": [1, 2]}, "field 'image': missing"),
    ({"image": "a.png", "ranking": [1, 2]}, "field 'captions': missing"),
    ({"image": "a.png", "captions": ["x", "y"]}, "field 'ranking': missing"),
    ({"image": 5, "captions": ["x", "y"], "ranking": [1, 2]}, "field 'image': expected a string"),
    ({"image": " ", "captions": ["x", "y"], "ranking": [1, 2]}, "field 'image': empty"),
    ({"image": "a.png", "captions": "x", "ranking": [1, 2]}, "field 'captions': expected a list"),
    ({"image": "a.png", "captions": ["x", 3], "ranking": [1, 2]}, "field 'captions': caption 2 is int"),
    ({"image": "a.png", "captions": ["x"], "ranking": [1]}, "field 'captions': needs at least 2"),
    ({"image": "a.png", "captions": ["x", "  "], "ranking": [1, 2]}, "field 'captions': caption 2 is empty"),
    ({"image": "a.png", "captions": ["x", "y"], "ranking": "1,2"}, "field 'ranking': expected a list"),
    ({"image": "a.png", "captions": ["x", "y"], "ranking": [1, True]}, "field 'ranking': rank 2 is True"),
    ({"image": "a.png", "captions": ["x", "y"], "ranking": [1, 2.0]}, "field 'ranking': rank 2 is 2.0"),
    ({"image": "a.png", "captions": ["x", "y"], "ranking": [0, 1]}, "field 'ranking': rank 1 is 0"),
    ({"image": "a.png", "captions": ["x", "y", "z"], "ranking": [1, 2]}, "field 'ranking': length 2 differs from 3"),
    ({"image": "a.png", "captions": ["x", "y", "z"], "ranking": [2, 2, 2]}, "field 'ranking': all 3 ranks are equal"),
]


@pytest.mark.parametrize(("row", "expected"), BAD_ROWS, ids=[expected for _, expected in BAD_ROWS])
def test_each_bad_row_is_named_by_file_row_and_field(tmp_path: Path, row: object, expected: str) -> None:
    error = problems_of(write_lines(tmp_path / "prefs.jsonl", [GOOD, row, GOOD]))

    assert str(error).startswith("prefs.jsonl: row 2: ")
    assert expected in str(error)
    assert len(error.problems) == 1


def test_every_bad_row_is_listed_at_once(tmp_path: Path) -> None:
    lines = [GOOD, *(row for row, _ in BAD_ROWS)]
    error = problems_of(write_lines(tmp_path / "prefs.jsonl", lines))

    assert len(error.problems) == len(BAD_ROWS)
    for number, (_, expected) in enumerate(BAD_ROWS, start=2):
        assert any(p.startswith(f"prefs.jsonl: row {number}: ") and expected in p for p in error.problems)
    assert "17 problems" in str(error).splitlines()[0]


def test_a_row_with_several_problems_reports_each_and_long_lists_are_cut(tmp_path: Path) -> None:
    bad = {"image": "", "captions": ["x", ""], "ranking": [0, 1]}
    error = problems_of(write_lines(tmp_path / "prefs.jsonl", [bad] * 10))

    assert len(error.problems) == 30
    assert {p.split(": ", 3)[2] for p in error.problems} == {"field 'image'", "field 'captions'", "field 'ranking'"}
    message = str(error)
    assert message.count("prefs.jsonl: row") == MAX_LISTED_PROBLEMS
    assert message.endswith("... and 10 more")


def test_parquet_rows_are_checked_like_jsonl_rows(tmp_path: Path) -> None:
    table = pa.table(
        {
            "image": pa.array(["a.png", None], pa.string()),
            "captions": pa.array([["p", "q"], ["s", "t"]], pa.list_(pa.string())),
            "ranking": pa.array([[1.0, 2.0], [2.0, 1.0]], pa.list_(pa.float64())),
        }
    )
    pq.write_table(table, tmp_path / "prefs.parquet")

    error = problems_of(tmp_path / "prefs.parquet")

    assert "prefs.parquet: row 2: field 'image': expected a string, got null" in error.problems
    assert "prefs.parquet: row 1: field 'ranking': rank 1 is 1.0 (float), not an integer" in error.problems


def test_parquet_without_a_column_is_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image": ["a.png"], "captions": [["x", "y"]]}), tmp_path / "prefs.parquet")
    assert "field 'ranking': column missing" in str(problems_of(tmp_path / "prefs.parquet"))


@pytest.mark.parametrize(
    ("name", "content", "expected"), [("prefs.jsonl", "\n\n", "no rows"), ("prefs.csv", "a", "unsupported")]
)
def test_empty_or_unknown_files_are_refused(tmp_path: Path, name: str, content: str, expected: str) -> None:
    (tmp_path / name).write_text(content)
    error = problems_of(tmp_path / name)
    assert str(error).startswith(f"{name}: ") and expected in str(error)


# --- images --------------------------------------------------------------------------------------------


def item(image: str, row: int = 1) -> PreferenceItem:
    return PreferenceItem(image, ("x", "y"), (1, 2), row)


def test_local_paths_resolve_against_the_preference_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes(8, 8))
    absolute = tmp_path / "b.png"
    absolute.write_bytes(png_bytes(8, 8, seed=1))

    resolved = resolve_images(
        [item("images/a.png"), item(str(absolute), 2)], tmp_path, tmp_path / "fetched", GuardPolicy()
    )

    assert [entry.image for entry in resolved] == [str((tmp_path / "images" / "a.png").resolve()), str(absolute)]
    assert [entry.row for entry in resolved] == [1, 2]


def test_missing_local_files_are_named_with_their_rows(tmp_path: Path) -> None:
    (tmp_path / "here.png").write_bytes(png_bytes(8, 8))
    items = [item("here.png", 1), item("gone.png", 2), item("sub/gone.png", 3)]

    with pytest.raises(PreferenceFormatError) as caught:
        resolve_images(items, tmp_path, tmp_path / "fetched", GuardPolicy(), source="prefs.jsonl")

    assert caught.value.problems == (
        f"prefs.jsonl: row 2: field 'image': image file not found: {tmp_path.resolve() / 'gone.png'}",
        f"prefs.jsonl: row 3: field 'image': image file not found: {tmp_path.resolve() / 'sub' / 'gone.png'}",
    )


@pytest.fixture
def served(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "cat.png").write_bytes(png_bytes(16, 12, seed=3))
    (root / "page.png").write_bytes(b"<!DOCTYPE html><html><body>Sorry, image gone</body></html>")
    with ImageServer(root) as server:
        yield server


def test_http_images_are_fetched_once_through_the_guard(tmp_path: Path, served: ImageServer) -> None:
    url = f"{served.base_url}/cat.png"
    dest = tmp_path / "fetched"

    resolved = resolve_images([item(url, 1), item(url, 2)], tmp_path, dest, LOCAL_ONLY)

    expected = dest / f"{hashlib.sha1(url.encode()).hexdigest()}.png"
    assert [entry.image for entry in resolved] == [str(expected.resolve())] * 2
    assert expected.read_bytes() == png_bytes(16, 12, seed=3)
    assert [p.name for p in dest.iterdir()] == [expected.name]

    served.stop()  # a file already fetched is not fetched again
    assert resolve_images([item(url, 5)], tmp_path, dest, LOCAL_ONLY)[0].image == str(expected.resolve())


def test_loopback_urls_are_refused_by_the_default_policy(tmp_path: Path, served: ImageServer) -> None:
    url = f"{served.base_url}/cat.png"
    with pytest.raises(PreferenceFormatError) as caught:
        resolve_images([item(url, 4)], tmp_path, tmp_path / "fetched", GuardPolicy(), source="prefs.jsonl")

    (problem,) = caught.value.problems
    assert problem.startswith(f"prefs.jsonl: row 4: field 'image': cannot fetch '{url}': refused:")
    assert "loopback" in problem
    assert not list((tmp_path / "fetched").iterdir())


def test_non_images_and_dead_links_are_rejected(tmp_path: Path, served: ImageServer) -> None:
    page, dead = f"{served.base_url}/page.png", f"{served.base_url}/nothing.png"
    with pytest.raises(PreferenceFormatError) as caught:
        resolve_images([item(page, 1), item(dead, 2)], tmp_path, tmp_path / "fetched", LOCAL_ONLY)

    page_problem, dead_problem = caught.value.problems
    assert f"row 1: field 'image': cannot fetch '{page}'" in page_problem and "not an image" in page_problem
    assert f"row 2: field 'image': cannot fetch '{dead}'" in dead_problem and "HTTP 404" in dead_problem
    assert not list((tmp_path / "fetched").iterdir())


def test_a_dripping_image_url_is_reported_by_row_as_a_timeout(tmp_path: Path) -> None:
    server = DripServer(png_bytes(16, 12, seed=3))
    server.thread.start()
    slow = server.url("/body")
    policy = GuardPolicy(allow_hosts=frozenset({"127.0.0.1"}), deadline_s=3.0)
    try:
        started = time.monotonic()
        with pytest.raises(PreferenceFormatError) as caught:
            resolve_images([item(slow, 7)], tmp_path, tmp_path / "fetched", policy, source="prefs.jsonl", timeout_s=10)
        took = time.monotonic() - started
    finally:
        server.server.shutdown()
        server.server.server_close()

    assert took < policy.deadline_s + 5, f"resolving took {took:.1f} s"
    (problem,) = caught.value.problems
    assert problem.startswith(f"prefs.jsonl: row 7: field 'image': cannot fetch '{slow}': deadline exceeded:")
    assert policy.deadline_s <= elapsed_in(problem, policy.deadline_s) < policy.deadline_s + 5
    assert not list((tmp_path / "fetched").iterdir())


@pytest.mark.parametrize("scheme_url", ["file:///etc/passwd", "ftp://example.com/a.png", "data:image/png;base64,AAAA"])
def test_other_schemes_are_refused(tmp_path: Path, scheme_url: str) -> None:
    with pytest.raises(PreferenceFormatError) as caught:
        resolve_images([item(scheme_url, 3)], tmp_path, tmp_path / "fetched", LOCAL_ONLY)
    assert "row 3: field 'image': scheme" in str(caught.value) and "refused" in str(caught.value)


# --- the shapes-world generator ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_preferences(tmp_path_factory.mktemp("prefs"), ShapesPreferenceConfig())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generation_is_deterministic(generated: Path, tmp_path: Path) -> None:
    again = write_shapes_preferences(tmp_path, ShapesPreferenceConfig())
    assert folder_bytes(again.parent) == folder_bytes(generated.parent)
    other = sample_shapes_preferences(ShapesPreferenceConfig(seed=1001, images=20))
    assert [row.captions for row in other] != [row.captions for row in sample_shapes_preferences()[:20]]


def test_generated_file_loads_with_relative_images(generated: Path) -> None:
    items = read_preferences(generated)
    assert len(items) == 300
    assert items[0].image == "images/pref-000000.png"
    resolved = resolve_images(items, generated.parent, generated.parent / "fetched", GuardPolicy())
    assert all(Path(entry.image).is_file() for entry in resolved)
    assert all(len(entry.captions) == 4 and len(set(entry.captions)) == 4 for entry in items)


def test_images_never_repeat_a_default_pool_image(generated: Path, tmp_path: Path) -> None:
    pool = generate_pool(tmp_path / "pool", "http://127.0.0.1:1", ShapesWorldConfig())
    pool_images = {hashlib.sha1(p.read_bytes()).digest() for p in pool.images_dir.glob("*.png")}
    pref_images = [hashlib.sha1(p.read_bytes()).digest() for p in (generated.parent / "images").glob("*.png")]

    assert len(pref_images) == len(set(pref_images)) == 300
    assert not pool_images & set(pref_images)
    # The exclusion covers every pool scene, including rows whose link is dead and have no image file.
    truth_keys = {scene_key(scene_from_json(text)) for text in read_truth(pool.truth_dir)["scene_json"]}
    assert pool_scene_keys(ShapesWorldConfig()) == truth_keys
    assert not truth_keys & {scene_key(row.scene) for row in sample_shapes_preferences()}


def test_rankings_follow_the_annotation_criteria(generated: Path) -> None:
    rows = [json.loads(line) for line in generated.read_text().splitlines()]
    clean_ranks = [row["ranking"][row["sources"].index("clean")] for row in rows]
    with_wrong = [row for row in rows if "wrong_attribute" in row["sources"]]
    wrong_below = [
        row["ranking"][row["sources"].index("wrong_attribute")] > row["ranking"][row["sources"].index("clean")]
        for row in with_wrong
    ]
    tied = [len(set(row["ranking"])) < len(row["ranking"]) for row in rows]

    assert sum(rank == 1 for rank in clean_ranks) > 0.8 * len(rows)
    assert len(with_wrong) > 50 and sum(wrong_below) > 0.8 * len(with_wrong)
    assert 0 < sum(tied) < len(rows)
    positions = {row["sources"].index("clean") for row in rows}
    assert positions == {0, 1, 2, 3}  # captions are shuffled: position says nothing


def test_more_errors_rank_lower_on_average() -> None:
    rows = sample_shapes_preferences(ShapesPreferenceConfig(images=150, captions_per_image=6))
    mean_rank = {
        source: np.mean([row.ranking[row.sources.index(source)] for row in rows if source in row.sources])
        for source in ("clean", "wrong_attribute", "two_wrong_attributes", "other_image")
    }
    assert mean_rank["clean"] < mean_rank["wrong_attribute"] < mean_rank["two_wrong_attributes"]
    assert mean_rank["two_wrong_attributes"] < mean_rank["other_image"]


def test_caption_grammar_matches_the_shapes_world() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        scene = sample_scene(rng)
        assert _claim_text(_full_claim(scene)) == describe(scene)


def test_competition_ranking_ties_within_the_margin() -> None:
    assert _competition_ranking(np.array([0.5, 1.0, 0.48, 0.1]), 0.05) == (2, 1, 2, 4)
    assert _competition_ranking(np.array([0.5, 0.52, 0.49]), 0.05) == (2, 1, 3)  # an all-tied row orders nothing
