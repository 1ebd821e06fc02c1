"""Reading the platform's webdataset tars safely, in a canonical order.

webdataset's default decoders unpickle `.pyd`/`.pickle` members and `torch.load` `.pth` ones, so a tar
from anywhere could run code. The platform reads tars with its own header walk instead, and hands samples out
as raw bytes of an allow-list of extensions that the caller decodes itself. `WDS_SECURE=1` is still set (with
weights-only `.pth` loads) for the webdataset the platform writes tars with, in case a caller reads through it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ca_platform.models.images import decode_image

# Set with this module, so they are in place before webdataset is imported to read or write a tar.
os.environ["WDS_SECURE"] = "1"
os.environ["WDS_PYTORCH_WEIGHTS_ONLY"] = "1"

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class TarSample:
    key: str
    image: bytes
    image_format: str
    caption: str
    meta: dict[str, Any]


def iter_samples(tars: Iterable[Path | str]) -> Iterator[TarSample]:
    """Samples of the tars, tar by tar, each tar's in canonical order (by sample key); members other than an
    image, `.txt` and `.json` are ignored undecoded.

    Canonical, not file order: img2dataset writes a shard's samples as their downloads complete, so the same
    pool gives differently ordered tars from run to run; its keys number the pool rows, so key order is the
    pool's order, and everything read from tars (training batches, subsets, scores) repeats exactly. Every
    sample of every tar wherever it runs: callers that parallelise split the stream themselves.
    """
    for tar in tars:
        path = Path(tar)
        with open(path, "rb") as data:
            for key, members in _samples_in_key_order(path):
                yield _sample_from(path, key, members, data)


@dataclass(frozen=True)
class TarMember:
    name: str
    offset: int  # of the member's data in the file
    size: int


# webdataset's split of a member name into sample key and extension: up to the first dot of the base name.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def tar_members(tar_path: Path) -> Iterator[TarMember]:
    """The regular file members of an uncompressed tar from its headers alone, seeking over the data.

    A plain header walk (pax `path`/`size` records honoured, as webdataset's writer emits them) costs a tenth
    of what `tarfile` or webdataset spend per member, and reads none of the data it skips.
    """
    overrides: dict[str, str] = {}
    with open(tar_path, "rb") as tar:
        while True:
            header = tar.read(512)
            if len(header) < 512 or header == b"\0" * 512:
                return
            kind = header[156:157]
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            padded = (size + 511) // 512 * 512
            if kind == b"x":
                overrides = _pax_records(tar.read(padded)[:size])
                continue
            if kind in (b"g", b"L", b"K"):
                raise ValueError(f"{tar_path}: unexpected tar header type {kind!r}")
            name = overrides.get("path") or header[:100].rstrip(b"\0").decode("utf-8")
            size = int(overrides.get("size", size))
            overrides = {}
            if kind in (b"0", b"\0"):
                yield TarMember(name, tar.tell(), size)
            tar.seek((size + 511) // 512 * 512, 1)


def _pax_records(block: bytes) -> dict[str, str]:
    records = {}
    while block:
        length, _, rest = block.partition(b" ")
        record = rest[: int(length) - len(length) - 2]
        key, _, value = record.partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        block = block[int(length) :]
    return records


def iter_samples_strided(tars: Iterable[Path | str], part: int, parts: int) -> Iterator[tuple[Path, TarSample]]:
    """(tar, sample) of the samples whose running index over all the tars (in `iter_samples` order) is `part`
    mod `parts`.

    For DataLoader workers: each walks the headers and reads only its own samples' bytes. Same samples, keys and
    members as `iter_samples` (consecutive members sharing a key form a sample).
    """
    index = 0
    for tar in tars:
        path = Path(tar)
        with open(path, "rb") as data:
            for key, members in _samples_in_key_order(path):
                if index % parts == part:
                    yield path, _sample_from(path, key, members, data)
                index += 1


def _samples_of(tar_path: Path) -> Iterator[tuple[str, dict[str, TarMember]]]:
    key, members = None, {}
    for member in tar_members(tar_path):
        match = _KEY_AND_EXTENSION.match(member.name)
        if match is None:
            continue
        if match[1] != key and members:
            yield key, members
            members = {}
        key = match[1]
        members[match[2].lower()] = member  # webdataset lower-cases extensions too
    if members:
        yield key, members


def _samples_in_key_order(tar_path: Path) -> list[tuple[str, dict[str, TarMember]]]:
    """The tar's samples sorted by key (from its headers alone); a key on two separate runs of members is an error,
    as webdataset would silently make two samples of it."""
    samples = sorted(_samples_of(tar_path), key=lambda sample: sample[0])
    for (key, _), (following, _) in zip(samples, samples[1:]):
        if key == following:
            raise ValueError(f"{tar_path}: sample key {key!r} appears twice")
    return samples


def _sample_from(tar_path: Path, key: str, members: dict[str, TarMember], data: Any) -> TarSample:
    def read(extension: str) -> bytes:
        member = members[extension]
        data.seek(member.offset)
        return data.read(member.size)

    image_format = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_format is None:
        raise ValueError(f"{tar_path}: sample {key!r} has no image member")
    meta = json.loads(read("json")) if "json" in members else {}
    caption = read("txt").decode("utf-8") if "txt" in members else ""
    return TarSample(key, read(image_format), image_format, caption, meta)


class SampleError(ValueError):
    """A tar sample that cannot be used; the message names the tar and the sample key."""


def decode_sample(tar: Path, sample: TarSample) -> tuple[str, Image.Image, str]:
    """(uid, decoded RGB image, caption) of a sample, or a SampleError naming the tar and key."""
    uid = sample.meta.get("uid")
    if uid is None:
        raise SampleError(f"{tar}: sample {sample.key!r} has no uid in its json member")
    try:
        image = decode_image(sample.image)
    except Exception as error:  # PIL raises many types on hostile bytes; all mean the same here
        raise SampleError(f"{tar}: sample {sample.key!r}: image does not decode ({error})") from error
    return str(uid), image, sample.caption


def iter_pairs(tars: Iterable[Path | str]) -> Iterator[tuple[str, Image.Image, str]]:
    """(uid, decoded image, caption) of every sample, tar by tar; e.g. to train a baseline on a pool."""
    for tar in tars:
        for sample in iter_samples([tar]):
            yield decode_sample(Path(tar), sample)
