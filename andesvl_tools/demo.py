"""Ask the shipped AndesVL-Tiny about bundled held-out test images; swap its scenario adapters at runtime with peft.

    python -m andesvl_tools.demo                                   # AndesVL-Tiny/ on assets/andesvl-tiny/examples.jsonl
    python -m andesvl_tools.demo --model outputs/tiny/AndesVL-Tiny --output outputs/demo.json

The model and processor load the way Hub users load them (`AutoModelForImageTextToText` / `AutoProcessor` with
`trust_remote_code=True`, from a local folder: no download). Each line of `--examples` is a conversation in the
`andesvl_tools/make_datasets.py` format plus `"adapter"`: null (the base) or the name of a scenario adapter under
`<model>/adapters/`. Lines run in file order; the first use of an adapter loads it (`model.load_scenario_adapter`,
peft through transformers' `load_adapter`), a later one switches to it (`set_adapter`), and `null` turns adapters
off again (`disable_adapters`). Every answer is printed next to the ground truth and scored like
`andesvl_tools/evaluate.py` (exact answer, exact text, box IoU >= 0.5, yes/no).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from .evaluate import SCORERS, generate_batch, generation_config, to_prompt_and_target
from .finetune_lora import load_jsonl

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", type=Path, default=ROOT / "AndesVL-Tiny", help="AndesVL folder (default: %(default)s)"
    )
    parser.add_argument(
        "--examples",
        type=Path,
        default=ROOT / "assets" / "andesvl-tiny" / "examples.jsonl",
        help="JSONL conversations with an 'adapter' field (default: %(default)s)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy generation budget per answer")
    parser.add_argument("--num-threads", type=int, default=1, help="torch CPU threads (tiny model: 1 is fastest)")
    parser.add_argument("--output", type=Path, help="also write every question, truth and answer as JSON here")
    return parser.parse_args(argv)


def load_examples(path: Path) -> list[dict[str, Any]]:
    """The conversations of `path` (images resolved against its folder) with their `adapter` (None = base)."""
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for field in ("task", "adapter"):
        missing = [number for number, line in enumerate(raw, start=1) if field not in line]
        if missing:
            raise ValueError(
                f"{path}: {len(missing)} of {len(raw)} lines have no {field!r} field (lines {missing[:5]})"
            )
    examples = load_jsonl(path)  # validates the messages and makes image paths absolute
    return [
        {**to_prompt_and_target(example), "adapter": line["adapter"], "task": line["task"]}
        for example, line in zip(examples, raw)
    ]


def switch_adapter(model, name: str | None, loaded: set[str]) -> str:
    """Make `name` the active adapter (None: adapters off); returns what was done, for the log."""
    if name is None:
        if not loaded:
            return "base"
        model.disable_adapters()
        return "adapters disabled: base"
    if name not in loaded:
        model.load_scenario_adapter(name)  # loads adapters/<name> with peft and activates it
        loaded.add(name)
        action = f"loaded adapters/{name}"
    else:
        model.set_adapter(name)
        action = f"switched to {name}"
    model.enable_adapters()
    return action


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    from transformers.utils import logging as transformers_logging

    # transformers 5 prints a load report listing the already loaded adapter's LoRA weights as MISSING when a second
    # adapter loads (a false alarm: `load_adapter("gui")` after "ocr" scores exactly as "gui" loaded alone); keep
    # the demo's output to the answers.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return run(args)
    finally:
        transformers_logging.set_verbosity(verbosity)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Load the model and processor, answer every example in order (switching adapters), print and save."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    examples = load_examples(args.examples)
    started = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(str(args.model), trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(args.model), trust_remote_code=True)
    model.eval()
    print(
        f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) in "
        f"{time.perf_counter() - started:.1f} s; adapters: {model.available_adapters()}"
    )
    config, loaded, active, results = generation_config(model, args.max_new_tokens), set(), "unset", []
    for example in examples:
        if example["adapter"] != active:
            print(f"-- {switch_adapter(model, example['adapter'], loaded)}")
            active = example["adapter"]
        answer = generate_batch(model, processor, [example], config)[0]
        correct = SCORERS[example["task"]]([answer], [example["target"]])["correct"][0]
        results.append(
            {
                "task": example["task"],
                "adapter": example["adapter"],
                "images": example["images"],
                "question": example["question"],
                "truth": example["target"],
                "answer": answer,
                "correct": correct,
            }
        )
        print(
            f"[{example['task']:5s}|{example['adapter'] or 'base':4s}] {'ok ' if correct else 'MISS'} "
            f"Q: {example['question']!r}\n{'':16s}truth: {example['target']!r}\n{'':16s}model: {answer!r}"
        )
    print(
        f"{sum(r['correct'] for r in results)} of {len(results)} answers correct "
        f"({time.perf_counter() - started:.1f} s in all)"
    )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results


if __name__ == "__main__":
    main()
