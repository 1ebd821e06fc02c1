"""The curation report on hand-made evaluation reports whose differences are known: a variant identical to full,
one ahead of it on every image's CIDEr-D, one that retrieves nothing. Materialized through Dagster, as the
lineage does; the intervals and verdicts reach the JSON, the markdown, the terminal table and the UI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dagster import materialize

from ca_platform import layout
from ca_platform.assets.evaluation import curation_report
from ca_platform.evaluation.captions import bleu4
from ca_platform.evaluation.intervals import BLEU4, RATIO, BootstrapSettings
from ca_platform.evaluation.report import NotEvaluatedError, variant_item_results, with_intervals
from ca_platform.evaluation.report_rows import CurationRow
from ca_platform.evaluation.report_text import curation_text, per_k_tables
from ca_platform.resources import EvaluationConfig, PlatformStorage
from ca_platform.schemas import CLIP_SCORE, REWARD_MODEL

SEEDS, IMAGES = 3, 60
UIDS = [f"img{i:03d}" for i in range(IMAGES)]
RNG = np.random.default_rng(11)
# full's models: each image found within 1 / 5 with these chances, two captions per image; CIDEr-D per image.
I2T = {k: RNG.random((SEEDS, IMAGES)) < p for k, p in ((1, 0.3), (5, 0.6), (10, 0.8))}
T2I = {k: RNG.binomial(2, p, (SEEDS, IMAGES)) for k, p in ((1, 0.25), (5, 0.55), (10, 0.75))}
CIDER = RNG.gamma(2.0, 0.25, (SEEDS, IMAGES))
CANDIDATES = ["a red circle on grey", "a blue square on grey", "a red circle", "a blue square"]
REFERENCES = {uid: ["a red circle on grey", "a blue square"] for uid in UIDS}


def _documents(i2t: dict[int, np.ndarray], t2i: dict[int, np.ndarray], cider: np.ndarray) -> tuple[dict, dict]:
    """A retrieval and a captioning report as the evaluations write them, the figures worked out here."""
    per_seed_r: dict[str, dict[str, float]] = {}
    per_item_r: dict[str, dict[str, Any]] = {}
    per_seed_c: dict[str, dict[str, float]] = {}
    per_item_c: dict[str, dict[str, Any]] = {}
    for seed in range(SEEDS):
        captions = {uid: CANDIDATES[(i + seed) % len(CANDIDATES)] for i, uid in enumerate(UIDS)}
        bleu = bleu4(captions, REFERENCES)
        per_seed_r[str(seed)] = {
            **{f"i2t_r{k}": float(hits[seed].mean()) for k, hits in i2t.items()},
            **{f"t2i_r{k}": float(found[seed].sum() / (2 * IMAGES)) for k, found in t2i.items()},
        }
        per_item_r[str(seed)] = {
            **{f"i2t_r{k}": hits[seed].astype(int).tolist() for k, hits in i2t.items()},
            **{f"t2i_r{k}": [[int(f), 2] for f in found[seed]] for k, found in t2i.items()},
        }
        per_seed_c[str(seed)] = {"cider": float(cider[seed].mean()), "bleu4": bleu.score}
        per_item_c[str(seed)] = {"cider": cider[seed].tolist(), "bleu4": [list(bleu.statistics[u]) for u in UIDS]}

    def summary(per_seed: dict[str, dict[str, float]]) -> dict[str, Any]:
        names = per_seed["0"]
        values = {n: np.array([per_seed[str(s)][n] for s in range(SEEDS)]) for n in names}
        return {
            **{n: float(v.mean()) for n, v in values.items()},
            "spread": {n: float(v.std(ddof=1)) for n, v in values.items()},
            "per_seed": per_seed,
            "items": UIDS,
        }

    retrieval = {**summary(per_seed_r), "per_item": per_item_r, "item_statistics": {f"t2i_r{k}": RATIO for k in t2i}}
    captioning = {**summary(per_seed_c), "per_item": per_item_c, "item_statistics": {"bleu4": BLEU4}}
    return retrieval, captioning


# Training sets at k = 0.3 (keyed as the curve keys them), and one more cut at 0.1 that must never be compared
# across keep fractions.
VARIANTS = {
    "full": _documents(I2T, T2I, CIDER),
    "reward_topk@0.3": _documents(I2T, T2I, CIDER),  # the same models' results: no difference at all
    "clipscore_topk@0.3": _documents(I2T, T2I, CIDER + 0.5),  # half a point of CIDEr-D better on every image
    "random_topk@0.3": _documents({k: np.zeros_like(h) for k, h in I2T.items()}, T2I, CIDER),  # finds no image
    "clipscore_topk@0.1": _documents(I2T, T2I, CIDER - 0.5),  # half a point worse: below full, not below 0.3's
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    data = tmp_path_factory.mktemp("report") / "data"
    reports = data / layout.REPORTS_DIR
    for variant, (retrieval, captioning) in VARIANTS.items():
        for kind, document in ((layout.RETRIEVAL_REPORT, retrieval), (layout.CAPTIONING_REPORT, captioning)):
            path = data / layout.variant_report_key(kind, variant)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"variant": variant, **document}))
    cut = {v: {"kept": 10 if v.endswith("@0.1") else 30, "total": 100} for v in VARIANTS if v != "full"}
    (reports / "score_threshold.json").write_text(json.dumps(cut))
    (reports / "preference_accuracy.json").write_text(json.dumps({REWARD_MODEL: 0.72, CLIP_SCORE: 0.7}))
    storage = PlatformStorage(pool_uri=str(data.parent / "pool"), data_uri=str(data))
    result = materialize(
        [curation_report],
        resources={"storage": storage, "evaluation": EvaluationConfig(bootstrap_resamples=400, bootstrap_seed=5)},
    )
    assert result.success
    return data, result.asset_materializations_for_node("curation_report")[0].metadata


def test_each_figure_carries_its_seed_spread_and_an_interval_around_it(report: tuple[Path, Any]) -> None:
    data, _ = report
    curation = json.loads((data / layout.CURATION_REPORT_KEY).read_text())
    full = curation["full"]
    assert full["bootstrap"] == {"resamples": 400, "confidence": 0.95, "seed": 5}
    assert full["evaluation_items"] == IMAGES and full["seeds"] == SEEDS
    for metric in ("i2t_r1", "t2i_r5", "cider", "bleu4", "i2t_r10"):
        low, high = full["interval"][metric]
        figure = full[metric] if metric in full else VARIANTS["full"][0][metric]
        assert low <= figure <= high, metric
    assert full["interval"]["i2t_r1"][1] - full["interval"]["i2t_r1"][0] < 0.2  # 180 hits at ~0.3
    assert 0 < full["interval"]["bleu4"][0] < full["interval"]["bleu4"][1]
    assert full["spread"]["cider"] == pytest.approx(CIDER.mean(axis=1).std(ddof=1))
    assert "versus" in full and "full" not in full["versus"]


def test_differences_from_full_and_clipscore_topk_are_marked_as_outside_noise_or_not(report: tuple[Path, Any]) -> None:
    data, _ = report
    curation = json.loads((data / layout.CURATION_REPORT_KEY).read_text())
    same = curation["reward_topk@0.3"]["versus"]["full"]
    assert all(d["difference"] == 0 and not d["outside_noise"] for d in same.values())
    better = curation["clipscore_topk@0.3"]["versus"]["full"]["cider"]
    assert better["outside_noise"] and better["low"] == pytest.approx(0.5) and better["high"] == pytest.approx(0.5)
    assert not curation["clipscore_topk@0.3"]["versus"]["full"]["i2t_r5"]["outside_noise"]
    worse = curation["random_topk@0.3"]["versus"]["full"]["i2t_r1"]
    assert worse["outside_noise"] and worse["high"] < 0
    assert curation["random_topk@0.3"]["versus"]["clipscore_topk@0.3"]["i2t_r1"]["outside_noise"]
    assert curation["reward_topk@0.3"]["versus"]["clipscore_topk@0.3"]["cider"]["difference"] == pytest.approx(-0.5)
    assert not curation["random_topk@0.3"]["versus"]["full"]["t2i_r1"]["outside_noise"]  # the same T->I hits
    # within one k: a cut is compared with clipscore_topk at its own k only; full with clipscore_topk at each k
    assert set(curation["reward_topk@0.3"]["versus"]) == {"full", "clipscore_topk@0.3"}
    assert set(curation["clipscore_topk@0.1"]["versus"]) == {"full"}
    assert set(curation["full"]["versus"]) == {"clipscore_topk@0.1", "clipscore_topk@0.3"}
    assert curation["full"]["versus"]["clipscore_topk@0.1"]["cider"]["difference"] == pytest.approx(0.5)


def _tables(text: str, heading: str) -> dict[str, str]:
    """k -> its table and notes, from a report of one table per keep fraction."""
    return dict(part.split("\n", 1) for part in text.split(heading)[1:])


def test_the_table_marks_the_cells_and_says_what_was_measured(report: tuple[Path, Any]) -> None:
    data, metadata = report
    tables = _tables((data / layout.CURATION_TABLE_KEY).read_text(), "### keep fraction k = ")
    assert list(tables) == ["0.1", "0.3"]
    rows = {
        k: {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
        for k, table in tables.items()
    }
    lines = rows["0.3"]
    assert "▲" in lines["clipscore_topk@0.3"].split("|")[9] and "▼" not in lines["clipscore_topk@0.3"]
    assert "↓" in lines["reward_topk@0.3"].split("|")[9] and "▲" not in lines["reward_topk@0.3"]
    assert "▼" in lines["random_topk@0.3"].split("|")[5] and "↓" in lines["random_topk@0.3"].split("|")[5]
    assert "▲" not in lines["full"] and "▼" not in lines["full"]
    # full's markers against clipscore_topk are those of the table's k
    assert "↓" in lines["full"].split("|")[9] and "↑" in rows["0.1"]["full"].split("|")[9]
    assert "▼" in rows["0.1"]["clipscore_topk@0.1"].split("|")[9]
    assert "▲/▼ above/below full, ↑/↓ above/below clipscore_topk@0.3" in tables["0.3"]
    assert "95% percentile bootstrap interval over the 60 evaluation images (400 resamples, seed 5)" in tables["0.3"]
    measured = metadata["measured"].value
    paragraphs = measured.split("\n\n")
    assert [p.split(":")[0] for p in paragraphs] == ["At keep fraction k = 0.1", "At keep fraction k = 0.3"]
    assert all(paragraph in tables[k] for paragraph, k in zip(paragraphs, tables))
    at_03 = paragraphs[1]
    against_full = at_03.split("Outside noise against full: ")[1].split("Outside noise against clipscore")[0]
    assert against_full.startswith("clipscore_topk@0.3 higher CIDEr-D (+0.500 [+0.500, +0.500]); random_topk@0.3 lower")
    assert "reward_topk" not in against_full  # identical to full: never named
    assert "clipscore_topk@0.1" not in at_03  # nothing of another k
    assert "I->T R@1" in at_03
    assert "The method's claim, reward_topk@0.3 against full at 30% of the pairs: within noise on I->T R@1," in at_03
    found = metadata["outside_noise"].value
    assert found["clipscore_topk@0.3"] == {"full": {"cider": pytest.approx(0.5)}}
    assert found["clipscore_topk@0.1"] == {"full": {"cider": pytest.approx(-0.5)}}


def test_the_terminal_table_reads_the_json_back(report: tuple[Path, Any]) -> None:
    data, _ = report
    curation = json.loads((data / layout.CURATION_REPORT_KEY).read_text())
    rows = [CurationRow(variant=v, **figures) for v, figures in curation.items()]
    tables = _tables(per_k_tables(rows, curation_text, "#k={k:g}"), "#k=")
    words = {k: " ".join(text.split()) for k, text in tables.items()}  # the notes are wrapped for a terminal
    assert "▲" in tables["0.3"] and "8 of 36 comparisons are outside noise" in words["0.3"]
    assert "2 of 12 comparisons are outside noise" in words["0.1"]
    assert max(len(line) for line in tables["0.3"].strip().splitlines()[4 + 2 :]) <= 120


def test_reports_without_per_item_results_or_on_other_items_are_named() -> None:
    retrieval, captioning = VARIANTS["full"]
    old = {k: v for k, v in retrieval.items() if k not in ("items", "per_item", "item_statistics")}
    with pytest.raises(NotEvaluatedError, match="retrieval_eval report of training set full has no per-item results"):
        variant_item_results("full", {"retrieval_eval": old})
    full = variant_item_results("full", {"retrieval_eval": retrieval})
    moved = variant_item_results("clipscore_topk@0.3", {"retrieval_eval": {**retrieval, "items": UIDS[::-1]}})
    recall = {m: retrieval[m] for m in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")}
    rows = [CurationRow("full", 1.0, None, **recall, cider=0.0, bleu4=0.0, seeds=SEEDS)]
    rows.append(replace(rows[0], variant="clipscore_topk@0.3", keep_fraction=0.3))
    with pytest.raises(ValueError, match="i2t_r1 of full and of clipscore_topk@0.3 cover different evaluation items"):
        with_intervals(rows, {"full": full, "clipscore_topk@0.3": moved}, BootstrapSettings(resamples=10))
    with pytest.raises(ValueError, match="the per-item results give i2t_r1"):
        with_intervals([replace(rows[0], i2t_r1=0.9)], {"full": full}, BootstrapSettings(resamples=10))
    per_item = retrieval["per_item"]
    reseeded = {**retrieval, "per_item": {**{s: per_item[s] for s in list(per_item)[:-1]}, "7": per_item["0"]}}
    other_seeds = variant_item_results("clipscore_topk@0.3", {"retrieval_eval": reseeded})
    with pytest.raises(
        NotEvaluatedError, match=r"seeds \['0', '1', '2'\], of clipscore_topk@0.3 for \['0', '1', '7'\]"
    ):
        with_intervals(rows, {"full": full, "clipscore_topk@0.3": other_seeds}, BootstrapSettings(resamples=10))
