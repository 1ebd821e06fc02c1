"""Where models run: CUDA with bf16 autocast when there is a GPU, the CPU in float32 otherwise."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# Subnormal floats (below 1.2e-38) take the CPU's slow path, up to a hundred times slower per operation: a
# vocabulary-wide softmax is mostly such values, and so become its gradients and the optimiser's second
# moments, until a tiny captioner spends most of a training step on them. Flushed to zero, for every model the
# platform runs, at no cost in accuracy that a float32 model could notice.
torch.set_flush_denormal(True)


def cpu_budget() -> int:
    """The cores this process may keep busy: OMP_NUM_THREADS when set (Ray sets it to a task's or actor's CPUs, so
    shards side by side on one machine do not oversubscribe it; a user may set it too), else every core the
    process may run on."""
    budget = os.environ.get("OMP_NUM_THREADS", "").strip()
    if budget.isdigit() and int(budget) > 0:
        return int(budget)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pick_device(preferred: str | None = None) -> torch.device:
    """`preferred` if given ("cpu", "cuda", "cuda:1"), else CUDA when available, else the CPU."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def inference_autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA; nothing on the CPU, where bf16 matmuls are slower than float32 on most chips."""
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
