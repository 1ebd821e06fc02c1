"""curation_report: did compression pay off? One table and one plot across the training-set variants."""

from dagster import Failure, MaterializeResult, MetadataValue, asset

from ca_platform import layout
from ca_platform.analytics.plots import markdown_image
from ca_platform.assets.compression import THRESHOLD_REPORT, score_threshold
from ca_platform.assets.evaluation import PREFERENCE_ACCURACY_REPORT, preference_accuracy
from ca_platform.assets.model_evaluation import CAPTIONING, RETRIEVAL, captioning_eval, retrieval_eval
from ca_platform.evaluation.report import CurationRow, curation_markdown, curation_plot
from ca_platform.resources import PlatformStorage
from ca_platform.schemas import CLIPSCORE_TOPK, FULL, REWARD_TOPK, TRAINING_VARIANTS
from ca_platform.storage import read_json, write_json

CURATION_REPORT = f"{layout.REPORTS_DIR}/curation_report"

# The scorer that ranks each variant, whose held-out preference accuracy the report shows.
VARIANT_SCORER = {REWARD_TOPK: "reward_model", CLIPSCORE_TOPK: "clip_score"}


@asset(
    deps=[retrieval_eval, captioning_eval, score_threshold, preference_accuracy],
    group_name="evaluation",
    kinds={"json", "markdown"},
)
def curation_report(storage: PlatformStorage) -> MaterializeResult:
    """Per variant: kept fraction, the scorer's held-out preference accuracy, retrieval R@1/R@5 both ways and
    CIDEr-D/BLEU-4, as measured in this run: whichever variant wins. Written to reports/curation_report.json,
    .md and .png."""
    data = storage.data_store()
    with storage.staging_dir("curation-report") as staging:
        thresholds = read_json(data, THRESHOLD_REPORT, staging) or {}
        accuracy = read_json(data, PREFERENCE_ACCURACY_REPORT, staging) or {}
        rows = []
        for variant in TRAINING_VARIANTS:
            retrieval = read_json(data, layout.variant_report_key(RETRIEVAL, variant), staging)
            captioning = read_json(data, layout.variant_report_key(CAPTIONING, variant), staging)
            if retrieval is None or captioning is None:
                raise Failure(
                    f"variant {variant} has not been evaluated: materialize retrieval_eval and "
                    f"captioning_eval for partition {variant} first"
                )
            if variant == FULL:
                kept_fraction = 1.0
            elif variant in thresholds:
                kept_fraction = thresholds[variant]["kept"] / thresholds[variant]["total"]
            else:
                raise Failure(f"no score threshold for {variant}: materialize score_threshold first")
            scorer = VARIANT_SCORER.get(variant)
            rows.append(
                CurationRow(
                    variant=variant,
                    kept_fraction=kept_fraction,
                    scorer_preference_accuracy=accuracy.get(scorer) if scorer else None,
                    i2t_r1=retrieval["i2t_r1"],
                    t2i_r1=retrieval["t2i_r1"],
                    i2t_r5=retrieval["i2t_r5"],
                    t2i_r5=retrieval["t2i_r5"],
                    cider=captioning["cider"],
                    bleu4=captioning["bleu4"],
                )
            )
        document = {row.variant: row.as_json() for row in rows}
        write_json(data, f"{CURATION_REPORT}.json", document, staging)
        table = curation_markdown(rows)
        (staging / "report.md").write_text(table + "\n")
        data.put_file(staging / "report.md", f"{CURATION_REPORT}.md", consume=True)
        plot = curation_plot(rows, staging / "report.png")
        image = markdown_image(plot, "curation report")
        data.put_file(plot, f"{CURATION_REPORT}.png", consume=True)
    return MaterializeResult(
        metadata={
            "table": MetadataValue.md(table),
            "plot": MetadataValue.md(image),
            "report": MetadataValue.path(data.uri_of(f"{CURATION_REPORT}.json")),
        }
    )
