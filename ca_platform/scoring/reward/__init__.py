"""The Compress & Align reward model: architecture, training on rankings, scoring."""
