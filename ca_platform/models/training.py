"""The one training loop of the platform, with the loss passed in (as open_clip's `train_one_epoch`).

The reward model, the CLIP/BLIP baselines and the models trained on each training-set variant all step
through `train_on_batches`, so the precision policy (bf16 autocast on CUDA), gradient clipping, the
learning-rate schedule hook and the guard against a diverging loss live here once. What differs between
them, the batches and the loss, is handed in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from PIL import Image

from ca_platform.models.devices import inference_autocast
from ca_platform.models.preprocessing import PairPreprocessor, Prepared, to_device
from ca_platform.progress import Task

Batch = TypeVar("Batch", bound=Sequence[Any])


@dataclass
class TrainedModel:
    """A model after training, in eval mode, with the preprocessing it was trained with and its metrics."""

    model: torch.nn.Module
    preprocessor: PairPreprocessor
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingLog:
    """What the loop did: the loss of every step and the samples it trained on."""

    losses: list[float]
    samples_seen: int


def adamw(
    parameters: Iterable[torch.nn.Parameter],
    learning_rate: float,
    *,
    weight_decay: float = 0.01,
) -> torch.optim.AdamW:
    """AdamW over the parameters that train, fused (all tensors stepped at once: a tenth of the per-tensor loop's
    time on small models) where torch has the fused kernel, on CPU and CUDA."""
    trainable = [p for p in parameters if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") for p in trainable)
    return torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay, fused=fused)


def train_on_batches(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    loss: Callable[[Batch], torch.Tensor],
    device: torch.device,
    *,
    max_grad_norm: float | None = 1.0,
    learning_rate_at: Callable[[int], float] | None = None,
    description: str = "training",
    total_samples: int | None = None,
) -> TrainingLog:
    """One optimiser step per batch; returns the loss of every step and the samples seen.

    `learning_rate_at(samples_seen)` sets the rate before each step (a schedule by samples seen, so it is the
    same whatever the batch size); `len(batch)` counts the samples. The forward pass and loss run under bf16
    autocast on CUDA, float32 on the CPU. A loss that is no longer finite stops training at once rather than
    training on garbage. The model is left in eval mode. Progress (samples of `total_samples`, the loss) is
    reported as `description` (ca_platform.progress), so a long training is visibly alive.
    """
    model.to(device).train()
    losses: list[float] = []
    seen = 0
    with Task(description, total_samples, "sample") as task:
        for batch in batches:
            if learning_rate_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(seen)
            with inference_autocast(device):
                value = loss(batch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            step_loss = float(value.detach().float().cpu())
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"training loss became {step_loss} at step {len(losses)}")
            losses.append(step_loss)
            seen += len(batch)
            task.advance(len(batch), loss=step_loss)
    model.eval()
    return TrainingLog(losses, seen)


def shuffled_index_batches(
    count: int, epochs: int, batch_size: int, generator: torch.Generator, min_size: int = 1
) -> Iterator[list[int]]:
    """Indices 0..count-1 in a fresh seeded order each epoch, cut into batches; smaller batches than
    `min_size` (a lone last pair, which in-batch contrast cannot use) are skipped."""
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count, batch_size):
            indices = order[start : start + batch_size]
            if len(indices) >= min_size:
                yield indices


def collated_loss(
    model: torch.nn.Module,
    preprocessor: PairPreprocessor,
    batch_loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
    device: torch.device,
) -> Callable[[list[Prepared]], torch.Tensor]:
    """A loss over prepared samples from a loss over a collated batch on the device."""

    def loss(samples: list[Prepared]) -> torch.Tensor:
        return batch_loss(model, to_device(preprocessor.collate(samples), device))

    return loss


def train_on_pairs(
    model: torch.nn.Module,
    preprocessor: PairPreprocessor,
    pairs: Iterable[tuple[Image.Image, str]],
    loss: Callable[[list[Prepared]], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: torch.device,
    description: str = "training",
) -> dict[str, Any]:
    """AdamW over shuffled batches of in-memory pairs for some epochs; returns metrics with the loss curve.

    Pairs are prepared once (tensors at model resolution), so a one-shot generator can feed several epochs.
    Batches of one are skipped: in-batch contrast needs two pairs.
    """
    prepared = [preprocessor.prepare(image, caption) for image, caption in pairs]
    if len(prepared) < 2:
        raise ValueError(f"training needs at least 2 pairs, got {len(prepared)}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    batches = (
        [prepared[i] for i in indices]
        for indices in shuffled_index_batches(len(prepared), epochs, batch_size, generator, min_size=2)
    )
    per_epoch = len(prepared) - (len(prepared) % batch_size == 1)  # a lone last pair is skipped
    losses = train_on_batches(
        model,
        adamw(model.parameters(), learning_rate),
        batches,
        loss,
        device,
        description=description,
        total_samples=epochs * per_epoch,
    ).losses
    return {
        "loss": losses,
        "steps": len(losses),
        "pairs": len(prepared),
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "device": str(device),
        "seconds": time.perf_counter() - started,
    }
