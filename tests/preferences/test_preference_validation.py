"""A preference file is checked first and whole, and cannot pull arbitrary local files into the data root.

Real files and PNGs throughout; image URLs and the pool are served by real HTTP servers on 127.0.0.1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from ca_platform import layout
from ca_platform.assets.partitions import POOL_SHARDS
from ca_platform.assets.reward import preference_data
from ca_platform.ingest.download_guard import GuardPolicy
from ca_platform.preferences.files import PreferenceFormatError, read_preferences, validate_preference_file
from ca_platform.preferences.staging import publish_preference_set, stage_preferences
from ca_platform.resources import build_resources
from ca_platform.storage import open_store
from tests.conftest import RoutesServer, bomb_png, png_bytes

LOOPBACK = GuardPolicy(allow_hosts=frozenset({"127.0.0.1"}))
SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


def row(
    image: str, captions: tuple[str, ...] = ("a red circle", "a blue square"), ranking: tuple[int, ...] = (1, 2)
) -> dict[str, object]:
    return {"image": image, "captions": list(captions), "ranking": list(ranking)}


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def outside(tmp_path: Path) -> tuple[Path, Path]:
    """A preference folder `prefs/` holding one good image, and a secret file beside it, outside the folder."""
    prefs = tmp_path / "prefs"
    (prefs / "images").mkdir(parents=True)
    (prefs / "images" / "good.png").write_bytes(png_bytes(16, 16))
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    return prefs, secret


def test_absolute_dotdot_and_symlinked_paths_outside_the_folder_are_refused_by_row_and_never_copied(
    tmp_path: Path, outside: tuple[Path, Path]
) -> None:
    prefs, secret = outside
    (prefs / "images" / "link.png").symlink_to(secret)
    source = write_jsonl(
        prefs / "prefs.jsonl",
        [
            row("images/good.png"),
            row(str(secret)),
            row("../secret.txt"),
            row("images/../../secret.txt"),
            row("images/link.png"),
        ],
    )
    data = tmp_path / "data"

    with pytest.raises(PreferenceFormatError) as caught:
        publish_preference_set(open_store(str(data)), source, LOOPBACK, tmp_path / "scratch")

    root = prefs.resolve()
    assert [problem.split(": field 'image': ")[0] for problem in caught.value.problems] == [
        f"prefs.jsonl: row {n}" for n in (2, 3, 4, 5)
    ]
    for problem, given in zip(caught.value.problems, [str(secret), "../secret.txt", "images/../../secret.txt"]):
        assert f"refused: {given!r} lies outside {root} (the preference file's folder" in problem
    assert f"'images/link.png' lies outside {root}" in caught.value.problems[3]  # the symlink's target counts
    assert not any(SECRET in body for body in files_under(tmp_path / "scratch").values())
    assert not data.exists() or not any(SECRET in body for body in files_under(data).values())
    assert not (data / layout.CURRENT_PREFERENCES_KEY).exists()


def test_a_file_with_format_and_image_errors_reports_all_of_them_at_once_in_row_order(
    tmp_path: Path, routes_server: RoutesServer
) -> None:
    prefs = tmp_path / "prefs"
    images = prefs / "images"
    images.mkdir(parents=True)
    (images / "good.png").write_bytes(png_bytes(16, 16))
    (images / "notes.png").write_bytes(b"these are my notes, not a picture\n")
    (images / "huge.png").write_bytes(bomb_png(400))  # 160,000 pixels in a few hundred bytes
    (images / "truncated.png").write_bytes(png_bytes(40, 40)[:-200])
    heavy = png_bytes(60, 60, seed=2)
    (images / "heavy.png").write_bytes(heavy)
    policy = GuardPolicy(allow_hosts=frozenset({"127.0.0.1"}), max_pixels=100 * 100, max_bytes=len(heavy) - 1)
    assert (images / "good.png").stat().st_size < policy.max_bytes
    gone_url = routes_server.url("/gone.png")
    page_url = routes_server.add("/page.png", b"<html>moved</html>", Content_Type="image/png")
    good_url = routes_server.add("/cat.png", png_bytes(12, 12, seed=4), Content_Type="image/png")
    source = write_jsonl(
        prefs / "prefs.jsonl",
        [
            row("images/good.png"),
            row("images/missing.png"),
            row("images/notes.png"),
            row("images/huge.png"),
            row("images/missing.png", ranking=(1, 2, 3)),  # a format problem: the image is not looked at
            '{"image": "images/good.png", "captions": ["x", "y"]',
            row("images/truncated.png"),
            row("images/heavy.png"),
            row(gone_url),
            row(page_url),
            row(good_url),
            row("/etc/passwd", captions=("only one",), ranking=(1,)),
        ],
    )

    started = time.monotonic()
    with pytest.raises(PreferenceFormatError) as caught:
        validate_preference_file(source, policy, tmp_path / "fetched")
    took = time.monotonic() - started

    problems = caught.value.problems
    where = {n: f"prefs.jsonl: row {n}: " for n in range(1, 13)}
    folder = images.resolve()
    expected_starts = [
        where[2] + f"field 'image': image file not found: {folder / 'missing.png'}",
        where[3] + f"field 'image': {folder / 'notes.png'}: 34 bytes that are not an image Pillow can identify",
        where[4] + f"field 'image': {folder / 'huge.png'}: too large: image of 400x400 pixels exceeds cap 10000",
        where[5] + "field 'ranking': length 3 differs from 2 captions",
        where[6] + "invalid JSON",
        where[7] + f"field 'image': {folder / 'truncated.png'}: not a decodable image",
        where[8] + f"field 'image': {folder / 'heavy.png'}: too large: file of {len(heavy)} bytes exceeds cap",
        where[9] + f"field 'image': cannot fetch '{gone_url}': HTTP 404",
        where[10] + f"field 'image': cannot fetch '{page_url}': 18 bytes that are not an image Pillow can identify",
        where[12] + "field 'captions': needs at least 2 captions to rank, got 1",
    ]
    assert len(problems) == len(expected_starts), "\n".join(problems)
    for problem, start in zip(problems, expected_starts):
        assert problem.startswith(start), problem
    message = str(caught.value)
    assert message.splitlines()[0] == f"prefs.jsonl: {len(expected_starts)} problems"
    assert all(problem in message for problem in problems)
    assert took < 10, f"validation took {took:.1f} s"
    assert routes_server.hits == {"/gone.png": 1, "/page.png": 1, "/cat.png": 1}


def test_a_valid_file_is_returned_with_checked_local_paths(tmp_path: Path, routes_server: RoutesServer) -> None:
    prefs = tmp_path / "prefs"
    (prefs / "images").mkdir(parents=True)
    (prefs / "images" / "a.png").write_bytes(png_bytes(16, 16))
    url = routes_server.add("/b.png", png_bytes(10, 14, seed=1), Content_Type="image/png")
    source = write_jsonl(prefs / "prefs.jsonl", [row("images/a.png"), row(str(prefs / "images" / "a.png")), row(url)])

    items = validate_preference_file(source, LOOPBACK, tmp_path / "fetched")

    assert [item.row for item in items] == [1, 2, 3]
    assert [item.captions for item in items] == [item.captions for item in read_preferences(source)]
    assert items[0].image == items[1].image == str((prefs / "images" / "a.png").resolve())
    assert Path(items[2].image).parent == (tmp_path / "fetched").resolve()
    assert Path(items[2].image).read_bytes() == png_bytes(10, 14, seed=1)


def test_a_configured_root_admits_images_under_it_and_only_those(tmp_path: Path, outside: tuple[Path, Path]) -> None:
    prefs, secret = outside
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "c.png").write_bytes(png_bytes(20, 10, seed=7))
    source = write_jsonl(
        prefs / "prefs.jsonl", [row("images/good.png"), row("../shared/c.png"), row(str(shared / "c.png"))]
    )

    with pytest.raises(PreferenceFormatError) as caught:  # by default only the file's own folder is allowed
        stage_preferences(source, tmp_path / "denied", LOOPBACK)
    assert [p.split(": ")[1] for p in caught.value.problems] == ["row 2", "row 3"]
    assert not (tmp_path / "denied" / "images").exists()

    version, staged = stage_preferences(source, tmp_path / "set", LOOPBACK, image_root=tmp_path)
    assert version and [item.row for item in staged] == [1, 2, 3]
    copied = files_under(tmp_path / "set" / "images")
    assert sorted(copied.values()) == sorted([png_bytes(16, 16), png_bytes(20, 10, seed=7)])

    narrow = write_jsonl(tmp_path / "elsewhere" / "prefs.jsonl", [row(str(secret)), row(str(shared / "c.png"))])
    with pytest.raises(PreferenceFormatError) as caught:
        validate_preference_file(narrow, LOOPBACK, tmp_path / "fetched", image_root=shared)
    (problem,) = caught.value.problems
    assert problem.startswith("prefs.jsonl: row 1: field 'image': refused:")
    assert f"lies outside {shared.resolve()} (the configured image root" in problem


def test_preference_data_asset_takes_the_image_root_from_its_resource(
    tmp_path: Path, outside: tuple[Path, Path]
) -> None:
    prefs, _ = outside
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "c.png").write_bytes(png_bytes(20, 10, seed=7))
    source = write_jsonl(prefs / "prefs.jsonl", [row("images/good.png"), row("../shared/c.png")])
    data = tmp_path / "data"

    def run(image_root: str | None):
        resources = build_resources("", str(data), preferences_uri=str(source), preference_image_root=image_root)
        return materialize([preference_data], resources=resources, raise_on_error=False)

    refused = run(None)
    assert not refused.success and not (data / layout.CURRENT_PREFERENCES_KEY).exists()
    admitted = run(str(tmp_path))
    assert admitted.success
    metadata = admitted.asset_materializations_for_node("preference_data")[0].metadata
    assert metadata["images"].value == 2


def test_run_with_a_bad_preference_file_fails_in_seconds_before_any_download(
    web_pool: Callable[..., Path],
    routes_server: RoutesServer,
    outside: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ca_platform.cli import main

    pool = web_pool(rows_per_shard=4)
    prefs, secret = outside
    (prefs / "images" / "notes.png").write_text("not a picture")
    dead = routes_server.url("/prefs/dead.png")
    bad = write_jsonl(
        prefs / "bad.jsonl",
        [
            row("images/good.png"),
            row("../secret.txt"),
            row(str(secret)),
            row("images/notes.png"),
            {"image": "images/good.png", "captions": ["x", "y"]},
            row(dead),
        ],
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").touch()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    data = tmp_path / "data"

    started = time.monotonic()
    code = main(
        ["run", "--pool", str(pool), "--data", str(data), "--allow-host", "127.0.0.1", "--preferences", str(bad)]
    )
    took = time.monotonic() - started

    out, err = capsys.readouterr()
    assert code == 1
    assert took < 30, f"failing took {took:.1f} s"
    assert err.startswith("error: bad.jsonl: 5 problems\n") and "Traceback" not in err, err
    for number, what in [
        (2, "field 'image': refused: '../secret.txt' lies outside"),
        (3, f"field 'image': refused: {str(secret)!r} lies outside"),
        (4, "field 'image': "),
        (5, "field 'ranking': missing"),
        (6, f"field 'image': cannot fetch '{dead}': HTTP 404"),
    ]:
        assert f"bad.jsonl: row {number}: {what}" in err
    assert "not an image" in err and out == ""
    assert not (data / layout.DOWNLOADS_DIR).exists()
    assert not any(path.startswith("/img/") for path in routes_server.hits)  # not one pool image was requested
    assert DagsterInstance.get().get_dynamic_partitions(POOL_SHARDS) == []  # nor any shard registered
    assert not data.exists() or SECRET not in b"".join(files_under(data).values())
