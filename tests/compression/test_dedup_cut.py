"""Dedup and decontamination before the cut, through the assets: a pool served on 127.0.0.1 with planted copies
(same bytes, a JPEG re-encode, a larger rendering), two images of the evaluation set and one of the labelled
classification set; the copies are grouped, the held-out images removed, every downloaded pair accounted for in
the subsets with its reason."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from ca_platform import analytics, layout, schemas
from ca_platform.assets import ALL_ASSETS
from ca_platform.compression.threshold import keep_count
from ca_platform.runner import build_resources, run_lineage
from tests.conftest import RoutesServer, fast_reward_stage, write_pool
from tests.dedup.photos import encoded, photo, resized

PHOTOS = 12


@pytest.mark.slow
def test_copies_and_evaluation_images_leave_before_the_cut_and_every_pair_is_accounted_for(
    routes_server: RoutesServer, tmp_path: Path
) -> None:
    server = routes_server
    images = [photo(seed, size=64) for seed in range(PHOTOS)]
    urls = [server.add(f"/p/{i}.png", encoded(image), Content_Type="image/png") for i, image in enumerate(images)]
    copies = {  # the copy's url -> the photo it copies
        server.add("/copy/exact.png", encoded(images[0]), Content_Type="image/png"): 0,
        server.add("/copy/jpeg.jpg", encoded(images[1], "JPEG", 50), Content_Type="image/jpeg"): 1,
        server.add("/copy/large.png", encoded(resized(images[2], 96)), Content_Type="image/png"): 2,
    }
    pool = write_pool(
        tmp_path / "pool",
        {
            "part-a": {"url": urls[:6] + list(copies)[:2], "caption": [f"photo {i}" for i in range(8)]},
            "part-b": {"url": urls[6:] + list(copies)[2:], "caption": [f"picture {i}" for i in range(7)]},
        },
    )
    leaked = {  # evaluation images that are pool photos: the same bytes, and a JPEG re-encode
        server.add("/eval/leaked-exact.png", encoded(images[3]), Content_Type="image/png"): 3,
        server.add("/eval/leaked-jpeg.jpg", encoded(images[8], "JPEG", 70), Content_Type="image/jpeg"): 8,
    }
    clean = [server.add(f"/eval/{i}.png", encoded(photo(100 + i)), Content_Type="image/png") for i in range(2)]
    evaluation = tmp_path / "eval.parquet"
    pl.DataFrame({"url": [*leaked, *clean], "caption": ["an image"] * 4}).write_parquet(evaluation)
    leaked_labelled = server.add("/classes/leaked.png", encoded(images[5]), Content_Type="image/png")
    others = [server.add(f"/classes/{i}.png", encoded(photo(200 + i)), Content_Type="image/png") for i in range(2)]
    classes = tmp_path / "classes.parquet"
    pl.DataFrame({"url": [leaked_labelled, *others], "label": ["a", "b", "a"]}).write_parquet(classes)
    leaked[leaked_labelled] = 5
    data = tmp_path / "data"
    resources = build_resources(
        str(pool),
        str(data),
        ["127.0.0.1"],
        download_options={"thread_count": 4, "image_size": 64},
        evaluation_uri=str(evaluation),
        classes_uri=str(classes),
        keep_fraction=0.5,
        **fast_reward_stage(tmp_path / "prefs"),
    )
    instance = DagsterInstance.ephemeral()
    assert run_lineage(resources, instance).success  # downloads, the models, scores and fingerprints
    for selection, partition in (
        (["evaluation_set", "classification_set", "duplicate_groups", "score_threshold"], None),
        (["compressed_subset"], "part-a"),
        (["compressed_subset"], "part-b"),
    ):
        result = materialize(
            ALL_ASSETS, selection=selection, partition_key=partition, instance=instance, resources=resources
        )
        assert result.success, selection

    ledger = pl.read_parquet(data / layout.DOWNLOADS_DIR / "*" / layout.ROWS_FILE)
    uid_of = dict(zip(ledger["url"], ledger[schemas.UID]))
    removals = dict(pl.read_parquet(data / layout.DEDUP_REMOVALS_KEY).select(schemas.UID, "reason").iter_rows())
    evaluation_uid = {url: f"eval_contamination:{uid}" for url, uid in _evaluation_uids(data).items()}
    # the two pool photos in the evaluation set and the one in the labelled set are removed, naming the held-out
    # image they match
    for url, index in leaked.items():
        assert removals.pop(uid_of[urls[index]]) == evaluation_uid[url]
    # each planted copy and its original form a group; one of the two stays, the other names it
    groups = pl.read_parquet(data / layout.DUPLICATES_KEY)
    assert sorted(groups.group_by("group_id").agg(pl.col(schemas.UID).sort())[schemas.UID].to_list()) == sorted(
        sorted([uid_of[copy], uid_of[urls[index]]]) for copy, index in copies.items()
    )
    kinds = dict(groups.filter(pl.col("kind").is_not_null()).select(schemas.UID, "kind").iter_rows())
    for copy, index in copies.items():
        pair = {uid_of[copy], uid_of[urls[index]]}
        (removed,) = pair & set(removals)
        (kept,) = pair - {removed}
        assert removals.pop(removed) == f"duplicate_of:{kept}"
        assert kinds[removed] == ("exact" if copy.endswith("exact.png") else "near")
    assert removals == {}  # nothing else removed

    # the cut ranks what is left; every downloaded pair is in each variant's membership, once, with its reason
    downloaded = ledger.filter(pl.col(schemas.STATUS) == schemas.Status.SUCCESS).height
    assert downloaded == PHOTOS + len(copies)
    db = data / layout.ANALYTICS_DB
    per_variant = analytics.query(
        db,
        "SELECT variant, count(*), count(DISTINCT uid), count(*) FILTER (kept), "
        "count(*) FILTER (drop_reason LIKE 'duplicate_of:%'), "
        "count(*) FILTER (drop_reason LIKE 'eval_contamination:%') FROM subsets GROUP BY variant ORDER BY variant",
    ).rows
    left = downloaded - len(copies) - len(leaked)
    for variant, rows, distinct, kept, duplicates, contaminated in per_variant:
        assert (rows, distinct, duplicates, contaminated) == (downloaded, downloaded, len(copies), len(leaked)), variant
        assert kept == keep_count(0.5, left), variant  # halves rounded up
    assert analytics.query(db, "SELECT images FROM largest_duplicate_groups()").rows == [(2,)] * len(copies)


def _evaluation_uids(data: Path) -> dict[str, str]:
    """The held-out sets' image uids by url, from the evaluation set's and the labelled set's download ledgers."""
    ledger = pl.concat(
        pl.read_parquet(data / folder / "*" / layout.ROWS_FILE)
        for folder in (layout.EVALUATION_DIR, layout.CLASSIFICATION_DIR)
    )
    return dict(zip(ledger["url"], ledger[schemas.UID]))
