"""ca-platform: Compress & Align, turning noisy web image-text pools into compact, well-aligned training sets."""
