"""Per-image fingerprints that duplicates and evaluation images are found by: a hash of the decoded pixels, a
64-bit DCT perceptual hash, and optionally the CLIP-score model's image embedding.

Three fingerprints because copies on the web differ in three ways: re-encoded losslessly (same pixels: the
pixel hash), resized or recompressed (nearly the same low frequencies: the pHash), or re-shot, cropped or
watermarked (the same content: the embedding). Fingerprinting is a per-shard map that decodes each image once.
"""

from __future__ import annotations

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
FINGERPRINT_RECIPE = "sha256-rgb.phash-dct32-box-lanczos.v1"
PHASH_SIZE = 32  # the grayscale thumbnail the DCT runs on
PHASH_LOW_FREQUENCIES = 8  # the 8 x 8 lowest frequencies make the 64 bits


def _dct_rows(size: int, frequencies: int) -> np.ndarray:
    """The first `frequencies` rows of the unnormalised DCT-II matrix (scipy's default norm)."""
    frequency = np.arange(frequencies)[:, None]
    sample = np.arange(size)[None, :]
    return 2 * np.cos(np.pi * frequency * (2 * sample + 1) / (2 * size))


# The DCT rows as integers (scaled by 2^16, float64): with 8-bit pixels every partial sum of the two products
# stays an integer below 2^53, so float64 arithmetic is exact and a hash does not depend on the order BLAS
# sums in (which changes with the batch). The scaling moves coefficients by about 1e-5 of their size.
_DCT_SCALE = 2.0**16
_DCT = np.round(_dct_rows(PHASH_SIZE, PHASH_LOW_FREQUENCIES) * _DCT_SCALE)
_DCT_T = np.ascontiguousarray(_DCT.T)
# Thumbnails per pair of matrix products: amortises numpy's per-call cost, yet stays below the size at which
# OpenBLAS spreads a product over threads (waking them costs more than this product, the more on a busy machine).
PHASH_BATCH = 16


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def pixel_hash(image: Image.Image) -> str:
    """sha256 (hex) of the image's RGB pixels and size: a lossless re-encode (PNG of a JPEG's pixels, another
    PNG compression level) matches, a lossy one does not (that is the pHash's job)."""
    rgb = _rgb(image)
    digest = hashlib.sha256(struct.pack("<II", *rgb.size))
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _thumbnail(image: Image.Image) -> bytes:
    """The pHash's 32 x 32 grayscale thumbnail (see `perceptual_hash`), as its 1,024 pixel bytes."""
    rgb_or_gray = image if image.mode in ("RGB", "L") else image.convert("RGB")
    gray = rgb_or_gray if rgb_or_gray.mode == "L" else rgb_or_gray.convert("L")
    width, height = gray.size
    reduced = gray.reduce((max(1, width // PHASH_SIZE), max(1, height // PHASH_SIZE)))
    if reduced.size != (PHASH_SIZE, PHASH_SIZE):
        reduced = reduced.resize((PHASH_SIZE, PHASH_SIZE), Image.Resampling.LANCZOS)
    return reduced.tobytes()


def _hashes_of_thumbnails(thumbnails: Sequence[bytes]) -> list[int]:
    """pHashes of thumbnails, a batch at a time: the 2-D DCT of all of them as two matrix products."""
    hashes: list[int] = []
    area = PHASH_SIZE * PHASH_SIZE
    for start in range(0, len(thumbnails), PHASH_BATCH):
        batch = np.frombuffer(b"".join(thumbnails[start : start + PHASH_BATCH]), dtype=np.uint8)
        count = len(batch) // area
        # rows: X D^T for every thumbnail at once; then D (X D^T) with the thumbnails side by side
        rows = (batch.reshape(count * PHASH_SIZE, PHASH_SIZE).astype(np.float64) @ _DCT_T).reshape(
            count, PHASH_SIZE, PHASH_LOW_FREQUENCIES
        )
        side_by_side = rows.transpose(1, 0, 2).reshape(PHASH_SIZE, count * PHASH_LOW_FREQUENCIES)
        low = (_DCT @ side_by_side).reshape(PHASH_LOW_FREQUENCIES, count, PHASH_LOW_FREQUENCIES)
        coefficients = low.transpose(1, 0, 2).reshape(count, PHASH_LOW_FREQUENCIES**2)
        ordered = np.sort(coefficients, axis=1)
        median = (ordered[:, 31] + ordered[:, 32]) / 2
        bits = coefficients > median[:, None]
        hashes.extend(np.packbits(bits, axis=1).view(">i8").ravel().tolist())
    return hashes


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (pHash) as a signed int64, the schema's storage of its bits.

    imagehash.phash's recipe and bit layout: grayscale 32 x 32 thumbnail, unnormalised 2-D DCT-II, the 8 x 8
    lowest frequencies, bit = coefficient > their median, row-major from the most significant bit. The DC
    term stays in the block: it is nearly always above the median, so it costs one bit of entropy, and keeping
    it keeps hashes comparable with that widely used layout (e.g. a published list of evaluation-image hashes).
    The median split sets 32 bits of 64 whenever coefficients do not tie, so distances are then even.

    The thumbnail is a box reduce by the integer part of the scale (the mean filter pHash.org blurs with), then
    Lanczos for the rest (from less than twice the size): several times cheaper than a plain Lanczos from 256 px,
    and copies stay as close as with it in the robustness tests. Photos keep energy in every low frequency and
    hash stably; an image with few low frequencies (a flat colour, a plain ramp, a drawing symmetric about an
    axis) has coefficients tied at or near the median, and hashes alike or by compression noise.
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

    Each image is decoded once and hashed at once; its pHash thumbnail (1 KiB) and, with `embed`, the image wait
    for their batch of `batch_size` (pHash DCTs and embeddings are computed a batch at a time), so memory is
    bounded by one batch of images plus the fingerprints. A sample that does not decode raises SampleError
    naming its tar and key, as scoring does: no image drops out unnoticed.
    """
    _check_embedding_settings(embed, embed_version)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    uids: list[str] = []
    pixel_hashes: list[str] = []
    phashes: list[int] = []
    embedded: list[np.ndarray] = []
    thumbnails: list[bytes] = []
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
