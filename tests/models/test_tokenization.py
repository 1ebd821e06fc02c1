"""The caption-vocabulary tokenizer of captioners trained from scratch: same pieces, smaller head."""

from __future__ import annotations

from pathlib import Path

from transformers import BlipConfig, BlipForConditionalGeneration

from ca_platform.models.blip import build_blip_captioner
from ca_platform.models.checkpoints import load_transformers_model, save_transformers_model
from ca_platform.models.tokenization import bert_tokenizer, caption_vocabulary_tokenizer

CAPTIONS = ["A red circle on a blue background", "two green squares, bluish", "a red circle"]


def test_captions_are_cut_into_the_same_pieces_and_unseen_words_become_unknown() -> None:
    full, cut = bert_tokenizer(64), caption_vocabulary_tokenizer(CAPTIONS, 64)
    for caption in [*CAPTIONS, "a bluish circle on a green background"]:
        assert cut.tokenize(caption) == full.tokenize(caption)
        assert cut.decode(cut(caption)["input_ids"], skip_special_tokens=True) == full.decode(
            full(caption)["input_ids"], skip_special_tokens=True
        )
    assert cut.tokenize("a purple hexagon") == ["a", "[UNK]", "[UNK]"]
    pieces = {piece for caption in CAPTIONS for piece in full.tokenize(caption)}
    assert len(cut) == len(pieces) + len(full.all_special_tokens)
    assert sorted(cut.get_vocab().values()) == list(range(len(cut)))


def test_a_captioner_on_its_captions_vocabulary_writes_only_their_words_and_keeps_its_tokenizer(
    tmp_path: Path,
) -> None:
    model, preprocessor = build_blip_captioner("tiny", image_size=32, captions=CAPTIONS)
    assert model.config.text_config.vocab_size == len(preprocessor.tokenizer) < 30
    assert model.text_decoder.cls.predictions.decoder.weight.shape[0] == len(preprocessor.tokenizer)
    tokenizer = preprocessor.tokenizer
    assert (model.config.text_config.bos_token_id, model.config.text_config.sep_token_id) == (
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
    )
    _, folder = save_transformers_model(tmp_path, model, preprocessor, {}, "captioner")
    loaded, checkpoint = load_transformers_model(folder, "captioner", BlipConfig, BlipForConditionalGeneration)
    assert checkpoint.preprocessor.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded.config.text_config.vocab_size == len(tokenizer)
