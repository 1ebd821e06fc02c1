"""Synthetic captions for a shard's images: decoding settings, captioners loaded from folders, tar streaming."""
