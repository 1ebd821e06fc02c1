"""Per-image fingerprints that duplicates and evaluation images are found by: a hash of the decoded pixels, a
64-bit DCT perceptual hash, and optionally the CLIP-score model's image embedding.

Three fingerprints because copies on the web differ in three ways: re-encoded losslessly (same pixels: the
pixel hash), resized or recompressed (nearly the same low frequencies: the pHash), or re-shot, cropped or
watermarked (the same content: the embedding). Fingerprinting is a per-shard map that decodes each image once.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from PIL import Image

from ca_platform import schemas
from ca_platform.ingest.webdataset_io import decode_sample, iter_samples

if TYPE_CHECKING:
    from ca_platform.scoring.clip_score import ClipScorer

# Rows of images in, L2-normalised float32 embeddings [len(images), d] out.
ImageEmbedder = Callable[[Sequence[Image.Image]], np.ndarray]

# The recipe of the pixel hash and the pHash: stored fingerprints of another recipe do not compare with these, so
# it belongs in wherever they are stored (as the embedding model's version does); bump it with any change.
FINGERPRINT_RECIPE = "sha256-rgb.phash-dct-box32.v2"
PHASH_SIZE = 32  # the grayscale thumbnail is box-reduced to between this and twice this a side
PHASH_LOW_FREQUENCIES = 8  # the 8 x 8 lowest frequencies make the 64 bits
# DCT rows are scaled to integers (float64): with 8-bit pixels and sides under 2 * PHASH_SIZE every partial sum of
# the two products stays an integer below 2^53, so float64 arithmetic is exact and a hash does not depend on the
# order BLAS sums in (which changes with the batch). The scaling moves coefficients by about 3e-5 of their size.
_DCT_SCALE = 2.0**15
# Thumbnails of one size per pair of matrix products: amortises numpy's per-call cost, yet stays below the size
# at which OpenBLAS spreads a product over threads (waking them costs more than this product on a busy machine).
PHASH_BATCH = 16


@functools.cache
def _dct_rows(size: int) -> np.ndarray:
    """The first PHASH_LOW_FREQUENCIES rows of the unnormalised DCT-II matrix (scipy's default norm) for `size`
    samples, scaled to integers."""
    frequency = np.arange(PHASH_LOW_FREQUENCIES)[:, None]
    sample = np.arange(size)[None, :]
    return np.round(2 * np.cos(np.pi * frequency * (2 * sample + 1) / (2 * size)) * _DCT_SCALE)


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def pixel_hash(image: Image.Image) -> str:
    """sha256 (hex) of the image's RGB pixels and size: a lossless re-encode (PNG of a JPEG's pixels, another
    PNG compression level) matches, a lossy one does not (that is the pHash's job)."""
    rgb = _rgb(image)
    digest = hashlib.sha256(struct.pack("<II", *rgb.size))
    digest.update(rgb.tobytes())
    return digest.hexdigest()


# The pHash's grayscale thumbnail: (pixel bytes, height, width).
Thumbnail = tuple[bytes, int, int]


def _thumbnail(image: Image.Image) -> Thumbnail:
    """The pHash's grayscale thumbnail: a box reduce by the integer part of PHASH_SIZE's share of each side, which
    leaves PHASH_SIZE to 2 * PHASH_SIZE - 1 pixels a side (fewer for a smaller image)."""
    rgb_or_gray = image if image.mode in ("RGB", "L") else image.convert("RGB")
    gray = rgb_or_gray if rgb_or_gray.mode == "L" else rgb_or_gray.convert("L")
    width, height = gray.size
    reduced = gray.reduce((max(1, width // PHASH_SIZE), max(1, height // PHASH_SIZE)))
    return reduced.tobytes(), reduced.height, reduced.width


def _hashes_of_thumbnails(thumbnails: Sequence[Thumbnail]) -> list[int]:
    """pHashes of thumbnails: the 8 x 8 lowest frequencies of the 2-D DCT of those of one size, a batch at a
    time, as two matrix products."""
    hashes = [0] * len(thumbnails)
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, (_, height, width) in enumerate(thumbnails):
        by_size.setdefault((height, width), []).append(index)
    for (height, width), indices in by_size.items():
        rows, columns_t = _dct_rows(height), np.ascontiguousarray(_dct_rows(width).T)
        for start in range(0, len(indices), PHASH_BATCH):
            batch = indices[start : start + PHASH_BATCH]
            pixels = np.frombuffer(b"".join(thumbnails[i][0] for i in batch), dtype=np.uint8)
            images = pixels.reshape(len(batch), height, width).astype(np.float64)
            coefficients = (rows @ images @ columns_t).reshape(len(batch), PHASH_LOW_FREQUENCIES**2)
            ordered = np.sort(coefficients, axis=1)
            median = (ordered[:, 31] + ordered[:, 32]) / 2
            bits = coefficients > median[:, None]
            for index, value in zip(batch, np.packbits(bits, axis=1).view(">i8").ravel().tolist()):
                hashes[index] = value
    return hashes


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (pHash) as a signed int64, the schema's storage of its bits.

    imagehash.phash's bit layout on pHash.org's recipe: a grayscale thumbnail, mean-filtered (the box reduce),
    unnormalised 2-D DCT-II, the 8 x 8 lowest frequencies, bit = coefficient > their median, row-major from the
    most significant bit. The DC term stays in the block: it is nearly always above the median, so it costs one
    bit of entropy, and keeping it keeps hashes comparable with that widely used layout (e.g. a published list of
    evaluation-image hashes). The median split sets 32 bits of 64 whenever coefficients do not tie, so distances
    are then even.

    The DCT runs on the box-reduced thumbnail at its own size (32 to 63 pixels a side) rather than on a 32 x 32
    resample of it: the lowest frequencies of the two differ by a scale per axis, which the median split ignores,
    and the resample cost more than the DCT. Photos keep energy in every low frequency and hash stably; an image
    with few low frequencies (a flat colour, a plain ramp, a drawing symmetric about an axis) has coefficients
    tied at or near the median, and hashes alike or by compression noise.
    """
    return _hashes_of_thumbnails([_thumbnail(image)])[0]


def hamming_distance(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray | int:
    """Differing bits of 64-bit hashes stored as int64 (arrays broadcast, element-wise); an int for two ints."""
    xor = np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    bits = np.bitwise_count(xor.view(np.uint64)).astype(np.int64)
    return int(bits) if bits.ndim == 0 else bits


def clip_image_embedder(scorer: ClipScorer) -> ImageEmbedder:
    """The CLIP-score model's image tower as an embedder: semantic duplicates are judged by the same model that
    the CLIP-score baseline filters with, on its device."""
    from ca_platform.models.clip import embed_pairs

    def embed(images: Sequence[Image.Image]) -> np.ndarray:
        embeddings, _ = embed_pairs(scorer.model, scorer.preprocessor, images, [], device=str(scorer.device))
        return embeddings.numpy().astype(np.float32, copy=False)

    return embed


def _embedded(embed: ImageEmbedder, images: Sequence[Image.Image], where: str) -> np.ndarray:
    embeddings = np.asarray(embed(images), dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(images):
        raise ValueError(f"{where}: the embedder gave shape {embeddings.shape} for {len(images)} images")
    return embeddings


def _check_embedding_settings(embed: ImageEmbedder | None, embed_version: str | None) -> None:
    if (embed is None) != (embed_version is None):
        raise ValueError("give both embed and embed_version (the embedding model's version) or neither")


def _fingerprint_frame(
    uids: list[str],
    shard: str,
    pixel_hashes: list[str],
    phashes: list[int],
    embeddings: np.ndarray | None,
    version: str | None,
) -> pl.DataFrame:
    rows = len(uids)
    if embeddings is None:
        embedding = pl.Series(schemas.EMBEDDING, [None] * rows, dtype=pl.List(pl.Float32))
    else:
        embedding = pl.Series(schemas.EMBEDDING, embeddings.reshape(rows, -1)).cast(pl.List(pl.Float32))
    frame = pl.DataFrame(
        [
            pl.Series(schemas.UID, uids, dtype=pl.String),
            pl.Series(schemas.SHARD, [shard] * rows, dtype=pl.String),
            pl.Series(schemas.PIXEL_HASH, pixel_hashes, dtype=pl.String),
            pl.Series(schemas.PHASH, phashes, dtype=pl.Int64),
            embedding,
            pl.Series(schemas.EMBEDDING_MODEL_VERSION, [version] * rows, dtype=pl.String),
        ]
    )
    return schemas.conform(frame, schemas.IMAGE_FINGERPRINTS)


def fingerprint_images(
    uids: Sequence[str],
    shard: str,
    images: Sequence[Image.Image],
    embed: ImageEmbedder | None = None,
    embed_version: str | None = None,
) -> pl.DataFrame:
    """Fingerprints (schemas.IMAGE_FINGERPRINTS) of in-memory images, e.g. an evaluation set; the embedding and
    its model version are null without `embed`."""
    _check_embedding_settings(embed, embed_version)
    if len(uids) != len(images):
        raise ValueError(f"shard {shard}: {len(uids)} uids but {len(images)} images")
    embeddings = _embedded(embed, images, f"shard {shard}") if embed is not None and images else None
    return _fingerprint_frame(
        [str(uid) for uid in uids],
        shard,
        [pixel_hash(image) for image in images],
        _hashes_of_thumbnails([_thumbnail(image) for image in images]),
        embeddings,
        embed_version,
    )


def fingerprint_tars(
    tars: Iterable[Path | str],
    shard: str,
    embed: ImageEmbedder | None = None,
    embed_version: str | None = None,
    batch_size: int = 256,
) -> pl.DataFrame:
    """Fingerprints (schemas.IMAGE_FINGERPRINTS) of every sample of a shard's tars, in canonical order.

    Each image is decoded once and hashed at once; its pHash thumbnail (at most 4 KiB) and, with `embed`, the
    image wait for their batch of `batch_size` (pHash DCTs and embeddings are computed a batch at a time), so
    memory is bounded by one batch of images plus the fingerprints. A sample that does not decode raises SampleError
    naming its tar and key, as scoring does: no image drops out unnoticed.
    """
    _check_embedding_settings(embed, embed_version)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    uids: list[str] = []
    pixel_hashes: list[str] = []
    phashes: list[int] = []
    embedded: list[np.ndarray] = []
    thumbnails: list[Thumbnail] = []
    images: list[Image.Image] = []

    def finish_batch() -> None:
        phashes.extend(_hashes_of_thumbnails(thumbnails))
        thumbnails.clear()
        if embed is not None and images:
            embedded.append(_embedded(embed, images, f"shard {shard}"))
        images.clear()

    for tar in tars:
        path = Path(tar)
        for sample in iter_samples([path]):
            uid, image, _ = decode_sample(path, sample)
            uids.append(uid)
            pixel_hashes.append(pixel_hash(image))
            thumbnails.append(_thumbnail(image))
            if embed is not None:
                images.append(image)
            if len(thumbnails) == batch_size:
                finish_batch()
    finish_batch()
    embeddings = np.concatenate(embedded) if embedded else None
    return _fingerprint_frame(uids, shard, pixel_hashes, phashes, embeddings, embed_version)
