"""A model is trained once per recipe: the current version is kept while its recipe is unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ca_platform import layout
from ca_platform.schemas import CLIP_SCORE
from ca_platform.scoring.registry import current_model, recipe_hash, train_once
from ca_platform.storage import LocalStore


def test_a_recipe_is_trained_once_and_a_new_recipe_again(tmp_path: Path) -> None:
    store, scratch = LocalStore(tmp_path / "data"), tmp_path / "scratch"
    trainings: list[str] = []

    def train_and_save() -> tuple[str, Path, dict[str, Any]]:
        version = f"v{len(trainings)}"
        trainings.append(version)
        folder = tmp_path / "checkpoints" / version
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(version.encode())
        return version, folder, {"metrics": {"loss": [1.0, 0.5]}}

    first, trained = train_once(store, CLIP_SCORE, "recipe-a", train_and_save, scratch)
    assert trained and trainings == ["v0"]
    assert first == {"version": "v0", "recipe": "recipe-a", "metrics": {"loss": [1.0, 0.5]}}
    assert current_model(store, CLIP_SCORE, scratch) == first
    assert store.exists(f"{layout.model_prefix(CLIP_SCORE, 'v0')}/model.safetensors")

    again, trained = train_once(store, CLIP_SCORE, "recipe-a", train_and_save, scratch)
    assert (again, trained, trainings) == (first, False, ["v0"])

    other, trained = train_once(store, CLIP_SCORE, "recipe-b", train_and_save, scratch)
    assert trained and trainings == ["v0", "v1"] and other["version"] == "v1"
    assert json.loads((tmp_path / "data" / layout.current_model_key(CLIP_SCORE)).read_text())["recipe"] == "recipe-b"


def test_recipe_hash_ignores_key_order_but_not_values() -> None:
    assert recipe_hash({"a": 1, "b": [2, 3]}) == recipe_hash({"b": [2, 3], "a": 1})
    assert recipe_hash({"a": 1, "b": [2, 3]}) != recipe_hash({"a": 1, "b": [3, 2]})
    assert len(recipe_hash(["fingerprint", {"epochs": 1}])) == 16
