"""Recaptioning real webdataset tars with tiny captioners: a platform checkpoint and pretrained folders."""

from __future__ import annotations

import io
import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import (
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from ca_platform.captioning.captioner import Captioner, load_captioner
from ca_platform.captioning.decoding import DecodingSettings
from ca_platform.captioning.streaming import caption_tars, in_sample_order
from ca_platform.ingest.webdataset_io import SampleError, iter_pairs
from ca_platform.models.blip import build_blip_captioner
from ca_platform.models.checkpoints import content_version
from ca_platform.models.images import ImageTransform
from ca_platform.models.tiny import tiny_blip_config
from ca_platform.models.tokenization import bert_tokenizer
from ca_platform.models.training import TrainedModel
from ca_platform.training.captioner import save_trained_captioner

IMAGE_SIZE = 32
SAMPLES = (5, 4)  # per tar


PIL_FORMATS = {"jpg": "JPEG", "png": "PNG"}


def image_bytes(seed: int, extension: str) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(20 + seed % 7, 24 + seed % 5, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=PIL_FORMATS[extension])
    return buffer.getvalue()


def write_tar(path: Path, samples: list[tuple[str, str, str, bytes]]) -> Path:
    """A tar as the platform's downloads are: (key, uid, image format, image bytes) -> image, txt, json."""
    with wds.TarWriter(str(path)) as writer:
        for key, uid, image_format, data in samples:
            writer.write(
                {
                    "__key__": key,
                    image_format: data,
                    "txt": f"alt text of {uid}".encode(),
                    "json": json.dumps({"uid": uid, "key": key}).encode(),
                }
            )
    return path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny models on one thread: what is tested does not depend on threads, and on a busy machine a model's
    many tiny ops run many times slower on two threads sharing the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shard_tars(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tars of 5 and 4 samples, PNGs and JPEGs of varied sizes; the second tar written in reverse key order
    (as downloads completing out of order write them)."""
    folder = tmp_path_factory.mktemp("tars")
    tars = []
    for tar, count in enumerate(SAMPLES):
        rows = range(count) if tar == 0 else reversed(range(count))
        extensions = {row: "png" if row % 2 else "jpg" for row in rows}
        samples = [
            (f"{tar:04d}{row:05d}", f"uid-{tar}-{row}", extension, image_bytes(10 * tar + row, extension))
            for row, extension in extensions.items()
        ]
        tars.append(write_tar(folder / f"{tar:05d}.tar", samples))
    return tars


@pytest.fixture(scope="module")
def platform_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BLIP captioner saved as the platform saves a trained one."""
    torch.manual_seed(0)
    model, preprocessor = build_blip_captioner("tiny", IMAGE_SIZE)
    _, folder = save_trained_captioner(TrainedModel(model.eval(), preprocessor), tmp_path_factory.mktemp("ckpt"))
    return folder


@pytest.fixture(scope="module")
def captioner(platform_folder: Path) -> Captioner:
    return load_captioner(platform_folder, device="cpu")


def tar_uids(tars: list[Path]) -> list[str]:
    return [uid for uid, _, _ in iter_pairs(tars)]


def tar_pixels(tars: list[Path], captioner: Captioner) -> torch.Tensor:
    return torch.stack([captioner.prepare(image) for _, image, _ in iter_pairs(tars)])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"strategy": "greedy", "candidates": 2}, "greedy decoding gives one caption per image, not 2"),
        ({"strategy": "beam", "candidates": 4, "num_beams": 3}, "candidates 4 > num_beams 3"),
        ({"strategy": "contrastive"}, "'contrastive' is not one of greedy, beam, nucleus, top_k"),
        ({"strategy": "nucleus", "top_p": 0.0}, "top_p must be in"),
        ({"strategy": "top_k", "top_k": 0}, "top_k must be at least 1"),
        ({"strategy": "nucleus", "temperature": 0.0}, "temperature must be positive"),
        ({"candidates": 0}, "candidates must be at least 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ],
)
def test_settings_refuse_what_decoding_cannot_give(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        DecodingSettings(**settings)


def test_generate_kwargs_per_strategy() -> None:
    common = {"max_new_tokens": 12, "use_cache": True}
    assert DecodingSettings("greedy", candidates=1, max_new_tokens=12).generate_kwargs() == {
        **common,
        "num_return_sequences": 1,
        "do_sample": False,
        "num_beams": 1,
    }
    assert DecodingSettings("beam", candidates=2, num_beams=4, max_new_tokens=12).generate_kwargs() == {
        **common,
        "num_return_sequences": 2,
        "do_sample": False,
        "num_beams": 4,
    }
    nucleus = DecodingSettings("nucleus", candidates=5, top_p=0.8, temperature=0.7, max_new_tokens=12)
    assert nucleus.generate_kwargs() == {
        **common,
        "num_return_sequences": 5,
        "do_sample": True,
        "num_beams": 1,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 0,  # the model's own top-k default switched off
    }
    top_k = DecodingSettings("top_k", candidates=5, top_k=7, max_new_tokens=12)
    assert top_k.generate_kwargs() == {
        **common,
        "num_return_sequences": 5,
        "do_sample": True,
        "num_beams": 1,
        "temperature": 1.0,
        "top_k": 7,
        "top_p": 1.0,
    }
    assert nucleus.sampled and top_k.sampled and not DecodingSettings().sampled


@pytest.mark.parametrize(
    "settings",
    [
        DecodingSettings("greedy", candidates=1, max_new_tokens=6),
        DecodingSettings("beam", candidates=2, num_beams=3, max_new_tokens=6),
        DecodingSettings("nucleus", candidates=3, max_new_tokens=6),
        DecodingSettings("top_k", candidates=2, top_k=5, max_new_tokens=6),
    ],
    ids=["greedy", "beam", "nucleus", "top_k"],
)
def test_caption_tars_gives_every_sample_its_candidates_in_tar_order(
    shard_tars: list[Path], captioner: Captioner, settings: DecodingSettings
) -> None:
    captioned = caption_tars(shard_tars, captioner, settings, batch_size=4, num_workers=0)

    frame = captioned.frame
    count = settings.candidates
    assert frame.schema == pl.Schema({"uid": pl.String, "rank": pl.Int32, "caption": pl.String})
    assert frame["uid"].to_list() == [uid for uid in tar_uids(shard_tars) for _ in range(count)]
    assert frame["rank"].to_list() == list(range(count)) * sum(SAMPLES)
    assert all(isinstance(caption, str) and caption == caption.strip() for caption in frame["caption"])
    assert captioned.seconds > 0
    # The untrained model seldom writes eos: between one token and max_new_tokens per caption.
    assert frame.height <= captioned.generated_tokens <= frame.height * settings.max_new_tokens

    # The same captions as generate() on the images prepared in memory, batch by batch, decoded by hand.
    pixels = tar_pixels(shard_tars, captioner)
    expected, tokens = [], 0
    for index, start in enumerate(range(0, len(pixels), 4)):
        with torch.random.fork_rng():
            if settings.sampled:
                torch.manual_seed(settings.seed + index)
            ids = captioner.model.generate(pixel_values=pixels[start : start + 4], **settings.generate_kwargs())
        for row in ids[:, 1:]:  # after bos
            eos = (row == captioner.model.config.text_config.sep_token_id).nonzero()
            length = int(eos[0]) + 1 if len(eos) else len(row)
            tokens += length
            expected.append(captioner.tokenizer.decode(row[:length], skip_special_tokens=True).strip())
    assert frame["caption"].to_list() == expected
    assert captioned.generated_tokens == tokens


def test_sampling_is_seeded_the_same_whatever_the_workers(shard_tars: list[Path], captioner: Captioner) -> None:
    settings = DecodingSettings("nucleus", candidates=2, max_new_tokens=5, seed=3)
    torch.manual_seed(123)
    before = torch.rand(1)

    torch.manual_seed(123)
    inline = caption_tars(shard_tars, captioner, settings, batch_size=3, num_workers=0)
    assert torch.rand(1) == before  # the caller's random state is left as it was
    again = caption_tars(shard_tars, captioner, settings, batch_size=3, num_workers=0)
    # Two workers deliver their strided batches interleaved; the captions come out the same, in tar order.
    in_workers = caption_tars(shard_tars, captioner, settings, batch_size=3, num_workers=2)
    reseeded = caption_tars(shard_tars, captioner, DecodingSettings("nucleus", 2, 5, seed=4), 3, num_workers=0)

    assert inline.frame.equals(again.frame)
    assert inline.frame.equals(in_workers.frame)
    assert inline.generated_tokens == in_workers.generated_tokens
    assert not inline.frame.equals(reseeded.frame)
    assert inline.frame["uid"].to_list() == reseeded.frame["uid"].to_list()


def test_tars_without_samples_give_an_empty_frame(tmp_path: Path, captioner: Captioner) -> None:
    empty = write_tar(tmp_path / "00000.tar", [])
    captioned = caption_tars([empty], captioner, DecodingSettings(), num_workers=2)
    assert captioned.frame.height == 0 and captioned.generated_tokens == 0
    assert captioned.frame.schema == pl.Schema({"uid": pl.String, "rank": pl.Int32, "caption": pl.String})


def test_samples_come_back_in_order_from_interleaved_batches() -> None:
    def batch(indices: list[int]) -> tuple[list[int], list[str], torch.Tensor]:
        return indices, [f"u{i}" for i in indices], torch.tensor(indices, dtype=torch.float32).unsqueeze(1)

    # Three workers' strided batches of two, arriving round-robin, the last worker one sample short.
    arrivals = [batch([0, 3]), batch([1, 4]), batch([2]), batch([6]), batch([5, 7])]
    batches = list(in_sample_order(arrivals, batch_size=3))
    assert [uids for uids, _ in batches] == [["u0", "u1", "u2"], ["u3", "u4", "u5"], ["u6", "u7"]]
    assert torch.cat([pixels for _, pixels in batches]).flatten().tolist() == list(range(8))
    with pytest.raises(RuntimeError, match="without samples before them"):
        list(in_sample_order([batch([0]), batch([2])], batch_size=2))


def test_workers_receive_the_transform_not_the_model(captioner: Captioner) -> None:
    transform = pickle.loads(pickle.dumps(captioner.transform))
    assert isinstance(transform, ImageTransform)
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    assert torch.equal(transform(image), captioner.prepare(image))
    assert captioner.prepare(image).shape == (3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_undecodable_image_names_tar_and_key(tmp_path: Path, captioner: Captioner, num_workers: int) -> None:
    good = write_tar(tmp_path / "00000.tar", [(f"{i:09d}", f"g{i}", "jpg", image_bytes(i, "jpg")) for i in range(3)])
    bad = write_tar(
        tmp_path / "00001.tar",
        [
            ("000010000", "b0", "png", image_bytes(5, "png")),
            ("000010001", "b1", "jpg", b"<html>not an image</html>"),
        ],
    )
    settings = DecodingSettings("greedy", candidates=1, max_new_tokens=3)
    with pytest.raises(SampleError, match=re.escape(str(bad)) + r": sample '000010001'.*does not decode"):
        caption_tars([good, bad], captioner, settings, batch_size=2, num_workers=num_workers)


def test_captioner_version_is_the_folder_content_hash(platform_folder: Path, captioner: Captioner) -> None:
    assert captioner.version == content_version(platform_folder) == platform_folder.name
    assert captioner.device == torch.device("cpu")
    with pytest.raises(ValueError, match="neither 'tiny' nor a local folder"):
        load_captioner(platform_folder / "missing")


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's pretrained BLIP captioner folder: save_pretrained of the model and its processor."""
    folder = tmp_path_factory.mktemp("blip")
    tokenizer = bert_tokenizer(64)
    torch.manual_seed(1)
    BlipForConditionalGeneration(tiny_blip_config(tokenizer, IMAGE_SIZE)).save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_pretrained_blip_folder_captions_tars(shard_tars: list[Path], blip_folder: Path) -> None:
    captioner = load_captioner(blip_folder, device="cpu")
    assert isinstance(captioner.model, BlipForConditionalGeneration)
    assert captioner.version == content_version(blip_folder)
    transform = pickle.loads(pickle.dumps(captioner.transform))
    assert transform(Image.new("RGB", (50, 20))).shape == (3, IMAGE_SIZE, IMAGE_SIZE)

    settings = DecodingSettings("beam", candidates=2, num_beams=2, max_new_tokens=4)
    captioned = caption_tars(shard_tars, captioner, settings, batch_size=4, num_workers=0)
    assert captioned.frame["uid"].to_list() == [uid for uid in tar_uids(shard_tars) for _ in range(2)]
    assert all(isinstance(caption, str) for caption in captioned.frame["caption"])


def test_blip_prompt_is_left_out_of_the_captions(shard_tars: list[Path], blip_folder: Path) -> None:
    """BLIP continues the prompt; the captions are what it wrote after it (as BLIP's CapFilt strips it)."""
    captioner = load_captioner(blip_folder, device="cpu", prompt="a picture of")
    pixels = tar_pixels(shard_tars, captioner)[:3]
    settings = DecodingSettings("greedy", candidates=1, max_new_tokens=4)

    batch = captioner.caption_batch(pixels, settings)

    prompt = captioner.tokenizer("a picture of", return_tensors="pt")["input_ids"]  # [CLS] a picture of [SEP]
    ids = captioner.model.generate(pixel_values=pixels, input_ids=prompt.repeat(3, 1), **settings.generate_kwargs())
    assert ids.shape[1] == 4 + 4 and ids[0, :4].tolist() == prompt[0, :4].tolist()
    expected = [[captioner.tokenizer.decode(row[4:], skip_special_tokens=True).strip()] for row in ids]
    assert batch.captions == expected


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-style folder: CLIP vision tower, Llama language model, BERT's vocabulary plus <image>."""
    folder = tmp_path_factory.mktemp("llava")
    tokenizer = bert_tokenizer(512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = LlamaConfig(
        **tower,
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**tower, image_size=IMAGE_SIZE, patch_size=8),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(2)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(folder)
    return folder


def test_llava_style_folder_captions_after_its_prompt(shard_tars: list[Path], llava_folder: Path) -> None:
    prompt = "<image> describe the picture:"
    captioner = load_captioner(llava_folder, device="cpu", prompt=prompt)
    assert isinstance(captioner.model, LlavaForConditionalGeneration)
    settings = DecodingSettings("beam", candidates=2, num_beams=2, max_new_tokens=4)

    captioned = caption_tars(shard_tars, captioner, settings, batch_size=4, num_workers=0)

    assert captioned.frame["uid"].to_list() == [uid for uid in tar_uids(shard_tars) for _ in range(2)]
    # What a user of the processor would get for the first two images, new tokens only.
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(llava_folder), local_files_only=True, backend="pil")
    images = [image for _, image, _ in iter_pairs(shard_tars)][:2]
    inputs = processor(images=images, text=[prompt] * 2, return_tensors="pt")
    ids = captioner.model.generate(**inputs, **settings.generate_kwargs())
    new = ids[:, inputs["input_ids"].shape[1] :]
    expected = [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    assert captioned.frame["caption"].to_list()[:4] == expected

    with pytest.raises(ValueError, match="need a prompt with the image token"):
        load_captioner(llava_folder, device="cpu")
