"""Evaluation: the held-out set, each variant's models on it (retrieval and captioning metrics), the
scorers' held-out preference accuracy, and the curation report across variants."""
