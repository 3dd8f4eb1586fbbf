"""Tests for `image_processing_andesvl.py`, loaded the way Hub users get it (remote code from a local folder).

Run in both supported transformers lines:
    .venv/tf4/bin/python -m pytest tests/test_image_processing.py -q
    .venv/tf5/bin/python -m pytest tests/test_image_processing.py -q
"""

import base64
import http.server
import io
import json
import pathlib
import sys
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
AndesVLImageProcessor = get_class_from_dynamic_module("image_processing_andesvl.AndesVLImageProcessor", str(REPO_ROOT))
ipa = sys.modules[AndesVLImageProcessor.__module__]  # the module's functions: load_image, patchify, ...

CLIP_BACKGROUND = (122, 116, 104)
SIGLIP_KWARGS = {"patch_size": 16, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}

# Spec table 7.3 (AIMv2, base 28): input -> (hf_chat canvas, tokens), (eval canvas, tokens).
TABLE_7_3 = [
    ((448, 448), (476, 476), 289, (448, 448), 256),
    ((640, 480), (644, 504), 414, (644, 504), 414),
    ((1000, 800), (840, 672), 720, (1008, 812), 1044),
    ((1920, 1080), (980, 560), 700, (1932, 1092), 2691),
    ((100, 50), (112, 56), 8, (112, 56), 8),
    ((28, 28), (84, 84), 9, (56, 56), 4),
    ((4000, 3000), (868, 644), 713, (2072, 1568), 4144),
    ((1792, 1792), (756, 756), 729, (1792, 1792), 4096),
]
TABLE_CASES = [(size, "hf_chat", canvas, tokens) for size, canvas, tokens, _, _ in TABLE_7_3] + [
    (size, "eval", canvas, tokens) for size, _, _, canvas, tokens in TABLE_7_3
]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def solid(width: int, height: int, color=(10, 200, 30)) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def pixels_of(image: Image.Image) -> list:
    """RGB pixels in row-major order, as tuples."""
    return [tuple(pixel) for pixel in np.asarray(image).reshape(-1, 3).tolist()]


def rgb_of(image: Image.Image) -> list:
    return pixels_of(ipa.convert_to_rgb(image))


@pytest.fixture
def processor():
    return AndesVLImageProcessor()


# ----------------------------------------------------------------------------- resize rules
@pytest.mark.parametrize("size, mode, canvas, tokens", TABLE_CASES)
def test_table_7_3(processor, size, mode, canvas, tokens):
    width, height = size
    rule = ipa.hf_chat_target_size if mode == "hf_chat" else ipa.eval_target_size
    assert rule(width, height, 28)[0] == canvas
    assert processor.expected_canvas_size(width, height, resize_mode=mode) == canvas
    assert processor.get_number_of_image_tokens(height, width, resize_mode=mode) == tokens

    out = processor(solid(width, height), resize_mode=mode)
    assert out["image_grid_hw"].tolist() == [[canvas[1] // 14, canvas[0] // 14]]
    assert processor.num_image_tokens(out["image_grid_hw"]) == [tokens]
    assert out["pixel_values"].shape == (tokens * 4, 3 * 14 * 14)


def test_siglip2_config_uses_base_32_and_grey_padding():
    processor = AndesVLImageProcessor(**SIGLIP_KWARGS)
    assert processor.expected_canvas_size(448, 448) == (480, 480)
    assert processor.expected_canvas_size(448, 448, resize_mode="eval") == (448, 448)
    assert processor.expected_canvas_size(1000, 800) == (832, 672)
    assert processor.expected_canvas_size(1000, 800, resize_mode="eval") == (1024, 800)
    assert processor.expected_canvas_size(28, 28) == (96, 96)
    for width, height in [(640, 480), (1, 4000), (333, 777), (5000, 20)]:
        for mode in ("hf_chat", "eval"):
            canvas = processor.expected_canvas_size(width, height, resize_mode=mode)
            assert canvas[0] % 32 == 0 and canvas[1] % 32 == 0, (width, height, mode, canvas)

    canvas = processor.make_canvas(solid(640, 480, (0, 0, 0)))
    assert canvas.size == (672, 512)
    assert canvas.getpixel((0, 0)) == (127, 127, 127)
    out = processor(solid(640, 480))
    assert out["pixel_values"].shape == (42 * 32, 3 * 16 * 16)


@pytest.mark.parametrize("mode", ["hf_chat", "eval"])
def test_padding_colour_is_int_255_mean(processor, mode):
    canvas = processor.make_canvas(solid(640, 480, (0, 0, 0)), resize_mode=mode)
    assert canvas.size == (644, 504)  # content 644x483, pasted at y = 10
    pixels = np.asarray(canvas)
    assert (pixels[:10] == CLIP_BACKGROUND).all() and (pixels[-11:] == CLIP_BACKGROUND).all()
    assert (pixels[10:493] == 0).all()

    out = processor(solid(640, 480, (0, 0, 0)), resize_mode=mode)
    (normalized,) = processor.unpatchify(out["pixel_values"], out["image_grid_hw"])  # [3, 504, 644]
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    restored = normalized * std + mean
    expected = torch.tensor(CLIP_BACKGROUND, dtype=torch.float32).view(3, 1) / 255
    torch.testing.assert_close(restored[:, 0, :], expected.expand(3, 644), atol=1e-6, rtol=0)


def test_extreme_aspect_ratios_produce_valid_canvases(processor):
    for width, height in [(1, 4000), (4000, 1), (5000, 1), (1, 5000), (1, 1), (3, 3000)]:
        for mode in ("hf_chat", "eval"):
            canvas, content = processor.target_size(width, height, resize_mode=mode)
            assert canvas[0] % 28 == 0 and canvas[1] % 28 == 0 and min(content) >= 1
            out = processor(solid(width, height), resize_mode=mode)
            h, w = out["image_grid_hw"][0].tolist()
            assert (w * 14, h * 14) == canvas and out["pixel_values"].shape[0] == h * w


# ----------------------------------------------------------------------------- patch packing
def test_patch_order_is_2x2_blocks_and_unpatchify_inverts_it():
    p, height, width = 14, 56, 84
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pixels = torch.stack([ys, xs, ys * 1000 + xs]).float()  # [3, H, W], each pixel encodes (y, x)
    patches = ipa.patchify(pixels, patch_size=p, merge_size=2)
    assert patches.shape == (4 * 6, 3 * p * p)

    def top_left(patch):  # (y, x) of a patch's top-left pixel; channel-major (C, p, p) layout
        grid = patch.view(3, p, p)
        assert torch.equal(grid[0], grid[0, :, :1].expand(p, p))  # y constant along a row
        assert torch.equal(grid[1], grid[1, :1, :].expand(p, p))  # x constant down a column
        return int(grid[0, 0, 0]), int(grid[1, 0, 0])

    expected = [(0, 0), (0, 14), (14, 0), (14, 14), (0, 28), (0, 42), (14, 28), (14, 42)]
    assert [top_left(patch) for patch in patches[:8]] == expected  # TL, TR, BL, BR, then the next block
    assert top_left(patches[12]) == (28, 0)  # second block row
    assert torch.equal(ipa.unpatchify(patches, (4, 6), patch_size=p, merge_size=2), pixels)


def test_two_images_of_different_sizes(processor):
    images = [solid(640, 480), solid(100, 50)]
    out = processor(images, return_tensors="pt")
    assert out["image_grid_hw"].dtype == torch.long
    assert out["image_grid_hw"].tolist() == [[36, 46], [4, 8]]
    assert out["pixel_values"].shape == (36 * 46 + 4 * 8, 588)
    assert out["pixel_values"].dtype == torch.float32
    nested = processor([[images[0]], [images[1]]])
    assert torch.equal(nested["pixel_values"], out["pixel_values"])

    canvases = processor.unpatchify(out["pixel_values"], out["image_grid_hw"])
    assert [tuple(c.shape) for c in canvases] == [(3, 504, 644), (3, 56, 112)]
    single = processor(images[1])
    assert torch.equal(single["pixel_values"], out["pixel_values"][36 * 46 :])


def test_zero_images_give_empty_tensors(processor):
    out = processor([])
    assert out["pixel_values"].shape == (0, 588) and out["image_grid_hw"].shape == (0, 2)
    assert out["image_grid_hw"].dtype == torch.long
    assert processor([[], []])["pixel_values"].shape == (0, 588)


# ----------------------------------------------------------------------------- options
def test_per_call_overrides(processor):
    image = solid(1000, 800)
    assert processor(image)["image_grid_hw"].tolist() == [[48, 60]]  # hf_chat 840x672
    assert processor(image, resize_mode="eval", max_size=1792)["image_grid_hw"].tolist() == [[58, 72]]
    assert processor(image, resize_mode="eval")["image_grid_hw"].tolist() == [[58, 72]]  # None -> 1792
    assert processor(image, max_size=1000)["image_grid_hw"].tolist() == [[58, 72]]  # no area cap: 1008x812
    assert processor.expected_canvas_size(448, 448, resize_mode="eval", image_scale=2.0) == (896, 896)
    assert processor.expected_canvas_size(448, 448, resize_mode="eval", min_size=1792) == (1792, 1792)
    assert processor(image, max_size=None)["image_grid_hw"].tolist() == [[48, 60]]  # None = not given
    assert processor.resize_mode == "hf_chat" and processor.max_size is None  # instance unchanged
    assert processor.get_number_of_image_patches(800, 1000, {"resize_mode": "eval"}) == 1044 * 4

    eval_processor = AndesVLImageProcessor(resize_mode="eval", image_scale=2.0)
    assert eval_processor.expected_canvas_size(448, 448) == (896, 896)


def test_invalid_options_raise(processor):
    with pytest.raises(ValueError, match=r"valid modes: \['hf_chat', 'eval'\]"):
        AndesVLImageProcessor(resize_mode="native")
    with pytest.raises(ValueError, match="valid modes"):
        processor(solid(64, 64), resize_mode="vllm")
    with pytest.raises(TypeError, match="max_sise"):
        processor(solid(64, 64), max_sise=1792)
    with pytest.raises(ValueError, match="positive"):
        processor(solid(64, 64), max_size=0)


def test_save_and_load_round_trip(tmp_path):
    processor = AndesVLImageProcessor(**SIGLIP_KWARGS, resize_mode="eval", max_size=2000, image_scale=2.0, min_size=8)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert set(ipa.CONFIG_KEYS) <= set(saved)
    assert saved["image_processor_type"] == "AndesVLImageProcessor"
    assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_andesvl.AndesVLImageProcessor"
    assert (tmp_path / "image_processing_andesvl.py").is_file()

    reloaded = AndesVLImageProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    assert sorted(reloaded.to_dict()) == sorted(saved)
    assert AndesVLImageProcessor.from_pretrained(tmp_path, resize_mode="hf_chat").resize_mode == "hf_chat"
    auto = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(auto).__name__ == "AndesVLImageProcessor"
    assert {k: auto.to_dict()[k] for k in ipa.CONFIG_KEYS} == {k: saved[k] for k in ipa.CONFIG_KEYS}
    image = solid(300, 200)
    assert torch.equal(auto(image)["pixel_values"], processor(image)["pixel_values"])


def test_default_config_keeps_none_max_size(tmp_path):
    AndesVLImageProcessor().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["max_size"] is None and saved["resize_mode"] == "hf_chat" and saved["merge_size"] == 2
    assert AndesVLImageProcessor.from_pretrained(tmp_path).expected_canvas_size(1792, 1792) == (756, 756)


def test_official_clip_preprocessor_config_loads():
    official = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": False,
        "do_center_crop": False,
        "crop_size": -1,
        "size": {"shortest_edge": -1},
        "do_convert_rgb": True,
        "do_rescale": True,
        "do_normalize": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "patch_size": 14,
        "hidden_stride": 2,
        "temporal_patch_size": 1,
        "min_pixels": 200704,
        "max_pixels": 2408448,
    }
    processor = AndesVLImageProcessor.from_dict(official)
    assert processor.expected_canvas_size(1920, 1080) == (980, 560)
    assert processor(solid(448, 448))["pixel_values"].shape == (289 * 4, 588)


# ----------------------------------------------------------------------------- inputs and errors
def test_array_and_tensor_inputs_match_pil(processor):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    reference = processor(Image.fromarray(array))["pixel_values"]
    chw = torch.from_numpy(array).permute(2, 0, 1)
    for value in [array, torch.from_numpy(array), chw, chw.float() / 255, array.astype(np.float32) / 255]:
        assert torch.equal(processor(value)["pixel_values"], reference)
    for value in [array, chw]:
        loaded = ipa.load_image(value)
        assert loaded.mode == "RGB" and pixels_of(loaded) == pixels_of(Image.fromarray(array))
    with pytest.raises(ValueError, match="Cannot load an image from a int"):
        ipa.load_image(7)
    gray = array[..., 0]
    gray_reference = processor(Image.fromarray(gray))["pixel_values"]
    for value in [gray, gray[..., None], torch.from_numpy(gray), torch.from_numpy(gray)[None]]:
        assert torch.equal(processor(value)["pixel_values"], gray_reference)


@pytest.mark.parametrize(
    "value, message",
    [
        (np.zeros((4, 4, 2), dtype=np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), dtype=np.uint8), "shape"),
        (np.full((4, 4, 3), 2.0, dtype=np.float32), r"\[0, 1\]"),
        (torch.full((3, 4, 4), -0.5), r"\[0, 1\]"),
        (np.zeros((4, 4, 3), dtype=np.int64), "dtype"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "zero area"),
        (Image.new("RGB", (0, 10)), r"zero area \(0x10\)"),
        (12345, "Unsupported image type int"),
        (None, "None"),
    ],
)
def test_bad_image_values_raise(processor, value, message):
    with pytest.raises(ValueError, match=message):
        processor(value)


def test_corrupt_and_truncated_bytes_raise(processor, tmp_path):
    with pytest.raises(ValueError, match="image bytes"):
        ipa.load_image(b"definitely not an image")
    truncated = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))[:200]
    with pytest.raises(ValueError, match="image bytes"):
        processor(truncated)
    corrupt_file = tmp_path / "corrupt.png"
    corrupt_file.write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="corrupt.png"):
        ipa.load_image(str(corrupt_file))


def test_missing_file_names_the_path(processor, tmp_path):
    missing = tmp_path / "nope" / "missing.png"
    with pytest.raises(ValueError, match="missing.png"):
        ipa.load_image(missing)
    with pytest.raises(ValueError, match="Image file not found"):
        processor(str(missing))


def test_decompression_bomb_guards(processor, tmp_path):
    small_limit = AndesVLImageProcessor(max_image_pixels=1000)
    with pytest.raises(ValueError, match=r"100x100 = 10000 pixels.*max_image_pixels = 1000"):
        small_limit(solid(100, 100))
    path = tmp_path / "big.png"
    Image.new("L", (2000, 1500)).save(path)
    with pytest.raises(ValueError, match=r"2000x1500 = 3000000 pixels.*1000000"):
        ipa.load_image(path, max_image_pixels=1_000_000)  # rejected from the header, before decoding
    assert ipa.load_image(path).size == (2000, 1500)

    data = bytearray(png_bytes(Image.new("L", (8, 8))))  # claim 100000x100000 in the IHDR chunk
    data[16:24] = (100_000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    for limit in (ipa.DEFAULT_MAX_IMAGE_PIXELS, None):
        with pytest.raises(ValueError, match="100000"):
            ipa.load_image(bytes(data), max_image_pixels=limit)
    with pytest.raises(ValueError, match="100000"):
        processor(bytes(data))


def test_mode_conversions():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 255, 128)])
    assert rgb_of(rgba) == [(255, 255, 255), (255, 0, 0), (127, 127, 255)]

    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    assert rgb_of(la) == [(255, 255, 255), (0, 0, 0)]

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putdata([0, 1])
    assert rgb_of(palette) == [(0, 0, 0), (255, 0, 0)]
    palette.info["transparency"] = 0
    assert rgb_of(palette) == [(255, 255, 255), (255, 0, 0)]

    gray = Image.new("L", (1, 1), 77)
    assert rgb_of(gray) == [(77, 77, 77)]
    assert rgb_of(Image.new("1", (2, 1), 1)) == [(255, 255, 255)] * 2
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0)])
    assert rgb_of(cmyk) == [(255, 255, 255), (0, 255, 255)]


def test_high_bit_depth_and_float_conversions():
    sixteen = np.array([[65535, 32768, 256, 255, 0]], dtype=np.uint16)
    expected = [(v, v, v) for v in (255, 128, 1, 0, 0)]
    image_16 = Image.fromarray(sixteen)
    assert image_16.mode == "I;16"
    assert rgb_of(image_16) == expected
    assert rgb_of(Image.fromarray(sixteen.astype(np.int32))) == expected  # mode "I"
    reloaded = ipa.load_image(png_bytes(image_16))  # a 16-bit PNG round trip
    assert pixels_of(reloaded) == expected

    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit_float.mode == "F"
    assert rgb_of(unit_float) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    byte_float = Image.fromarray(np.array([[0.0, 100.0, 255.0, 300.0]], dtype=np.float32))
    assert rgb_of(byte_float) == [(0, 0, 0), (100, 100, 100), (255, 255, 255), (255, 255, 255)]


def test_processor_accepts_every_mode(processor):
    for mode in ("RGBA", "LA", "P", "L", "1", "I;16", "I", "CMYK", "F"):
        out = processor(Image.new(mode, (60, 60)))
        assert out["image_grid_hw"].tolist() == [[6, 6]], mode
    with pytest.raises(ValueError, match="do_convert_rgb=False"):
        processor(Image.new("L", (60, 60)), do_convert_rgb=False)


def test_sources_paths_data_urls_base64_and_bytes(processor, tmp_path):
    image = Image.effect_noise((40, 30), 60).convert("RGB")
    data = png_bytes(image)
    path = tmp_path / "img.png"
    path.write_bytes(data)
    encoded = base64.b64encode(data).decode()
    sources = [path, str(path), data, bytearray(data), f"data:image/png;base64,{encoded}", encoded]
    for source in sources:
        loaded = ipa.load_image(source)
        assert loaded.mode == "RGB" and pixels_of(loaded) == pixels_of(image)
    reference = processor(image)["pixel_values"]
    for source in sources:
        assert torch.equal(processor(source)["pixel_values"], reference)
    with pytest.raises(ValueError, match="base64"):
        ipa.load_image("data:image/png,rawpayload")


def test_remote_urls_need_opt_in(processor):
    for url in ("https://example.com/cat.png", "http://example.com/cat.png"):
        with pytest.raises(ValueError, match="allow_remote=True"):
            ipa.load_image(url)
        with pytest.raises(ValueError, match="Remote image fetching is disabled"):
            processor(url)


def test_remote_fetch_with_opt_in_from_a_local_server():
    data = png_bytes(solid(20, 10, (1, 2, 3)))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            found = self.path == "/img.png"
            self.send_response(200 if found else 404)
            self.end_headers()
            self.wfile.write(data if found else b"missing")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base_url = f"http://127.0.0.1:{server.server_address[1]}"
        image = ipa.load_image(f"{base_url}/img.png", allow_remote=True, timeout=5.0)
        assert image.size == (20, 10) and image.getpixel((0, 0)) == (1, 2, 3)
        with pytest.raises(ValueError, match="404"):
            ipa.load_image(f"{base_url}/other.png", allow_remote=True, timeout=5.0)
    finally:
        server.shutdown()
        server.server_close()
