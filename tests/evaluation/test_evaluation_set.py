"""The evaluation set: parquet url, caption downloaded through the guard; shared URLs give several references."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ca_platform.demo.evaluation_set import write_shapes_evaluation_set
from ca_platform.demo.shapes_pool import ShapesWorldConfig
from ca_platform.evaluation.evaluation_set import (
    EvaluationSetError,
    download_evaluation_set,
    load_evaluation_set,
    read_evaluation_file,
)
from ca_platform.ingest.download import DownloadSettings
from ca_platform.ingest.download_guard import GuardPolicy
from tests.conftest import RoutesServer, png_bytes

SETTINGS = DownloadSettings(thread_count=4, policy=GuardPolicy(allow_hosts=frozenset({"127.0.0.1"})))


def test_images_with_several_references_and_a_failed_download(routes_server: RoutesServer, tmp_path: Path) -> None:
    a = routes_server.add("/a.png", png_bytes(32, 32, seed=1), Content_Type="image/png")
    b = routes_server.add("/b.png", png_bytes(32, 32, seed=2), Content_Type="image/png")
    missing = routes_server.url("/missing.png")
    path = tmp_path / "eval.parquet"
    pl.DataFrame(
        {"url": [a, b, a, missing], "caption": ["a red circle", "a blue square", "red round shape", "gone"]}
    ).write_parquet(path)

    ledger = download_evaluation_set(path, tmp_path / "set", SETTINGS)
    assert ledger.height == 3 and sorted(ledger["status"]) == ["failed_to_download", "success", "success"]
    dataset = load_evaluation_set(tmp_path / "set")
    assert dataset.not_downloaded == 1
    by_reference = {tuple(refs): image.size for refs, image in zip(dataset.references, dataset.images)}
    assert set(by_reference) == {("a red circle", "red round shape"), ("a blue square",)}
    captions, owner = dataset.captions
    assert len(captions) == 3 and all(c in dataset.references[i] for c, i in zip(captions, owner))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pl.DataFrame({"url": ["http://x/a.png"]}), r"missing column\(s\) \['caption'\]"),
        (pl.DataFrame({"url": ["http://x/a.png", "http://x/b.png"], "caption": ["ok", " "]}), r"at rows \[2\]"),
        (
            pl.DataFrame(
                {"url": [None, "http://x/b.png"], "caption": ["ok", "ok"]}, schema_overrides={"url": pl.String}
            ),
            r"at rows \[1\]",
        ),
    ],
)
def test_bad_files_are_named_with_their_rows(tmp_path: Path, frame: pl.DataFrame, message: str) -> None:
    path = tmp_path / "eval.parquet"
    frame.write_parquet(path)
    with pytest.raises(EvaluationSetError, match=rf"eval\.parquet: .*{message}"):
        read_evaluation_file(path)


def test_the_demo_set_has_distinct_images_with_two_references_and_is_reproducible(tmp_path: Path) -> None:
    pool = ShapesWorldConfig(shards=2, rows_per_shard=50)
    path = write_shapes_evaluation_set(tmp_path, "http://127.0.0.1:1", images=30, avoid_pool=pool)
    frame = read_evaluation_file(path)
    assert frame["uid"].n_unique() == 30 and frame.height in range(31, 61)
    assert all((tmp_path / "eval-images" / url.rsplit("/", 1)[1]).is_file() for url in frame["url"])
    again = write_shapes_evaluation_set(tmp_path / "again", "http://127.0.0.1:1", images=30, avoid_pool=pool)
    assert again.read_bytes() == path.read_bytes()
