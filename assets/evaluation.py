"""Evaluation: evaluation_set (the clean held-out set), retrieval_eval and captioning_eval (every variant's
models on it), with a labelled set classification_set and classification_eval (every variant's CLIP, zero-shot),
and curation_report (did compression pay off?)."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, DataVersion, Failure, MaterializeResult, MetadataValue, asset

from ca_platform import layout
from ca_platform.analytics.plots import markdown_image, markdown_table
from ca_platform.assets.compression import score_threshold
from ca_platform.assets.partitions import training_variants
from ca_platform.assets.reward import preference_accuracy
from ca_platform.assets.training import blip_checkpoint, clip_checkpoint
from ca_platform.evaluation.classification_set import stage_classification_set
from ca_platform.evaluation.evaluation_set import stage_evaluation_set
from ca_platform.evaluation.report import write_curation_report
from ca_platform.evaluation.report_text import measured_by_k, outside_noise
from ca_platform.evaluation.variants import (
    RETRIEVAL_METRICS,
    evaluate_captioning,
    evaluate_classification,
    evaluate_retrieval,
)
from ca_platform.resources import DownloadConfig, EvaluationConfig, ModelTrainingConfig, PlatformStorage

GROUP = "evaluation"


def _seed_cell(document: Mapping[str, Any], name: str) -> str:
    """A variant report's figure for a metadata table: its mean, ± its spread when several seeds were trained."""
    value = f"{document[name]:.3f}"
    return f"{value} ± {document['spread'][name]:.3f}" if len(document["per_seed"]) > 1 else value


@asset(group_name=GROUP, kinds={"webdataset"})
def evaluation_set(
    storage: PlatformStorage, evaluation: EvaluationConfig, downloader: DownloadConfig
) -> MaterializeResult:
    """The clean held-out set (parquet url, caption) downloaded through the guarded img2dataset, stored by the
    file's content hash (so the same file is downloaded once); rows sharing a URL are one image with several
    references."""
    if not evaluation.uri:
        raise Failure("no evaluation set configured: pass --eval FILE or set CA_EVAL_URI")
    path = Path(evaluation.uri)
    with storage.staging_dir("evaluation-set") as staging:
        staged = stage_evaluation_set(storage.data_store(), path, downloader.settings(), staging)
    return _staged_set_result(staged.version, staged.ledger.height, staged.downloaded, path)


def _staged_set_result(version: str, images: int, downloaded: int, source: Path) -> MaterializeResult:
    """A staged held-out set's materialization, versioned by the file's content hash."""
    metadata = {"version": version, "images": images, "downloaded": downloaded, "source": str(source)}
    return MaterializeResult(metadata=metadata, data_version=DataVersion(version))


@asset(
    partitions_def=training_variants,
    deps=[clip_checkpoint, evaluation_set],  # the variant's CLIP, on the same held-out images as every variant
    group_name=GROUP,
    kinds={"pytorch", "json"},
)
def retrieval_eval(
    context: AssetExecutionContext,
    storage: PlatformStorage,
    evaluation: EvaluationConfig,
    model_training: ModelTrainingConfig,
) -> MaterializeResult:
    """Image->text and text->image Recall@1/5/10 of the training set's CLIP (each seed's) on the evaluation set
    (cosine of the normalised embeddings; an image counts as found by any of its references): the mean over
    seeds with its spread."""
    variant = context.partition_key
    seeds = model_training.settings().training_seeds()
    with storage.staging_dir(f"retrieval-{variant}") as staging:
        result = evaluate_retrieval(
            storage.data_store(), variant, seeds, evaluation.batch_size, evaluation.device, storage.cache_dir(), staging
        )
    document = result.document

    return MaterializeResult(
        metadata={
            **{name: document[name] for name in RETRIEVAL_METRICS},
            "seeds": len(seeds),
            "model_versions": MetadataValue.json(document["model_versions"]),
            "table": MetadataValue.md(
                markdown_table(
                    ["direction", "R@1", "R@5", "R@10"],
                    [
                        [label, *(_seed_cell(document, f"{prefix}_r{k}") for k in (1, 5, 10))]
                        for label, prefix in (("image -> text", "i2t"), ("text -> image", "t2i"))
                    ],
                )
            ),
        }
    )


@asset(group_name=GROUP, kinds={"webdataset"})
def classification_set(
    storage: PlatformStorage, evaluation: EvaluationConfig, downloader: DownloadConfig
) -> MaterializeResult:
    """The labelled set of zero-shot classification (parquet url, label[, name]) downloaded through the guarded
    img2dataset as the evaluation set is, stored by the file's content hash (the same file is downloaded once)."""
    if not evaluation.classes_uri:
        raise Failure("no labelled classification set configured: pass --eval-classes FILE or set CA_EVAL_CLASSES_URI")
    path = Path(evaluation.classes_uri)
    with storage.staging_dir("classification-set") as staging:
        staged = stage_classification_set(storage.data_store(), path, downloader.settings(), staging)
    return _staged_set_result(staged.version, staged.ledger.height, staged.downloaded, path)


@asset(
    partitions_def=training_variants,
    deps=[clip_checkpoint, classification_set],
    group_name=GROUP,
    kinds={"pytorch", "json"},
)
def classification_eval(
    context: AssetExecutionContext,
    storage: PlatformStorage,
    evaluation: EvaluationConfig,
    model_training: ModelTrainingConfig,
) -> MaterializeResult:
    """Zero-shot top-1 and top-5 accuracy of the training set's CLIP (each seed's) on the labelled set, each class the
    normalised mean of its name in every prompt template (CLIP's ensembling): the mean over seeds with its
    spread, and every image's outcome per seed in the report (for intervals over the images)."""
    if not evaluation.classes_uri:  # the report leaves classification out then: so does this asset
        raise Failure("no labelled classification set configured: pass --eval-classes FILE or set CA_EVAL_CLASSES_URI")
    variant = context.partition_key
    seeds = model_training.settings().training_seeds()
    with storage.staging_dir(f"classification-{variant}") as staging:
        result = evaluate_classification(
            storage.data_store(),
            variant,
            seeds,
            evaluation.class_templates,
            evaluation.batch_size,
            evaluation.device,
            storage.cache_dir(),
            staging,
        )
    document = result.document

    per_class = sorted(document["per_class"].items(), key=lambda item: -item[1]["top1"])
    return MaterializeResult(
        metadata={
            "top1": document["top1"],
            "top5": document["top5"],
            "images": document["num_images"],
            "classes": document["num_classes"],
            "images_not_downloaded": document["images_not_downloaded"],
            "seeds": len(seeds),
            "model_versions": MetadataValue.json(document["model_versions"]),
            "table": MetadataValue.md(
                markdown_table(["top-1", "top-5"], [[_seed_cell(document, m) for m in ("top1", "top5")]])
            ),
            "per_class": MetadataValue.md(
                markdown_table(
                    ["class", "images", "top-1"], [[name, c["images"], f"{c['top1']:.3f}"] for name, c in per_class]
                )
            ),
            "templates": MetadataValue.json(document["templates"]),
        }
    )


@asset(
    partitions_def=training_variants,
    deps=[blip_checkpoint, evaluation_set],
    group_name=GROUP,
    kinds={"pytorch", "json"},
)
def captioning_eval(
    context: AssetExecutionContext,
    storage: PlatformStorage,
    evaluation: EvaluationConfig,
    model_training: ModelTrainingConfig,
) -> MaterializeResult:
    """CIDEr-D and BLEU-4 (coco-caption's definitions, in Python) of the variant's BLIP captions (each seed's),
    greedy decoding, against every reference of each evaluation image: the mean over seeds with its spread."""
    variant = context.partition_key
    with storage.staging_dir(f"captioning-{variant}") as staging:
        result = evaluate_captioning(
            storage.data_store(),
            variant,
            model_training.settings().training_seeds(),
            evaluation.batch_size,
            evaluation.max_new_tokens,
            evaluation.device,
            storage.cache_dir(),
            staging,
        )
    return MaterializeResult(
        metadata={
            "cider": result.cider,
            "bleu4": result.bleu4,
            "spread": MetadataValue.json(result.document["spread"]),
            "model_versions": MetadataValue.json(result.document["model_versions"]),
            "examples": MetadataValue.md(markdown_table(["a reference", "generated"], result.examples)),
        }
    )


@asset(
    deps=[retrieval_eval, captioning_eval, classification_eval, score_threshold, preference_accuracy],
    group_name=GROUP,
    kinds={"json", "markdown"},
)
def curation_report(storage: PlatformStorage, evaluation: EvaluationConfig) -> MaterializeResult:
    """Per training set (full, each variant at each keep fraction k): kept fraction, the scorer's held-out
    preference accuracy, retrieval R@1/R@5 both ways, CIDEr-D/BLEU-4 and (with a labelled set) zero-shot
    top-1/top-5, each with its seed spread and bootstrap interval over the evaluation images, and the differences
    from full and from clipscore_topk at the same k outside noise marked, as measured in this run: whichever
    variant wins. A table per k, and the compression curve (each figure against k, one line per ranking, full as
    the reference line). Written to reports/curation_report.json, .md and .png, and reports/curation_curve.png."""
    data = storage.data_store()
    with storage.staging_dir("curation-report") as staging:
        report = write_curation_report(
            data, staging, evaluation.bootstrap(), classification=bool(evaluation.classes_uri)
        )
        image = markdown_image(report.plot, "curation report")
        curve = markdown_image(report.curve, "compression curve")
    return MaterializeResult(
        metadata={
            "table": MetadataValue.md(report.table),
            "curve": MetadataValue.md(curve),
            "measured": MetadataValue.text(measured_by_k(report.rows)),
            "outside_noise": MetadataValue.json(outside_noise(report.rows)),
            "plot": MetadataValue.md(image),
            "report": MetadataValue.path(data.uri_of(layout.CURATION_REPORT_KEY)),
            "curve_plot": MetadataValue.path(data.uri_of(layout.CURATION_CURVE_PLOT_KEY)),
        }
    )
