"""Train ONE AndesVL scenario LoRA adapter (the "N" of "1+N") from chat conversations with images.

    python -m andesvl_tools.finetune_lora --model out/AndesVL-1B-Instruct --name ocr \\
        --train-file data/ocr/train.jsonl --eval-fraction 0.05 --max-steps 2000 --per-device-batch-size 8 --bf16 \\
        --work-dir runs/ocr
    python -m andesvl_tools.finetune_lora ... --qalft int4          # train against the int4 base that gets deployed
    python -m andesvl_tools.finetune_lora ... --resume              # continue from the last checkpoint in --work-dir
    accelerate launch --num_processes 8 andesvl_tools/finetune_lora.py ...     # or torchrun: the Trainer does the rest

Data: JSON Lines, one conversation per line (blank lines are skipped):

    {"messages": [{"role": "system", "content": "You read text in images."},
                  {"role": "user", "content": [{"type": "image", "path": "img/0001.png"},
                                               {"type": "text", "text": "What does the sign say?"}]},
                  {"role": "assistant", "content": "STOP"}]}

`role` is system, user or assistant; `content` is a string or a list of `{"type": "text", "text": str}` and
`{"type": "image", "path": str}` parts; relative image paths are resolved against the JSONL file's folder; every
conversation needs at least one assistant message. Every line is validated when the file is read (JSON, roles, part
types, image files exist; images are decoded only when a batch needs them); the ValueError names file and line.

Tokenization: the conversation is rendered by the repo's chat template and tokenized by its processor, so the ids are
exactly `processor.apply_chat_template(messages, tokenize=True)`'s: training sees the inference-time prompt format.
Only assistant turns are learned: each assistant content and its closing `<|im_end|>` are labelled, everything else
(system/user turns, role headers, image tokens, padding) is -100. Assistant reasoning that the template drops (the
`<think>` of turns before the last user turn) is not learned either. A `--max-length` cut inside an image span, or one
that leaves no assistant token, raises a ValueError naming the line.

Model: the base is loaded with `AutoModelForImageTextToText` (`trust_remote_code=True`) and frozen; LoRA goes on the
language model's projections (the model's `default_lora_target_modules`), plus the projector with
`--train-projector` (`modules_to_save`), plus the embedding rows of the tokens the training answers use with
`--train-answer-tokens` (peft `trainable_token_indices`; with tied embeddings the output rows follow).
`--qalft int4|int8|int3|int2` (quantization-aware LoRA fine-tuning; `--qalft-lm-head` for a base quantized with
`--lm-head`) makes every linear
layer that `andesvl_tools/quantize.py` would quantize compute with `fake_quantize(weight)`, the exact weights of the
deployed
quantized base, so the adapter is trained against the base it will run on.

Outputs: checkpoints every `--save-steps` in `--work-dir` (with `args.json`); the adapter in `--output-dir` (default
`<--model>/adapters/<--name>`) as plain PEFT files with `base_model_name_or_path` = `--base-model-id` (tensors in
`--save-dtype`: float32 as peft saves them, or bfloat16 at half the size; loading casts them to the model's dtype), plus
`andesvl_adapter.json` (scenario, base, QALFT, LoRA and data settings, steps, eval metrics) and `metrics.json` (loss
curves, final train/eval losses, token accuracy, steps, wall time, the resolved arguments).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .folders import overlap_error  # sibling script: refuse outputs that would overwrite the model
from .quantize import quantization_module  # sibling script: the deployed quantizer's module

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
TURN_END = "<|im_end|>"  # closes every turn in the chat template; the model must learn to emit it
IMAGE_TOKENS = ("<img>", "<|vision_pad|>", "</img>")
ADAPTER_INFO_NAME = "andesvl_adapter.json"
METRICS_NAME = "metrics.json"
ARGS_NAME = "args.json"
QALFT_BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8}
PRINTED_ERRORS = 10
EVAL_TIMINGS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")  # kept out of the metric records


# ----------------------------------------------------------------------------------------------------------------------
# Data: JSON Lines of chat conversations, validated up front
# ----------------------------------------------------------------------------------------------------------------------


def parse_part(part: Any, folder: Path) -> dict[str, Any]:
    """One content part -> `{"type": "text", "text"}` or `{"type": "image", "path": <absolute, existing file>}`."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image" and isinstance(part.get("path"), str):
        path = (folder / part["path"]).resolve()
        if not path.is_file():
            raise ValueError(f"image file not found: {part['path']!r} (resolved to {path})")
        return {"type": "image", "path": str(path)}
    raise ValueError(
        f"unsupported content part {json.dumps(part)[:120]}; expected {{'type': 'text', 'text': str}} or "
        f"{{'type': 'image', 'path': str}}"
    )


def parse_message(message: Any, index: int, folder: Path) -> dict[str, Any]:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        role = message.get("role") if isinstance(message, dict) else None
        raise ValueError(f"message {index} has unknown role {role!r}; expected one of {ROLES}")
    content = message.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"message {index} content must be a string or a list of parts, got {type(content).__name__}")
    try:
        return {"role": message["role"], "content": [parse_part(part, folder) for part in content]}
    except ValueError as error:
        raise ValueError(f"message {index}: {error}") from None


def parse_record(line: str, folder: Path) -> dict[str, Any]:
    """One JSONL line -> `{"messages": validated messages (list-of-parts content, absolute image paths), "meta": the
    line's optional generator metadata object ({} when absent)}`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("expected an object with a non-empty 'messages' list")
    messages = [parse_message(message, index, folder) for index, message in enumerate(messages)]
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("no assistant message: there is nothing to learn from this conversation")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"'meta' must be an object, got {type(meta).__name__}")
    return {"messages": messages, "meta": meta}


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    """All conversations of a JSONL file as `{"messages", "meta", "source": "file:line"}`; raises with every bad
    line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Data file {path} does not exist.")
    examples, errors, lines = [], [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        lines += 1
        try:
            examples.append({**parse_record(line, path.parent), "source": f"{path}:{number}"})
        except ValueError as error:
            errors.append(f"{path.name} line {number}: {error}")
    if errors:
        shown = "\n  ".join(errors[:PRINTED_ERRORS])
        raise ValueError(f"{len(errors)} of {lines} lines of {path} are malformed:\n  {shown}")
    if not examples:
        raise ValueError(f"{path} holds no conversations.")
    return examples


def image_paths(messages: list[dict[str, Any]]) -> list[str]:
    """The image paths of loaded messages, in order."""
    return [part["path"] for message in messages for part in message["content"] if part["type"] == "image"]


def split_examples(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded, disjoint (train, eval) split with round(fraction * n) >= 1 eval examples and >= 1 train example."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {fraction}.")
    num_eval = max(1, round(fraction * len(examples)))
    if num_eval >= len(examples):
        raise ValueError(f"--eval-fraction {fraction} of {len(examples)} examples leaves no training example.")
    eval_indices = set(random.Random(seed).sample(range(len(examples)), num_eval))
    train = [example for index, example in enumerate(examples) if index not in eval_indices]
    return train, [examples[index] for index in sorted(eval_indices)]


def load_splits(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    train = [example for path in args.train_file for example in load_jsonl(path)]
    if args.eval_file is not None:
        return train, load_jsonl(args.eval_file)
    if args.eval_fraction is not None:
        return split_examples(train, args.eval_fraction, args.seed)
    return train, []


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization: the inference-time prompt, with labels on assistant tokens only
# ----------------------------------------------------------------------------------------------------------------------


class ChatEncoder:
    """Conversation -> `input_ids`, `labels` (assistant content + `<|im_end|>`), `pixel_values`, `image_grid_hw`."""

    def __init__(self, processor, max_length: int | None = None):
        self.processor, self.max_length = processor, max_length
        tokenizer = processor.tokenizer
        self.header_ids = assistant_header_ids(processor)  # <|im_start|> assistant \n
        self.turn_end_id = tokenizer.convert_tokens_to_ids(TURN_END)
        self.image_ids = set(tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS)))

    def __call__(self, messages: list[dict], source: str = "conversation") -> dict[str, torch.Tensor]:
        text = self.processor.apply_chat_template(messages, tokenize=False)
        images = image_paths(messages)
        inputs = self.processor(text=text, images=images or None, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        try:
            labels = self.label_assistant_turns(ids, [message["role"] for message in messages])
            ids, labels = self.truncate(ids, labels)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
        example = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if images:
            example.update(pixel_values=inputs["pixel_values"], image_grid_hw=inputs["image_grid_hw"])
        return example

    def label_assistant_turns(self, ids: list[int], roles: list[str]) -> list[int]:
        """Copy the ids of every assistant turn's content and its `<|im_end|>` into labels; -100 elsewhere."""
        turn_start = self.header_ids[0]
        starts = [index for index, token in enumerate(ids) if token == turn_start]
        ends = [index for index, token in enumerate(ids) if token == self.turn_end_id]
        if len(starts) != len(roles) or len(ends) != len(roles):
            raise ValueError(
                f"the rendered prompt has {len(starts)} turn starts and {len(ends)} turn ends for {len(roles)} "
                "messages; does a message contain a chat-template special token literally?"
            )
        labels = [IGNORE_INDEX] * len(ids)
        for start, end, role in zip(starts, ends, roles):
            if role == "assistant":
                first = self.content_start(ids, start)
                labels[first : end + 1] = ids[first : end + 1]
        return [IGNORE_INDEX if token in self.image_ids else token for token in labels]

    def content_start(self, ids: list[int], start: int) -> int:
        """First content token of the assistant turn opened at `start`.

        The header's final newline merges with a content that itself starts with newlines ("\\n" + "\\n\\nA" is
        tokenized "\\n\\n\\n", "A"); that merged token carries content, so it is labelled.
        """
        header = self.header_ids
        if ids[start : start + len(header)] == header:
            return start + len(header)
        if ids[start : start + len(header) - 1] == header[:-1]:
            return start + len(header) - 1
        raise ValueError(f"an assistant turn does not start with the template's header ids {header}")

    def truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, labels
        last_image_token = max((i for i, token in enumerate(ids) if token in self.image_ids), default=-1)
        if last_image_token >= self.max_length:
            raise ValueError(
                f"{len(ids)} tokens exceed --max-length {self.max_length}, and the cut would fall in or before an "
                f"image span (the last image token is at position {last_image_token}); raise --max-length to at "
                f"least {last_image_token + 1} or shorten this conversation"
            )
        if all(label == IGNORE_INDEX for label in labels[: self.max_length]):
            raise ValueError(
                f"{len(ids)} tokens exceed --max-length {self.max_length}, and the cut leaves no assistant token to "
                "learn"
            )
        return ids[: self.max_length], labels[: self.max_length]


def assistant_header_ids(processor) -> list[int]:
    """The ids that open an assistant turn: the chat template's generation prompt (`<|im_start|>assistant\\n`)."""
    probe = [{"role": "user", "content": "x"}]
    prompt = processor.apply_chat_template(probe, tokenize=False)
    with_header = processor.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    if not with_header.startswith(prompt) or with_header == prompt:
        raise ValueError("The chat template's generation prompt is not a suffix of the prompt; cannot find turns.")
    return processor.tokenizer.encode(with_header[len(prompt) :], add_special_tokens=False)


class ChatDataset(torch.utils.data.Dataset):
    """Validated conversations, encoded (and their images decoded) on access."""

    def __init__(self, examples: list[dict], encoder: ChatEncoder):
        self.examples, self.encoder = examples, encoder

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        return self.encoder(example["messages"], example["source"])


class ChatCollator:
    """Right-pads ids (pad id) and labels (-100); concatenates the packed images of the batch in order."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set one in tokenizer_config.json.")
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            size = len(example["input_ids"])
            input_ids[row, :size], labels[row, :size] = example["input_ids"], example["labels"]
            attention_mask[row, :size] = 1
        # labelled_logits_only: the model runs its 152k-wide head only where a label is set (same loss)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "labelled_logits_only": True,
        }
        with_images = [example for example in examples if "pixel_values" in example]
        if with_images:
            batch["pixel_values"] = torch.cat([example["pixel_values"] for example in with_images])
            batch["image_grid_hw"] = torch.cat([example["image_grid_hw"] for example in with_images])
        return batch


# ----------------------------------------------------------------------------------------------------------------------
# Model: frozen base, optional QALFT fake quantization, LoRA
# ----------------------------------------------------------------------------------------------------------------------


def load_processor(model: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model, trust_remote_code=True)


def load_base_model(args: argparse.Namespace) -> nn.Module:
    from transformers import AutoModelForImageTextToText

    kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=args.dtype, **kwargs)
    model.config.text_config.use_cache = False  # no KV cache while training (and none in the eval outputs)
    return model


class FakeQuantizedWeight(nn.Module):
    """A weight parametrization: the float weight -> the weight the deployed int-N base computes with (STE grads)."""

    def __init__(self, fake_quantize, spec: dict[str, Any]):
        super().__init__()
        self.fake_quantize = fake_quantize
        self.bits, self.group_size, self.scale_dtype = spec["bits"], spec["group_size"], spec["scale_dtype"]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.fake_quantize(weight, self.bits, self.group_size, self.scale_dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, scale_dtype={self.scale_dtype}"


def qalft_spec(args: argparse.Namespace, quantization) -> dict[str, Any]:
    """The deployed quantizer's canonical spec for `--qalft` (its own defaults fill what the flags leave out)."""
    flags = {"group_size": args.qalft_group_size, "modules": args.qalft_modules, "scale_dtype": args.qalft_scale_dtype}
    given = {key: value for key, value in flags.items() if value is not None}
    return quantization.normalize_spec({"bits": QALFT_BITS[args.qalft], "lm_head": args.qalft_lm_head, **given})


def apply_qalft(model: nn.Module, spec: dict[str, Any], quantization) -> list[str]:
    """Make the linears that `quantize_model(spec)` would quantize compute with `fake_quantize(weight)`. With
    `lm_head` the LM head too: a head tied to the embedding then computes with the fake-quantized weight while the
    embedding lookup reads the float rows, as the deployed `--lm-head` base (untied, float embedding) does."""
    from torch.nn.utils import parametrize

    if getattr(model.config, "quantization", None):
        raise ValueError(
            f"The base is already quantized ({model.config.quantization}); drop --qalft: training on it already sees "
            "the deployed weights."
        )
    selected = quantization.select_targets(model, spec)  # the projections, plus the LM head with lm_head
    for _, module in selected:
        parametrize.register_parametrization(module, "weight", FakeQuantizedWeight(quantization.fake_quantize, spec))
    return [name for name, _ in selected]


def answer_token_ids(examples: list[dict], tokenizer) -> list[int]:
    """Sorted ids of every token in the assistant answers of `examples`, plus the `<|im_end|>` that closes them: the
    vocabulary rows an adapter must move to write these answers (`--train-answer-tokens`)."""
    ids = {tokenizer.convert_tokens_to_ids(TURN_END)}
    for example in examples:
        for message in example["messages"]:
            if message["role"] == "assistant":
                text = "".join(part["text"] for part in message["content"] if part["type"] == "text")
                ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(ids)


def add_lora(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules or model.default_lora_target_modules,
        modules_to_save=["mlp.0", "mlp.2"] if args.train_projector else None,
        trainable_token_indices=args.trainable_tokens or None,  # embed_tokens rows (and the tied output rows)
    )
    # register_lora_layers: the LoRA layer for a quantized base's linears (a no-op on a float base)
    return get_peft_model(model, model.register_lora_layers(config))  # freezes all but the adapter (+ modules_to_save)


# ----------------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------------


def predicted_tokens(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the argmax of the eval logits (the full [B, S, vocab] tensors would pile up over the eval set)."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    if logits.dim() == 2:  # labelled_logits_only: logits of the labelled positions only, put them back in place
        predictions = torch.full_like(labels, IGNORE_INDEX)
        predictions[:, :-1][labels[:, 1:] != IGNORE_INDEX] = logits.argmax(-1)
        return predictions
    return logits.argmax(-1)


def token_accuracy(prediction) -> dict[str, float]:
    """Next-token accuracy over the labelled (assistant) positions: the prediction at i is scored against label i+1."""
    predictions, labels = torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids)
    predictions, labels = predictions[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return {"token_accuracy": float((predictions[mask] == labels[mask]).float().mean()) if mask.any() else math.nan}


def trainer_arguments(
    args: argparse.Namespace, *, output_dir: Path, has_eval: bool, learning_rate: float | None = None, **extra: Any
):
    """`TrainingArguments` from the shared training flags (`add_trainer_flags`), for adapters and the base stages
    (andesvl_tools/train.py passes each stage's learning rate)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.per_device_batch_size,
        per_device_eval_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate if learning_rate is None else learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        max_steps=args.max_steps,
        num_train_epochs=args.num_epochs,
        bf16=args.bf16,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=args.dataloader_workers,
        remove_unused_columns=False,  # the model takes pixel_values / image_grid_hw, which a PeftModel hides
        label_names=["labels"],  # PeftModel.forward(*args, **kwargs) hides `labels` from the Trainer's detection
        report_to=args.report_to,
        disable_tqdm=False,
        **checkpointing_arguments(args.gradient_checkpointing),
        **extra,
    )


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing under this transformers' names (5.x renamed `gradient_checkpointing*`)."""
    from transformers import TrainingArguments

    if not enabled:
        return {}
    prefix = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def build_trainer(model, training_args, train_set, eval_set, collator, callbacks=(), token_metrics: bool = True):
    """The transformers `Trainer` of adapters and base stages; `token_metrics`: next-token accuracy on the eval set."""
    from transformers import Trainer

    metrics = token_metrics and eval_set is not None
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        compute_metrics=token_accuracy if metrics else None,
        preprocess_logits_for_metrics=predicted_tokens if metrics else None,
        callbacks=list(callbacks),
    )


def resume_checkpoint(args: argparse.Namespace) -> str | None:
    """The last checkpoint of `--work-dir` with `--resume`; refuses to mix a fresh run into old checkpoints."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(args.work_dir)) if args.work_dir.is_dir() else None
    if args.resume and last is None:
        raise ValueError(f"--resume: no checkpoint-* folder in --work-dir {args.work_dir}.")
    if not args.resume and last is not None:
        raise ValueError(
            f"--work-dir {args.work_dir} already holds checkpoints ({Path(last).name}); pass --resume to continue that "
            "run, or choose an empty --work-dir."
        )
    return last


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


def finalize_adapter_folder(output_dir: Path, base_model_id: str, save_dtype: str = "float32") -> list[str]:
    """Point the adapter at the Hub base, drop the Trainer/peft by-products, store the tensors in `save_dtype`, and
    check the saved keys."""
    config_path = output_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model_id
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (output_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle of TrainingArguments; args are in metrics
    card = output_dir / "README.md"
    if card.is_file() and "library_name: peft" in card.read_text():  # peft's placeholder card, with a local path
        card.unlink()
    from safetensors.torch import load_file, save_file

    weights_path = output_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights_path))
    keys = sorted(tensors)
    expected = ("lora_", ".token_adapter.trainable_tokens_delta")  # LoRA factors, --train-answer-tokens rows
    stray = [
        key for key in keys if not any(part in key for part in expected) and not key.startswith("base_model.model.mlp.")
    ]
    if stray or any("parametrizations" in key for key in keys):
        raise RuntimeError(f"The saved adapter has {len(stray)} unexpected keys, e.g. {stray[:3]}.")
    dtype = getattr(torch, save_dtype)
    if any(tensor.is_floating_point() and tensor.dtype != dtype for tensor in tensors.values()):
        # peft loads adapter tensors with load_state_dict, which casts them back to the model's dtype
        cast = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in tensors.items()}
        save_file(cast, str(weights_path), metadata={"format": "pt"})
    return keys


def final_evaluation(trainer) -> dict[str, float]:
    """Eval metrics at the last step: those of the periodic eval when it just ran, else a fresh `evaluate()`."""
    last = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    metrics = last[-1] if last and last[-1]["step"] == trainer.state.global_step else trainer.evaluate()
    return {key: value for key, value in metrics.items() if key.startswith("eval_") and key not in EVAL_TIMINGS}


def loss_curves(log_history: list[dict]) -> tuple[list[dict], list[dict]]:
    """Training loss and eval metric points `{"step", ...}` from the Trainer's log history (resumed runs included)."""
    train = [{"step": entry["step"], "loss": entry["loss"]} for entry in log_history if "loss" in entry]
    evaluation = [
        {
            "step": entry["step"],
            **{key: value for key, value in entry.items() if key.startswith("eval_") and key not in EVAL_TIMINGS},
        }
        for entry in log_history
        if "eval_loss" in entry
    ]
    return train, evaluation


def collect_metrics(args, trainer, train_output, eval_metrics, qalft, sizes, checkpoint, wall_time) -> dict[str, Any]:
    """metrics.json: loss/eval curves, final metrics, sizes, QALFT spec, wall time of this invocation, arguments."""
    train_curve, eval_curve = loss_curves(trainer.state.log_history)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    return {
        "scenario": args.name,
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_examples": sizes[0],
        "eval_examples": sizes[1],
        "train_loss_curve": train_curve,
        "final_train_loss": train_curve[-1]["loss"] if train_curve else None,
        "mean_train_loss": train_output.training_loss,
        "eval_curve": eval_curve,
        "eval": eval_metrics,
        "qalft": qalft,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "wall_time_s": wall_time,
        "resumed_from": checkpoint,
        "args": resolved_args(args),
    }


def adapter_info(args, metrics: dict[str, Any], base_quantization) -> dict[str, Any]:
    return {
        "scenario": args.name,
        "base_model": args.base_model_id,
        "trained_from": str(args.model),
        "base_quantization": base_quantization,
        "qalft": metrics["qalft"],
        "lora": {
            "r": args.lora_rank,
            "alpha": args.lora_alpha,
            "dropout": args.lora_dropout,
            "target_modules": metrics["args"]["target_modules"],
            "modules_to_save": ["mlp.0", "mlp.2"] if args.train_projector else None,
            "trainable_tokens": len(args.trainable_tokens or ()),
        },
        "data": {
            "train_files": [str(path) for path in args.train_file],
            "eval_file": str(args.eval_file) if args.eval_file else None,
            "eval_fraction": args.eval_fraction,
            "train_examples": metrics["train_examples"],
            "eval_examples": metrics["eval_examples"],
            "max_length": args.max_length,
        },
        "steps": metrics["global_step"],
        "eval": metrics["eval"],
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; a flag's help ends with its default, when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if any(action.default is unset for unset in (None, False, argparse.SUPPRESS)) or "default:" in action.help:
            return action.help
        return f"{action.help} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="AndesVL folder or Hub id to train on (float or quantized)")
    model.add_argument("--name", required=True, help="scenario name; the adapter folder is adapters/<name>")
    model.add_argument("--base-model-id", default="org/AndesVL-4B", help="written as base_model_name_or_path")
    model.add_argument("--output-dir", type=Path, help="adapter folder (default: <--model>/adapters/<--name>)")
    model.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="base weights dtype (auto: the checkpoint's, as andesvl_tools/quantize.py loads it)",
    )
    model.add_argument(
        "--save-dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the saved adapter tensors (training stays in --dtype; bfloat16 halves the files)",
    )
    model.add_argument("--attn-implementation", help="e.g. sdpa, eager, flash_attention_2 (default: transformers')")

    data = parser.add_argument_group("data")
    data.add_argument("--train-file", type=Path, nargs="+", required=True, help="JSONL file(s) (format above)")
    data.add_argument("--eval-file", type=Path, help="JSONL eval set")
    data.add_argument("--eval-fraction", type=float, help="hold out this seeded fraction of the training data instead")
    data.add_argument("--max-length", type=int, default=4096, help="truncate longer conversations (never an image)")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r")
    lora.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (the update is scaled by alpha / r)")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    lora.add_argument(
        "--target-modules",
        help="regex fullmatched against module names (default: the model's "
        "default_lora_target_modules, the language model's attention and MLP projections)",
    )
    lora.add_argument("--train-projector", action="store_true", help="also train the projector (mlp.0, mlp.2) fully")
    lora.add_argument(
        "--train-answer-tokens",
        action="store_true",
        help="also train the embedding rows of the tokens that the training answers use (peft trainable_token_indices)",
    )

    qalft = parser.add_argument_group("quantization-aware LoRA fine-tuning (QALFT)")
    qalft.add_argument("--qalft", choices=tuple(QALFT_BITS), help="train against this fake-quantized base")
    qalft.add_argument(
        "--qalft-group-size", type=int, help="inputs per scale (default: the quantizer's, as quantize.py uses)"
    )
    qalft.add_argument(
        "--qalft-scale-dtype",
        choices=("float16", "bfloat16", "float32"),
        help="scale dtype (default: the quantizer's, as quantize.py uses)",
    )
    qalft.add_argument(
        "--qalft-modules", help="regex of the quantized linears (default: the quantizer's, as quantize.py uses)"
    )
    qalft.add_argument(
        "--qalft-lm-head",
        action="store_true",
        help="the LM head too, as `quantize.py --lm-head` deploys it (same bits and groups; the embedding stays float)",
    )

    add_trainer_flags(parser)
    parser.add_argument("--work-dir", type=Path, help="checkpoints and args.json (default: outputs/finetune-<name>)")
    return parser


def add_trainer_flags(parser: argparse.ArgumentParser) -> None:
    """The training, checkpoint and logging flags of both trainers (adapters here, base stages in train.py; a script
    changes a default with `parser.set_defaults`)."""
    train = parser.add_argument_group("training")
    train.add_argument("--learning-rate", type=float, default=2e-4, help="peak learning rate (train.py: per stage)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--lr-scheduler", default="cosine", help="scheduler name: cosine, linear, constant, ...")
    train.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    train.add_argument("--per-device-batch-size", type=int, default=4, help="conversations per device and step")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --num-epochs if > 0)")
    train.add_argument("--num-epochs", type=float, default=1.0, help="epochs when --max-steps is not set")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs with bf16 support)")
    train.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    train.add_argument("--dataloader-workers", type=int, default=0, help="DataLoader worker processes")
    train.add_argument("--seed", type=int, default=0, help="seed of the init, data order, eval split and dropout")
    train.add_argument(
        "--num-threads",
        type=int,
        help="torch intra-op CPU threads (default: torch's; on a busy 2-core CPU, 1 can be far faster)",
    )
    run = parser.add_argument_group("checkpoints and logging")
    run.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps")
    run.add_argument("--save-total-limit", type=int, default=3, help="keep the last N checkpoints")
    run.add_argument("--eval-steps", type=int, default=200, help="evaluate every N steps (and at the end)")
    run.add_argument("--logging-steps", type=int, default=10, help="log the training loss every N steps")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --work-dir")
    run.add_argument("--report-to", default="none", help="Trainer integrations (none, tensorboard, wandb, ...)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval_file is not None and args.eval_fraction is not None:
        parser.error("give --eval-file or --eval-fraction, not both")
    if args.qalft_lm_head and not args.qalft:
        parser.error("--qalft-lm-head needs --qalft (the bits of the quantized LM head)")
    if args.qalft_lm_head and args.train_answer_tokens:
        parser.error(
            "--train-answer-tokens trains embedding rows that a quantized LM head (--qalft-lm-head) cannot apply: "
            "drop one of them"
        )
    if args.output_dir is None:
        if not Path(args.model).is_dir():
            parser.error(f"--model {args.model} is not a local folder: give --output-dir")
        args.output_dir = Path(args.model) / "adapters" / args.name
    if Path(args.model).is_dir() and (problem := overlap_error(args.output_dir, Path(args.model), allow_inside=True)):
        parser.error(
            f"--output-dir would write over --model ({problem}); adapters go to a folder of their own, "
            f"by default <model>/adapters/<name>"
        )
    args.work_dir = args.work_dir or Path("outputs") / f"finetune-{args.name}"
    args.trainable_tokens = None  # main() fills in the answer token ids with --train-answer-tokens
    return args


def resolved_args(args: argparse.Namespace) -> dict[str, Any]:
    """`vars(args)` with paths as strings (JSON-serialisable)."""

    def plain(value: Any) -> Any:
        if isinstance(value, list):
            return [plain(item) for item in value]
        return str(value) if isinstance(value, Path) else value

    return {key: plain(value) for key, value in vars(args).items()}


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> dict[str, Any]:
    """Train, save the adapter and its metrics; `callbacks` (TrainerCallback) go to the Trainer. Returns the metrics."""
    from transformers import set_seed

    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    train_examples, eval_examples = load_splits(args)  # before the model: bad data fails in seconds
    training_args = trainer_arguments(args, output_dir=args.work_dir, has_eval=bool(eval_examples))
    checkpoint = resume_checkpoint(args)
    set_seed(args.seed)
    processor = load_processor(args.model)
    model = load_base_model(args)
    args.trainable_tokens = answer_token_ids(train_examples, processor.tokenizer) if args.train_answer_tokens else None
    args.target_modules = args.target_modules or model.default_lora_target_modules
    quantization = quantization_module(model) if args.qalft else None
    qalft = qalft_spec(args, quantization) if args.qalft else None
    qalft_modules = apply_qalft(model, qalft, quantization) if qalft else []
    if training_args.should_save:
        print(json.dumps(resolved_args(args), indent=2))
        write_json(args.work_dir / ARGS_NAME, resolved_args(args))
        print(f"QALFT: {len(qalft_modules)} linears fake-quantized with {qalft}" if qalft else "QALFT: off")
    model = add_lora(model, args)
    if training_args.should_save:
        model.print_trainable_parameters()

    encoder = ChatEncoder(processor, args.max_length)
    train_set = ChatDataset(train_examples, encoder)
    eval_set = ChatDataset(eval_examples, encoder) if eval_examples else None
    collator = ChatCollator(processor.tokenizer.pad_token_id)
    trainer = build_trainer(model, training_args, train_set, eval_set, collator, callbacks)

    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = final_evaluation(trainer) if eval_set is not None else {}
    trainer.save_model(str(args.output_dir))
    sizes = (len(train_examples), len(eval_examples))
    wall_time = time.perf_counter() - start
    metrics = collect_metrics(args, trainer, train_output, eval_metrics, qalft, sizes, checkpoint, wall_time)
    if trainer.is_world_process_zero():
        finalize_adapter_folder(args.output_dir, args.base_model_id, args.save_dtype)
        base_quantization = getattr(trainer.model.get_base_model().config, "quantization", None)
        write_json(args.output_dir / ADAPTER_INFO_NAME, adapter_info(args, metrics, base_quantization))
        write_json(args.output_dir / METRICS_NAME, metrics)
        print(json.dumps({key: metrics[key] for key in ("global_step", "final_train_loss", "eval")}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
