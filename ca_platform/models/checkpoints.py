"""Versioned model checkpoints: a folder of safetensors weights and JSON, named by its content hash.

The same weights and configuration always give the same version, so re-training to identical weights or
registering a copy is a no-op, and scores keyed by version stay comparable. Weights load with safetensors
only: a checkpoint folder holding pickle files (`*.bin`, `*.pt`, `*.pth`, `*.pkl`) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be trusted or read; the message names the folder and file."""


def content_version(folder: Path) -> str:
    """sha256 over every file's relative name and bytes, in name order; 16 hex digits."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def write_checkpoint(
    root: Path,
    state_dict: Mapping[str, torch.Tensor],
    json_files: Mapping[str, Any],
    extra_files: Mapping[str, Path] | None = None,
) -> tuple[str, Path]:
    """Write weights, JSON documents and extra files (e.g. a tokenizer's) as `root/<version>`.

    Written aside and renamed into place, so a reader never sees half a checkpoint.
    """

    def fill(staging: Path) -> None:
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
        save_file(tensors, str(staging / WEIGHTS_FILE))
        for name, document in json_files.items():
            (staging / name).write_text(json.dumps(document, indent=2, sort_keys=True))
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / name)

    return _commit(root, fill)


def _commit(root: Path, fill: Callable[[Path], None]) -> tuple[str, Path]:
    """Fill a folder aside under `root`, then rename it to its content version (kept if already there)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
    try:
        fill(staging)
        version = content_version(staging)
        final = root / version
        if final.exists():
            shutil.rmtree(staging)
        else:
            os.replace(staging, final)
        return version, final
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's safetensors weights, after refusing any pickle file beside them."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(f"{folder}: refusing pickle files {pickled}; checkpoints load from safetensors only")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder}: missing {WEIGHTS_FILE}")
    return load_file(str(weights))


def read_json(folder: Path, name: str) -> Any:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{folder}: missing {name}")
    return json.loads(path.read_text())


def register_folder(source: Path, root: Path) -> tuple[str, Path]:
    """Copy a checkpoint folder trained elsewhere under `root`, as the version its content hashes to."""
    read_weights(source)  # refuses pickles and a missing weights file before anything is copied
    return _commit(root, lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True))
