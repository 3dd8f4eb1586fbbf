"""Answer chat messages with images from the ExecuTorch files of `andesvl_tools.export_executorch` alone.

    python -m andesvl_tools.executorch_runner --programs out/AndesVL-Tiny-et --image photo.png --text "what shape?"
    python -m andesvl_tools.executorch_runner --programs out/AndesVL-Tiny-et --adapter ocr --image a.png --text "..."

No transformers model class is used: the processor (tokenizer, chat template, image packing) comes from the export
folder's own processor files, and every tensor op runs in ExecuTorch's runtime (`executorch.runtime`) on the
programs named by `manifest.json`: `token_embedding`, one `vision_<W>x<H>` per canvas bucket and the `text_decoder`
of the base (`base.pte`) or of an adapter (`adapters/<name>.pte`), all reading the weights of one `base.ptd`. The
export of a quantized folder (e.g. the int4 base of the `*-qalft-int4` adapters) runs the same way: its weights are
the dequantized fp32 ones, so its answers are those of the eager quantized model in fp32.

Each image goes to the bucket its processor canvas names. An image whose canvas is not a bucket is first fitted
(aspect kept, centred on the processor's background colour) to the size from which the processor's own rule makes
the bucket nearest in aspect ratio (then in area); the eager model given the same fitted image sees the same tokens.
Decoding is greedy, as `model.generate(do_sample=False)`, and stops at the generation config's end tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from .export_executorch import MANIFEST


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=Path, required=True, help="folder written by export_executorch")
    parser.add_argument("--adapter", default=None, help="adapter program to answer with (default: the base)")
    parser.add_argument("--image", type=Path, action="append", default=[], help="an image (repeatable)")
    parser.add_argument("--text", required=True, help="the user's question")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    return parser.parse_args(argv)


def fitted_size_for(bucket: tuple[int, int], image_processor) -> tuple[int, int]:
    """An image size from which the processor's resize rule makes exactly the `bucket` canvas."""
    base = image_processor.base
    width, height = bucket
    for candidate in ((width - base, height - base), (width, height), (width - 1, height - 1)):
        if min(candidate) > 0 and tuple(image_processor.expected_canvas_size(*candidate)) == bucket:
            return candidate
    raise ValueError(f"No image size makes the processor choose the {width}x{height} canvas bucket.")


def nearest_bucket(canvas: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket nearest in aspect ratio, then in area (log scale), to a processor canvas."""

    def distance(bucket: tuple[int, int]) -> tuple[float, float]:
        aspect = abs(math.log(bucket[0] / bucket[1]) - math.log(canvas[0] / canvas[1]))
        return round(aspect, 6), abs(math.log(bucket[0] * bucket[1]) - math.log(canvas[0] * canvas[1]))

    return min(buckets, key=distance)


def fit_to_bucket(image, bucket: tuple[int, int], image_processor):
    """Resize (aspect kept) and pad `image`, with the processor's own helpers, so that the processor's rule makes the
    `bucket` canvas of it."""
    helpers = sys.modules[type(image_processor).__module__]  # image_processing_andesvl of the export folder
    target = fitted_size_for(bucket, image_processor)
    content = helpers._fit_content(image.width, image.height, target, round)
    background = tuple(int(255 * m) for m in image_processor.image_mean)
    return helpers.resize_and_pad(image.convert("RGB"), target, content, background, image_processor.resample)


def load_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a folder written by export_executorch.")
    return json.loads(path.read_text())


def load_program(folder: Path, manifest: dict[str, Any], relative_path: str | None = None):
    """One program of the export folder (`manifest["base"]` by default) with the shared base weights file. An 8da4w
    export needs ExecuTorch's quantized kernels (the int8 embedding lookup), registered here on first use; the export
    of a quantized folder (weights dequantized to fp32) needs none."""
    from executorch.runtime import Runtime

    if (manifest.get("quantization") or {}).get("linear") == "8da4w":
        import executorch.kernels.quantized  # noqa: F401  (registers quantized_decomposed::embedding_byte)
    folder = Path(folder)
    path = folder / (relative_path or manifest["base"])
    return Runtime.get().load_program(path, data_path=folder / manifest["data"])


class ExecutorchAndesVL:
    """The exported base and adapters of one folder, loaded lazily in ExecuTorch's runtime."""

    def __init__(self, folder: Path | str):
        from transformers import AutoProcessor, GenerationConfig

        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        self.processor = AutoProcessor.from_pretrained(str(self.folder), trust_remote_code=True)
        self.generation = GenerationConfig.from_pretrained(str(self.folder))
        eos = self.generation.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.base = load_program(self.folder, self.manifest)
        self.buckets = {
            tuple(int(v) for v in key.split("x")): method for key, method in self.manifest["buckets"].items()
        }
        self.programs: dict[str | None, Any] = {None: self.base}
        self.methods: dict[tuple[str | None, str], Any] = {}

    @property
    def adapters(self) -> list[str]:
        return sorted(self.manifest["adapters"])

    def method(self, name: str, adapter: str | None = None):
        key = (adapter, name)
        if key not in self.methods:
            self.methods[key] = self.program(adapter).load_method(name)
        return self.methods[key]

    def program(self, adapter: str | None):
        if adapter not in self.programs:
            if adapter not in self.manifest["adapters"]:
                raise ValueError(f"Unknown adapter {adapter!r}; exported adapters: {self.adapters}.")
            self.programs[adapter] = load_program(self.folder, self.manifest, self.manifest["adapters"][adapter])
        return self.programs[adapter]

    def bucketed_images(self, images: list) -> list:
        """Each image as is when its canvas is a bucket, else fitted to the nearest bucket (`fit_to_bucket`)."""
        from PIL import Image

        image_processor = self.processor.image_processor
        fitted = []
        for image in images:
            image = Image.open(image).convert("RGB") if isinstance(image, (str, Path)) else image.convert("RGB")
            canvas = tuple(image_processor.expected_canvas_size(*image.size))
            if canvas not in self.buckets:
                image = fit_to_bucket(image, nearest_bucket(canvas, list(self.buckets)), image_processor)
            fitted.append(image)
        return fitted

    def prepare(self, messages: list[dict[str, Any]], images: list) -> dict[str, torch.Tensor]:
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.processor(text=[prompt], images=self.bucketed_images(images) or None, return_tensors="pt")

    def embed_prompt(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[1, S, D] prompt embeddings with every image's visual tokens over its `<|vision_pad|>` placeholders."""
        input_ids = inputs["input_ids"]
        embeds = self.method("token_embedding").execute([input_ids])[0]  # [1, S, D]
        grids = inputs.get("image_grid_hw")
        if grids is None:
            return embeds
        features, start = [], 0
        patch = self.processor.image_processor.patch_size
        for rows, cols in grids.tolist():
            count = rows * cols
            bucket = self.buckets[(cols * patch, rows * patch)]
            features.append(self.method(bucket).execute([inputs["pixel_values"][start : start + count].float()])[0])
            start += count
        features = torch.cat(features)  # [T, D]
        mask = input_ids[0] == self.manifest["image_token_id"]
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"{int(mask.sum())} image tokens in the prompt but {features.shape[0]} visual tokens.")
        embeds = embeds.clone()
        embeds[0, mask] = features
        return embeds

    def generate_ids(self, inputs: dict[str, torch.Tensor], adapter: str | None, max_new_tokens: int) -> list[int]:
        length = inputs["input_ids"].shape[1]
        limit = self.manifest["max_context"]
        if length + max_new_tokens > limit:
            raise ValueError(
                f"The prompt is {length} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{length + max_new_tokens} cache positions, but the programs were exported with --max-context {limit}."
            )
        decoder = self.method("text_decoder", adapter)
        logits = decoder.execute([self.embed_prompt(inputs), torch.arange(length)])[0]  # [1, V]
        tokens: list[int] = []
        for step in range(max_new_tokens):
            token = int(logits[0].argmax())
            tokens.append(token)
            if token in self.eos_ids or step == max_new_tokens - 1:
                break
            embeds = self.method("token_embedding").execute([torch.tensor([[token]])])[0]
            logits = decoder.execute([embeds, torch.tensor([length + step])])[0]
        return tokens

    def chat(
        self,
        messages: list[dict[str, Any]],
        images: list | None = None,
        adapter: str | None = None,
        max_new_tokens: int = 64,
    ) -> str:
        """The greedy answer to `messages` (transformers chat format; `images` in order of their image parts)."""
        inputs = self.prepare(messages, list(images or []))
        tokens = self.generate_ids(inputs, adapter, max_new_tokens)
        return self.processor.batch_decode([tokens], skip_special_tokens=True)[0].strip()


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    runner = ExecutorchAndesVL(args.programs)
    content = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.text}]
    answer = runner.chat([{"role": "user", "content": content}], args.image, args.adapter, args.max_new_tokens)
    print(answer)
    return answer


if __name__ == "__main__":
    main()
