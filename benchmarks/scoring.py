"""Scoring throughput: is end-to-end shard scoring as fast as its slower half allows?

All in one run, on one webdataset tar of shapes-world images laid out as the platform's downloads are:
- F: the reward model's `score_batch` on batches prepared and collated in memory beforehand (pairs/s);
- D: decoding and preparation alone, through the same DataLoader workers, no model (pairs/s);
- E: `ca_platform.scoring.score_tars` end to end (pairs/s), with peak memory.
The ideal is min(F, D) on a GPU, where decode (CPU) and model (GPU) overlap; on a CPU they share the cores,
so the ideal is 1 / (1/F + 1/D). Goal: E / ideal >= 0.85. The model's FLOP/s is also given as a fraction
of a large matmul at the same dtype in the same run. The model is loaded once for the run.

    .venv/bin/python benchmarks/scoring.py [--rows 2000] [--image-size 64] [--batch-size 64] [--workers 2]
        [--device cuda] [--backbone /path/to/local/blip]
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.flop_counter import FlopCounterMode

from ca_platform.devices import pick_device
from ca_platform.image_preprocessing import decode_image
from ca_platform.reward_model import (
    RewardModelSpec,
    RewardScorer,
    TrainedRewardModel,
    build_reward_model,
    load_reward_model,
    save_reward_model,
)
from ca_platform.scoring import prepared_batches, score_tars
from ca_platform.shapes_world import describe, render_scene, sample_scene
from ca_platform.tokenization import bert_tokenizer


def write_shard(folder: Path, rows: int, image_size: int) -> tuple[Path, list[tuple[bytes, str]]]:
    """A tar of `rows` jpg/txt/json samples, and the (jpeg bytes, caption) pairs in it."""
    rng = np.random.default_rng(0)
    pairs = []
    tar = folder / "00000.tar"
    with wds.TarWriter(str(tar)) as writer:
        for row in range(rows):
            scene = sample_scene(rng)
            buffer = io.BytesIO()
            render_scene(scene, image_size).save(buffer, format="JPEG", quality=95)
            caption = describe(scene)
            pairs.append((buffer.getvalue(), caption))
            writer.write({"__key__": f"{row:09d}", "jpg": buffer.getvalue(), "txt": caption, "json": {"uid": str(row)}})
    return tar, pairs


def build_scorer(folder: Path, image_size: int, backbone: str, device: torch.device) -> RewardScorer:
    """An untrained reward model of the given architecture, saved and loaded the way the platform does."""
    tokenizer = bert_tokenizer()
    spec = RewardModelSpec(backbone=backbone, image_size=image_size)
    trained = TrainedRewardModel(
        build_reward_model(spec, tokenizer), tokenizer, spec, {"reward_mean": 0.0, "reward_std": 1.0}
    )
    _, checkpoint = save_reward_model(trained, folder / "checkpoints")
    return RewardScorer(load_reward_model(checkpoint, device=device))


def pairs_per_second(rows: int, run: callable) -> float:
    start = time.perf_counter()
    run()
    return rows / (time.perf_counter() - start)


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backbone", default="tiny", help='"tiny" or a local pretrained BLIP folder')
    args = parser.parse_args()
    device = pick_device(args.device)

    with tempfile.TemporaryDirectory(prefix="ca-bench-scoring-") as scratch:
        folder = Path(scratch)
        tar, pairs = write_shard(folder, args.rows, args.image_size)
        scorer = build_scorer(folder, args.image_size, args.backbone, device)

        prepared = [scorer.prepare(decode_image(image), caption) for image, caption in pairs]
        batches = [scorer.collate(prepared[i : i + args.batch_size]) for i in range(0, len(prepared), args.batch_size)]
        for batch in batches[:2]:
            scorer.score_batch(batch)
        forward = pairs_per_second(args.rows, lambda: [scorer.score_batch(b) for b in batches])

        def decode_only() -> None:
            for _ in prepared_batches([tar], scorer, args.batch_size, args.workers):
                pass

        decode = pairs_per_second(args.rows, decode_only)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        end_to_end = pairs_per_second(
            args.rows, lambda: score_tars([tar], scorer, batch_size=args.batch_size, num_workers=args.workers)
        )

        with FlopCounterMode(display=False) as counter:
            scorer.score_batch(batches[0])
        flops_per_pair = counter.get_total_flops() / batches[0]["input_ids"].shape[0]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        peak_flops = matmul_flops(dtype, device)

    overlapped = device.type == "cuda"
    ideal = min(forward, decode) if overlapped else 1 / (1 / forward + 1 / decode)
    own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"device: {device}, rows: {args.rows}, image size: {args.image_size}, batch: {args.batch_size}, "
        f"workers: {args.workers}, backbone: {args.backbone}"
    )
    print(f"F  model forward on prepared batches: {forward:9.1f} pairs/s")
    print(f"D  decode + preprocess, {args.workers} workers:   {decode:9.1f} pairs/s")
    print(f"E  score_tars end to end:             {end_to_end:9.1f} pairs/s")
    print(f"ideal = {'min(F, D)' if overlapped else '1/(1/F + 1/D), decode and model share the cores'}: {ideal:.1f}")
    print(f"E / ideal: {end_to_end / ideal:.2f}  (goal >= 0.85)")
    print(
        f"peak memory: main process {own_rss:.0f} MiB, largest worker {workers_rss:.0f} MiB"
        + (f", GPU {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else "")
    )
    model_flops = flops_per_pair * forward
    print(
        f"model: {flops_per_pair / 1e6:.1f} MFLOP/pair, {model_flops / 1e9:.2f} GFLOP/s = "
        f"{model_flops / peak_flops:.3f} of a {dtype} 2048^3 matmul ({peak_flops / 1e9:.1f} GFLOP/s)"
    )


if __name__ == "__main__":
    main()
