"""Train a small AndesVL end to end on offline data, staged like the AndesVL paper, with the transformers `Trainer`.

    python -m andesvl_tools.make_datasets --output outputs/datasets
    python -m andesvl_tools.train --init tiny-aimv2 --data outputs/datasets --stages align,pretrain,sft --val \\
        --max-steps 500 --per-device-batch-size 8 --work-dir runs/tiny --output out/AndesVL-Tiny
    python -m andesvl_tools.train ... --resume                  # continue from the last checkpoint (finished stages
    skip)
    python -m andesvl_tools.train --init out/AndesVL-Tiny --stage sft --data ... --work-dir runs/sft2 --output out/sft2
    accelerate launch --num_processes 8 andesvl_tools/train.py ...   # or torchrun: the Trainer does the rest

Model: `--init tiny-aimv2` builds a fresh, seeded AndesVL-Tiny from `TINY_DEMO` (AIMv2-type encoder, hidden 128,
4 layers, 4 heads, patch 14, 16x16 position grid; Qwen3 text, hidden 80, 4 layers, 4 heads / 2 KV heads, head_dim 32,
intermediate 384, the real 151,936-token vocabulary, tied embeddings; 13.9M parameters, 12.2M of them the embedding)
into `<work-dir>/init`; `--micro` shrinks it further (tests). `--init PATH` continues from a saved AndesVL folder.
Weights train in float32. The text width is 80, not 128, so the exported folder stays under 48 MB: in bfloat16 the
weights are 27.8 MB, the tokenizer files 16 MB (hidden 128 would make it 59 MB).

Stages (`--stage NAME`, or `--stages a,b,c` in sequence; each stage starts from the previous stage's weights):

    stage     trains                                    default LR   data (chat template, assistant-only labels)
    vision    vision_encoder, mlp (+ label heads)          3e-4      --vision-tasks images (vqa; + ocr, gui), see below
    align     mlp (+ vision_encoder with --align-vision)  1e-3      captions/answers of all --tasks
    pretrain  vision_encoder, mlp, language_model          5e-4      all --tasks
    sft       vision_encoder, mlp, language_model          1e-4      all --tasks (multi-task instruction tuning)

`vision` is an optional warm-up for an encoder trained from scratch (the official sizes start from pretrained AIMv2 /
SigLIP2 encoders): linear heads over the visual tokens as the language model sees them (after the projector) learn
what the answers will need, and are dropped afterwards (`VisionWarmupHeads`):
  - easy-vqa images: the shape and colour the answers name for the image, from the mean of its tokens;
  - OCR images: per token, the characters whose centre lies in it, left to right (CHAR_SLOTS slots, 62 classes);
  - GUI screens: per token, which label text lies on it (GUI_LABELS) and the box of the element under its centre;
  - every image, with `--position-loss-weight W`: per token, its own (row, column) on the token grid, so the tokens
    keep absolute position (`--position-table sincos` starts the encoder's position table as the 2-D sin-cos table).
The dense targets come from the generators' meta (`char_centers`, `text_boxes_px`, `boxes_px`), mapped onto the token
grid through the image processor's resize and padding (`TokenGrid`). Measured on AndesVL-Tiny: through the language
model alone, the from-scratch encoder learned colour but not shape (39% after 1,500 steps of shape/colour questions),
and never learned to read: the base and its adapters answered every GUI question with one constant box and got no
OCR answer right. With image-level labels only, the warm-up fixed shape (easy-vqa 78.5% -> 92.0%) but not reading.

Every other stage tokenizes with `andesvl_tools/finetune_lora.py`'s `ChatEncoder` (the inference-time chat template,
labels on
assistant content and `<|im_end|>` only) and its collator. The stages differ by trainable modules, learning rate and
task mix (`--align-tasks`, `--pretrain-tasks`, `--sft-tasks` override `--tasks`): the concatenated `train.jsonl` of
the tasks, shuffled with `--seed`. `--val` evaluates the loss on the tasks' `val.jsonl` every `--eval-steps`.
The model computes logits only at labelled positions (`causal_lm_loss_on_labelled_positions`), so the full
vocabulary stays cheap.

Outputs: `<work-dir>/args.json`; per stage `<work-dir>/<stage>/checkpoints/checkpoint-*` and
`<work-dir>/<stage>/model/` (a complete float32 repo folder with `training_metrics.json` and `loss_curve.png`). The
last stage is also exported to `--output` in `--save-dtype` (bfloat16 by default: the tied 151,936 x 80 embedding
dominates the size) with the repo's config, code, tokenizer and processor files, loadable with
`AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import build_repo
from . import finetune_lora as ft
from .evaluate import box_intersection, text_of
from .folders import overlap_error
from .make_datasets import BUTTON_LABELS, ROW_LABELS, SHAPE_COLORS, SHAPES, TASKS

STAGE_NAMES = ("vision", "align", "pretrain", "sft")
ALL_MODULES = ("vision_encoder", "mlp", "language_model")
METRICS_NAME = "training_metrics.json"
PLOT_NAME = "loss_curve.png"
# The vision warm-up's image-level labels: what the easy-vqa colour and shape answers say about each image.
IMAGE_LABELS = {"shape": SHAPES, "color": tuple(SHAPE_COLORS)}
# Its dense targets, per visual token: the OCR characters it holds, the GUI label text on it, the GUI element box.
OCR_CHARS = string.digits + string.ascii_letters  # every character make_datasets.ocr_text draws
NO_CHAR = len(OCR_CHARS)  # class of an empty character slot
CHAR_SLOTS = 3  # characters per token (a 28-px token holds at most 2 at the OCR font sizes)
GUI_LABELS = ROW_LABELS + BUTTON_LABELS
DENSE_META = {"ocr": ("text", "char_centers"), "gui": ("image_size", "labels", "boxes_px", "text_boxes_px")}
VISION_TARGETS = (*IMAGE_LABELS, "chars", "element", "box")
VISION_TASKS = ("vqa", "ocr", "gui")
BOX_LOSS_WEIGHT = 10.0  # the L1 box error (0-1 units) is small next to the cross-entropies
IGNORE_INDEX = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StageSpec:
    modules: tuple[str, ...]  # top-level children of AndesVLForConditionalGeneration that train
    learning_rate: float


STAGES = {
    "vision": StageSpec(("vision_encoder", "mlp"), 3e-4),
    "align": StageSpec(("mlp",), 1e-3),
    "pretrain": StageSpec(ALL_MODULES, 5e-4),
    "sft": StageSpec(ALL_MODULES, 1e-4),
}

TINY_DEMO = build_repo.model_config(
    {
        **build_repo.AIMV2_LARGE,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 224,
        "torch_dtype": "float32",
    },
    {**build_repo.qwen3_text_config(80, 4, 4, 384), "num_key_value_heads": 2, "head_dim": 32, "torch_dtype": "float32"},
    "float32",
)
MICRO = build_repo.model_config(
    {
        **build_repo.AIMV2_LARGE,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 112,
        "torch_dtype": "float32",
    },
    {**build_repo.qwen3_text_config(32, 1, 2, 64), "num_key_value_heads": 1, "head_dim": 16, "torch_dtype": "float32"},
    "float32",
)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def stage_tasks(args: argparse.Namespace, stage: str) -> list[str]:
    if stage == "vision":
        return args.vision_tasks
    return getattr(args, f"{stage}_tasks") or args.tasks


def load_task_split(
    data: Path, tasks: list[str], split: str, seed: int, limits: dict[str, int] | None = None
) -> list[dict]:
    """The concatenated `<data>/<task>/<split>.jsonl` of `tasks` (the first `limits[task]` lines of a capped task),
    shuffled with `seed` (validated by finetune_lora)."""
    limits = limits or {}
    examples = [
        example for task in tasks for example in ft.load_jsonl(data / task / f"{split}.jsonl")[: limits.get(task)]
    ]
    random.Random(seed).shuffle(examples)
    return examples


def drop_answers(examples: list[dict], answers: list[str]) -> list[dict]:
    """Loaded examples whose last (assistant) answer is not one of `answers` (case-insensitive, stripped)."""
    dropped = {answer.strip().lower() for answer in answers}
    return [example for example in examples if text_of(example["messages"][-1]).strip().lower() not in dropped]


def image_records(examples: list[dict], task: str) -> list[dict]:
    """One record per distinct single-image example's image (first appearance order): the path, the task, the
    generator's meta, and the answers given about it."""
    records: dict[str, dict] = {}
    for example in examples:
        paths = ft.image_paths(example["messages"])
        if len(paths) != 1:
            continue
        record = records.setdefault(
            paths[0], {"image": paths[0], "task": task, "meta": example.get("meta", {}), "answers": []}
        )
        record["answers"].append(text_of(example["messages"][-1]).strip().lower())
    return list(records.values())


def image_labels(answers: list[str]) -> dict[str, int]:
    """For every IMAGE_LABELS name, the index of the value that one of `answers` (stripped, lower-case) names, or
    IGNORE_INDEX when none does."""
    named = {
        name: [values.index(answer) for answer in answers if answer in values] for name, values in IMAGE_LABELS.items()
    }
    return {name: indices[0] if indices else IGNORE_INDEX for name, indices in named.items()}


def check_dense_meta(records: list[dict], task: str, keys: tuple[str, ...]) -> None:
    missing = [record["image"] for record in records if any(key not in record["meta"] for key in keys)]
    if missing:
        raise SystemExit(
            f"stage vision: {len(missing)} of {len(records)} {task} images lack the meta {list(keys)} "
            f"(first: {missing[0]}); regenerate the data with andesvl_tools/make_datasets.py"
        )


def vision_records(examples: list[dict], task: str) -> list[dict]:
    """The vision warm-up's records of one task: vqa images some answer gives a shape or colour to; every OCR and GUI
    image (their dense targets come from the generator's meta, checked here)."""
    records = image_records(examples, task)
    if task == "vqa":
        return [record for record in records if set(image_labels(record["answers"]).values()) != {IGNORE_INDEX}]
    check_dense_meta(records, task, DENSE_META[task])
    return records


@dataclass(frozen=True)
class TokenGrid:
    """Where an original image's pixels land on its grid of visual tokens (one token = `base` x `base` canvas
    pixels after the image processor's resize and centred padding)."""

    rows: int
    cols: int
    scale: tuple[float, float]  # canvas / original pixels, (x, y)
    offset: tuple[int, int]  # the pasted content's top-left corner on the canvas
    base: int

    @classmethod
    def of(cls, image_processor, size: tuple[int, int], grid_hw: torch.Tensor) -> TokenGrid:
        canvas, content = image_processor.target_size(*size)
        base, merge = image_processor.base, image_processor.merge_size
        rows, cols = int(grid_hw[0]) // merge, int(grid_hw[1]) // merge
        if (cols * base, rows * base) != tuple(canvas):
            raise ValueError(f"image of {size[0]}x{size[1]} px: canvas {canvas} but a {rows}x{cols} token grid")
        offset = image_processor.paste_offset(canvas, content)
        return cls(rows, cols, (content[0] / size[0], content[1] / size[1]), offset, base)

    @property
    def tokens(self) -> int:
        return self.rows * self.cols

    def token_at(self, x: float, y: float) -> int:
        """Row-major index of the token that holds original pixel (x, y) (clamped to the grid)."""
        col = int((x * self.scale[0] + self.offset[0]) // self.base)
        row = int((y * self.scale[1] + self.offset[1]) // self.base)
        return min(max(row, 0), self.rows - 1) * self.cols + min(max(col, 0), self.cols - 1)

    def token_box(self, index: int) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) of token `index` in original pixels."""
        row, col = divmod(index, self.cols)
        x1, y1 = col * self.base - self.offset[0], row * self.base - self.offset[1]
        return (
            x1 / self.scale[0],
            y1 / self.scale[1],
            (x1 + self.base) / self.scale[0],
            (y1 + self.base) / self.scale[1],
        )


def char_targets(text: str, centers: list[list[float]], grid: TokenGrid) -> torch.Tensor:
    """long[tokens, CHAR_SLOTS]: the OCR_CHARS index of the characters whose centre lies in each token, left to right,
    NO_CHAR in its free slots; IGNORE_INDEX on tokens without a character (most of them: as NO_CHAR targets they
    swamp the loss and the head learns to say 'none')."""
    if len(centers) != len(text):
        raise ValueError(f"OCR text {text!r} has {len(text)} characters but {len(centers)} centres")
    slots: list[list[int]] = [[] for _ in range(grid.tokens)]
    for char, (x, y) in zip(text, centers):
        if char not in OCR_CHARS:
            raise ValueError(f"OCR text {text!r}: character {char!r} is not one of the {len(OCR_CHARS)} OCR_CHARS")
        slots[grid.token_at(x, y)].append(OCR_CHARS.index(char))
    if max(len(token) for token in slots) > CHAR_SLOTS:
        raise ValueError(f"OCR text {text!r}: more than {CHAR_SLOTS} characters in one visual token")
    return torch.tensor([token + [NO_CHAR if token else IGNORE_INDEX] * (CHAR_SLOTS - len(token)) for token in slots])


def gui_targets(meta: dict, grid: TokenGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """(long[tokens], float[tokens, 4]): the GUI_LABELS index of the label text that overlaps each token most
    (IGNORE_INDEX where none does, as for char_targets), and the box (x1, y1, x2, y2; 0-1) of the element whose box
    holds the token's centre (-1 where none does)."""
    width, height = meta["image_size"]
    elements, boxes = torch.full((grid.tokens,), IGNORE_INDEX), torch.full((grid.tokens, 4), -1.0)
    for index in range(grid.tokens):
        token = grid.token_box(index)
        cover = [box_intersection(token, text_box) for text_box in meta["text_boxes_px"]]
        if max(cover, default=0.0) > 0:
            elements[index] = GUI_LABELS.index(meta["labels"][cover.index(max(cover))])
        cx, cy = (token[0] + token[2]) / 2, (token[1] + token[3]) / 2
        for x1, y1, x2, y2 in meta["boxes_px"]:
            if x1 <= cx < x2 and y1 <= cy < y2:
                boxes[index] = torch.tensor([x1 / width, y1 / height, x2 / width, y2 / height])
    return elements, boxes


class VisionTargetDataset(torch.utils.data.Dataset):
    """Vision records -> packed patches, grid, and every VISION_TARGETS tensor (IGNORE_INDEX / -1 where the record's
    task has none): shape and colour per image, chars, element and box per visual token."""

    def __init__(self, records: list[dict], image_processor):
        self.records, self.image_processor = records, image_processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        record = self.records[index]
        with Image.open(record["image"]) as image:
            size = image.size
            inputs = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        grid = TokenGrid.of(self.image_processor, size, inputs["image_grid_hw"][0])
        targets = {name: torch.tensor([IGNORE_INDEX]) for name in IMAGE_LABELS}
        targets["chars"] = torch.full((grid.tokens, CHAR_SLOTS), IGNORE_INDEX)
        targets["element"] = torch.full((grid.tokens,), IGNORE_INDEX)
        targets["box"] = torch.full((grid.tokens, 4), -1.0)
        if record["task"] == "vqa":
            targets.update({name: torch.tensor([index]) for name, index in image_labels(record["answers"]).items()})
        elif record["task"] == "ocr":
            targets["chars"] = char_targets(record["meta"]["text"], record["meta"]["char_centers"], grid)
        else:
            targets["element"], targets["box"] = gui_targets(record["meta"], grid)
        return {"pixel_values": inputs["pixel_values"], "image_grid_hw": inputs["image_grid_hw"], **targets}


def collate_vision_targets(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate along dim 0: patches, grids and image labels per image, token targets in the model's token order."""
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def tiny_config(micro: bool) -> dict:
    return copy.deepcopy(MICRO if micro else TINY_DEMO)


def sincos_position_table(side: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The 2-D sin-cos table [side * side, dim] (row-major) of MAE and AIMv2 pre-training: the first half of the
    channels encode the row, the second half the column, each as sines then cosines of geometric frequencies."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position table needs a width divisible by 4, got {dim}")
    frequencies = temperature ** -(torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # [dim/4]
    rows, cols = torch.meshgrid(
        torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij"
    )
    angles = [axis.reshape(-1, 1) * frequencies for axis in (rows, cols)]  # 2 x [side*side, dim/4]
    return torch.cat([part for angle in angles for part in (angle.sin(), angle.cos())], dim=-1)  # [side*side, dim]


def set_sincos_position_table(folder: Path) -> None:
    """Overwrite the saved AIMv2 position table of `folder` with the sin-cos table (`--position-table sincos`)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    weights = load_file(str(path))
    key = "vision_encoder.preprocessor.pos_embed"
    if key not in weights:
        raise SystemExit(f"--position-table sincos: {path} has no {key} (an AIMv2-type encoder is needed)")
    _, positions, width = weights[key].shape
    weights[key] = sincos_position_table(int(round(positions**0.5)), width)[None].to(weights[key].dtype)
    save_file(weights, str(path), metadata={"format": "pt"})


def build_init_folder(folder: Path, config: dict, seed: int, position_table: str = "random") -> Path:
    """A fresh, seeded random model as a complete repo folder (float32); with `position_table="sincos"` the vision
    encoder's position table starts as the 2-D sin-cos table instead of normal(0, 0.02) noise."""
    build_repo.save_tiny_weights(folder, config, seed)
    build_repo.write_repo_files(folder, config)
    if position_table == "sincos":
        set_sincos_position_table(folder)
    return folder


def init_folder(args: argparse.Namespace) -> Path:
    if args.init != "tiny-aimv2":
        return Path(args.init)
    folder = args.work_dir / "init"
    if not (folder / "config.json").is_file():
        build_init_folder(folder, tiny_config(args.micro), args.seed, args.position_table)
    return folder


def load_model(folder: Path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    model.config.text_config.use_cache = False  # no KV cache while training
    return model


def token_positions(image_grid_hw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """float[tokens, 2]: the centre (row, column) of every visual token on its image's token grid, in 0-1 units, in
    the model's token order (images in order, row-major)."""
    centres = []
    for height, width in (image_grid_hw // merge_size).tolist():
        rows, cols = torch.meshgrid(
            (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
        )
        centres.append(torch.stack([rows.flatten(), cols.flatten()], dim=-1))
    return torch.cat(centres)


class VisionWarmupHeads(torch.nn.Module):
    """The vision warm-up: the model's vision encoder and projector (shared, trained in place) plus linear heads over
    the visual tokens as the language model sees them: shape and colour over the mean of an easy-vqa image's tokens;
    per token of an OCR image, the characters it holds (CHAR_SLOTS ordered slots); per token of a GUI screen, the label
    text on it and the box of the element under it; with `position_loss_weight` > 0, per token of every image, its own
    place on the token grid, so the tokens keep the absolute position that grounding answers need (measured on
    AndesVL-Tiny without this head: R2 of a linear read-out of the grid position fell from 0.93 at the sin-cos init to
    0.5 after the shape/colour warm-up). Loss: the sum of the cross-entropies (each over its labelled entries),
    BOX_LOSS_WEIGHT x the L1 box error and position_loss_weight x the L1 position error. The heads are dropped after
    the stage; what the stage leaves is an encoder whose tokens carry what the answers need."""

    def __init__(self, model, position_loss_weight: float = 0.0):
        super().__init__()
        self.position_loss_weight = position_loss_weight
        self.vision_encoder, self.mlp = model.vision_encoder, model.mlp
        self.group = model.config.image_token_group  # patches per visual token (2x2 merge)
        self.merge_size = model.config.vision_config.merge_size
        width = model.config.text_config.hidden_size
        self.heads = torch.nn.ModuleDict(
            {name: torch.nn.Linear(width, len(values)) for name, values in IMAGE_LABELS.items()}
        )
        self.heads["chars"] = torch.nn.Linear(width, CHAR_SLOTS * (NO_CHAR + 1))
        self.heads["element"] = torch.nn.Linear(width, len(GUI_LABELS))
        self.heads["box"] = torch.nn.Linear(width, 4)
        if position_loss_weight > 0:  # only then: a head built and unused would shift the seeded initialisation
            self.heads["position"] = torch.nn.Linear(width, 2)

    def visual_tokens(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor) -> torch.Tensor:
        features = self.vision_encoder(pixel_values, image_grid_hw)  # [N, Dv]
        return self.mlp(features.reshape(-1, features.shape[-1] * self.group))  # [N/4, D_llm], as the LLM sees them

    def forward(
        self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, **targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        tokens = self.visual_tokens(pixel_values, image_grid_hw)  # [T, D]
        counts = (image_grid_hw.prod(-1) // self.group).tolist()
        pooled = torch.stack([image.mean(0) for image in tokens.split(counts)])  # [images, D]
        logits = {name: self.heads[name](pooled) for name in IMAGE_LABELS}
        logits["chars"] = self.heads["chars"](tokens).reshape(-1, NO_CHAR + 1)  # [T * CHAR_SLOTS, classes]
        logits["element"], logits["box"] = self.heads["element"](tokens), self.heads["box"](tokens)
        if "position" in self.heads:
            logits["position"] = self.heads["position"](tokens)
        losses = [
            torch.nn.functional.cross_entropy(logits[name], targets[name].reshape(-1), ignore_index=IGNORE_INDEX)
            for name in (*IMAGE_LABELS, "chars", "element")
            if (targets[name] != IGNORE_INDEX).any()
        ]
        boxed = targets["box"][:, 0] >= 0
        if boxed.any():
            error = (logits["box"][boxed] - targets["box"][boxed]).abs().mean()
            losses.append(BOX_LOSS_WEIGHT * error)
        if "position" in logits:
            where = token_positions(image_grid_hw, self.merge_size).to(tokens)
            losses.append(self.position_loss_weight * (logits["position"] - where).abs().mean())
        return {"loss": torch.stack(losses).sum(), **logits}


@torch.no_grad()
def vision_target_accuracy(
    heads: VisionWarmupHeads, dataset: VisionTargetDataset, batch_size: int = 32
) -> dict[str, float]:
    """Over the labelled entries of `dataset`: shape and colour accuracy, OCR character accuracy (slots that hold a
    character), GUI label accuracy (tokens on a label), mean box error (0-1000 units, tokens inside an element) and,
    with the position head, mean position error (0-1000 units, every token)."""
    heads.eval()
    sums: dict[str, list[float]] = {
        name: [0.0, 0] for name in (*IMAGE_LABELS, "chars", "element", "box_error", "position_error")
    }
    for start in range(0, len(dataset), batch_size):
        batch = collate_vision_targets([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = heads(**batch)
        for name in (*IMAGE_LABELS, "chars", "element"):
            target = batch[name].reshape(-1)
            known = (target != IGNORE_INDEX) & ((target != NO_CHAR) if name == "chars" else True)
            sums[name][0] += int((logits[name].argmax(-1) == target)[known].sum())
            sums[name][1] += int(known.sum())
        boxed = batch["box"][:, 0] >= 0
        sums["box_error"][0] += float((logits["box"][boxed] - batch["box"][boxed]).abs().mean(-1).sum()) * 1000
        sums["box_error"][1] += int(boxed.sum())
        if "position" in logits:
            where = token_positions(batch["image_grid_hw"], heads.merge_size)
            sums["position_error"][0] += float((logits["position"] - where).abs().mean(-1).sum()) * 1000
            sums["position_error"][1] += len(where)
    heads.train()
    return {name: round(total / count, 4) for name, (total, count) in sums.items() if count}


def set_trainable(model: torch.nn.Module, modules: tuple[str, ...]) -> dict[str, int]:
    """Train exactly the parameters under `modules` (top-level children); returns trainable counts per module."""
    counts = {name: 0 for name in ALL_MODULES}
    for name, parameter in model.named_parameters():
        top = name.split(".")[0]
        parameter.requires_grad_(top in modules)
        if parameter.requires_grad:
            counts[top] = counts.get(top, 0) + parameter.numel()
    return counts


def stage_modules(args: argparse.Namespace, stage: str) -> tuple[str, ...]:
    if args.train_modules:
        return tuple(args.train_modules)
    modules = STAGES[stage].modules
    if stage == "align" and args.align_vision:
        modules = ("vision_encoder", *modules)
    return modules


def export_config(folder: Path, dtype: str) -> dict:
    """The saved model's config.json with every dtype field set to `dtype`."""
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = dtype
    for key in ("vision_config", "text_config"):
        config[key]["torch_dtype"] = dtype
        config[key].pop("dtype", None)
    return config


def save_repo_folder(model, folder: Path, config: dict, dtype: str) -> int:
    """`save_pretrained` in `dtype`, then the repo's JSON, code and tokenizer; returns the folder size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    export = copy.deepcopy(model).to(DTYPES[dtype])
    export.config.text_config.use_cache = True
    export.save_pretrained(folder)
    build_repo.write_repo_files(folder, config)  # after save_pretrained: the hand-authored JSON and sources win
    return folder_size(folder)


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# ----------------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------------


def training_arguments(args: argparse.Namespace, stage: str, output_dir: Path, has_eval: bool):
    return ft.trainer_arguments(
        args,
        output_dir=output_dir,
        has_eval=has_eval,
        learning_rate=args.learning_rate or STAGES[stage].learning_rate,
        prediction_loss_only=True,  # eval loss only: no logits piled up over the eval set
    )


def last_checkpoint(folder: Path, resume: bool) -> str | None:
    """The stage's last checkpoint with `--resume`; refuses to mix a fresh run into old checkpoints."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if last is not None and not resume:
        raise SystemExit(
            f"{folder} already holds checkpoints ({Path(last).name}); pass --resume or use a new --work-dir."
        )
    return last


# ----------------------------------------------------------------------------------------------------------------------
# Metrics and the loss plot
# ----------------------------------------------------------------------------------------------------------------------


def stage_metrics(stage, args, trainer, train_output, counts, sizes, checkpoint, wall_time) -> dict[str, Any]:
    train_curve, eval_curve = ft.loss_curves(trainer.state.log_history)
    return {
        "stage": stage,
        "trained_modules": list(stage_modules(args, stage)),
        "trainable_parameters": counts,
        "total_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "tasks": stage_tasks(args, stage),
        "train_examples": sizes[0],
        "eval_examples": sizes[1],
        "learning_rate": trainer.args.learning_rate,
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss_curve": train_curve,
        "final_train_loss": train_curve[-1]["loss"] if train_curve else None,
        "mean_train_loss": train_output.training_loss,
        "eval_curve": eval_curve,
        "final_eval_loss": eval_curve[-1]["eval_loss"] if eval_curve else None,
        "wall_time_s": wall_time,
        "resumed_from": checkpoint,
        "args": ft.resolved_args(args),
    }


def scale(values: list[float], low: float, high: float, start: int, end: int) -> list[float]:
    span = (high - low) or 1.0
    return [start + (value - low) / span * (end - start) for value in values]


def plot_loss_curves(train: list[dict], evaluation: list[dict], path: Path, title: str) -> None:
    """A PNG line plot (PIL only): train loss (blue) and eval loss (orange) against the optimizer step."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 420, 70, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    series = [
        ([p["step"] for p in train], [p["loss"] for p in train], (31, 119, 180), "train loss"),
        ([p["step"] for p in evaluation], [p["eval_loss"] for p in evaluation], (255, 127, 14), "eval loss"),
    ]
    steps = [s for xs, _, _, _ in series for s in xs] or [0, 1]
    losses = [v for _, ys, _, _ in series for v in ys] or [0, 1]
    x_range, y_range = (min(steps), max(steps)), (min(losses), max(losses))
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((width // 2 - 60, 12), title, fill="black")
    draw.text((width // 2 - 10, height - 22), "step", fill="black")
    draw.text((8, top - 24), "loss", fill="black")
    for fraction in (0.0, 0.5, 1.0):
        y = height - bottom - fraction * (height - bottom - top)
        draw.text((6, y - 6), f"{y_range[0] + fraction * (y_range[1] - y_range[0]):.4g}", fill="black")
        x = left + fraction * (width - right - left)
        draw.text(
            (x - 10, height - bottom + 6), f"{x_range[0] + fraction * (x_range[1] - x_range[0]):.0f}", fill="black"
        )
    for index, (xs, ys, color, label) in enumerate(series):
        points = list(zip(scale(xs, *x_range, left, width - right), scale(ys, *y_range, height - bottom, top)))
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points if len(points) < 50 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.line([(width - 170, top + 14 + 16 * index), (width - 145, top + 14 + 16 * index)], fill=color, width=2)
        draw.text((width - 140, top + 8 + 16 * index), label, fill="black")
    image.save(path)


def write_stage_outputs(folder: Path, metrics: dict[str, Any]) -> None:
    ft.write_json(folder / METRICS_NAME, metrics)
    plot_loss_curves(
        metrics["train_loss_curve"], metrics["eval_curve"], folder / PLOT_NAME, f"AndesVL {metrics['stage']}: loss"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------------


def stage_done(stage_dir: Path) -> bool:
    return (stage_dir / "model" / METRICS_NAME).is_file()


def stage_datasets(args: argparse.Namespace, stage: str, processor):
    """(train set, eval set or None, sizes) of a stage: seeded task mix, tokenized on access by ChatEncoder."""
    tasks = stage_tasks(args, stage)
    train = drop_answers(load_task_split(args.data, tasks, "train", args.seed, args.task_limit), args.drop_answers)
    evaluation = load_task_split(args.data, tasks, "val", args.seed) if args.val else []
    evaluation = drop_answers(evaluation, args.drop_answers)[: args.max_val_examples]
    if not train:
        raise SystemExit(f"stage {stage}: no training example left (tasks {tasks}, --drop-answers {args.drop_answers})")
    encoder = ft.ChatEncoder(processor, args.max_length)
    eval_set = ft.ChatDataset(evaluation, encoder) if evaluation else None
    return ft.ChatDataset(train, encoder), eval_set, (len(train), len(evaluation))


def vision_split(args: argparse.Namespace, split: str, limit: int | None = None) -> list[dict]:
    """The vision records of every --vision-tasks task's split (train capped by --task-limit, each task's records cut
    to `limit`), task after task: each task's examples shuffled with --seed, its records in first-appearance order
    (the Trainer's sampler shuffles across tasks)."""
    limits = args.task_limit if split == "train" else {}
    return [
        record
        for task in args.vision_tasks
        for record in vision_records(load_task_split(args.data, [task], split, args.seed, limits), task)[:limit]
    ]


def vision_datasets(args: argparse.Namespace, processor):
    """(train set, eval set or None, sizes) of the vision warm-up: the labelled images of the --vision-tasks splits
    (the eval set: the first --max-val-examples val records of each task)."""
    train = vision_split(args, "train")
    evaluation = vision_split(args, "val", args.max_val_examples) if args.val else []
    if not train:
        raise SystemExit(f"stage vision: no labelled train image in {args.vision_tasks} ({args.data})")
    eval_set = VisionTargetDataset(evaluation, processor.image_processor) if evaluation else None
    return VisionTargetDataset(train, processor.image_processor), eval_set, (len(train), len(evaluation))


def run_stage(args: argparse.Namespace, stage: str, source: Path) -> Path:
    """Train one stage from the repo folder `source`; returns `<work-dir>/<stage>/model` (float32 repo folder)."""
    stage_dir = args.work_dir / stage
    checkpoint = last_checkpoint(stage_dir / "checkpoints", args.resume)
    processor = ft.load_processor(str(source))
    # before the model: bad data fails fast
    if stage == "vision":
        train_set, eval_set, sizes = vision_datasets(args, processor)
    else:
        train_set, eval_set, sizes = stage_datasets(args, stage, processor)
    from transformers import set_seed

    set_seed(args.seed)
    model = load_model(source)
    counts = set_trainable(model, stage_modules(args, stage))
    training_args = training_arguments(args, stage, stage_dir / "checkpoints", eval_set is not None)
    if stage == "vision":  # the trainer sees the encoder, projector and label heads only
        trained, collator = VisionWarmupHeads(model, args.position_loss_weight), collate_vision_targets
        training_args.label_names = list(VISION_TARGETS)  # so the eval loop computes the loss
    else:
        trained, collator = model, ft.ChatCollator(processor.tokenizer.pad_token_id)
    trainer = ft.build_trainer(trained, training_args, train_set, eval_set, collator, token_metrics=False)
    print(
        f"== stage {stage}: trains {stage_modules(args, stage)} ({sum(counts.values()):,} parameters), "
        f"{sizes[0]} train / {sizes[1]} val examples, from {source}"
    )
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    if eval_set is not None and not any(
        e.get("step") == trainer.state.global_step and "eval_loss" in e for e in trainer.state.log_history
    ):
        trainer.evaluate()
    metrics = stage_metrics(stage, args, trainer, train_output, counts, sizes, checkpoint, time.perf_counter() - start)
    if stage == "vision" and eval_set is not None:
        metrics["val_accuracy"] = vision_target_accuracy(trained, eval_set)
        print(f"== stage vision: val accuracy {metrics['val_accuracy']}")
    model_dir = stage_dir / "model"
    if trainer.is_world_process_zero():
        metrics["folder_bytes"] = save_repo_folder(model, model_dir, export_config(source, "float32"), "float32")
        write_stage_outputs(model_dir, metrics)
        print(json.dumps({k: metrics[k] for k in ("stage", "global_step", "final_train_loss", "final_eval_loss")}))
    trainer.accelerator.wait_for_everyone()
    return model_dir


def export_final(args: argparse.Namespace, model_dir: Path) -> int:
    """The last stage's model in `--save-dtype` as a complete repo folder at `--output`; returns its size in bytes."""
    model = load_model(model_dir)
    size = save_repo_folder(model, args.output, export_config(model_dir, args.save_dtype), args.save_dtype)
    for name in (METRICS_NAME, PLOT_NAME):
        shutil.copy2(model_dir / name, args.output / name)
    return size + sum((args.output / name).stat().st_size for name in (METRICS_NAME, PLOT_NAME))


def run_stages(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage in order, each from the previous stage's folder; finished stages are skipped with --resume."""
    source, summary = init_folder(args), {"stages": {}}
    for stage in args.stages:
        stage_dir = args.work_dir / stage
        if args.resume and stage_done(stage_dir):
            print(f"== stage {stage}: done, skipped ({stage_dir / 'model'})")
        else:
            run_stage(args, stage, source)
        source = stage_dir / "model"
        summary["stages"][stage] = json.loads((source / METRICS_NAME).read_text())["final_train_loss"]
    summary["output_bytes"] = export_final(args, source)
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def comma_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """`a,b` -> ["a", "b"] in the given order; every item must be one of `allowed`, and there must be one."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = sorted(set(items) - set(allowed))
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown {what}(s) {unknown}; choose from {','.join(allowed)}")
    return items


def task_list(text: str) -> list[str]:
    return comma_list(text, TASKS, "task")


def vision_task_list(text: str) -> list[str]:
    return comma_list(text, VISION_TASKS, "vision task")


def module_list(text: str) -> list[str]:
    return comma_list(text, ALL_MODULES, "module")


def task_limits(text: str) -> dict[str, int]:
    """`ocr=1000,gui=1000` -> {"ocr": 1000, "gui": 1000}."""
    limits = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, _, count = item.partition("=")
        task_list(task)
        if not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"--task-limit wants task=N with N >= 1, got {item!r}")
        limits[task.strip()] = int(count)
    return limits


def stage_list(text: str) -> list[str]:
    stages = [stage.strip() for stage in text.split(",") if stage.strip()]
    if not stages or any(stage not in STAGE_NAMES for stage in stages):
        raise argparse.ArgumentTypeError(f"stages must be a comma-separated subset of {','.join(STAGE_NAMES)}")
    return stages


def add_model_and_data_flags(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model and stages")
    model.add_argument("--init", required=True, help="'tiny-aimv2' (fresh TINY_DEMO) or a saved AndesVL folder")
    model.add_argument("--micro", action="store_true", help="with --init tiny-aimv2: a much smaller model (tests)")
    model.add_argument(
        "--position-table",
        choices=("random", "sincos"),
        default="random",
        help="with --init tiny-aimv2: the vision encoder's initial position table",
    )
    which = model.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", choices=STAGE_NAMES, help="run one stage")
    which.add_argument("--stages", type=stage_list, help="comma-separated stages to run in order")
    model.add_argument("--align-vision", action="store_true", help="align also trains the vision encoder")
    model.add_argument(
        "--train-modules",
        type=module_list,
        help="comma-separated modules to train in the stage(s) "
        "run, overriding the stage table (e.g. all three for an align stage on a from-scratch model)",
    )
    model.add_argument("--save-dtype", choices=tuple(DTYPES), default="bfloat16", help="dtype of --output weights")
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help="output folder of andesvl_tools/make_datasets.py")
    data.add_argument("--tasks", type=task_list, default=list(TASKS), help="tasks of every stage")
    data.add_argument(
        "--vision-tasks",
        type=vision_task_list,
        default=["vqa"],
        help="images of the vision warm-up, a subset of vqa,ocr,gui (ocr and gui add their per-token heads)",
    )
    data.add_argument(
        "--position-loss-weight",
        type=float,
        default=0.0,
        help="vision warm-up: weight of a per-token head that regresses each token's own grid position (0: no head)",
    )
    for stage in STAGE_NAMES[1:]:
        data.add_argument(f"--{stage}-tasks", type=task_list, help=f"tasks of the {stage} stage (default: --tasks)")
    data.add_argument(
        "--task-limit",
        type=task_limits,
        default={},
        metavar="TASK=N,...",
        help="train on the first N train examples of these tasks only, in every stage (e.g. keep the "
        "scenario tasks small in the base: ocr=1000,gui=1000)",
    )
    data.add_argument(
        "--drop-answers",
        type=lambda text: [a for a in text.split(",") if a.strip()],
        default=[],
        metavar="A,B",
        help="skip examples whose answer is one of these, e.g. 'yes,no' for an align "
        "stage on answers only the image determines (a text prior can guess yes/no)",
    )
    data.add_argument("--val", action="store_true", help="evaluate the loss on the tasks' val splits")
    data.add_argument(
        "--max-val-examples",
        type=int,
        help="evaluate on the first N shuffled val examples only (vision stage: N images per task)",
    )
    data.add_argument("--max-length", type=int, default=1024, help="truncate longer conversations (never an image)")


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """finetune_lora's training, checkpoint and logging flags (one set for both trainers), with the base stages'
    defaults: each stage's own learning rate unless --learning-rate is given, batch 8, a checkpoint every 500 steps."""
    ft.add_trainer_flags(parser)
    parser.set_defaults(learning_rate=None, per_device_batch_size=8, save_steps=500, save_total_limit=2, eval_steps=500)
    run = parser.add_argument_group("outputs")
    run.add_argument("--work-dir", type=Path, required=True, help="checkpoints, stage folders and args.json")
    run.add_argument("--output", type=Path, required=True, help="final repo folder (the last stage's model)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=ft.HelpFormatter)
    add_model_and_data_flags(parser)
    add_training_flags(parser)
    args = parser.parse_args(argv)
    args.stages = args.stages or [args.stage]
    if args.micro and args.init != "tiny-aimv2":
        parser.error("--micro only applies to --init tiny-aimv2")
    if args.init != "tiny-aimv2" and (problem := overlap_error(args.output, Path(args.init))):
        parser.error(f"--output would write over --init ({problem}); choose another output folder")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    print(json.dumps(ft.resolved_args(args), indent=2))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    ft.write_json(args.work_dir / "args.json", ft.resolved_args(args))
    summary = run_stages(args)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
