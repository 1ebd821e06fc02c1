"""The Compress & Align reward model: architecture (`model`), training on rankings (`train`), checkpoint and
scoring (`scorer`)."""
