"""The one training loop: every trainer of the platform steps through it, so its policies are tested here."""

from __future__ import annotations

import pytest
import torch

from ca_platform.models.training import adamw, shuffled_index_batches, train_on_batches

CPU = torch.device("cpu")


def regression_batches(count: int, size: int, seed: int = 0) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Batches of (x, y) with y = 3x + 1, the samples a batch holds being its length."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.randn(size, 1, generator=generator)
        batches.append(list(zip(x, 3 * x + 1)))
    return batches


def mse(model: torch.nn.Module):
    def loss(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x = torch.stack([sample[0] for sample in batch])
        y = torch.stack([sample[1] for sample in batch])
        return torch.nn.functional.mse_loss(model(x), y)

    return loss


def test_loss_falls_samples_are_counted_and_the_model_is_left_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    batches = regression_batches(200, 8)
    log = train_on_batches(model, adamw(model.parameters(), 0.05), batches, mse(model), CPU)
    assert len(log.losses) == 200 and log.samples_seen == 200 * 8
    assert log.losses[-1] < 0.01 * log.losses[0]
    assert not model.training


def test_the_learning_rate_schedule_is_set_from_samples_seen_before_each_step() -> None:
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    seen_rates: list[float] = []

    def loss(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        seen_rates.append(optimizer.param_groups[0]["lr"])
        return mse(model)(batch)

    batches = regression_batches(3, 4)
    train_on_batches(model, optimizer, batches, loss, CPU, learning_rate_at=lambda seen: 1.0 / (1 + seen))
    assert seen_rates == [1.0, 1 / 5, 1 / 9]


def test_gradients_are_clipped_to_the_maximum_norm() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def huge(batch: list[int]) -> torch.Tensor:
        return -1e6 * model(torch.ones(1, 1)).sum()  # gradient -1e6 on the one weight

    train_on_batches(model, optimizer, [[0]], huge, CPU, max_grad_norm=0.5)
    assert model.weight.item() == pytest.approx(0.5)
    train_on_batches(model, optimizer, [[0]], huge, CPU, max_grad_norm=None)
    assert model.weight.item() == pytest.approx(0.5 + 1e6)


def test_a_loss_that_is_no_longer_finite_stops_training_naming_the_step() -> None:
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = iter([1.0, 2.0, float("nan")])

    def loss(batch: list[int]) -> torch.Tensor:
        return model(torch.ones(1, 1)).sum() * 0 + next(losses)

    with pytest.raises(FloatingPointError, match="became nan at step 2"):
        train_on_batches(model, optimizer, [[0], [1], [2], [3]], loss, CPU)


def test_shuffled_index_batches_permute_every_epoch_and_skip_batches_below_the_minimum() -> None:
    batches = list(shuffled_index_batches(7, 2, 3, torch.Generator().manual_seed(0), min_size=2))
    assert [len(b) for b in batches] == [3, 3, 3, 3]  # the lone seventh index of each epoch is skipped
    assert len(set(batches[0] + batches[1])) == 6
    again = list(shuffled_index_batches(7, 2, 3, torch.Generator().manual_seed(0), min_size=2))
    assert again == batches
    assert [len(b) for b in shuffled_index_batches(7, 1, 3, torch.Generator().manual_seed(0))] == [3, 3, 1]


def test_adamw_steps_only_the_parameters_that_train() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    optimizer = adamw(model.parameters(), 1e-3, weight_decay=0.1)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model[1].parameters()}
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
