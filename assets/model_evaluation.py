"""evaluation_set, retrieval_eval and captioning_eval: every variant's models on the same clean held-out set."""

from pathlib import Path
from typing import Any

import polars as pl
from dagster import AssetExecutionContext, DataVersion, Failure, MaterializeResult, MetadataValue, asset

from ca_platform import layout
from ca_platform.analytics.plots import markdown_table
from ca_platform.assets.partitions import training_variants
from ca_platform.assets.training import BLIP_CHECKPOINT, CLIP_CHECKPOINT, blip_checkpoint, clip_checkpoint
from ca_platform.evaluation.captions import bleu4, cider_d
from ca_platform.evaluation.evaluation_set import (
    LEDGER_FILE,
    EvaluationSet,
    download_evaluation_set,
    evaluation_version,
    load_evaluation_set,
)
from ca_platform.evaluation.retrieval import cosine_similarity_matrix, retrieval_recall
from ca_platform.resources import DownloadConfig, EvaluationConfig, PlatformStorage
from ca_platform.schemas import STATUS, Status
from ca_platform.scoring.registry import current_model
from ca_platform.storage import DataStore, fetch_folder, fetch_to_local, publish_folder, read_json, write_json
from ca_platform.training.captioner import generate_captions, load_trained_captioner
from ca_platform.training.clip import embed_pairs, load_trained_clip

RETRIEVAL = "retrieval"
CAPTIONING = "captioning"


@asset(group_name="evaluation", kinds={"webdataset"})
def evaluation_set(
    storage: PlatformStorage, evaluation: EvaluationConfig, downloader: DownloadConfig
) -> MaterializeResult:
    """The clean held-out set (parquet url, caption) downloaded through the guarded img2dataset, stored by the
    file's content hash (so the same file is downloaded once); rows sharing a URL are one image with several
    references."""
    if not evaluation.uri:
        raise Failure("no evaluation set configured: pass --eval FILE or set CA_EVAL_URI")
    data = storage.data_store()
    path = Path(evaluation.uri)
    version = evaluation_version(path)
    ledger_key = f"{layout.evaluation_prefix(version)}/{LEDGER_FILE}"
    with storage.staging_dir("evaluation-set") as staging:
        if data.exists(ledger_key):  # this file was downloaded before: the set is reused as it is
            ledger = pl.read_parquet(fetch_to_local(data, ledger_key, staging))
        else:
            ledger = download_evaluation_set(path, staging / "set", downloader.settings())
            publish_folder(data, staging / "set", layout.evaluation_prefix(version), index_name=LEDGER_FILE)
        write_json(data, layout.CURRENT_EVALUATION_KEY, {"version": version, "source": str(path)}, staging)
    downloaded = ledger.filter(pl.col(STATUS) == Status.SUCCESS).height
    return MaterializeResult(
        metadata={"version": version, "images": ledger.height, "downloaded": downloaded, "source": str(path)},
        data_version=DataVersion(version),
    )


def _load_evaluation(storage: PlatformStorage, scratch: Path) -> tuple[str, EvaluationSet]:
    data = storage.data_store()
    document = read_json(data, layout.CURRENT_EVALUATION_KEY, scratch)
    if document is None:
        raise Failure("no evaluation set yet: materialize evaluation_set first")
    folder = fetch_folder(data, layout.evaluation_prefix(document["version"]), storage.cache_dir())
    return document["version"], load_evaluation_set(folder)


def _checkpoint_folder(storage: PlatformStorage, model: str, variant: str, scratch: Path) -> tuple[str, Path]:
    data = storage.data_store()
    kind = layout.trained_model_kind(model, variant)
    version = current_model(data, kind, scratch)["version"]
    return version, fetch_folder(data, layout.model_prefix(kind, version), storage.cache_dir())


def _write_report(data: DataStore, report: str, variant: str, document: dict[str, Any], scratch: Path) -> None:
    write_json(data, layout.variant_report_key(report, variant), document, scratch)


@asset(
    partitions_def=training_variants,
    deps=[clip_checkpoint, evaluation_set],
    group_name="evaluation",
    kinds={"pytorch", "json"},
)
def retrieval_eval(
    context: AssetExecutionContext, storage: PlatformStorage, evaluation: EvaluationConfig
) -> MaterializeResult:
    """Image->text and text->image Recall@1/5/10 of the variant's CLIP on the evaluation set (cosine of the
    normalised embeddings; an image counts as found by any of its references)."""
    variant = context.partition_key
    with storage.staging_dir(f"retrieval-{variant}") as staging:
        evaluation_version_, dataset = _load_evaluation(storage, staging)
        version, folder = _checkpoint_folder(storage, CLIP_CHECKPOINT, variant, staging)
        model, preprocessor = load_trained_clip(folder, device=evaluation.device)
        captions, owner = dataset.captions
        images, texts = embed_pairs(
            model, preprocessor, dataset.images, captions, batch_size=evaluation.batch_size, device=evaluation.device
        )
        recall = retrieval_recall(cosine_similarity_matrix(images, texts), owner)
        document = {
            "variant": variant,
            "model_version": version,
            "evaluation_version": evaluation_version_,
            "images_not_downloaded": dataset.not_downloaded,
            **recall.as_json(),
        }
        _write_report(storage.data_store(), RETRIEVAL, variant, document, staging)
    return MaterializeResult(
        metadata={
            **recall.as_json(),
            "model_version": version,
            "table": MetadataValue.md(
                markdown_table(
                    ["direction", "R@1", "R@5", "R@10"],
                    [
                        ["image -> text", recall.i2t_r1, recall.i2t_r5, recall.i2t_r10],
                        ["text -> image", recall.t2i_r1, recall.t2i_r5, recall.t2i_r10],
                    ],
                )
            ),
        }
    )


@asset(
    partitions_def=training_variants,
    deps=[blip_checkpoint, evaluation_set],
    group_name="evaluation",
    kinds={"pytorch", "json"},
)
def captioning_eval(
    context: AssetExecutionContext, storage: PlatformStorage, evaluation: EvaluationConfig
) -> MaterializeResult:
    """CIDEr-D and BLEU-4 (coco-caption's definitions, in Python) of the variant's BLIP captions, greedy
    decoding, against every reference of each evaluation image."""
    variant = context.partition_key
    with storage.staging_dir(f"captioning-{variant}") as staging:
        evaluation_version_, dataset = _load_evaluation(storage, staging)
        version, folder = _checkpoint_folder(storage, BLIP_CHECKPOINT, variant, staging)
        model, preprocessor = load_trained_captioner(folder, device=evaluation.device)
        generated = generate_captions(
            model,
            preprocessor,
            dataset.images,
            batch_size=evaluation.batch_size,
            max_new_tokens=evaluation.max_new_tokens,
            device=evaluation.device,
        )
        candidates = dict(zip(dataset.uids, generated))
        references = dict(zip(dataset.uids, dataset.references))
        cider, bleu = cider_d(candidates, references), bleu4(candidates, references)
        examples = [[r[0], g] for r, g in zip(dataset.references[:5], generated[:5])]
        document = {
            "variant": variant,
            "model_version": version,
            "evaluation_version": evaluation_version_,
            "images_not_downloaded": dataset.not_downloaded,
            "cider": cider.score,
            "bleu4": bleu.score,
            "captions": candidates,
        }
        _write_report(storage.data_store(), CAPTIONING, variant, document, staging)
    return MaterializeResult(
        metadata={
            "cider": cider.score,
            "bleu4": bleu.score,
            "model_version": version,
            "examples": MetadataValue.md(markdown_table(["a reference", "generated"], examples)),
        }
    )
