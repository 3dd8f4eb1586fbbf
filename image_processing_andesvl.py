"""AndesVL image processor: native-resolution resize + pad, normalize, and block-ordered patch packing.

Every image is resized (bicubic) and pasted, centered, onto a canvas whose sides are multiples of
`base = patch_size * merge_size` (28 for AIMv2, 32 for SigLIP2), filled with `int(255 * mean)` per channel.
Two official rules choose the canvas (`resize_mode`):

* `"hf_chat"` (the official HF `chat()` path, `max_size` 733). Cap the longest side at `max_resolution`
  (int truncation, real resize). If `w*h > max_size**2`, fit the area `max_size**2` at the original aspect
  (floor), clamp to `[base, max_resolution]`, then round up by adding `base - side % base`: an exact multiple
  still gains `base`. Images under `min_tokens * base**2` pixels get the same treatment with
  `max_size = int(base * sqrt(min_tokens))` (a 28x28 image becomes 84x84). Otherwise each side becomes
  `side + base - side % base`. Content: `round()` (area branches) or `int()` (otherwise) of `side * s` with
  `s = min(canvas / side)`; paste offset = floor of half the slack.
* `"eval"` (the vLLM / benchmark path, `max_size` 1792). In floats: multiply by `image_scale`, cap the
  longest side at `max_resolution`, scale up to `min_tokens * base**2` and to `min_size**2` pixels, scale down
  to `max_size**2`, then ceil each side to a multiple of `base`. Content: `int(side * s)`.

The normalized canvas [C, H, W] is cut into (C, p, p) patches ordered in `merge_size x merge_size` blocks
(blocks row-major, patches row-major inside a block), giving `pixel_values` [sum_i h_i * w_i, C*p*p] and
`image_grid_hw` [num_images, 2], the packed layout the AndesVL vision tower consumes.
"""

import base64
import binascii
import contextlib
import copy
import io
import math
import os
import time
import warnings
from typing import Any, Optional, TypedDict, Union

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Input limits, checked before decoding (file size, then the size the header declares). 2**25 pixels (8192 x 4096) is
# 10x the largest canvas the resize rules make ("eval": 1792**2 = 3.2 Mpx) and decodes in about 0.3 GB even as 16-bit.
DEFAULT_MAX_IMAGE_PIXELS = 2**25
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20  # encoded size cap for files, data URLs and downloads (a 8k x 8k PNG is ~20 MB)
CONVERT_ROWS = 512  # rows converted at a time from 16-bit / float (bounds the temporary arrays)
RESIZE_MODES = ("hf_chat", "eval")
DEFAULT_MAX_SIZE = {"hf_chat": 733, "eval": 1792}
OVERRIDABLE_KEYS = (
    "resize_mode",
    "max_size",
    "min_size",
    "image_scale",
    "max_resolution",
    "min_tokens",
    "image_mean",
    "image_std",
    "do_convert_rgb",
    "rescale_factor",
    "resample",
    "max_image_pixels",
    "max_image_bytes",
)
CONFIG_KEYS = ("patch_size", "merge_size") + OVERRIDABLE_KEYS
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I" is how PIL decodes most 16-bit files
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

# Lets transformers 5.x route per-call options (`processor(..., resize_mode="eval")`) to this image processor.
AndesVLImagesKwargs = TypedDict("AndesVLImagesKwargs", {key: Any for key in OVERRIDABLE_KEYS}, total=False)
ImageSource = Union[Image.Image, np.ndarray, torch.Tensor, str, os.PathLike, bytes, bytearray]
Size = tuple[int, int]  # (width, height), PIL order


# ----------------------------------------------------------------------------- canvas size rules
def _check_positive_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"Image size must be positive, got {width}x{height}.")


def cap_longest_side(width: int, height: int, max_resolution: int) -> Size:
    """Shrink so that the longest side is at most `max_resolution` (int truncation, never below 1)."""
    longest = max(width, height)
    if longest <= max_resolution:
        return width, height
    scale = max_resolution / longest
    return max(1, int(width * scale)), max(1, int(height * scale))


def _fit_content(width: int, height: int, canvas: Size, rounding) -> Size:
    """Largest aspect-preserving size of a (width, height) image that fits in `canvas`."""
    scale = min(canvas[0] / width, canvas[1] / height)
    return (min(canvas[0], max(1, rounding(width * scale))), min(canvas[1], max(1, rounding(height * scale))))


def _area_fit_target_size(width: int, height: int, base: int, max_size: int, max_resolution: int) -> tuple[Size, Size]:
    """The HF chat "max_preprocess": fit area max_size**2, then round up with the +base quirk."""
    area, aspect = max_size**2, width / height
    top = max(base, max_resolution - max_resolution % base)  # == max_resolution for base 28 (4172 = 149 * 28)

    def round_up(side: int) -> int:  # clamp, then add `base - side % base`: an exact multiple still gains `base`
        side = min(max(side, base), max_resolution)
        return min(side + base - side % base, top)

    canvas = (round_up(math.floor(math.sqrt(area * aspect))), round_up(math.floor(math.sqrt(area / aspect))))
    return canvas, _fit_content(width, height, canvas, round)


def hf_chat_target_size(
    width: int, height: int, base: int, max_size: int = 733, max_resolution: int = 4172, min_tokens: int = 4
) -> tuple[Size, Size]:
    """Canvas and content (width, height) of the official HF `chat()` rule (see module docstring)."""
    _check_positive_size(width, height)
    width, height = cap_longest_side(width, height, max_resolution)
    if width * height > max_size**2:
        return _area_fit_target_size(width, height, base, max_size, max_resolution)
    if width * height < min_tokens * base**2:
        return _area_fit_target_size(width, height, base, int(base * math.sqrt(min_tokens)), max_resolution)
    canvas = (width + base - width % base, height + base - height % base)
    return canvas, _fit_content(width, height, canvas, int)


def eval_target_size(
    width: int,
    height: int,
    base: int,
    max_size: int = 1792,
    min_size: int = 0,
    image_scale: float = 1.0,
    max_resolution: int = 4172,
    min_tokens: int = 4,
) -> tuple[Size, Size]:
    """Canvas and content (width, height) of the official vLLM / benchmark rule (see module docstring)."""
    _check_positive_size(width, height)
    scaled_w, scaled_h = width * image_scale, height * image_scale
    if max(scaled_w, scaled_h) > max_resolution:
        shrink = max_resolution / max(scaled_w, scaled_h)
        scaled_w, scaled_h = scaled_w * shrink, scaled_h * shrink
    for min_area in (min_tokens * base**2, min_size**2):
        if scaled_w * scaled_h < min_area:
            grow = math.sqrt(min_area / (scaled_w * scaled_h))
            scaled_w, scaled_h = scaled_w * grow, scaled_h * grow
    if scaled_w * scaled_h > max_size**2:
        shrink = math.sqrt(max_size**2 / (scaled_w * scaled_h))
        scaled_w, scaled_h = scaled_w * shrink, scaled_h * shrink
    canvas = (math.ceil(scaled_w / base) * base, math.ceil(scaled_h / base) * base)
    return canvas, _fit_content(width, height, canvas, int)


def paste_offset(canvas: Size, content: Size) -> Size:
    """(left, top) of the centered `content` on its `canvas`: the floor of half the slack."""
    return (canvas[0] - content[0]) // 2, (canvas[1] - content[1]) // 2


def resize_and_pad(image: Image.Image, canvas: Size, content: Size, background: tuple, resample: int) -> Image.Image:
    """Resize `image` to `content` and paste it centered (`paste_offset`) on a `canvas` of `background`."""
    if image.size == canvas == content:
        return image
    resized = image.resize(content, resample=resample)
    padded = Image.new("RGB", canvas, background)
    padded.paste(resized, paste_offset(canvas, content))
    return padded


# ----------------------------------------------------------------------------- patch packing
def patchify(pixels: torch.Tensor, patch_size: int, merge_size: int) -> torch.Tensor:
    """float[C, H, W] -> float[h*w, C*p*p], patches in merge-block order (TL, TR, BL, BR for merge 2)."""
    channels, height, width = pixels.shape
    block = patch_size * merge_size
    if height % block or width % block:
        raise ValueError(f"Canvas {width}x{height} is not a multiple of patch_size*merge_size = {block}.")
    h, w, p, m = height // patch_size, width // patch_size, patch_size, merge_size
    patches = pixels.reshape(channels, h // m, m, p, w // m, m, p)  # [C, h/m, m, p, w/m, m, p]
    patches = patches.permute(1, 4, 2, 5, 0, 3, 6)  # [h/m, w/m, m, m, C, p, p]
    return patches.reshape(h * w, channels * p * p)


def unpatchify(patches: torch.Tensor, grid_hw: tuple[int, int], patch_size: int, merge_size: int) -> torch.Tensor:
    """Inverse of `patchify` for one image: float[h*w, C*p*p] -> float[C, h*p, w*p]."""
    h, w = (int(v) for v in grid_hw)
    p, m = patch_size, merge_size
    if patches.shape[0] != h * w:
        raise ValueError(f"Got {patches.shape[0]} patches for a {h}x{w} grid ({h * w} expected).")
    channels = patches.shape[1] // (p * p)
    pixels = patches.reshape(h // m, w // m, m, m, channels, p, p)  # [h/m, w/m, m, m, C, p, p]
    pixels = pixels.permute(4, 0, 2, 5, 1, 3, 6)  # [C, h/m, m, p, w/m, m, p]
    return pixels.reshape(channels, h * p, w * p)


# ----------------------------------------------------------------------------- loading and conversion
def check_image_size(size: Size, max_image_pixels: Optional[int], source: str = "image") -> None:
    """Reject zero-area images and images above the decompression-bomb guard."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"The {source} has zero area ({width}x{height}).")
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise ValueError(
            f"The {source} is {width}x{height} = {width * height} pixels, above max_image_pixels = "
            f"{max_image_pixels} (decompression-bomb guard); raise the limit if the image is trusted."
        )


@contextlib.contextmanager
def _image_errors(source: str):
    """Turn PIL's decoding errors into ValueErrors that name the source."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # `check_image_size` enforces the limit
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"The {source} is too large to decode safely: {err}") from err
    except Exception as err:  # UnidentifiedImageError, truncated data, unreadable file, ...
        raise ValueError(f"Could not read an image from the {source}: {type(err).__name__}: {err}") from err


def _open_image(data: bytes, source: str, max_image_pixels: Optional[int]) -> Image.Image:
    with _image_errors(source):
        image = Image.open(io.BytesIO(data))
    check_image_size(image.size, max_image_pixels, source)  # header only: nothing decoded yet
    with _image_errors(source):
        image.load()
    return image


def _check_byte_count(count: int, source: str, max_image_bytes: Optional[int]) -> None:
    if max_image_bytes is not None and count > max_image_bytes:
        raise ValueError(
            f"The {source} is over {max_image_bytes} bytes (max_image_bytes; got at least {count}): refused before "
            "decoding; raise the limit if the image is trusted."
        )


def _fetch_url(url: str, timeout: float, max_image_bytes: Optional[int] = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The body of an http(s) URL, read in chunks under a byte cap and a total deadline of `timeout` seconds (a
    server that trickles bytes cannot hold the call open past it)."""
    import http.client  # only needed when remote fetching was explicitly allowed
    import urllib.request

    source, deadline, chunks, size = f"image at URL {url!r}", time.monotonic() + timeout, [], 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            declared = int(response.headers.get("Content-Length") or 0)
            _check_byte_count(declared, source, max_image_bytes)
            while chunk := response.read1(1 << 16):
                chunks.append(chunk)
                size += len(chunk)
                _check_byte_count(size, source, max_image_bytes)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not complete after {timeout} s ({size} bytes so far)")
            if size < declared:
                raise http.client.IncompleteRead(b"", declared - size)
    except (OSError, http.client.HTTPException) as err:  # URLError, HTTPError, timeouts, IncompleteRead
        raise ValueError(f"Could not fetch the {source}: {type(err).__name__}: {err}") from err
    return b"".join(chunks)


def _decode_data_url(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise ValueError(f"Only base64 data URLs are supported, got header {header!r}.")
    try:
        return base64.b64decode(payload)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"The data URL payload is not valid base64: {err}") from err


def _read_source(
    source: Union[str, os.PathLike],
    allow_remote: bool,
    timeout: float,
    max_image_bytes: Optional[int] = DEFAULT_MAX_IMAGE_BYTES,
) -> tuple[bytes, str]:
    """Raw bytes and a description for a path, http(s) URL, data URL or raw base64 string."""
    text = os.fspath(source)
    if isinstance(source, str) and source.strip().lower().startswith(("http://", "https://")):
        if not allow_remote:
            raise ValueError(
                f"Remote image fetching is disabled (got URL {source!r}); opt in with allow_remote_images=True "
                "(AutoProcessor.from_pretrained / processor call / model.chat) or load_image(..., allow_remote=True)."
            )
        return _fetch_url(source.strip(), timeout, max_image_bytes), f"image at URL {source!r}"
    if isinstance(source, str) and source.startswith("data:"):
        _check_byte_count(len(source) * 3 // 4, "data URL", max_image_bytes)
        return _decode_data_url(source), "data URL"
    if os.path.isfile(text):
        _check_byte_count(os.path.getsize(text), f"file {text!r}", max_image_bytes)  # before reading a byte
        with open(text, "rb") as file:
            return file.read(), f"file {text!r}"
    try:  # not an existing file: maybe raw base64
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"Image file not found: {text!r}.") from None
    return data, f"string {text[:48]!r} (no such file; decoded as base64)"


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: alpha composited onto white, 16-bit scaled by 1/256, float 'F' read as [0, 1] or [0, 255]."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image)  # [H, W] uint16 or int32 ("I")
        scaled = np.empty(values.shape, dtype=np.uint8)
        for start in range(0, values.shape[0], CONVERT_ROWS):  # row blocks: no full-size int64 temporaries
            block = values[start : start + CONVERT_ROWS]
            scaled[start : start + CONVERT_ROWS] = np.clip(block, 0, 65535).astype(np.int32) >> 8
        return Image.fromarray(scaled).convert("RGB")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_image(
    source: ImageSource,
    allow_remote: bool = False,
    timeout: float = 10.0,
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    max_image_bytes: Optional[int] = DEFAULT_MAX_IMAGE_BYTES,
) -> Image.Image:
    """PIL image, array, tensor, local path, http(s) URL (opt-in), `data:image/...;base64,` URL, raw base64 or
    bytes -> 8-bit RGB PIL image. A file, data URL or download over `max_image_bytes` is refused before it is read
    whole; a download gets `timeout` seconds in total."""
    if isinstance(source, (Image.Image, np.ndarray, torch.Tensor)):
        image = to_pil_image(source, max_image_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _open_image(bytes(source), "image bytes", max_image_pixels)
    elif isinstance(source, (str, os.PathLike)):
        image = _open_image(*_read_source(source, allow_remote, timeout, max_image_bytes), max_image_pixels)
    else:
        raise ValueError(f"Cannot load an image from a {type(source).__name__}; expected PIL, array, path or bytes.")
    check_image_size(image.size, max_image_pixels)
    return convert_to_rgb(image)


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """HW or HWC (C in 1, 3, 4) array, uint8 / uint16 / bool / float in [0, 1] -> PIL image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"Expected an HW or HWC image array with 1, 3 or 4 channels, got shape {tuple(array.shape)}.")
    if 0 in array.shape:
        raise ValueError(f"The image has zero area (array shape {tuple(array.shape)}).")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            raise ValueError(f"Float image arrays must hold values in [0, 1], got [{array.min()}, {array.max()}].")
        array = np.round(array * 255.0).astype(np.uint8)
    if array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(array)  # mode "I;16", scaled down by `convert_to_rgb`
    if array.dtype != np.uint8:
        raise ValueError(f"Unsupported image array dtype {array.dtype}; use uint8, 2-D uint16 or float in [0, 1].")
    return Image.fromarray(np.ascontiguousarray(array))


def _tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """CHW (C in 1, 3, 4 first) or HWC / HW tensor -> HWC / HW numpy array."""
    tensor = tensor.detach().cpu()
    if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4):
        tensor = tensor.permute(1, 2, 0)  # [C, H, W] -> [H, W, C]
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.numpy()


def to_pil_image(
    image: Any,
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    max_image_bytes: Optional[int] = DEFAULT_MAX_IMAGE_BYTES,
) -> Image.Image:
    """Any accepted image value (PIL, numpy, torch, path, URL string, bytes) -> PIL image (mode unchanged)."""
    if isinstance(image, Image.Image):
        pil_image = image
    elif isinstance(image, torch.Tensor):
        pil_image = _array_to_pil(_tensor_to_array(image))
    elif isinstance(image, np.ndarray):
        pil_image = _array_to_pil(image)
    elif isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return load_image(image, max_image_pixels=max_image_pixels, max_image_bytes=max_image_bytes)
    else:
        raise ValueError(
            f"Unsupported image type {type(image).__name__}; expected a PIL image, numpy array, torch tensor, "
            "path, data URL, base64 string or bytes."
        )
    check_image_size(pil_image.size, max_image_pixels)
    return pil_image


def _flatten_images(images: Any) -> list:
    """A single image or a (nested, per-sample) list of images -> flat list, in order."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    if images is None:
        raise ValueError("Got None instead of an image.")
    return [images]


# ----------------------------------------------------------------------------- processor
class AndesVLImageProcessor(BaseImageProcessor):
    r"""
    Native-resolution image processor of AndesVL (AIMv2: patch 14, CLIP mean/std; SigLIP2: patch 16, mean/std 0.5).

    Args:
        patch_size (`int`, defaults to 14): ViT patch side in pixels.
        merge_size (`int`, defaults to 2): token merge factor per side; canvases are multiples of
            `patch_size * merge_size` and each image yields `h * w / merge_size**2` LLM tokens.
        image_mean / image_std (`list[float]`, default CLIP): normalization; the pad colour is `int(255 * mean)`.
        resize_mode (`str`, defaults to `"hf_chat"`): `"hf_chat"` or `"eval"` (see the module docstring).
        max_size (`int`, *optional*): area budget side; `None` means 733 for `"hf_chat"`, 1792 for `"eval"`.
        min_size (`int`, defaults to 0) and image_scale (`float`, defaults to 1.0): `"eval"` rule only.
        max_resolution (`int`, defaults to 4172): cap on the longest side.
        min_tokens (`int`, defaults to 4): images below `min_tokens * base**2` pixels are scaled up.
        do_convert_rgb (`bool`, defaults to `True`): convert any PIL mode to 8-bit RGB (else RGB is required).
        rescale_factor (`float`, defaults to 1/255) and resample (`int`, defaults to 3 = bicubic).
        max_image_pixels (`int`, *optional*, defaults to 2**25 = 33554432, 8192 x 4096): an image whose header
            declares more pixels is rejected before it is decoded (10x the largest canvas; `None` lifts the limit).
        max_image_bytes (`int`, *optional*, defaults to 64 MiB): an image file, data URL or download above this size
            is rejected before it is read (`None` lifts the limit).
    """

    model_input_names = ["pixel_values", "image_grid_hw"]
    valid_kwargs = AndesVLImagesKwargs
    _auto_class = "AutoImageProcessor"  # `save_pretrained` writes `auto_map` and copies this file

    def __init__(
        self,
        patch_size: int = 14,
        merge_size: int = 2,
        image_mean: Optional[list[float]] = None,
        image_std: Optional[list[float]] = None,
        resize_mode: str = "hf_chat",
        max_size: Optional[int] = None,
        min_size: int = 0,
        image_scale: float = 1.0,
        max_resolution: int = 4172,
        min_tokens: int = 4,
        do_convert_rgb: bool = True,
        rescale_factor: float = 1 / 255,
        resample: int = 3,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
        max_image_bytes: Optional[int] = DEFAULT_MAX_IMAGE_BYTES,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.patch_size, self.merge_size = int(patch_size), int(merge_size)
        self.image_mean = [float(v) for v in (CLIP_MEAN if image_mean is None else image_mean)]
        self.image_std = [float(v) for v in (CLIP_STD if image_std is None else image_std)]
        self.resize_mode, self.max_size, self.min_size, self.image_scale = resize_mode, max_size, min_size, image_scale
        self.max_resolution, self.min_tokens = max_resolution, min_tokens
        self.do_convert_rgb, self.rescale_factor, self.resample = do_convert_rgb, rescale_factor, int(resample)
        self.max_image_pixels, self.max_image_bytes = max_image_pixels, max_image_bytes
        if self.patch_size <= 0 or self.merge_size <= 0:
            raise ValueError(f"patch_size and merge_size must be positive, got {patch_size} and {merge_size}.")
        self._resolve_options({})  # validate the defaults once

    @property
    def base(self) -> int:
        return self.patch_size * self.merge_size

    def _resolve_options(self, overrides: dict) -> dict:
        """Instance settings updated with the non-None per-call `overrides`, validated."""
        unknown = sorted(key for key, value in overrides.items() if key not in OVERRIDABLE_KEYS and value is not None)
        if unknown:
            raise TypeError(f"Unknown image processor option(s) {unknown}; valid ones: {list(OVERRIDABLE_KEYS)}.")
        options = {key: getattr(self, key) for key in OVERRIDABLE_KEYS}
        options.update({key: value for key, value in overrides.items() if value is not None})
        if options["resize_mode"] not in RESIZE_MODES:
            raise ValueError(f"Unknown resize_mode {options['resize_mode']!r}; valid modes: {list(RESIZE_MODES)}.")
        if options["max_size"] is None:
            options["max_size"] = DEFAULT_MAX_SIZE[options["resize_mode"]]
        if options["max_size"] <= 0 or options["image_scale"] <= 0 or options["min_tokens"] < 1:
            raise ValueError(
                f"max_size, image_scale and min_tokens must be positive, got {options['max_size']}, "
                f"{options['image_scale']} and {options['min_tokens']}."
            )
        if options["max_resolution"] < self.base or options["min_size"] < 0:
            raise ValueError(
                f"Need max_resolution >= {self.base} and min_size >= 0, got "
                f"{options['max_resolution']} and {options['min_size']}."
            )
        mean, std = options["image_mean"], options["image_std"]
        if len(mean) != len(std):
            raise ValueError(f"image_mean has {len(mean)} values but image_std has {len(std)}.")
        return options

    def _target_size(self, width: int, height: int, options: dict) -> tuple[Size, Size]:
        limits = {key: options[key] for key in ("max_size", "max_resolution", "min_tokens")}
        if options["resize_mode"] == "hf_chat":
            return hf_chat_target_size(width, height, self.base, **limits)
        scaling = {key: options[key] for key in ("min_size", "image_scale")}
        return eval_target_size(width, height, self.base, **scaling, **limits)

    def target_size(self, width: int, height: int, **overrides) -> tuple[Size, Size]:
        """(canvas, content) sizes, each (width, height), of a `width x height` image."""
        return self._target_size(width, height, self._resolve_options(overrides))

    paste_offset = staticmethod(paste_offset)  # (left, top) of `content` on `canvas`, as `target_size` returns them

    def expected_canvas_size(self, width: int, height: int, **overrides) -> Size:
        """(width, height) of the padded canvas for a `width x height` image, without touching pixels."""
        return self.target_size(width, height, **overrides)[0]

    def get_number_of_image_tokens(self, height: int, width: int, **overrides) -> int:
        """LLM tokens of a `height x width` input image: (W / base) * (H / base)."""
        canvas_w, canvas_h = self.expected_canvas_size(width, height, **overrides)
        return (canvas_w // self.base) * (canvas_h // self.base)

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: Optional[dict] = None) -> int:
        """ViT patches (before merging) of a `height x width` input image, as transformers processors expect."""
        return self.get_number_of_image_tokens(height, width, **(images_kwargs or {})) * self.merge_size**2

    def num_image_tokens(self, image_grid_hw: Union[torch.Tensor, list]) -> list[int]:
        """LLM tokens per image from `image_grid_hw` [num_images, 2]: h * w / merge_size**2."""
        grids = torch.as_tensor(image_grid_hw).reshape(-1, 2).tolist()
        return [h * w // self.merge_size**2 for h, w in grids]

    def make_canvas(self, image: Image.Image, **overrides) -> Image.Image:
        """Resize and pad an RGB PIL image onto its canvas (before rescaling and normalization)."""
        return self._make_canvas(image, self._resolve_options(overrides))

    def _make_canvas(self, image: Image.Image, options: dict) -> Image.Image:
        background = tuple(int(255 * m) for m in options["image_mean"])
        if options["resize_mode"] == "hf_chat":  # the official path resizes to the capped size first
            capped = cap_longest_side(*image.size, options["max_resolution"])
            image = image if capped == image.size else image.resize(capped, resample=options["resample"])
        canvas, content = self._target_size(*image.size, options)
        return resize_and_pad(image, canvas, content, background, options["resample"])

    def _normalize(self, canvas: Image.Image, options: dict) -> torch.Tensor:
        """RGB PIL canvas -> float[C, H, W], rescaled and normalized."""
        pixels = torch.from_numpy(np.array(canvas, dtype=np.uint8)).permute(2, 0, 1)  # [H, W, C] -> [C, H, W]
        mean = torch.tensor(options["image_mean"], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(options["image_std"], dtype=torch.float32).view(-1, 1, 1)
        return (pixels.float() * options["rescale_factor"] - mean) / std

    def _to_rgb(self, image: Any, options: dict) -> Image.Image:
        image = to_pil_image(image, options["max_image_pixels"], options["max_image_bytes"])
        if options["do_convert_rgb"]:
            return convert_to_rgb(image)
        if image.mode != "RGB":
            raise ValueError(f"Image mode is {image.mode!r} but do_convert_rgb=False; pass RGB images.")
        return image

    def preprocess(self, images: Any, return_tensors: Optional[str] = None, **overrides) -> BatchFeature:
        """
        Images (one, a list, or nested per-sample lists) -> `BatchFeature` with `pixel_values`
        float[sum_i h_i*w_i, C*p*p] and `image_grid_hw` long[num_images, 2] (patches, merge-block order).
        """
        options = self._resolve_options(overrides)
        patch_dim = len(options["image_mean"]) * self.patch_size**2
        patches, grids = [torch.zeros(0, patch_dim)], []
        for image in _flatten_images(images):
            canvas = self._make_canvas(self._to_rgb(image, options), options)
            patches.append(patchify(self._normalize(canvas, options), self.patch_size, self.merge_size))
            grids.append((canvas.height // self.patch_size, canvas.width // self.patch_size))
        data = {
            "pixel_values": torch.cat(patches, dim=0),  # [sum_i h_i*w_i, C*p*p]
            "image_grid_hw": torch.tensor(grids, dtype=torch.long).reshape(-1, 2),  # [num_images, 2]
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def unpatchify(self, pixel_values: torch.Tensor, image_grid_hw: Union[torch.Tensor, list]) -> list[torch.Tensor]:
        """Inverse of `preprocess`'s packing: per-image normalized canvases float[C, H, W]."""
        grids = torch.as_tensor(image_grid_hw).reshape(-1, 2).tolist()
        sizes = [h * w for h, w in grids]
        if sum(sizes) != pixel_values.shape[0]:
            raise ValueError(f"image_grid_hw has {sum(sizes)} patches, pixel_values {pixel_values.shape[0]}.")
        chunks = torch.split(pixel_values, sizes, dim=0)  # per image: [h*w, C*p*p]
        return [unpatchify(chunk, grid, self.patch_size, self.merge_size) for chunk, grid in zip(chunks, grids)]

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        if output.get("_processor_class") is None:  # 4.x keeps an empty `_processor_class`; 5.x does not
            output.pop("_processor_class", None)
        output.update({key: copy.deepcopy(getattr(self, key)) for key in CONFIG_KEYS})  # 5.x drops None values
        return output
