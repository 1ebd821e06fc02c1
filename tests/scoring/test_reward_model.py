"""Reward model: learns a planted caption preference, refuses collapse, checkpoints by content, scores pairs."""

from __future__ import annotations

import copy
import json
import math
import pickle
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import BertModel, BlipConfig, BlipForImageTextRetrieval, BlipModel

from ca_platform.models.checkpoints import CheckpointError, content_version
from ca_platform.models.images import ImageTransform
from ca_platform.models.tokenization import bert_tokenizer, minilm_folder
from ca_platform.preferences.pairs import PreferenceItem, PreferencePair
from ca_platform.scoring.reward.model import RewardModelSpec, build_reward_model
from ca_platform.scoring.reward.scorer import (
    RewardScorer,
    load_reward_model,
    register_reward_model,
    save_reward_model,
)
from ca_platform.scoring.reward.train import (
    RewardCollapseError,
    TrainConfig,
    TrainedRewardModel,
    pairwise_loss,
    train_reward_model,
)

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 50, 220), "yellow": (230, 220, 40)}
TRAIN_SHADES = (-25, -15, -5, 5, 15, 25)
HELDOUT_SHADES = (-20, 20)  # shades never trained on
PLANTED = TrainConfig(epochs=15, learning_rate=1e-3, images_per_batch=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on 2 shared cores: a second OpenMP thread mostly waits at barriers, and under load a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def colour_items(folder: Path, shades: tuple[int, ...], seed: int) -> list[PreferenceItem]:
    """Solid squares; the caption naming the square's colour beats captions naming another colour or nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    items = []
    for colour, rgb in COLOURS.items():
        for shade in shades:
            path = folder / f"{colour}_{shade}.png"
            Image.new("RGB", (48, 48), tuple(min(255, max(0, v + shade)) for v in rgb)).save(path)
            wrong = rng.sample([other for other in COLOURS if other != colour], 2)
            captions = (f"a {colour} square", f"a {wrong[0]} square", f"a {wrong[1]} square", "an image")
            items.append(PreferenceItem(str(path), captions, (1, 2, 2, 2), len(items) + 1))
    return items


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[PreferenceItem], list[PreferenceItem]]:
    root = tmp_path_factory.mktemp("colours")
    return colour_items(root / "train", TRAIN_SHADES, 0), colour_items(root / "heldout", HELDOUT_SHADES, 1)


@pytest.fixture(scope="module")
def trained(planted: tuple[list[PreferenceItem], list[PreferenceItem]]) -> TrainedRewardModel:
    train, heldout = planted
    return train_reward_model(train, heldout, RewardModelSpec(), PLANTED)


@pytest.fixture(scope="module")
def saved(trained: TrainedRewardModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return save_reward_model(trained, tmp_path_factory.mktemp("checkpoints"))


def model_rewards(model: torch.nn.Module, image: Image.Image, captions: list[str], image_size: int) -> torch.Tensor:
    """Rewards straight from a model's forward, on the model's device, float32 on the CPU."""
    device = next(model.parameters()).device
    encoded = bert_tokenizer()(captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        rewards = model(
            ImageTransform(image_size)(image)[None].to(device),
            encoded["input_ids"].to(device),
            encoded["attention_mask"].to(device),
            torch.zeros(len(captions), dtype=torch.long, device=device),
        )
    return rewards.float().cpu()


def test_bert_tokenizer_is_uncased_bert_wordpiece() -> None:
    tokenizer = bert_tokenizer()
    assert len(tokenizer) == 30522
    assert tokenizer("A Red Square")["input_ids"] == [101, 1037, 2417, 2675, 102]


def test_learns_planted_preference_on_unseen_images(
    trained: TrainedRewardModel, planted: tuple[list[PreferenceItem], list[PreferenceItem]]
) -> None:
    metrics = trained.metrics
    _, heldout = planted
    # Text alone cannot beat 2/3 here: "an image" can be learnt as worst, but which colour is right needs the image.
    assert metrics["heldout_accuracy"] >= 0.85, metrics
    assert metrics["heldout_pairs"] == 3 * len(heldout) == 24
    assert metrics["train_pairs"] == 3 * len(TRAIN_SHADES) * len(COLOURS)
    assert metrics["loss_first"] == pytest.approx(math.log(2), abs=0.01)
    assert metrics["loss_last"] < metrics["loss_first"] - 0.3
    assert len(metrics["loss_curve"]) == metrics["epochs"] == PLANTED.epochs
    assert metrics["reward_std"] > 0.1 and math.isfinite(metrics["reward_mean"])
    assert metrics["normalization_source"] == "heldout"
    assert not trained.model.training


def test_zero_learning_rate_collapses_to_constant_reward(
    planted: tuple[list[PreferenceItem], list[PreferenceItem]],
) -> None:
    train, heldout = planted
    with pytest.raises(RewardCollapseError, match="constant") as caught:
        train_reward_model(train[:8], heldout, RewardModelSpec(), replace(PLANTED, epochs=2, learning_rate=0.0))
    assert caught.value.metrics["reward_std"] == 0.0
    assert caught.value.metrics["heldout_accuracy"] == 0.5


def test_rankings_without_signal_collapse_at_ln2(planted: tuple[list[PreferenceItem], list[PreferenceItem]]) -> None:
    """Every image ranked once each way: the pairs cancel, the best the model can do is equal rewards."""
    train, heldout = planted
    contradictory = [variant for item in train[:12] for variant in (item, replace(item, ranking=(2, 1, 1, 1)))]
    with pytest.raises(RewardCollapseError, match="ln 2") as caught:
        train_reward_model(contradictory, heldout, RewardModelSpec(), replace(PLANTED, epochs=6))
    assert caught.value.metrics["loss_last"] == pytest.approx(math.log(2), abs=0.01)


def test_pairwise_loss_hand_computed() -> None:
    ln2 = math.log(2)
    equal = torch.zeros(3)
    assert pairwise_loss(equal, [PreferencePair(0, 1, 1.0), PreferencePair(2, 1, 0.5)]).item() == pytest.approx(ln2)
    rewards = torch.tensor([2.0, 0.0, 1.0])
    assert pairwise_loss(rewards, [PreferencePair(0, 1, 1.0)]).item() == pytest.approx(math.log1p(math.exp(-2)))
    assert pairwise_loss(rewards, [PreferencePair(1, 0, 1.0)]).item() == pytest.approx(math.log1p(math.exp(2)))
    soft = 0.5 * math.log1p(math.exp(-2)) + 0.5 * math.log1p(math.exp(2))
    assert pairwise_loss(rewards, [PreferencePair(0, 1, 0.5)]).item() == pytest.approx(soft)
    mean = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2
    assert pairwise_loss(rewards, [PreferencePair(0, 1, 1.0), PreferencePair(2, 1, 1.0)]).item() == pytest.approx(mean)
    with pytest.raises(ValueError):
        pairwise_loss(rewards, [])


def test_training_is_reproducible_and_soft_ties_become_pairs(
    planted: tuple[list[PreferenceItem], list[PreferenceItem]],
) -> None:
    train, _ = planted
    config = replace(PLANTED, epochs=3, tie_policy="soft")
    first = train_reward_model(train[:8], [], RewardModelSpec(), config)
    second = train_reward_model(train[:8], [], RewardModelSpec(), config)
    assert first.metrics["train_pairs"] == 8 * 6  # 3 ordered pairs + 3 tied ones per image
    assert first.metrics["heldout_accuracy"] is None and first.metrics["normalization_source"] == "train"
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name


def test_checkpoint_round_trip(
    trained: TrainedRewardModel, saved: tuple[str, Path], planted: tuple[list[PreferenceItem], list[PreferenceItem]]
) -> None:
    version, folder = saved
    assert folder.name == version == content_version(folder)
    assert {"model.safetensors", "config.json", "normalization.json", "metrics.json", "tokenizer.json"} <= {
        path.name for path in folder.iterdir()
    }
    config = json.loads((folder / "config.json").read_text())
    assert config["spec"] == asdict(RewardModelSpec())
    assert config["vision_config"]["hidden_size"] == 64 and config["text_config"]["is_decoder"] is True

    loaded = load_reward_model(folder, device=next(trained.model.parameters()).device)
    assert not loaded.model.training
    assert loaded.version == version and loaded.spec == trained.spec
    assert (loaded.mean, loaded.std) == (trained.metrics["reward_mean"], trained.metrics["reward_std"])
    assert loaded.metrics["heldout_accuracy"] == trained.metrics["heldout_accuracy"]
    _, heldout = planted
    with Image.open(heldout[0].image) as image:
        expected = model_rewards(trained.model, image, list(heldout[0].captions), 64)
        actual = model_rewards(loaded.model, image, list(heldout[0].captions), 64)
    assert torch.equal(expected, actual)
    assert loaded.tokenizer("A Red Square")["input_ids"] == [101, 1037, 2417, 2675, 102]


def test_version_stable_for_identical_content_and_changes_with_weights(
    trained: TrainedRewardModel, saved: tuple[str, Path]
) -> None:
    version, folder = saved
    assert save_reward_model(trained, folder.parent) == (version, folder)
    changed = replace(trained, model=copy.deepcopy(trained.model))
    with torch.no_grad():
        changed.model.head[-1].bias += 1e-3
    new_version, new_folder = save_reward_model(changed, folder.parent)
    assert new_version != version and new_folder.is_dir() and folder.is_dir()


def test_pickle_files_refused(saved: tuple[str, Path], tmp_path: Path) -> None:
    _, folder = saved
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    (tampered / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(CheckpointError, match="pickle"):
        load_reward_model(tampered)
    with pytest.raises(CheckpointError, match="pickle"):
        register_reward_model(tampered, tmp_path / "registry")
    assert not (tmp_path / "registry").exists()


def test_register_copies_a_loadable_folder_as_its_version(saved: tuple[str, Path], tmp_path: Path) -> None:
    version, folder = saved
    registry = tmp_path / "registry"
    assert register_reward_model(folder, registry) == (version, registry / version)
    assert load_reward_model(registry / version, device="cpu").version == version

    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    metrics = json.loads((edited / "metrics.json").read_text())
    (edited / "metrics.json").write_text(json.dumps({**metrics, "note": "retrained elsewhere"}))
    new_version, new_folder = register_reward_model(edited, registry)
    assert new_version != version and new_folder == registry / new_version
    assert sorted(path.name for path in registry.iterdir()) == sorted([version, new_version])

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        register_reward_model(broken, registry)
    assert len(list(registry.iterdir())) == 2


def test_scorer(saved: tuple[str, Path], planted: tuple[list[PreferenceItem], list[PreferenceItem]]) -> None:
    version, folder = saved
    scorer = RewardScorer(load_reward_model(folder))
    assert (scorer.name, scorer.version) == ("reward_model", version)

    payload = pickle.dumps(scorer.prepare)
    assert b"RewardModel" not in payload  # the model stays in the main process
    preparer = pickle.loads(payload)

    _, heldout = planted
    item = heldout[0]
    with Image.open(item.image) as image:
        image.load()
    samples = [preparer(image, caption) for caption in item.captions]
    assert samples[0]["pixel_values"].shape == (3, 64, 64)
    assert samples[0]["input_ids"].shape == samples[0]["attention_mask"].shape
    assert samples[0]["input_ids"].numel() <= 40  # truncated at the spec's max_text_length
    assert torch.equal(samples[1]["input_ids"], scorer.prepare(image, item.captions[1])["input_ids"])

    batch_scores = scorer.score_batch(scorer.collate(samples))
    assert batch_scores.shape == (4,) and batch_scores.dtype == torch.float32 and batch_scores.device.type == "cpu"
    caption_scores = scorer.score_captions(image, list(item.captions))
    tolerance = 1e-4 if scorer.loaded.device.type == "cpu" else 5e-2  # bf16 on CUDA
    assert caption_scores == pytest.approx(batch_scores.tolist(), abs=tolerance)
    assert max(range(4), key=caption_scores.__getitem__) == 0  # the caption naming the right colour


def tiny_blip_config() -> BlipConfig:
    text = {
        "vocab_size": 30522,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "bos_token_id": None,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 16,
    }
    return BlipConfig(text_config=text, vision_config=vision)


@pytest.mark.parametrize("blip_class", [BlipForImageTextRetrieval, BlipModel])
def test_local_pretrained_blip_backbone(
    blip_class: type, tmp_path: Path, planted: tuple[list[PreferenceItem], list[PreferenceItem]]
) -> None:
    torch.manual_seed(1)
    pretrained = blip_class(tiny_blip_config())
    text = pretrained.text_encoder if blip_class is BlipForImageTextRetrieval else pretrained.text_model
    backbone = tmp_path / "blip"
    pretrained.save_pretrained(backbone)
    spec = RewardModelSpec(backbone=str(backbone), freeze_fraction=0.5)

    model = build_reward_model(spec, bert_tokenizer())
    assert torch.equal(
        model.vision.encoder.layers[1].mlp.fc1.weight, pretrained.vision_model.encoder.layers[1].mlp.fc1.weight
    )
    cross = model.text.encoder.layer[1].crossattention.self.key.weight
    assert torch.equal(cross, text.encoder.layer[1].crossattention.self.key.weight)
    assert model.text.pooler is None
    with pytest.raises(ValueError, match="takes 64px images, the spec says 128"):
        build_reward_model(replace(spec, image_size=128), bert_tokenizer())

    train, _ = planted
    result = train_reward_model(train, [], spec, replace(PLANTED, epochs=3))
    trained_state = {name: tensor.cpu() for name, tensor in result.model.state_dict().items()}
    # freeze_fraction 0.5 of 2 layers: embeddings and layer 0 keep their pretrained weights, layer 1 learns.
    assert torch.equal(
        trained_state["text.encoder.layer.0.attention.self.query.weight"],
        text.encoder.layer[0].attention.self.query.weight,
    )
    assert torch.equal(
        trained_state["vision.embeddings.patch_embedding.weight"],
        pretrained.vision_model.embeddings.patch_embedding.weight,
    )
    assert not torch.equal(
        trained_state["text.encoder.layer.1.attention.self.query.weight"],
        text.encoder.layer[1].attention.self.query.weight,
    )

    _, folder = save_reward_model(result, tmp_path / "checkpoints")
    shutil.rmtree(backbone)  # the checkpoint alone rebuilds the architecture
    loaded = load_reward_model(folder, device="cpu")
    assert loaded.model.text.config.hidden_size == 32
    with Image.open(train[0].image) as image:
        assert torch.allclose(
            model_rewards(result.model.cpu(), image, list(train[0].captions), 64),
            model_rewards(loaded.model, image, list(train[0].captions), 64),
        )


def test_freeze_fraction_freezes_embeddings_and_first_layers() -> None:
    model = build_reward_model(RewardModelSpec(freeze_fraction=0.5), bert_tokenizer())
    frozen_prefixes = ("vision.embeddings.", "vision.encoder.layers.0.", "text.embeddings.", "text.encoder.layer.0.")
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (not name.startswith(frozen_prefixes)), name
    everything = build_reward_model(RewardModelSpec(freeze_fraction=1.0), bert_tokenizer())
    trainable = {
        name.split(".")[0] + "." + name.split(".")[1] for name, p in everything.named_parameters() if p.requires_grad
    }
    assert trainable == {"vision.post_layernorm", "head.0", "head.2"}
    assert all(p.requires_grad for p in build_reward_model(RewardModelSpec(), bert_tokenizer()).parameters())


def test_minilm_text_init_reproduces_minilm_without_the_image() -> None:
    torch.manual_seed(0)
    model = build_reward_model(RewardModelSpec(text_init="minilm"), bert_tokenizer()).eval()
    assert (model.text.config.hidden_size, model.text.config.num_hidden_layers) == (384, 6)
    minilm = BertModel.from_pretrained(minilm_folder(), local_files_only=True).eval()
    encoded = bert_tokenizer()(["a red square on a table", "an image"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        ours = model.text(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
        reference = minilm(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
    mask = encoded["attention_mask"].bool()
    assert torch.allclose(ours[mask], reference[mask], atol=1e-4)
    with pytest.raises(ValueError, match="tiny"):
        RewardModelSpec(backbone="/some/blip", text_init="minilm")
