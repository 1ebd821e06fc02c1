"""Reading the platform's webdataset tars safely.

webdataset's default decoders unpickle `.pyd`/`.pickle` members and `torch.load` `.pth` ones, so a tar
from anywhere could run code. The platform never uses them: `WDS_SECURE=1` is set for the versions that
honour it, `.pth` loads are limited to weights, and samples are handed out as raw bytes of an allow-list
of extensions that the caller decodes itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["WDS_SECURE"] = "1"
os.environ["WDS_PYTORCH_WEIGHTS_ONLY"] = "1"

import webdataset as wds  # noqa: E402 - after the security settings above

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class TarSample:
    key: str
    image: bytes
    image_format: str
    caption: str
    meta: dict[str, Any]


def iter_samples(tars: Iterable[Path | str]) -> Iterator[TarSample]:
    """Samples of the tars in order; members other than an image, `.txt` and `.json` are ignored undecoded.

    Every sample of every tar, wherever it runs: webdataset's own splitting by DataLoader worker and by
    distributed node is off, so callers that parallelise split the stream themselves and lose nothing.
    """
    dataset = wds.WebDataset(
        [str(t) for t in tars], shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None
    )
    for raw in dataset:
        image_format = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image_format is None:
            raise ValueError(f"{raw.get('__url__')}: sample {raw.get('__key__')!r} has no image member")
        meta = json.loads(raw["json"]) if "json" in raw else {}
        caption = raw["txt"].decode("utf-8") if "txt" in raw else ""
        yield TarSample(raw["__key__"], raw[image_format], image_format, caption, meta)
