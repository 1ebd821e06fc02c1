"""Write a BLIP-base-sized local folder built from config (random weights), to time real-size models offline.

Throughput depends on the architecture, not on the weights' values, and no checkpoint can be downloaded here:
this writes what `from_pretrained(path)` reads from a real BLIP-base folder (ViT-B/16 at 384 px, BERT-base
text, transformers' BlipConfig defaults), so `benchmarks/scoring.py --backbone DIR` (kind `itm`) and
`benchmarks/captioning.py --model DIR` (kind `captioning`, with its processor) run at BLIP-base's cost. Captions
from random weights are gibberish and run to --max-new-tokens, the worst case for a captioner's throughput.

    .venv/bin/python benchmarks/blip_base_folder.py --kind itm --out /tmp/blip-itm-base
    .venv/bin/python benchmarks/blip_base_folder.py --kind captioning --out /tmp/blip-captioning-base
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
)

from ca_platform.models.tokenization import bert_tokenizer

KINDS = {"itm": BlipForImageTextRetrieval, "captioning": BlipForConditionalGeneration}


def write_folder(kind: str, out: Path, seed: int = 0) -> Path:
    """A BLIP-base `kind` model with random weights and, for captioning, its processor, saved to `out`."""
    torch.manual_seed(seed)
    config = BlipConfig()
    config.architectures = [KINDS[kind].__name__]
    model = KINDS[kind](config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if kind == "captioning":
        size = config.vision_config.image_size
        image_processor = BlipImageProcessor(size={"height": size, "width": size})
        BlipProcessor(image_processor=image_processor, tokenizer=bert_tokenizer()).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(KINDS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    folder = write_folder(args.kind, args.out)
    parameters = sum(p.numel() for p in KINDS[args.kind].from_pretrained(folder, local_files_only=True).parameters())
    print(f"{args.kind}: BLIP-base from config, {parameters / 1e6:.0f}M parameters, written to {folder}")


if __name__ == "__main__":
    main()
