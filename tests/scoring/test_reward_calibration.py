"""Cross-image calibration of the reward: planted per-image offsets survive the pairwise loss and mislead a cut
across images; the calibrated recipe removes them and keeps the good pairs. Cross-image accuracy by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ca_platform.compression.threshold import keep_count
from ca_platform.preferences.pairs import PreferenceItem, PreferencePair, cross_image_accuracy, preference_pairs
from ca_platform.scoring.reward.train import (
    TrainConfig,
    calibration_loss,
    cross_image_pairs,
    image_mean_anchor,
    offset_spread,
    pairwise_loss,
)

CAPTIONS = ("a red square in the center", "a red shape", "IMG_0042.jpg")  # ranked 1, 2, 3 on every image
IMAGES = 12
PLANTED_OFFSET = 10.0  # images 0-5: what a backbone might happen to like, unrelated to any caption


class OffsetModel(torch.nn.Module):
    """reward(image, caption) = quality(caption) + offset(image): exactly the freedom the pairwise loss leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.quality = torch.nn.Parameter(torch.zeros(len(CAPTIONS)))
        planted = [PLANTED_OFFSET if image < IMAGES // 2 else 0.0 for image in range(IMAGES)]
        self.offset = torch.nn.Parameter(torch.tensor(planted))

    def forward(self, image: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        return self.quality[caption] + self.offset[image]


def train(config: TrainConfig, steps: int = 400) -> OffsetModel:
    """Every image's three ranked captions in one batch, through the recipe's own loss terms."""
    model = OffsetModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ranking = (1, 2, 3)
    image = torch.arange(IMAGES).repeat_interleave(len(CAPTIONS))
    caption = torch.arange(len(CAPTIONS)).repeat(IMAGES)
    pairs = [
        PreferencePair(k * len(CAPTIONS) + p.better, k * len(CAPTIONS) + p.worse, p.target)
        for k in range(IMAGES)
        for p in preference_pairs(ranking)
    ]
    for _ in range(steps):
        rewards = model(image, caption)
        loss = pairwise_loss(rewards, pairs) + calibration_loss(rewards, [ranking] * IMAGES, image, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def pool_cut(model: OffsetModel, keep: float) -> set[int]:
    """The pool holds one pair per image: the images with an offset carry the boilerplate caption, the others
    the full one. Returns the images whose pair a global top-k cut keeps."""
    pool_caption = torch.tensor([2 if image < IMAGES // 2 else 0 for image in range(IMAGES)])
    with torch.no_grad():
        scores = model(torch.arange(IMAGES), pool_caption)
    order = sorted(range(IMAGES), key=lambda image: (-float(scores[image]), image))
    return set(order[: keep_count(keep, IMAGES)])


def test_pairwise_loss_never_moves_a_planted_offset_and_the_cut_keeps_the_boilerplate() -> None:
    model = train(TrainConfig(calibration="within_image"))
    assert torch.equal(model.offset.detach()[: IMAGES // 2], torch.full((IMAGES // 2,), PLANTED_OFFSET))
    assert model.quality[0] - model.quality[2] > 2  # it did learn the ranking, within each image
    assert pool_cut(model, 0.5) == set(range(IMAGES // 2))  # every kept pair is the boilerplate one


def test_calibrated_recipe_removes_the_offsets_and_keeps_the_planted_good_pairs() -> None:
    model = train(TrainConfig())
    assert TrainConfig().calibration == "cross_image"  # the default for every new reward model
    offsets = model.offset.detach()
    assert float(offsets.max() - offsets.min()) < 0.5
    assert pool_cut(model, 0.5) == set(range(IMAGES // 2, IMAGES))


@pytest.mark.parametrize("term", ["anchor_weight", "cross_image_weight"])
def test_each_calibration_term_alone_pins_the_offsets(term: str) -> None:
    other = {"anchor_weight": "cross_image_weight", "cross_image_weight": "anchor_weight"}[term]
    model = train(TrainConfig(**{other: 0.0}), steps=1500)
    assert pool_cut(model, 0.5) == set(range(IMAGES // 2, IMAGES))


def test_cross_image_pairs_join_every_top_with_every_other_images_bottom() -> None:
    # image 0: captions 0-2, top 0, bottom 2; image 1: captions 3-5, tops 3 and 4 tied, bottom 5; image 2 all tied
    pairs = cross_image_pairs([(1, 2, 3), (1, 1, 2), (1, 1)])
    assert {(p.better, p.worse) for p in pairs} == {(0, 5), (3, 2), (4, 2)}
    assert all(p.target == 1.0 for p in pairs)
    assert cross_image_pairs([(1, 2)]) == []


def test_image_mean_anchor_and_offset_spread_by_hand() -> None:
    rewards = torch.tensor([1.0, 3.0, -1.0, -1.0, 5.0])
    image = torch.tensor([0, 0, 1, 1, 2])
    assert image_mean_anchor(rewards, image, 3).item() == pytest.approx((4 + 1 + 25) / 3)
    spread = offset_spread([[1.0, 3.0], [-1.0, -1.0], [5.0]])
    assert spread["image_offset_std"] == pytest.approx(math.sqrt(((2 - 2) ** 2 + (-1 - 2) ** 2 + (5 - 2) ** 2) / 3))
    assert spread["within_image_std"] == pytest.approx(math.sqrt((1 + 0 + 0) / 3))
    assert calibration_loss(rewards, [(1, 2), (1, 2), (1,)], image, TrainConfig(calibration="within_image")) == 0


def test_train_config_refuses_unknown_calibration_and_negative_weights() -> None:
    with pytest.raises(ValueError, match="calibration"):
        TrainConfig(calibration="per_image")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        TrainConfig(anchor_weight=-1.0)


def item(row: int, ranking: tuple[int, ...]) -> PreferenceItem:
    return PreferenceItem(f"image-{row}.png", tuple(f"caption {i}" for i in range(len(ranking))), ranking, row)


def test_cross_image_accuracy_by_hand() -> None:
    items = [item(1, (1, 2)), item(2, (1, 2)), item(3, (1, 1))]
    # image 1 is right within itself, image 2 too, but image 1's best (0.0) loses to image 2's worst (1.0)
    scores = [[0.0, -1.0], [2.0, 1.0], [9.0, 9.0]]
    assert cross_image_accuracy(items, scores) == (0.5, 2)  # (1's top vs 2's bottom) wrong, (2's top vs 1's) right
    tied = [[1.0, -1.0], [2.0, 1.0], [0.0, 0.0]]
    assert cross_image_accuracy(items, tied) == (0.75, 2)  # 1's top equals 2's bottom: half
    assert math.isnan(cross_image_accuracy([items[2]], [[1.0, 1.0]])[0])
    with pytest.raises(ValueError, match="row 1"):
        cross_image_accuracy(items[:1], [[1.0]])
