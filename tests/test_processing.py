"""Tests for `processing_andesvl.py` and `chat_template.jinja`: the processor loaded the way Hub users get it
(`AutoProcessor`, `trust_remote_code=True`, from tiny repo folders built by `andesvl_tools/build_repo.py`).

Run in both supported transformers lines (CPU only, offline):
    .venv/tf4/bin/python -m pytest tests/test_processing.py -q
    .venv/tf5/bin/python -m pytest tests/test_processing.py -q
"""

from __future__ import annotations

import base64
import copy
import io
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import IMAGE_TOKEN_ID, load_processor, random_image

IMG_START_ID, IMG_END_ID, PAD_ID = 151652, 151653, 151643

# (width, height) -> tokens in the default "hf_chat" mode and with resize_mode="eval", max_size=1792.
# AIMv2 (base 28): the rows of spec table 7.3, plus extreme aspect ratios. 1x4000 (4000 px >= 4*28**2):
# plain round-up, canvas 28 x 4004 = 1 x 143 tokens, in both modes.
AIMV2_TOKENS = {
    (448, 448): (289, 256),
    (640, 480): (414, 414),
    (1920, 1080): (700, 2691),
    (28, 28): (9, 4),
    (100, 50): (8, 8),
    (1, 4000): (143, 143),
    (4000, 1): (143, 143),
}
# SigLIP2 (base 32), derived by hand from spec 7.1 / 7.2: 448 -> 480 (15x15) / 448 (14x14); 640x480 -> 672x512 /
# 640x480; 1920x1080 -> area fit 977x549 -> 992x576 (31x18) / 1920x1088 (60x34); 28x28 -> 96x96 / 64x64.
# 1x4000 is below 4*32**2 = 4096 px: hf_chat area fit to 64**2 gives 1x4047 -> 64x4064 (2x127); eval scales up to
# 4096 px then ceils to 32x4064 (1x127).
SIGLIP2_TOKENS = {
    (448, 448): (225, 196),
    (640, 480): (336, 300),
    (1920, 1080): (558, 2040),
    (28, 28): (9, 4),
    (100, 50): (8, 8),
    (1, 4000): (254, 127),
    (4000, 1): (254, 127),
}
EXPECTED_TOKENS = {"aimv2": AIMV2_TOKENS, "siglip2": SIGLIP2_TOKENS}
EVAL_MODE = {"resize_mode": "eval", "max_size": 1792}


@pytest.fixture(scope="module")
def processor(tiny_repos):
    """The AIMv2 tiny repo's processor, for tests that do not depend on the encoder type."""
    return load_processor(tiny_repos["aimv2"])


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "picture.png"
    random_image(100, 60, seed=1).save(path)
    return str(path)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width x height` with (almost) no pixel data: a decompression-bomb stand-in."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def user(*parts) -> list[dict]:
    """One user message; str parts become text parts."""
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}]


def render(processor, messages, **kwargs) -> str:
    return processor.apply_chat_template(messages, tokenize=False, **kwargs)


def encode(processor, messages, **kwargs):
    return processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True, **kwargs
    )


def assert_same_inputs(actual, expected):
    assert set(actual.keys()) == set(expected.keys())
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def has_number(message: str, number: int) -> bool:
    return re.search(rf"\b{number}\b", message) is not None


# ----------------------------------------------------------------------------------------------------------------------
# Loading, input names, output keys
# ----------------------------------------------------------------------------------------------------------------------


def test_auto_processor_classes(tiny_processor, vision_type):
    assert type(tiny_processor).__name__ == "AndesVLProcessor"
    assert type(tiny_processor.image_processor).__name__ == "AndesVLImageProcessor"
    assert type(tiny_processor.tokenizer).__name__.startswith("Qwen2Tokenizer")  # "...Fast" on 4.x
    assert tiny_processor.image_processor.patch_size == {"aimv2": 14, "siglip2": 16}[vision_type]
    assert tiny_processor.image_token_id == IMAGE_TOKEN_ID


def test_model_input_names(tiny_processor):
    assert list(tiny_processor.model_input_names) == ["input_ids", "attention_mask", "pixel_values", "image_grid_hw"]


def test_output_keys_with_images(tiny_processor):
    out = tiny_processor(text="a <image> b", images=random_image(64, 64), return_tensors="pt")
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values", "image_grid_hw"}
    assert out["image_grid_hw"].dtype == torch.long and out["pixel_values"].is_floating_point()


def test_output_keys_text_only(tiny_processor):
    assert set(tiny_processor(text="hello", return_tensors="pt").keys()) == {"input_ids", "attention_mask"}
    out = encode(tiny_processor, user("hello"))
    assert set(out.keys()) == {"input_ids", "attention_mask"}


# ----------------------------------------------------------------------------------------------------------------------
# Image token counts and spans
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hf_chat", "eval"])
@pytest.mark.parametrize("size", list(AIMV2_TOKENS), ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_token_count_and_span(tiny_processor, tiny_model, vision_type, size, mode):
    expected = EXPECTED_TOKENS[vision_type][size][mode == "eval"]
    options = EVAL_MODE if mode == "eval" else {}
    prefix, suffix = "Look:", " done"
    out = tiny_processor(text=f"{prefix}<image>{suffix}", images=random_image(*size), return_tensors="pt", **options)
    ids = out["input_ids"][0].tolist()
    tokens_from_grid = int(out["image_grid_hw"].prod(-1)[0]) // 4
    assert tokens_from_grid == expected
    assert ids.count(IMAGE_TOKEN_ID) == expected
    tokenize = tiny_processor.tokenizer
    span = [IMG_START_ID] + [IMAGE_TOKEN_ID] * expected + [IMG_END_ID]
    assert ids == tokenize(prefix)["input_ids"] + span + tokenize(suffix)["input_ids"]
    with torch.no_grad():
        features = tiny_model.get_image_features(out["pixel_values"], out["image_grid_hw"])
    assert features.shape[0] == expected


def test_two_image_spans_in_order(tiny_processor):
    images = [random_image(100, 50, seed=1), random_image(448, 448, seed=2)]
    out = tiny_processor(text="A<image>B<image>C", images=images, return_tensors="pt")
    counts = (out["image_grid_hw"].prod(-1) // 4).tolist()
    assert len(counts) == 2 and counts[0] != counts[1]
    tokenize = tiny_processor.tokenizer
    expected = tokenize("A")["input_ids"]
    for count, piece in zip(counts, ("B", "C")):
        expected += [IMG_START_ID] + [IMAGE_TOKEN_ID] * count + [IMG_END_ID] + tokenize(piece)["input_ids"]
    assert out["input_ids"][0].tolist() == expected
    assert out["pixel_values"].shape[0] == int(out["image_grid_hw"].prod(-1).sum())


# ----------------------------------------------------------------------------------------------------------------------
# Image-count mismatches
# ----------------------------------------------------------------------------------------------------------------------


IMG = random_image(64, 64)
MISMATCHES = {
    "flat-more-markers": ("<image><image><image>x", [IMG] * 2, 3, 2),
    "flat-more-images": ("<image><image>x", [IMG] * 3, 2, 3),
    "nested-more-markers": (["<image>a", "<image><image><image>b"], [[IMG], [IMG] * 2], 3, 2),
    "nested-more-images": (["<image>a", "<image><image>b"], [[IMG], [IMG] * 3], 2, 3),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_marker_image_count_mismatch(processor, case):
    text, images, markers, given = MISMATCHES[case]
    with pytest.raises(ValueError) as error:
        processor(text=text, images=images)
    assert has_number(str(error.value), markers) and has_number(str(error.value), given)


def test_markers_without_images(processor):
    with pytest.raises(ValueError, match="<image>"):
        processor(text="<image> what is this?")


def test_model_rejects_missing_placeholder(tiny_processor, tiny_model):
    out = tiny_processor(text="a <image> b", images=random_image(100, 80), return_tensors="pt")
    needed = int((out["input_ids"] == IMAGE_TOKEN_ID).sum())
    ids = out["input_ids"][0].tolist()
    ids.remove(IMAGE_TOKEN_ID)
    with pytest.raises(ValueError) as error, torch.no_grad():
        tiny_model(input_ids=torch.tensor([ids]), pixel_values=out["pixel_values"], image_grid_hw=out["image_grid_hw"])
    assert has_number(str(error.value), needed - 1) and has_number(str(error.value), needed)


# ----------------------------------------------------------------------------------------------------------------------
# Chat template golden strings (spec 6.2)
# ----------------------------------------------------------------------------------------------------------------------


def test_template_text_only(processor):
    expected = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert render(processor, [{"role": "user", "content": "Hello"}], add_generation_prompt=True) == expected
    assert render(processor, user("Hello"), add_generation_prompt=True) == expected


def test_template_without_generation_prompt(processor):
    assert render(processor, user("Hello")) == "<|im_start|>user\nHello<|im_end|>\n"


def test_template_one_image(processor):
    messages = user({"type": "image", "image": IMG}, "What is this?")
    expected = "<|im_start|>user\n<image>What is this?<|im_end|>\n<|im_start|>assistant\n"
    assert render(processor, messages, add_generation_prompt=True) == expected


def test_template_two_images(processor):
    messages = user("Compare ", {"type": "image", "image": IMG}, " and ", {"type": "image", "url": "/x.png"}, ".")
    expected = "<|im_start|>user\nCompare <image> and <image>.<|im_end|>\n<|im_start|>assistant\n"
    assert render(processor, messages, add_generation_prompt=True) == expected


def test_template_image_placeholder_without_source(processor):
    """The common transformers idiom: render `{"type": "image"}` placeholders, then pass the images to the processor."""
    messages = user({"type": "image"}, "What is this?")
    prompt = render(processor, messages, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<image>What is this?<|im_end|>\n<|im_start|>assistant\n"
    image = random_image(64, 64)
    reference = encode(processor, user({"type": "image", "image": image}, "What is this?"))
    assert_same_inputs(processor(text=prompt, images=image, return_tensors="pt"), reference)


def test_template_system_prompt(processor):
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}]
    expected = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render(processor, messages, add_generation_prompt=True) == expected


@pytest.mark.parametrize("thinking", [True, False])
def test_template_thinking(processor, thinking):
    rendered = render(processor, user("Hi"), add_generation_prompt=True, enable_thinking=thinking)
    header = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert rendered == header + ("<think>" if thinking else "")


def test_template_assistant_prefill(processor):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer is"}]
    rendered = render(processor, messages, continue_final_message=True)
    assert rendered == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nThe answer is"


def test_template_official_double_header(processor):
    rendered = render(processor, user("Q"), add_generation_prompt=True, official_double_header=True)
    assert rendered == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<|im_start|>assistant\n"
    rendered = render(
        processor, user("Q"), add_generation_prompt=True, official_double_header=True, enable_thinking=True
    )
    assert rendered.endswith("<|im_start|>assistant\n<|im_start|>assistant\n<think>")


def test_template_drops_earlier_reasoning(processor):
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nsome reasoning\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
    ]
    expected = (
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(processor, messages, add_generation_prompt=True) == expected
    # The reasoning of an assistant turn after the last user turn is kept.
    assert "<think>\nsome reasoning\n</think>" in render(processor, messages[:2])


# ----------------------------------------------------------------------------------------------------------------------
# apply_chat_template with images from every supported source
# ----------------------------------------------------------------------------------------------------------------------


def image_part(kind: str, path: str) -> dict:
    data = Path(path).read_bytes()
    return {
        "pil": {"type": "image", "image": Image.open(path)},
        "path": {"type": "image", "path": path},
        "local-url": {"type": "image", "url": path},
        "image-str": {"type": "image", "image": path},
        "data-url": {"type": "image", "url": data_url(data)},
        "base64": {"type": "image", "base64": base64.b64encode(data).decode()},
        "openai-image_url": {"type": "image_url", "image_url": {"url": data_url(data)}},
        "openai-image_url-detail": {"type": "image_url", "image_url": {"url": data_url(data), "detail": "low"}},
    }[kind]


@pytest.mark.parametrize(
    "kind",
    ["pil", "path", "local-url", "image-str", "data-url", "base64", "openai-image_url", "openai-image_url-detail"],
)
def test_chat_template_image_sources(processor, image_file, kind):
    reference = encode(processor, user({"type": "image", "image": Image.open(image_file).convert("RGB")}, "Describe."))
    out = encode(processor, user(image_part(kind, image_file), "Describe."))
    assert_same_inputs(out, reference)
    assert int((out["input_ids"] == IMAGE_TOKEN_ID).sum()) == int(out["image_grid_hw"].prod(-1).sum()) // 4


@pytest.mark.parametrize("part", ["image", "image_url"])
def test_remote_url_refused_by_default(processor, part):
    url = "http://127.0.0.1:9/x.png"
    content = {"type": "image", "url": url} if part == "image" else {"type": "image_url", "image_url": {"url": url}}
    with pytest.raises(ValueError, match=r"(?i)remote.*disabled.*allow_remote"):
        encode(processor, user(content, "hi"))


def test_remote_refusal_names_the_processor_option(processor):
    """The refusal must name the option that actually opts in (`allow_remote_images`); `allow_remote` is ignored."""
    with pytest.raises(ValueError) as error:
        encode(processor, user({"type": "image", "url": "http://127.0.0.1:9/x.png"}, "hi"))
    assert "allow_remote_images" in str(error.value)


@pytest.mark.parametrize("opt_in", ["processor-option", "call-argument"])
def test_remote_url_opt_in_fails_cleanly(processor, opt_in):
    """With the opt-in, a fetch is attempted: a closed local port gives a clear ValueError quickly, not a hang."""
    url = "http://127.0.0.1:9/x.png"  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(ValueError, match="Could not fetch"):
        if opt_in == "processor-option":
            remote = copy.copy(processor)
            remote.allow_remote_images = True
            encode(remote, user({"type": "image", "url": url}, "hi"))
        else:
            processor(text="<image>", images=url, allow_remote_images=True)
    assert time.monotonic() - start < 10


# ----------------------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------------------


def test_batched_chat_template_left_padding(processor):
    short = user({"type": "image", "image": random_image(64, 64, seed=1)}, "hi")
    long = user(
        {"type": "image", "image": random_image(100, 50, seed=2)},
        {"type": "image", "image": random_image(90, 120, seed=3)},
        "a much longer question about both of these pictures",
    )
    out = encode(processor, [short, long], padding=True)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape[0] == 2 and out["image_grid_hw"].shape == (3, 2)
    pad = int((mask[0] == 0).sum())
    assert pad > 0 and mask[1].all()
    assert mask[0, :pad].eq(0).all() and mask[0, pad:].eq(1).all()  # zeros on the left
    assert ids[0, :pad].eq(PAD_ID).all()
    single = encode(processor, short)
    assert torch.equal(ids[0, pad:], single["input_ids"][0])
    tokens = (out["image_grid_hw"].prod(-1) // 4).tolist()
    assert int((ids[0] == IMAGE_TOKEN_ID).sum()) == tokens[0]
    assert int((ids[1] == IMAGE_TOKEN_ID).sum()) == tokens[1] + tokens[2]


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: clear ValueErrors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["bytes", "data-url", "file", "truncated-png"])
def test_corrupt_image_rejected(processor, tmp_path, source):
    garbage = b"this is not an image at all"
    if source == "file":
        (tmp_path / "bad.png").write_bytes(garbage)
    image = {
        "bytes": garbage,
        "data-url": data_url(garbage),
        "file": str(tmp_path / "bad.png"),
        "truncated-png": png_bytes(random_image(64, 64))[:60],
    }[source]
    with pytest.raises(ValueError, match="(?i)could not read|truncated"):
        processor(text="<image>", images=image)


def test_zero_area_pil_image_rejected(processor):
    with pytest.raises(ValueError, match="zero area"):
        processor(text="<image>", images=Image.new("RGB", (0, 10)))


def test_zero_area_array_rejected(processor):
    with pytest.raises(ValueError, match="zero area"):
        processor(text="<image>", images=np.zeros((0, 10, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", ["numpy-hwc", "torch-chw"])
def test_array_and_tensor_images_accepted(processor, kind):
    """The processor's docstring promises arrays and tensors; they must give the same inputs as the PIL image."""
    image = random_image(70, 50, seed=5)
    array = np.array(image)  # a writable copy: torch.from_numpy warns on read-only arrays
    value = array if kind == "numpy-hwc" else torch.from_numpy(array).permute(2, 0, 1)
    expected = processor(text="<image>", images=image, return_tensors="pt")
    assert_same_inputs(processor(text="<image>", images=value, return_tensors="pt"), expected)


@pytest.mark.parametrize("source", ["file", "bytes", "data-url"])
def test_decompression_bomb_header_rejected(processor, tmp_path, source):
    bomb = png_header_only(20_000, 20_000)  # 400 Mpx claimed, ~100 bytes on disk
    (tmp_path / "bomb.png").write_bytes(bomb)
    image = {"file": str(tmp_path / "bomb.png"), "bytes": bomb, "data-url": data_url(bomb)}[source]
    with pytest.raises(ValueError, match="(?i)too large|max_image_pixels"):
        processor(text="<image>", images=image)


def test_max_image_pixels_override(processor, tmp_path):
    strict = copy.copy(processor)
    strict.image_processor = copy.copy(processor.image_processor)
    strict.image_processor.max_image_pixels = 10_000
    random_image(200, 200).save(tmp_path / "big.png")
    for image in (random_image(200, 200), str(tmp_path / "big.png")):
        with pytest.raises(ValueError, match="max_image_pixels"):
            strict(text="<image>", images=image)
    assert strict(text="<image>", images=random_image(90, 90))["image_grid_hw"] is not None


def test_per_call_image_limits_apply_before_reading(processor, tmp_path):
    """`max_image_bytes` / `max_image_pixels` given to the call override the image processor's, for files too."""
    random_image(200, 200).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="max_image_bytes"):
        processor(text="<image>", images=str(tmp_path / "big.png"), max_image_bytes=100)
    with pytest.raises(ValueError, match="max_image_pixels"):
        processor(text="<image>", images=str(tmp_path / "big.png"), max_image_pixels=10_000)
    assert processor(text="<image>", images=str(tmp_path / "big.png"))["image_grid_hw"] is not None


def mode_variants() -> dict[str, tuple[Image.Image, Image.Image]]:
    """mode -> (input image, the RGB image it must be processed as)."""
    rgb = random_image(50, 40, seed=7)
    gray = rgb.convert("L")
    rgb_array, gray_array = np.asarray(rgb), np.asarray(gray)
    opaque = np.full(gray_array.shape, 255, dtype=np.uint8)
    cmyk = rgb.convert("CMYK")
    return {
        "RGBA": (Image.fromarray(np.dstack([rgb_array, opaque])), rgb),
        "LA": (Image.fromarray(np.dstack([gray_array, opaque]), mode="LA"), gray.convert("RGB")),
        "L": (gray, gray.convert("RGB")),
        "I;16": (Image.fromarray(gray_array.astype(np.uint16) * 257), gray.convert("RGB")),
        "CMYK": (cmyk, cmyk.convert("RGB")),
        "P": (rgb.convert("P"), rgb.convert("P").convert("RGB")),
    }


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "I;16", "CMYK", "P"])
def test_image_modes_converted_to_rgb(processor, mode):
    image, as_rgb = mode_variants()[mode]
    assert image.mode == mode
    out = processor(text="<image>", images=image, return_tensors="pt")
    assert_same_inputs(out, processor(text="<image>", images=as_rgb, return_tensors="pt"))


@pytest.mark.parametrize("role", ["tool", "bot"])
def test_unknown_role_rejected(processor, role):
    with pytest.raises(ValueError, match=repr(role)):
        render(processor, [{"role": role, "content": "x"}])
    with pytest.raises(ValueError, match=repr(role)):
        encode(processor, [{"role": "user", "content": "x"}, {"role": role, "content": "y"}])


@pytest.mark.parametrize("kind", ["video", "audio", "foo"])
def test_unknown_content_type_rejected(processor, kind):
    with pytest.raises(ValueError, match=repr(kind)):
        encode(processor, user({"type": kind, kind: "file.bin"}, "hi"))


@pytest.mark.parametrize("argument", ["videos", "audio"])
def test_video_and_audio_arguments_rejected(processor, argument):
    with pytest.raises(ValueError, match="(?i)video|audio"):
        processor(text="hi", **{argument: [np.zeros((4, 8, 8, 3), dtype=np.uint8)]})


# ----------------------------------------------------------------------------------------------------------------------
# Decoding and persistence
# ----------------------------------------------------------------------------------------------------------------------


def test_decode_helpers(processor):
    ids = processor.tokenizer("Hello world")["input_ids"] + [151645]
    assert processor.decode(ids) == "Hello world<|im_end|>"
    assert processor.decode(ids, skip_special_tokens=True) == "Hello world"
    assert processor.batch_decode([ids, ids[:1]], skip_special_tokens=True) == ["Hello world", "Hello"]
    assert processor.post_process_image_text_to_text(torch.tensor([ids])) == ["Hello world"]


def test_save_pretrained_round_trip(tiny_repos, tmp_path):
    """SigLIP2's processor: its non-default settings (patch 16, mean/std 0.5) are the ones a round trip could lose."""
    original = load_processor(tiny_repos["siglip2"])
    original.save_pretrained(tmp_path)
    reloaded = load_processor(tmp_path)
    assert type(reloaded).__name__ == "AndesVLProcessor"
    assert type(reloaded.image_processor).__name__ == "AndesVLImageProcessor"
    assert reloaded.chat_template == original.chat_template
    assert reloaded.image_processor.to_dict() == original.image_processor.to_dict()
    assert reloaded.image_processor.patch_size == 16 and reloaded.image_processor.image_mean == [0.5] * 3
    messages = user({"type": "image", "image": random_image(120, 70, seed=9)}, "What is shown?")
    assert_same_inputs(encode(reloaded, messages), encode(original, messages))
    options = {"text": "x <image>", "images": random_image(448, 448), "return_tensors": "pt", **EVAL_MODE}
    assert_same_inputs(reloaded(**options), original(**options))
