"""Evaluation: the held-out set, retrieval and captioning metrics, the curation report."""
