"""Training CLIP and the BLIP captioner on a training-set variant under an equal budget."""
