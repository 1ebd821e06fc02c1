"""Evaluation: the held-out set, each variant's models on it (retrieval, zero-shot classification and captioning
metrics), the scorers' held-out preference accuracy, and the curation report across variants."""

# The prompt templates zero-shot classification puts each class name in, unless told otherwise: a handful of
# CLIP's ImageNet templates that read for any labelled image (the resource default and the CLI's both read this).
# A user whose images are not photos (or whose model was trained on another kind of text) passes their own.
DEFAULT_CLASS_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
    "itap of a {}.",
)
