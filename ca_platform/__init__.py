"""ca-platform: Compress & Align, turning noisy web image-text pools into compact, well-aligned training sets."""

import os

# Models come from configs, from the platform's own checkpoints or from local folders, never from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
