"""The one model layer: devices, tokenizer, image preprocessing, tiny configs, the training loop, checkpoints."""
