"""Streaming real webdataset tars through a scorer: every sample once, in workers or not, errors named."""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ca_platform.ingest.webdataset_io import SampleError, iter_pairs
from ca_platform.models.clip import build_clip
from ca_platform.models.images import decode_image
from ca_platform.models.preprocessing import PairPreprocessor
from ca_platform.scoring.clip_score import ClipScorer
from ca_platform.scoring.streaming import score_pairs, score_tars


def jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A tar laid out as img2dataset's WebDatasetSampleWriter writes it: jpg, txt and json per key."""
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def sample(key: str, uid: str, image: bytes, caption: str) -> dict:
    return {"__key__": key, "jpg": image, "txt": caption, "json": json.dumps({"uid": uid, "key": key}).encode()}


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    model, preprocessor = build_clip("tiny", image_size=32)
    return ClipScorer(model, preprocessor, version="random-init", device="cpu")


@pytest.fixture
def shard_tars(tmp_path: Path) -> list[Path]:
    """Three tars of 5, 4 and 3 samples with images of varied shapes and captions of varied lengths."""
    tars = []
    for tar_index, count in enumerate((5, 4, 3)):
        samples = [
            sample(
                f"{tar_index:05d}{row:04d}",
                f"uid-{tar_index}-{row}",
                jpeg_bytes(20 + 3 * row, 24 + tar_index, seed=10 * tar_index + row),
                "a photo " + "of a thing " * row,
            )
            for row in range(count)
        ]
        tars.append(write_tar(tmp_path / f"{tar_index:05d}.tar", samples))
    return tars


@pytest.mark.parametrize("num_workers", [0, 2])
def test_score_tars_scores_every_sample_once_like_score_pairs(
    shard_tars: list[Path], scorer: ClipScorer, num_workers: int
) -> None:
    scores = score_tars(shard_tars, scorer, batch_size=4, num_workers=num_workers)

    pairs = list(iter_pairs(shard_tars))
    assert {name: str(dtype) for name, dtype in scores.schema.items()} == {
        "uid": "String",
        "caption_rank": "Int32",  # null: each image with its own caption
        "score": "Float64",
    }
    assert scores["caption_rank"].null_count() == scores.height == 12
    assert sorted(scores["uid"].to_list()) == sorted(uid for uid, _, _ in pairs)
    expected = dict(
        zip((uid for uid, _, _ in pairs), score_pairs([p[1] for p in pairs], [p[2] for p in pairs], scorer))
    )
    got = dict(zip(scores["uid"].to_list(), scores["score"].to_list()))
    np.testing.assert_allclose([got[uid] for uid in expected], list(expected.values()), rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(scores["score"].to_numpy()) <= 1.0 + 1e-6)  # cosine similarities

    # the same images with candidate captions instead of their own: one row per candidate, scored alike
    candidates = {uid: [(0, f"a candidate for {uid}"), (1, caption)] for uid, _, caption in pairs}
    recaptioned = score_tars(shard_tars, scorer, batch_size=4, num_workers=num_workers, candidates=candidates)
    assert recaptioned.height == 24 and sorted(set(recaptioned["caption_rank"])) == [0, 1]
    by_pair = {(u, r): s for u, r, s in recaptioned.iter_rows()}
    np.testing.assert_allclose([by_pair[uid, 1] for uid in expected], list(expected.values()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_undecodable_image_raises_naming_tar_and_key(tmp_path: Path, scorer: ClipScorer, num_workers: int) -> None:
    good = write_tar(tmp_path / "00000.tar", [sample("000000000", "u0", jpeg_bytes(16, 16, 0), "fine")])
    bad = write_tar(  # the broken sample is the second of the stream: worker 1's with two workers
        tmp_path / "00001.tar",
        [
            sample("000010000", "u1", b"<html>not an image</html>", "broken"),
            sample("000010001", "u2", jpeg_bytes(16, 16, 1), "fine"),
        ],
    )
    with pytest.raises(SampleError, match=re.escape(str(bad)) + r".*'000010000'.*does not decode"):
        score_tars([good, bad], scorer, batch_size=2, num_workers=num_workers)


def test_sample_without_uid_is_an_error(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "00000.tar", [{"__key__": "000000007", "jpg": jpeg_bytes(8, 8, 0), "txt": "x"}])
    with pytest.raises(SampleError, match=r"00000\.tar: sample '000000007' has no uid"):
        list(iter_pairs([tar]))


def test_iter_pairs_yields_uid_image_caption_in_tar_order(shard_tars: list[Path]) -> None:
    pairs = list(iter_pairs(shard_tars))
    assert [uid for uid, _, _ in pairs] == [f"uid-{t}-{r}" for t, n in enumerate((5, 4, 3)) for r in range(n)]
    uid, image, caption = pairs[6]  # second sample of the second tar
    assert uid == "uid-1-1"
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (23, 25)
    assert caption == "a photo of a thing "


def test_workers_receive_the_preprocessor_not_the_model(scorer: ClipScorer) -> None:
    prepare = pickle.loads(pickle.dumps(scorer.prepare))
    assert isinstance(prepare.__self__, PairPreprocessor)
    weights_bytes = sum(p.numel() * p.element_size() for p in scorer.model.parameters())
    assert len(pickle.dumps(scorer.prepare)) < weights_bytes / 4
    image = decode_image(jpeg_bytes(40, 30, 3))
    prepared = prepare(image, "A Red Square")
    assert prepared["pixel_values"].shape == (3, 32, 32)
    assert prepared["input_ids"].tolist() == scorer.prepare(image, "a red square")["input_ids"].tolist()


def test_score_pairs_needs_one_caption_per_image(scorer: ClipScorer) -> None:
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        score_pairs([Image.new("RGB", (8, 8))] * 2, ["one"], scorer)
