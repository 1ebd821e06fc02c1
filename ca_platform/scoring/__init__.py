"""Pair scorers (reward model, CLIP score, BLIP ITM), streaming a shard through them, and the model registry."""
