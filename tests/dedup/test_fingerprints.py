"""Fingerprints of real images: pixel hashes match lossless copies only, pHashes survive resizing and
recompression and keep distinct images apart, shards' tars give the same rows as images in memory."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.fft
from PIL import Image

from ca_platform import schemas
from ca_platform.dedup.fingerprints import (
    clip_image_embedder,
    fingerprint_images,
    fingerprint_tars,
    hamming_distance,
    perceptual_hash,
    pixel_hash,
)
from ca_platform.dedup.groups import DedupSettings
from ca_platform.ingest.webdataset_io import SampleError
from ca_platform.models.clip import build_clip, embed_pairs
from ca_platform.scoring.clip_score import ClipScorer
from tests.dedup.photos import encoded, photo, reencoded, resized, write_shard_tar

DEFAULT_BITS = DedupSettings().near_max_bits
PHOTOS = [photo(seed) for seed in range(40)]


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    model, preprocessor = build_clip("tiny", 32)
    return ClipScorer(model, preprocessor, "v-test", "cpu")


def test_pixel_hash_matches_lossless_copies_only() -> None:
    image = PHOTOS[0]
    assert pixel_hash(reencoded(image, "PNG")) == pixel_hash(image)
    assert pixel_hash(reencoded(image, "BMP")) == pixel_hash(image)
    assert pixel_hash(image.convert("RGBA")) == pixel_hash(image)  # compared as RGB pixels
    assert pixel_hash(reencoded(image, "JPEG", 95)) != pixel_hash(image)
    assert pixel_hash(PHOTOS[1]) != pixel_hash(image)
    # the same bytes in another shape are another image
    pixels = np.asarray(image)
    assert pixel_hash(Image.fromarray(pixels.reshape(32, 128, 3))) != pixel_hash(image)


def test_phash_is_the_dct_recipe_as_a_signed_int64() -> None:
    """Against an independent reference: scipy's unnormalised DCT-II on both axes, bits > the 8x8 block's
    median, row-major from the most significant bit, read as a signed 64-bit integer."""
    for image in PHOTOS[:10]:
        thumbnail = image.convert("L").reduce(2).resize((32, 32), Image.Resampling.LANCZOS)  # 64 px: 2 x 2 boxes
        coefficients = scipy.fft.dct(scipy.fft.dct(np.asarray(thumbnail, dtype=np.float64), axis=0), axis=1)
        low = coefficients[:8, :8]
        bits = (low > np.median(low)).ravel()
        unsigned = int("".join("1" if bit else "0" for bit in bits), 2)
        expected = unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned
        assert perceptual_hash(image) == expected
        assert -(1 << 63) <= expected < 1 << 63
        assert bin(unsigned).count("1") == 32  # the median splits the 64 coefficients in half


@pytest.mark.parametrize(
    "copy",
    [
        pytest.param(lambda image: resized(image, 48), id="resized-to-48"),
        pytest.param(lambda image: resized(image, 128), id="resized-to-128"),
        pytest.param(lambda image: reencoded(image, "JPEG", 40), id="jpeg-40"),
    ],
)
def test_phash_of_resized_or_recompressed_copies_is_within_the_default_threshold(copy) -> None:
    distances = [hamming_distance(perceptual_hash(image), perceptual_hash(copy(image))) for image in PHOTOS]
    assert max(distances) <= DEFAULT_BITS


def test_phash_of_copies_both_resized_and_recompressed() -> None:
    """Within the default from 128 px up (downloads are larger); a 64 px thumbnail both shrunk and recompressed
    can lose 6 bits, which `near_max_bits=6` catches for pools of thumbnails."""
    for seed in range(40):
        larger = photo(seed, 128)
        copy = reencoded(resized(larger, 96), "JPEG", 40)
        assert hamming_distance(perceptual_hash(larger), perceptual_hash(copy)) <= DEFAULT_BITS
        small = PHOTOS[seed]
        copy = reencoded(resized(small, 48), "JPEG", 40)
        assert hamming_distance(perceptual_hash(small), perceptual_hash(copy)) <= 6


def test_phash_quality_change_of_a_jpeg_is_within_the_default_threshold() -> None:
    for image in PHOTOS:
        served = reencoded(image, "JPEG", 95)
        assert hamming_distance(perceptual_hash(served), perceptual_hash(reencoded(served, "JPEG", 40))) <= DEFAULT_BITS


def structured(seed: int, size: int = 64) -> Image.Image:
    """An off-centre radial gradient under stripes of a random angle and period: structure without noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    centre_y, centre_x, angle = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0, np.pi)
    radial = np.hypot(y - centre_y, x - centre_x)
    stripes = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi * rng.uniform(1, 4))
    channels = [np.clip(255 * (0.6 * radial + 0.2 * stripes * weight + 0.2), 0, 255) for weight in (1, -1, 0.5)]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


def test_phash_keeps_distinct_images_well_apart() -> None:
    rng = np.random.default_rng(7)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(10)]
    hashes = [perceptual_hash(image) for image in PHOTOS + noise + [structured(seed) for seed in range(20)]]
    distances = [hamming_distance(a, b) for a, b in itertools.combinations(hashes, 2)]
    assert min(distances) > 2 * DEFAULT_BITS  # a wide margin, not only past the threshold


def test_images_with_few_low_frequencies_share_a_phash_and_only_pixels_tell_them_apart() -> None:
    """pHash's known blind spot, kept exact: a uniform image has no low frequency but the mean, so every uniform
    image hashes alike (and a plain ramp nearly so); their pixel hashes still differ."""
    red, blue = Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (48, 48), (30, 30, 200))
    assert perceptual_hash(red) == perceptual_hash(blue) == -(1 << 63)  # the DC bit alone
    assert pixel_hash(red) != pixel_hash(blue)


def test_hamming_distance_counts_bits_of_ints_and_int64_arrays() -> None:
    assert hamming_distance(0, 0) == 0
    assert hamming_distance(-1, 0) == 64
    assert hamming_distance(-(1 << 63), 0) == 1  # the sign bit is a bit like the others
    assert hamming_distance(0b1011, 0b0110) == 3
    left = np.array([0, -1, 5, 1 << 62], dtype=np.int64)
    right = np.array([0, 0, 6, -(1 << 63)], dtype=np.int64)
    assert hamming_distance(left, right).tolist() == [0, 64, 2, 2]
    assert hamming_distance(left, 0).tolist() == [0, 64, 2, 1]


def test_fingerprint_images_without_embeddings_has_null_embedding_columns() -> None:
    frame = fingerprint_images(["a", "b"], "s0", PHOTOS[:2])
    assert frame.schema == pl.Schema(schemas.IMAGE_FINGERPRINTS)
    assert frame[schemas.UID].to_list() == ["a", "b"]
    assert frame[schemas.SHARD].to_list() == ["s0", "s0"]
    assert frame[schemas.PIXEL_HASH].to_list() == [pixel_hash(image) for image in PHOTOS[:2]]
    assert frame[schemas.PHASH].to_list() == [perceptual_hash(image) for image in PHOTOS[:2]]
    assert frame[schemas.EMBEDDING].null_count() == 2
    assert frame[schemas.EMBEDDING_MODEL_VERSION].null_count() == 2


def test_embeddings_need_their_model_version_and_matching_counts(scorer: ClipScorer) -> None:
    with pytest.raises(ValueError, match="embed_version"):
        fingerprint_images(["a"], "s0", PHOTOS[:1], embed=clip_image_embedder(scorer))
    with pytest.raises(ValueError, match="2 uids but 1 images"):
        fingerprint_images(["a", "b"], "s0", PHOTOS[:1])


def test_clip_image_embedder_gives_the_clip_score_models_unit_embeddings(scorer: ClipScorer) -> None:
    embed = clip_image_embedder(scorer)
    embeddings = embed(PHOTOS[:5])
    assert embeddings.dtype == np.float32 and embeddings.shape == (5, scorer.model.config.projection_dim)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    expected, _ = embed_pairs(scorer.model, scorer.preprocessor, PHOTOS[:5], [], device="cpu")
    np.testing.assert_allclose(embeddings, expected.numpy(), rtol=1e-5, atol=1e-6)
    frame = fingerprint_images([f"u{i}" for i in range(5)], "s0", PHOTOS[:5], embed, scorer.version)
    np.testing.assert_allclose(np.array(frame[schemas.EMBEDDING].to_list()), embeddings, rtol=1e-6)
    assert frame[schemas.EMBEDDING_MODEL_VERSION].to_list() == ["v-test"] * 5


def _shard_samples() -> tuple[list[tuple[str, str, bytes, str]], dict[str, Image.Image]]:
    """Samples written out of key order (as downloads complete), JPEG and PNG, and each uid's decoded image."""
    samples, decoded = [], {}
    for index in (3, 0, 5, 1, 4, 2, 6):
        image_format, extension = ("JPEG", "jpg") if index % 2 else ("PNG", "png")
        data = encoded(PHOTOS[index], image_format, 90)
        samples.append((f"{index:09d}", f"uid-{index}", data, extension))
        decoded[f"uid-{index}"] = reencoded(PHOTOS[index], image_format, 90)
    return samples, decoded


def test_fingerprint_tars_reads_every_sample_in_canonical_order(tmp_path: Path) -> None:
    samples, decoded = _shard_samples()
    tars = [write_shard_tar(tmp_path / "a.tar", samples[:4]), write_shard_tar(tmp_path / "b.tar", samples[4:])]
    frame = fingerprint_tars(tars, "s7")
    uids = sorted(uid for _, uid, _, _ in samples[:4]) + sorted(uid for _, uid, _, _ in samples[4:])
    assert frame[schemas.UID].to_list() == uids
    assert frame.equals(fingerprint_images(uids, "s7", [decoded[uid] for uid in uids]))


def test_fingerprint_tars_embeds_in_bounded_batches(tmp_path: Path, scorer: ClipScorer) -> None:
    samples, decoded = _shard_samples()
    tar = write_shard_tar(tmp_path / "a.tar", samples)
    clip = clip_image_embedder(scorer)
    batch_sizes = []

    def recording_embedder(images):
        batch_sizes.append(len(images))
        return clip(images)

    frame = fingerprint_tars([tar], "s0", recording_embedder, scorer.version, batch_size=3)
    assert batch_sizes == [3, 3, 1]
    uids = sorted(decoded)
    expected = fingerprint_images(uids, "s0", [decoded[uid] for uid in uids], clip, scorer.version)
    assert frame.drop(schemas.EMBEDDING).equals(expected.drop(schemas.EMBEDDING))
    np.testing.assert_allclose(
        np.array(frame[schemas.EMBEDDING].to_list()), np.array(expected[schemas.EMBEDDING].to_list()), atol=1e-5
    )


def test_fingerprint_tars_names_the_tar_and_key_of_an_image_that_does_not_decode(tmp_path: Path) -> None:
    samples, _ = _shard_samples()
    tar = write_shard_tar(tmp_path / "broken.tar", [*samples[:2], ("000000099", "uid-99", b"<html>", "jpg")])
    with pytest.raises(SampleError, match=r"broken\.tar.*000000099"):
        fingerprint_tars([tar], "s0")
