"""Scoring throughput: is end-to-end shard scoring as fast as its slower half allows?

All in one run, on webdataset tars of shapes-world images laid out as the platform's downloads are (`jpg`,
`txt`, `json` with the uid), with one reward model loaded once:
- F: the scorer's `score_batch` on batches prepared and collated in memory beforehand (pairs/s);
- D: decoding and preparation alone, through the same DataLoader workers as scoring, no model (pairs/s);
- E: `ca_platform.scoring.streaming.score_tars` end to end (pairs/s), with its peak memory.
On a GPU decode (CPU) and model (GPU) overlap, so the ideal is min(F, D); on a CPU they share the cores, so it
is 1 / (1/F + 1/D). Goal: E / ideal >= 0.85. The model's FLOP/s is also given as a fraction of a large
matmul at the model's dtype (float32 on the CPU, bf16 on CUDA) timed in the same run. Each figure is the
best of --repeats rounds, so a neighbour's burst on a shared machine does not decide the ratio.

    .venv/bin/python benchmarks/scoring.py [--rows 2000] [--image-size 64] [--batch-size 64] [--workers 2]
        [--tars 1] [--repeats 3] [--device cuda] [--backbone /path/to/local/blip]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.flop_counter import FlopCounterMode
from transformers import BlipConfig

from ca_platform.demo.shapes_world import describe, render_scene, sample_scene
from ca_platform.models.devices import pick_device
from ca_platform.models.images import decode_image
from ca_platform.models.tokenization import bert_tokenizer
from ca_platform.scoring.reward.model import RewardModelSpec, build_reward_model
from ca_platform.scoring.reward.scorer import RewardScorer, load_reward_model, save_reward_model
from ca_platform.scoring.reward.train import TrainedRewardModel
from ca_platform.scoring.streaming import prepared_batches, score_tars

HELD_PIXEL_BYTES = 2 * 2**30  # F cycles over at most this much prepared pixel data, whatever --rows is
TINY_IMAGE_SIZE = 64
BUSY_LOAD = 0.5  # 1-minute load average per core, before the run, above which the machine counts as busy

Batch = dict[str, Any]


def write_shard(
    folder: Path, rows: int, image_size: int, tars: int, keep: int
) -> tuple[list[Path], list[tuple[bytes, str]]]:
    """`rows` samples spread over `tars` tars, and the (jpeg bytes, caption) of the first `keep` of them."""
    rng = np.random.default_rng(0)
    paths = [folder / f"{index:05d}.tar" for index in range(tars)]
    per_tar = math.ceil(rows / tars)
    kept = []
    for index, path in enumerate(paths):
        with wds.TarWriter(str(path)) as writer:
            for row in range(index * per_tar, min(rows, (index + 1) * per_tar)):
                scene = sample_scene(rng)
                buffer = io.BytesIO()
                render_scene(scene, image_size).save(buffer, format="JPEG", quality=95)
                caption = describe(scene)
                if row < keep:
                    kept.append((buffer.getvalue(), caption))
                writer.write(
                    {"__key__": f"{row:09d}", "jpg": buffer.getvalue(), "txt": caption, "json": {"uid": str(row)}}
                )
    return paths, kept


def model_image_size(backbone: str, requested: int | None) -> int:
    """The model's resolution: --image-size (default 64) for the tiny backbone, its own for a BLIP folder."""
    if backbone == "tiny":
        return requested or TINY_IMAGE_SIZE
    return int(BlipConfig.from_pretrained(backbone, local_files_only=True).vision_config.image_size)


def build_scorer(folder: Path, image_size: int, backbone: str, device: torch.device) -> RewardScorer:
    """An untrained reward model of the given architecture, saved and loaded the way the platform does.

    Training is left out: it changes the weights' values, not the work a forward pass does.
    """
    tokenizer = bert_tokenizer()
    spec = RewardModelSpec(backbone=backbone, image_size=image_size)
    metrics = {"reward_mean": 0.0, "reward_std": 1.0}
    trained = TrainedRewardModel(build_reward_model(spec, tokenizer), tokenizer, spec, metrics)
    _, checkpoint = save_reward_model(trained, folder / "checkpoints")
    return RewardScorer(load_reward_model(checkpoint, device=device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pairs_per_second(device: torch.device, run: Callable[[], int]) -> float:
    """Pairs/s of `run`, which returns how many pairs it handled."""
    synchronize(device)
    start = time.perf_counter()
    pairs = run()
    synchronize(device)
    return pairs / (time.perf_counter() - start)


def forward_only(scorer: RewardScorer, batches: list[Batch], rows: int) -> int:
    """Score the held batches, cycling over them, until `rows` pairs are done."""
    done, index = 0, 0
    while done < rows:
        batch = batches[index % len(batches)]
        scorer.score_batch(batch)
        done += len(batch["input_ids"])
        index += 1
    return done


def decode_only(tars: list[Path], scorer: RewardScorer, batch_size: int, workers: int) -> int:
    return sum(len(uids) for uids, _ in prepared_batches(tars, scorer, batch_size, workers))


def end_to_end(tars: list[Path], scorer: RewardScorer, batch_size: int, workers: int) -> int:
    return len(score_tars(tars, scorer, batch_size=batch_size, num_workers=workers))


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of an n x n @ n x n matmul, timed over about `seconds` after a warm-up."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    a @ b
    synchronize(device)
    repeats = max(3, int(seconds / max(time.perf_counter() - start, 1e-6)))
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def fmt(rates: list[float]) -> str:
    return ", ".join(f"{rate:.0f}" for rate in rates)


def mib(kib: float) -> str:
    return f"{kib / 1024:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=None, help="jpeg size, and the tiny model's resolution (64)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tars", type=int, default=1, help="tars the rows are spread over")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of F, D and E; the best of each is kept")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1; default: CUDA when present")
    parser.add_argument("--backbone", default="tiny", help='"tiny" or a local pretrained BLIP folder')
    args = parser.parse_args()
    device = pick_device(args.device)
    model_size = model_image_size(args.backbone, args.image_size)
    image_size = args.image_size or model_size
    held_rows = min(args.rows, max(args.batch_size, HELD_PIXEL_BYTES // (3 * model_size**2 * 4)))
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="ca-bench-scoring-") as scratch:
        folder = Path(scratch)
        tars, kept = write_shard(folder, args.rows, image_size, args.tars, held_rows)
        scorer = build_scorer(folder, model_size, args.backbone, device)
        pipeline = (tars, scorer, args.batch_size, args.workers)
        warm_up = [scorer.prepare(decode_image(image), caption) for image, caption in kept[: args.batch_size]]
        for _ in range(2):
            scorer.score_batch(scorer.collate(warm_up))

        # E first, so its peak memory is read before the benchmark holds F's batches or runs D's workers.
        peak_before_e = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        e_rates = [pairs_per_second(device, lambda: end_to_end(*pipeline))]
        peak_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        peak_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0

        prepared = [scorer.prepare(decode_image(image), caption) for image, caption in kept]
        batches = [scorer.collate(prepared[i : i + args.batch_size]) for i in range(0, held_rows, args.batch_size)]
        del kept, prepared
        f_rates: list[float] = []
        d_rates: list[float] = []
        for round_ in range(args.repeats):
            if round_:
                e_rates.append(pairs_per_second(device, lambda: end_to_end(*pipeline)))
            d_rates.append(pairs_per_second(device, lambda: decode_only(*pipeline)))
            f_rates.append(pairs_per_second(device, lambda: forward_only(scorer, batches, args.rows)))

        with FlopCounterMode(display=False) as counter:
            scorer.score_batch(batches[0])
        flops_per_pair = counter.get_total_flops() / len(batches[0]["input_ids"])
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        matmul = matmul_flops(dtype, device)

    forward, decode, scored = max(f_rates), max(d_rates), max(e_rates)
    overlapped = device.type == "cuda"
    ideal = min(forward, decode) if overlapped else 1 / (1 / forward + 1 / decode)
    print(
        f"device {device}, {args.rows} rows in {args.tars} tar(s), {image_size} px jpeg, model at {model_size} px, "
        f"batch {args.batch_size}, {args.workers} workers, backbone {args.backbone}, torch threads "
        f"{torch.get_num_threads()} of {os.cpu_count()} cores, best of {args.repeats}"
    )
    load_after = os.getloadavg()[0]
    print(f"load average before / after: {load_before:.2f} / {load_after:.2f}")
    if load_before > BUSY_LOAD * (os.cpu_count() or 1):
        print("warning: the cores were busy before the run started; F, D and E may be unreliable, run again when idle")
    print(f"F  model forward on prepared batches: {forward:9.1f} pairs/s   (rounds: {fmt(f_rates)})")
    print(f"D  decode + prepare, {args.workers} workers:      {decode:9.1f} pairs/s   (rounds: {fmt(d_rates)})")
    print(f"E  score_tars end to end:             {scored:9.1f} pairs/s   (rounds: {fmt(e_rates)})")
    which = "min(F, D): decode and model overlap" if overlapped else "1/(1/F + 1/D): decode and model share the cores"
    print(f"ideal = {which}: {ideal:.1f} pairs/s")
    print(f"E / ideal: {scored / ideal:.2f}   (goal >= 0.85: {'met' if scored / ideal >= 0.85 else 'NOT met'})")
    print(
        f"peak RSS through E: main process {mib(peak_main)} ({mib(peak_before_e)} before E), largest worker "
        f"{mib(peak_worker)} (pages shared with the main process count in both)"
        + (f"; GPU max allocated {peak_gpu / 2**20:.0f} MiB" if overlapped else "")
    )
    model_flops = flops_per_pair * forward
    print(
        f"model: {flops_per_pair / 1e6:.2f} MFLOP/pair x F = {model_flops / 1e9:.2f} GFLOP/s, "
        f"{model_flops / matmul:.3f} of a {str(dtype).removeprefix('torch.')} 2048^3 matmul "
        f"({matmul / 1e9:.1f} GFLOP/s)"
    )


if __name__ == "__main__":
    main()
