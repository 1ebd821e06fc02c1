"""The one checkpoint format: what a folder holds, what its version depends on, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration, CLIPConfig, CLIPModel

from ca_platform.models.blip import build_blip_captioner
from ca_platform.models.checkpoints import (
    CheckpointError,
    load_transformers_model,
    read_model,
    save_transformers_model,
)
from ca_platform.models.clip import build_clip


@pytest.fixture(scope="module")
def tiny_clip() -> tuple[CLIPModel, object]:
    torch.manual_seed(0)
    return build_clip("tiny", image_size=32)


def test_a_checkpoint_holds_weights_config_preprocessing_tokenizer_and_metrics(tiny_clip, tmp_path: Path) -> None:
    model, preprocessor = tiny_clip
    version, folder = save_transformers_model(tmp_path, model, preprocessor, {"loss": [1.0], "seconds": 3.2}, "clip")
    assert folder.name == version
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "config.json",
        "metrics.json",
        "model.safetensors",
        "preprocessing.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((folder / "metrics.json").read_text()) == {"loss": [1.0]}  # wall-clock figures left out
    preprocessing = json.loads((folder / "preprocessing.json").read_text())
    assert preprocessing["model"] == "clip" and preprocessing["image_size"] == 32
    checkpoint = read_model(folder, "clip")
    assert checkpoint.version == version and checkpoint.metrics == {"loss": [1.0]}
    assert checkpoint.preprocessor.settings() == preprocessor.settings()


def test_the_version_depends_on_content_not_on_run_time_or_tokenizer_use(tiny_clip, tmp_path: Path) -> None:
    model, preprocessor = tiny_clip
    first, _ = save_transformers_model(tmp_path / "a", model, preprocessor, {"seconds": 1.0}, "clip")
    preprocessor.tokenizer("a long caption " * 50, truncation=True, max_length=8, padding="max_length")
    second, _ = save_transformers_model(tmp_path / "b", model, preprocessor, {"seconds": 9.0}, "clip")
    assert first == second
    third, _ = save_transformers_model(tmp_path / "c", model, preprocessor, {"loss": [0.5]}, "clip")
    assert third != first


def test_another_kind_and_pickle_files_are_refused(tiny_clip, tmp_path: Path) -> None:
    model, preprocessor = tiny_clip
    _, folder = save_transformers_model(tmp_path, model, preprocessor, {}, "clip")
    with pytest.raises(CheckpointError, match="holds a 'clip' model, not 'blip_captioner'"):
        read_model(folder, "blip_captioner")
    (folder / "extra.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match=r"refusing pickle files \['extra.bin'\]"):
        load_transformers_model(folder, "clip", CLIPConfig, CLIPModel)


def test_tied_weights_are_stored_once_and_tied_again_on_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, preprocessor = build_blip_captioner("tiny", image_size=32)
    _, folder = save_transformers_model(tmp_path, model, preprocessor, {}, "captioner")
    loaded, _ = load_transformers_model(folder, "captioner", BlipConfig, BlipForConditionalGeneration)
    decoder = loaded.text_decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
