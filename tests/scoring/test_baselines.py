"""The CLIP-score and BLIP-ITM baselines: tiny models learn, save and load as versions, and score pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ca_platform.models.blip import build_blip_itm
from ca_platform.models.checkpoints import CheckpointError, read_model
from ca_platform.models.clip import build_clip
from ca_platform.models.training import TrainedModel
from ca_platform.schemas import CLIP_SCORE
from ca_platform.scoring.blip_itm import BlipItmScorer, load_blip_itm, save_blip_itm, train_blip_itm
from ca_platform.scoring.clip_score import ClipScorer, load_clip, save_clip, train_clip
from ca_platform.scoring.streaming import score_pairs

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
IMAGES = [Image.new("RGB", (40, 36), rgb) for rgb in COLOURS.values()]
CAPTIONS = [f"a {name} square" for name in COLOURS]
MISMATCHED = CAPTIONS[1:] + CAPTIONS[:1]
PAIRS = list(zip(IMAGES, CAPTIONS)) * 4


def falls(losses: list[float]) -> bool:
    return float(np.mean(losses[-4:])) < 0.8 * float(np.mean(losses[:4]))


@pytest.fixture(scope="module")
def trained_clip() -> TrainedModel:
    return train_clip(PAIRS, image_size=32, epochs=12, batch_size=8, learning_rate=2e-3, seed=0, device="cpu")


@pytest.fixture(scope="module")
def trained_blip() -> TrainedModel:
    return train_blip_itm(PAIRS, image_size=32, epochs=20, batch_size=8, learning_rate=2e-3, seed=0, device="cpu")


def test_clip_loss_falls_and_matching_pairs_score_higher(trained_clip: TrainedModel, tmp_path: Path) -> None:
    assert trained_clip.metrics["steps"] == 24 and len(trained_clip.metrics["loss"]) == 24
    assert falls(trained_clip.metrics["loss"]), trained_clip.metrics["loss"]
    _, folder = save_clip(trained_clip, tmp_path)
    scorer = load_clip(folder, device="cpu")
    matched = score_pairs(IMAGES, CAPTIONS, scorer)
    mismatched = score_pairs(IMAGES, MISMATCHED, scorer)
    assert matched.mean() > mismatched.mean() + 0.1, (matched, mismatched)
    assert np.all(np.abs(matched) <= 1.0 + 1e-6)


def test_clip_round_trip_keeps_scores_and_version(trained_clip: TrainedModel, tmp_path: Path) -> None:
    version, folder = save_clip(trained_clip, tmp_path / "a")
    assert folder == tmp_path / "a" / version
    assert save_clip(trained_clip, tmp_path / "a") == (version, folder)
    loaded = load_clip(folder, device="cpu")
    assert loaded.name == "clip_score" and loaded.version == version
    in_memory = ClipScorer(trained_clip.model, trained_clip.preprocessor, version, device="cpu")
    np.testing.assert_array_equal(score_pairs(IMAGES, CAPTIONS, loaded), score_pairs(IMAGES, CAPTIONS, in_memory))
    metrics = read_model(folder, CLIP_SCORE).metrics  # the training metrics are part of the checkpoint
    resaved, _ = save_clip(TrainedModel(loaded.model, loaded.preprocessor, metrics), tmp_path / "b")
    assert resaved == version


def test_blip_itm_learns_and_scores_probabilities(trained_blip: TrainedModel, tmp_path: Path) -> None:
    assert falls(trained_blip.metrics["loss"]), trained_blip.metrics["loss"]
    version, folder = save_blip_itm(trained_blip, tmp_path)
    scorer = load_blip_itm(folder, device="cpu")
    assert scorer.name == "blip_score" and scorer.version == version
    matched = score_pairs(IMAGES, CAPTIONS, scorer)
    mismatched = score_pairs(IMAGES, MISMATCHED, scorer)
    assert np.all((matched >= 0) & (matched <= 1)) and np.all((mismatched >= 0) & (mismatched <= 1))
    assert matched.mean() > mismatched.mean(), (matched, mismatched)
    in_memory = BlipItmScorer(trained_blip.model, trained_blip.preprocessor, version, device="cpu")
    np.testing.assert_array_equal(matched, score_pairs(IMAGES, CAPTIONS, in_memory))


def test_both_scorers_score_the_same_pairs(
    trained_clip: TrainedModel, trained_blip: TrainedModel, tmp_path: Path
) -> None:
    scorers = [load_clip(save_clip(trained_clip, tmp_path)[1]), load_blip_itm(save_blip_itm(trained_blip, tmp_path)[1])]
    images, captions = IMAGES + IMAGES, CAPTIONS + MISMATCHED
    scores = {scorer.name: score_pairs(images, captions, scorer, batch_size=3) for scorer in scorers}
    assert set(scores) == {"clip_score", "blip_score"}
    assert all(s.shape == (8,) and s.dtype == np.float64 and np.isfinite(s).all() for s in scores.values())


def test_a_checkpoint_loads_only_as_its_own_kind(trained_clip: TrainedModel, tmp_path: Path) -> None:
    _, folder = save_clip(trained_clip, tmp_path)
    with pytest.raises(CheckpointError, match="holds a 'clip_score' model, not 'blip_score'"):
        load_blip_itm(folder)


def test_local_pretrained_clip_dir_loads(tmp_path: Path) -> None:
    """A user's CLIP saved with save_pretrained (model and tokenizer) scores like the model it came from."""
    model, preprocessor = build_clip("tiny", image_size=32)
    model.save_pretrained(tmp_path / "my-clip")
    preprocessor.tokenizer.save_pretrained(tmp_path / "my-clip")
    scorer = ClipScorer.from_pretrained_dir(tmp_path / "my-clip", device="cpu")
    assert scorer.preprocessor.transform.size == 32
    assert scorer.preprocessor.max_length == model.config.text_config.max_position_embeddings
    assert len(scorer.version) == 16
    original = ClipScorer(model, preprocessor, scorer.version, device="cpu")
    np.testing.assert_allclose(
        score_pairs(IMAGES, CAPTIONS, scorer), score_pairs(IMAGES, CAPTIONS, original), rtol=1e-6, atol=1e-6
    )


def test_local_pretrained_blip_dir_loads(tmp_path: Path) -> None:
    model, preprocessor = build_blip_itm("tiny", image_size=32)
    model.save_pretrained(tmp_path / "my-blip")
    preprocessor.tokenizer.save_pretrained(tmp_path / "my-blip")
    scorer = BlipItmScorer.from_pretrained_dir(tmp_path / "my-blip", device="cpu")
    original = BlipItmScorer(model, preprocessor, scorer.version, device="cpu")
    np.testing.assert_allclose(
        score_pairs(IMAGES, CAPTIONS, scorer), score_pairs(IMAGES, CAPTIONS, original), rtol=1e-6, atol=1e-6
    )


def test_hub_names_are_refused() -> None:
    with pytest.raises(ValueError, match="neither 'tiny' nor a local folder"):
        build_clip("openai/clip-vit-base-patch32")
