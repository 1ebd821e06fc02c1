"""Compression: the global cut of every subset variant and each shard's re-packed subset."""
