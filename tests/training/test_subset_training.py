"""Training CLIP and a BLIP captioner on webdataset tars under a budget: real tars of drawn shapes, tiny models."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw
from transformers import BlipConfig, BlipForConditionalGeneration, CLIPConfig, CLIPModel

from ca_platform.ingest.webdataset_io import SampleError
from ca_platform.models.blip import captioning_loss, generate_captions
from ca_platform.models.checkpoints import (
    METRICS_FILE,
    CheckpointError,
    content_version,
    load_transformers_model,
    save_transformers_model,
)
from ca_platform.models.clip import embed_pairs
from ca_platform.models.training import TrainedModel
from ca_platform.schemas import SYNTHETIC_CAPTION_META
from ca_platform.training.captioner import (
    TRAINED_CAPTIONER,
    load_trained_captioner,
    save_trained_captioner,
    train_blip_captioner_on_tars,
)
from ca_platform.training.clip import TRAINED_CLIP, load_trained_clip, save_trained_clip, train_clip_on_tars
from ca_platform.training.tars import TrainingBudget, mixed_captions, training_batches

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 220), "yellow": (240, 215, 40)}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 32
CLIP_BUDGET = TrainingBudget(samples_seen=960)  # twenty passes over the 48-sample tar
CAPTIONER_BUDGET = TrainingBudget(samples_seen=480)


def draw_shape(colour: str, shape: str, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128))
    radius = IMAGE_SIZE * 0.3
    x, y = IMAGE_SIZE / 2 + rng.uniform(-2, 2), IMAGE_SIZE / 2 + rng.uniform(-2, 2)
    box = (x - radius, y - radius, x + radius, y + radius)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=COLOURS[colour])
    return image


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_shapes_tar(path: Path, count: int, start: int = 0, numbered: bool = False) -> Path:
    """`count` samples cycling through every colour and shape, captioned "a <colour> <shape>".

    `numbered` appends each sample's index to its caption, so a caption names one sample.
    """
    rng = np.random.default_rng(start)
    with wds.TarWriter(str(path)) as writer:
        for index in range(start, start + count):
            colour, shape = list(COLOURS)[index % len(COLOURS)], SHAPES[(index // len(COLOURS)) % len(SHAPES)]
            writer.write(
                {
                    "__key__": f"{index:08d}",
                    "jpg": jpeg(draw_shape(colour, shape, rng)),
                    "txt": f"a {colour} {shape}" + (f" {index}" if numbered else ""),
                    "json": json.dumps({"uid": f"uid-{index}"}).encode(),
                }
            )
    return path


@pytest.fixture(scope="module")
def shapes_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_tar(tmp_path_factory.mktemp("shapes") / "00000.tar", 48)


@pytest.fixture(scope="module")
def trained_clip(shapes_tar: Path) -> TrainedModel:
    return train_clip_on_tars(
        [shapes_tar], CLIP_BUDGET, image_size=IMAGE_SIZE, batch_size=16, learning_rate=2e-3, seed=0, device="cpu"
    )


@pytest.fixture(scope="module")
def trained_captioner(shapes_tar: Path) -> TrainedModel:
    return train_blip_captioner_on_tars(
        [shapes_tar], CAPTIONER_BUDGET, image_size=IMAGE_SIZE, batch_size=8, learning_rate=5e-3, seed=0, device="cpu"
    )


def held_out_images() -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(1234)
    pairs = [(draw_shape(c, s, rng), f"a {c} {s}") for c in COLOURS for s in SHAPES]
    return [image for image, _ in pairs], [caption for _, caption in pairs]


def caption_of(image: Image.Image, caption: str) -> dict[str, str]:
    """A stand-in `prepare` that keeps only the caption, which names the sample in these tars."""
    return {"caption": caption}


def test_clip_loss_falls_and_matching_pairs_embed_closest(trained_clip: TrainedModel) -> None:
    metrics = trained_clip.metrics
    losses = metrics["loss"]
    assert metrics["steps"] == len(losses) == 60
    assert metrics["samples_seen"] == 960 and metrics["epochs_completed"] == pytest.approx(20.0)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])

    images, captions = held_out_images()
    image_embeddings, text_embeddings = embed_pairs(
        trained_clip.model, trained_clip.preprocessor, images, captions + ["a red circle"], batch_size=5, device="cpu"
    )
    assert image_embeddings.shape == (12, 64) and text_embeddings.shape == (13, 64)
    assert image_embeddings.dtype == torch.float32 == text_embeddings.dtype
    torch.testing.assert_close(image_embeddings.norm(dim=-1), torch.ones(12))
    torch.testing.assert_close(text_embeddings[0], text_embeddings[12])  # batching does not change an embedding
    similarity = image_embeddings @ text_embeddings[:12].T
    assert (similarity.argmax(dim=1) == torch.arange(12)).float().mean() >= 0.4  # chance is 1/12


def test_blip_captioner_loss_falls_and_captions_stop_at_sep(trained_captioner: TrainedModel) -> None:
    losses = trained_captioner.metrics["loss"]
    assert trained_captioner.metrics["samples_seen"] == 480
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])

    images, truths = held_out_images()
    captions = generate_captions(
        trained_captioner.model, trained_captioner.preprocessor, images, batch_size=5, max_new_tokens=12, device="cpu"
    )
    assert len(captions) == 12 and all(isinstance(caption, str) for caption in captions)
    # Generation ends at the [SEP] that ends every training caption instead of running on to max_new_tokens.
    assert all(re.fullmatch(r"a \w+ \w+", caption) for caption in captions), captions
    colours = [caption.split()[1] for caption in captions]
    assert sum(c == t.split()[1] for c, t in zip(colours, truths)) >= 8, captions  # colour is learnt (chance: 3 of 12)


def test_captioning_loss_is_blips_language_modelling_loss(trained_captioner: TrainedModel) -> None:
    model, preprocessor = trained_captioner.model, trained_captioner.preprocessor
    images, captions = held_out_images()
    longer = [caption + " on a gray background" * (index % 2) for index, caption in enumerate(captions)]
    batch = preprocessor.collate([preprocessor.prepare(image, caption) for image, caption in zip(images, longer)])
    assert (batch["attention_mask"] == 0).any()  # the short captions are padded
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        torch.testing.assert_close(captioning_loss(model, batch), model(**batch, labels=labels).loss)


def captions_of(batches: list[list[dict[str, str]]]) -> list[str]:
    return [sample["caption"] for batch in batches for sample in batch]


def test_samples_seen_budget_is_the_same_on_small_and_large_training_sets(tmp_path: Path) -> None:
    small = [write_shapes_tar(tmp_path / "small.tar", 12, numbered=True)]
    large = [write_shapes_tar(tmp_path / f"{i}.tar", 30, start=30 * i, numbered=True) for i in range(2)]
    budget = TrainingBudget(samples_seen=100)

    for tars, per_epoch in ((small, 12), (large, 60)):
        total = budget.total_samples(per_epoch)
        batches = list(training_batches(tars, caption_of, per_epoch, total, batch_size=8, seed=0))
        assert sum(len(batch) for batch in batches) == 100
        assert all(len(set(captions_of([batch]))) == len(batch) >= 2 for batch in batches)  # no sample twice
        seen = Counter(captions_of(batches))
        assert len(seen) == per_epoch  # every sample is seen, the small set about 8 times, the large one 1-2 times
        assert max(seen.values()) - min(seen.values()) <= 1

    trained = train_clip_on_tars(small, budget, image_size=IMAGE_SIZE, batch_size=8, seed=0, device="cpu")
    metrics = trained.metrics
    assert metrics["samples_seen"] == 100 and metrics["pairs_per_epoch"] == 12
    assert metrics["epochs_completed"] == pytest.approx(100 / 12)
    assert metrics["budget"] == {"samples_seen": 100, "epochs": None}
    assert metrics["steps"] == len(metrics["loss"]) == 8 * 2 + 1  # 8 + 4 per epoch, then the last 4


def test_epochs_budget_passes_over_every_sample_once_per_epoch_in_a_seeded_order(tmp_path: Path) -> None:
    tars = [write_shapes_tar(tmp_path / "a.tar", 10, numbered=True)]
    tars.append(write_shapes_tar(tmp_path / "b.tar", 7, start=10, numbered=True))
    budget = TrainingBudget(epochs=3)
    total = budget.total_samples(17)

    def batches(seed: int) -> list[list[dict[str, str]]]:
        return list(training_batches(tars, caption_of, 17, total, batch_size=4, seed=seed, shuffle_buffer=5))

    first = batches(seed=3)
    assert total == 51
    assert [len(batch) for batch in first] == [4, 4, 4, 5] * 3  # a lone last sample joins the batch before it
    order = captions_of(first)
    in_tar_order = [f"a {list(COLOURS)[i % 4]} {SHAPES[(i // 4) % 3]} {i}" for i in range(17)]
    for epoch in range(3):
        assert sorted(order[17 * epoch : 17 * (epoch + 1)]) == sorted(in_tar_order)
    assert order[:17] != in_tar_order and order[:17] != order[17:34]  # shuffled, afresh each epoch
    assert captions_of(batches(seed=3)) == order
    assert captions_of(batches(seed=4)) != order

    trained = train_blip_captioner_on_tars(tars, budget, image_size=IMAGE_SIZE, batch_size=4, seed=0, device="cpu")
    metrics = trained.metrics
    assert metrics["epochs_completed"] == pytest.approx(3.0)
    assert metrics["samples_seen"] == 51 and metrics["steps"] == 12
    assert metrics["budget"] == {"samples_seen": None, "epochs": 3}


def test_recap_mix_draws_the_synthetic_caption_at_rate_p_reproducibly(tmp_path: Path) -> None:
    tar = tmp_path / "mix.tar"
    with wds.TarWriter(str(tar)) as writer:
        for index in range(50):
            meta = {"uid": f"uid-{index}", SYNTHETIC_CAPTION_META: f"synthetic {index}"}
            writer.write(
                {
                    "__key__": f"{index:08d}",
                    "jpg": jpeg(Image.new("RGB", (8, 8))),
                    "txt": f"raw {index}",
                    "json": json.dumps(meta).encode(),
                }
            )

    def drawn(probability: float, seed: int) -> list[str]:
        batches = training_batches(
            [tar], caption_of, 50, 2000, batch_size=10, seed=seed, caption_of=mixed_captions(probability, seed)
        )
        return captions_of(list(batches))

    for p in (0.8, 0.3):
        captions = drawn(p, seed=0)
        synthetic = sum(caption.startswith("synthetic") for caption in captions)
        # 2,000 draws: within four standard deviations of the binomial mean
        assert abs(synthetic - p * 2000) <= 4 * (2000 * p * (1 - p)) ** 0.5
        assert all(c.split()[1] == o.split()[1] for c, o in zip(captions, drawn(0.0, seed=0)))  # same image order
    assert drawn(0.8, seed=0) == drawn(0.8, seed=0) and drawn(0.8, seed=1) != drawn(0.8, seed=0)
    assert set(drawn(1.0, seed=0)) == {f"synthetic {i}" for i in range(50)}


def test_budget_sets_exactly_one_positive_limit() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TrainingBudget(samples_seen=10, epochs=2)
    with pytest.raises(ValueError, match="exactly one"):
        TrainingBudget()
    with pytest.raises(ValueError, match="positive"):
        TrainingBudget(epochs=0)


def test_same_seed_gives_the_same_checkpoint_version(shapes_tar: Path, tmp_path: Path) -> None:
    def version(seed: int, root: str) -> str:
        trained = train_clip_on_tars(
            [shapes_tar], TrainingBudget(samples_seen=64), image_size=IMAGE_SIZE, batch_size=16, seed=seed, device="cpu"
        )
        return save_trained_clip(trained, tmp_path / root)[0]

    assert version(0, "a") == version(0, "b")
    assert version(1, "c") != version(0, "a")


def test_clip_round_trip_gives_identical_embeddings_and_version(trained_clip: TrainedModel, tmp_path: Path) -> None:
    version, folder = save_trained_clip(trained_clip, tmp_path / "clips")
    assert folder == tmp_path / "clips" / version and version == content_version(folder)
    saved_metrics = json.loads((folder / METRICS_FILE).read_text())
    assert saved_metrics["loss"] == trained_clip.metrics["loss"] and saved_metrics["samples_seen"] == 960
    assert "seconds" not in saved_metrics and trained_clip.metrics["seconds"] > 0

    model, preprocessor = load_trained_clip(folder, device="cpu")
    images, captions = held_out_images()
    before = embed_pairs(trained_clip.model, trained_clip.preprocessor, images, captions, device="cpu")
    after = embed_pairs(model, preprocessor, images, captions, device="cpu")
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])

    reloaded, checkpoint = load_transformers_model(folder, TRAINED_CLIP, CLIPConfig, CLIPModel)
    resaved, _ = save_transformers_model(
        tmp_path / "again", reloaded, checkpoint.preprocessor, checkpoint.metrics, TRAINED_CLIP
    )
    assert resaved == version


def test_captioner_round_trip_keeps_tied_weights_and_captions(trained_captioner: TrainedModel, tmp_path: Path) -> None:
    version, folder = save_trained_captioner(trained_captioner, tmp_path / "captioners")
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))

    model, preprocessor = load_trained_captioner(folder, device="cpu")
    decoder = model.text_decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    for name, tensor in trained_captioner.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    images, _ = held_out_images()
    assert generate_captions(model, preprocessor, images, device="cpu") == generate_captions(
        trained_captioner.model, trained_captioner.preprocessor, images, device="cpu"
    )

    with pytest.raises(CheckpointError, match="blip_captioner"):
        load_trained_clip(folder)
    reloaded, checkpoint = load_transformers_model(folder, TRAINED_CAPTIONER, BlipConfig, BlipForConditionalGeneration)
    resaved, _ = save_transformers_model(
        tmp_path / "again", reloaded, checkpoint.preprocessor, checkpoint.metrics, TRAINED_CAPTIONER
    )
    assert resaved == version


def test_fewer_than_two_pairs_is_a_clear_error_naming_the_tars(tmp_path: Path) -> None:
    lonely = write_shapes_tar(tmp_path / "lonely.tar", 1)
    with pytest.raises(ValueError, match=r"at least 2 pairs.*lonely\.tar.*hold 1"):
        train_clip_on_tars([lonely], TrainingBudget(epochs=1), image_size=IMAGE_SIZE, device="cpu")
    with pytest.raises(ValueError, match="at least 2 pairs.*hold 0"):
        train_blip_captioner_on_tars([], TrainingBudget(samples_seen=10), image_size=IMAGE_SIZE, device="cpu")


def test_an_image_that_does_not_decode_names_its_tar_and_key(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tar"
    with wds.TarWriter(str(broken)) as writer:
        for index, image in enumerate((jpeg(Image.new("RGB", (8, 8))), b"<html>not an image</html>")):
            writer.write({"__key__": f"k{index}", "jpg": image, "txt": "a caption", "json": b'{"uid": "u"}'})
    with pytest.raises(SampleError, match=r"broken\.tar: sample 'k1'"):
        list(training_batches([broken], caption_of, 2, 2, batch_size=2, seed=0))
