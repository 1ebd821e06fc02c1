"""Reward calibration recipes on the demo world: which one makes a cut across images keep the right pairs?

Needs a demo data root (`make demo` writes `.demo`). For each recipe and seed it trains a reward model on the
demo's preference split exactly as `reward_model` does (same backbone: the demo's BLIP ITM model; same
optimisation settings), scores every downloaded pool pair, and prints, against the world's truth files:
- within / across: held-out within-image and cross-image preference accuracy;
- offset / caption: the spread of images' mean rewards against the spread of captions within an image;
- AUROC of clean pool pairs against each noise kind, across images;
- clean share and the annotators' mean utility of the pairs a top-k cut keeps.
The same figures for the demo's current CLIP score come first, as the reference. Ratios, not timings.

    .venv/bin/python benchmarks/calibration.py [--demo .demo] [--seeds 0,1,2] [--keep 0.3]
        [--recipes within_image,cross_image,anchor_only,pairs_only]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image

from ca_platform import layout, schemas
from ca_platform.compression.threshold import keep_count
from ca_platform.demo.truth_audit import ANY_NOISE, kept_summary, pool_truth, separation_by_kind
from ca_platform.preferences.pairs import cross_image_accuracy, pairwise_accuracy
from ca_platform.preferences.staging import current_preference_split
from ca_platform.resources import RewardModelConfig
from ca_platform.scoring.baselines import pool_blip_backbone
from ca_platform.scoring.registry import current_model, load_scorer
from ca_platform.scoring.reward.scorer import RewardScorer, load_reward_model, save_reward_model
from ca_platform.scoring.reward.train import offset_spread, train_reward_model
from ca_platform.scoring.streaming import score_pairs
from ca_platform.storage import open_store

RECIPES = {
    "within_image": {"calibration": "within_image"},
    "cross_image": {},  # the default's weights
    "anchor_only": {"cross_image_weight": 0.0},
    "pairs_only": {"anchor_weight": 0.0},
}


def figures(scores: np.ndarray, pairs: pl.DataFrame, keep: float) -> dict[str, float]:
    scored = pairs.with_columns(pl.Series("score", scores))
    row = separation_by_kind(scored)
    top = scored.sort(["score", schemas.UID], descending=[True, False]).head(keep_count(keep, scored.height))
    summary = kept_summary(top)
    return {**row, "clean_share": summary["clean_share"], "utility": summary["mean_utility"]}


def heldout_figures(heldout: list, scores: list[list[float]]) -> dict[str, float]:
    spread = offset_spread(scores)
    return {
        "within": pairwise_accuracy(heldout, scores)[0],
        "across": cross_image_accuracy(heldout, scores)[0],
        "offset": spread["image_offset_std"],
        "caption": spread["within_image_std"],
    }


def print_row(name: str, row: dict[str, float]) -> None:
    print(f"{name:24s} " + " ".join(f"{key}={value:.3f}" for key, value in row.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=".demo")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--keep", type=float, default=0.3)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    args = parser.parse_args()
    demo = Path(args.demo).resolve()
    data = demo / "data"
    store = open_store(str(data))
    settings = RewardModelConfig()
    with tempfile.TemporaryDirectory(prefix="ca-calibration-") as temp:
        scratch, cache = Path(temp) / "scratch", Path(temp) / "cache"
        scratch.mkdir()
        train, heldout = current_preference_split(store, 0.2, 0, cache, scratch)
        backbone = Path(temp) / "backbone"
        pool_blip_backbone(store, cache, backbone)
        pairs = pool_truth(data / layout.ANALYTICS_DB, demo / "world" / "truth")
        # the world's own files: the downloads keep the same 64 px pixels, and the truth names them by URL
        images = [Image.open(demo / "world" / "images" / url.rsplit("/", 1)[1]).convert("RGB") for url in pairs["url"]]
        captions = pairs[schemas.CAPTION].to_list()
        heldout_images = [Image.open(item.image).convert("RGB") for item in heldout]

        def heldout_scores(scorer: object) -> list[list[float]]:
            return [
                score_pairs([image] * len(item.captions), list(item.captions), scorer).tolist()
                for image, item in zip(heldout_images, heldout)
            ]

        clip = load_scorer(store, schemas.CLIP_SCORE, current_model(store, schemas.CLIP_SCORE, scratch), cache, "cpu")
        reference = {
            **heldout_figures(heldout, heldout_scores(clip)),
            **figures(score_pairs(images, captions, clip), pairs, args.keep),
        }
        print_row("clip_score", reference)
        results: dict[str, list[dict[str, float]]] = {}
        for recipe in args.recipes.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                config = replace(settings.train_config(), seed=seed, device="cpu", **RECIPES[recipe])
                spec = replace(settings.spec(), backbone=str(backbone))
                trained = train_reward_model(train, heldout, spec, config)
                _, folder = save_reward_model(trained, Path(temp) / "models")
                scorer = RewardScorer(load_reward_model(folder, device="cpu"))
                row = {
                    **heldout_figures(heldout, heldout_scores(scorer)),
                    **figures(score_pairs(images, captions, scorer), pairs, args.keep),
                }
                results.setdefault(recipe, []).append(row)
                print_row(f"{recipe} seed {seed}", row)
        print(f"\nmean over seeds (k = {args.keep}; AUROC columns: clean against each noise kind, {ANY_NOISE!r} all):")
        print_row("clip_score", reference)
        for recipe, rows in results.items():
            print_row(recipe, {key: float(np.mean([r[key] for r in rows])) for key in rows[0]})
        print(json.dumps({"clip_score": reference, **results}))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
