"""The one checkpoint format: a folder of safetensors weights and JSON, named by its content hash.

Every model the platform saves (reward model, CLIP/BLIP baselines, models trained on each variant) is
written by `save_model` and read back by `read_model`:

- `model.safetensors`: the weights, tied copies once; pickle files beside them are refused on load;
- `config.json`: the architecture (a transformers config, or the reward model's own document);
- `preprocessing.json`: which kind of model it is and how images and text are prepared;
- the tokenizer's own files, saved canonically so the version does not depend on how it was last used;
- `metrics.json`: how training went, without wall-clock figures, so a seed fixes the version;
- any further JSON documents a kind needs (the reward model's score normalisation).

The same weights and settings always give the same version, so retraining to identical weights or
registering a copy is a no-op, and scores keyed by version stay comparable.

torch, safetensors and transformers are imported where a checkpoint is written or read, not with the module:
`content_version` is on the path of every Dagster process that loads the definitions, most of which run no model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from ca_platform.models.preprocessing import PairPreprocessor

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREPROCESSING_FILE = "preprocessing.json"
METRICS_FILE = "metrics.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Wall-clock figures differ from run to run; kept out of the checkpoint so that a seed fixes the version.
UNVERSIONED_METRICS = ("seconds", "samples_per_second")
# Recorded by transformers when a tokenizer is loaded from a folder, not part of what it does: left out so a
# loaded and re-saved checkpoint keeps its version.
TOKENIZER_LOAD_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")


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


def save_model(
    root: Path,
    model: torch.nn.Module,
    *,
    kind: str,
    config: Mapping[str, Any],
    preprocessor: PairPreprocessor,
    metrics: Mapping[str, Any] | None = None,
    documents: Mapping[str, Any] | None = None,
) -> tuple[str, Path]:
    """Write `root/<version>` in the one checkpoint format (see the module docstring); returns its version.

    Written aside and renamed into place, so a reader never sees half a checkpoint.
    """
    state = model.state_dict()
    aliases = _aliases(state)
    weights = {name: tensor for name, tensor in state.items() if name not in aliases}
    files: dict[str, Any] = {
        CONFIG_FILE: {k: v for k, v in config.items() if k != "transformers_version"},
        PREPROCESSING_FILE: {"model": kind, **preprocessor.settings()},
        METRICS_FILE: {k: v for k, v in (metrics or {}).items() if k not in UNVERSIONED_METRICS},
        **(documents or {}),
    }

    def fill(staging: Path) -> None:
        from safetensors.torch import save_file

        tokenizer_files = _save_tokenizer(preprocessor.tokenizer, staging)
        clashes = sorted(tokenizer_files & (set(files) | {WEIGHTS_FILE}))
        if clashes:
            raise CheckpointError(f"tokenizer files {clashes} would overwrite the checkpoint's own")
        save_file({n: t.detach().to("cpu").contiguous() for n, t in weights.items()}, str(staging / WEIGHTS_FILE))
        for name, document in files.items():
            (staging / name).write_text(json.dumps(document, indent=2, sort_keys=True))

    return _commit(root, fill)


@dataclass(frozen=True)
class ModelCheckpoint:
    """A checkpoint folder read and checked: its weights, documents and preprocessing, not yet a model."""

    folder: Path
    version: str
    weights: dict[str, torch.Tensor]
    config: dict[str, Any]
    preprocessor: PairPreprocessor
    metrics: dict[str, Any]

    def document(self, name: str) -> Any:
        return read_json(self.folder, name)

    def load_into(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` with the checkpoint's weights (tied copies restored by the model itself), in eval mode."""
        missing, unexpected = model.load_state_dict(self.weights, strict=False)
        untied = sorted(set(missing) - _aliases(model.state_dict()))
        if untied or unexpected:
            raise CheckpointError(
                f"{self.folder}: weights do not fit the architecture in {CONFIG_FILE} "
                f"(missing {untied}, unexpected {unexpected})"
            )
        return model.eval()


def read_model(folder: Path, kind: str) -> ModelCheckpoint:
    """A checkpoint of `kind` written by `save_model`; any other kind, a pickle or a missing file is refused."""
    from transformers import AutoTokenizer

    from ca_platform.models.preprocessing import PairPreprocessor

    preprocessing = read_json(folder, PREPROCESSING_FILE)
    if preprocessing.get("model") != kind:
        raise CheckpointError(f"{folder}: holds a {preprocessing.get('model')!r} model, not {kind!r}")
    weights = read_weights(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return ModelCheckpoint(
        folder=folder,
        version=content_version(folder),
        weights=weights,
        config=read_json(folder, CONFIG_FILE),
        preprocessor=PairPreprocessor.from_settings(preprocessing, tokenizer),
        metrics=read_json(folder, METRICS_FILE) if (folder / METRICS_FILE).is_file() else {},
    )


def save_transformers_model(
    root: Path, model: PreTrainedModel, preprocessor: PairPreprocessor, metrics: Mapping[str, Any], kind: str
) -> tuple[str, Path]:
    """`save_model` for a transformers model: its own config is the architecture document."""
    return save_model(root, model, kind=kind, config=model.config.to_dict(), preprocessor=preprocessor, metrics=metrics)


def load_transformers_model(
    folder: Path, kind: str, config_class: type[PretrainedConfig], model_class: type[PreTrainedModel]
) -> tuple[PreTrainedModel, ModelCheckpoint]:
    """A transformers model (eval mode, CPU) from a checkpoint of `kind`, and the checkpoint it came from."""
    checkpoint = read_model(folder, kind)
    model = model_class(config_class.from_dict(checkpoint.config))
    return checkpoint.load_into(model), checkpoint


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's safetensors weights, after refusing any pickle file beside them."""
    from safetensors.torch import load_file

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


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> set[str]:
    """Save the tokenizer into `folder` free of per-call state; returns the names of the files it wrote.

    The last call's truncation/padding state would be saved into tokenizer.json, and transformers records how
    a tokenizer was loaded in tokenizer_config.json: both would make the version depend on the tokenizer's
    history rather than on what it does, so a copy is saved without them.
    """
    canonical = copy.deepcopy(tokenizer)
    backend = getattr(canonical, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    written = {Path(f).name for f in canonical.save_pretrained(str(folder)) if Path(f).is_file()}
    settings_file = folder / TOKENIZER_CONFIG_FILE
    if settings_file.is_file():
        settings = json.loads(settings_file.read_text())
        kept = {key: value for key, value in settings.items() if key not in TOKENIZER_LOAD_KEYS}
        settings_file.write_text(json.dumps(kept, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return written


def _aliases(state_dict: Mapping[str, torch.Tensor]) -> set[str]:
    """Names of tensors that share memory with an earlier one: tied weights, e.g. a decoder tied to embeddings."""
    first: dict[tuple[Any, ...], str] = {}
    aliases = set()
    for name, tensor in state_dict.items():
        place = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if place in first:
            aliases.add(name)
        else:
            first[place] = name
    return aliases
