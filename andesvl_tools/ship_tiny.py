"""Copy a trained AndesVL-Tiny (scripts/train_tiny.sh) into the repo as the embedded default, with its demo examples.

    python -m andesvl_tools.ship_tiny --work outputs/tiny --output AndesVL-Tiny --demo-output assets/andesvl-tiny

Writes `--output` as a complete, loadable repo folder:
- the trained weights, `config.json`, `generation_config.json`, and `adapters/<name>/` (adapter weights and config,
  `andesvl_adapter.json`, `metrics.json`) of every adapter under `<work>/AndesVL-Tiny/adapters/`;
- `training/<stage>/` (training_metrics.json, loss_curve.png) of each base stage, and `eval/` (every JSON report
  found under `<work>/eval/`: the recorded accuracies the tests check);
- every other file (remote code, tokenizer, processor and chat template) as a relative symlink to the identical file
  at the repo root, so the git history holds them once; a file that differs from the root's is an error (rebuild
  the folder with the current code);
- a short README.md (model card) pointing to `docs/andesvl-tiny.md` (data, recipe, evaluation).

`--demo-output` gets `examples.jsonl` + `images/`: the FIRST examples of each test split (no picking), in the
order the demo runs them: easy-vqa and multi-image with the base, OCR with `adapters/ocr`, GUI with `adapters/gui`,
then easy-vqa again with the adapters disabled.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from .folders import overlap_error, staged_folder

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("config.json", "generation_config.json", "model.safetensors")
NOT_SHIPPED = ("README.md", "training_metrics.json", "loss_curve.png")  # the root card / the last stage's copies
STAGE_FILES = ("training_metrics.json", "loss_curve.png")
DEMO_PLAN = (("vqa", None, 4), ("multi", None, 2), ("ocr", "ocr", 4), ("gui", "gui", 3))  # ocr: 2 words, 2 numbers
CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [andesvl, tiny, demo]
---
# AndesVL-Tiny

A 13.9M-parameter AndesVL (AIMv2-type vision encoder + Qwen3 text model, the real AndesVL tokenizer and chat
template) trained from scratch on a 2-core CPU with this repository's own scripts, on offline data generated from pip
packages (easy-vqa, captcha fonts, synthetic phone screens). It is a demonstration that exercises exactly the code
path of the official sizes; it is not a substitute for the official AndesVL weights.

Adapters (`adapters/`): {adapters}. A name ending in `-qalft-int4` was trained with QALFT against the int4-quantized
base (`andesvl_tools/quantize.py --bits 4 --group-size 16 --scale-dtype float16`); the others are plain LoRA for this
float base. All four are LoRA on the text model's linears only, so every loading path serves them (peft's integrated
API, mixed batches, hot-swap). Data, recipe and the evaluation tables: the repository's `docs/andesvl-tiny.md`; the
recorded accuracies are in `eval/`, the training curves in `training/`.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("outputs/tiny"), help="train_tiny.sh output folder")
    parser.add_argument("--output", type=Path, default=ROOT / "AndesVL-Tiny", help="folder to (re)write")
    parser.add_argument(
        "--demo-output", type=Path, default=ROOT / "assets" / "andesvl-tiny", help="demo examples folder to (re)write"
    )
    return parser.parse_args(argv)


def check_output(output: Path, work: Path) -> None:
    """Refuse an output that is, contains or lies inside the work folder (the input), or that contains the repo."""
    if overlap_error(output, work) or ROOT.resolve().is_relative_to(output.resolve()):
        raise SystemExit(
            f"Refusing to write {output} ({output.resolve()}): it is, contains or lies inside --work {work} "
            f"({work.resolve()}), "
            f"or contains the repository {ROOT}; choose another output folder."
        )
    if output.is_symlink() or output.is_file():
        raise SystemExit(f"{output} is not a folder")


def link_or_copy_repo_files(source: Path, output: Path) -> list[str]:
    """Copy the trained files; symlink the rest to the root's identical files. Returns the linked names."""
    linked, differing = [], []
    for path in sorted(source.iterdir()):
        if path.is_dir() or path.name in NOT_SHIPPED:
            continue
        if path.name in COPIED:
            shutil.copy2(path, output / path.name)
            continue
        twin = ROOT / path.name
        if not twin.is_file() or twin.read_bytes() != path.read_bytes():
            differing.append(path.name)
            continue
        (output / path.name).symlink_to(os.path.relpath(twin, output))
        linked.append(path.name)
    if differing:
        raise SystemExit(
            f"{len(differing)} file(s) of {source} differ from the repo root's: {differing}; rebuild "
            "the folder with the current code (scripts/train_tiny.sh re-exports it)."
        )
    return linked


def copy_adapters(source: Path, output: Path) -> list[str]:
    names = sorted(path.parent.name for path in source.glob("adapters/*/adapter_config.json"))
    for name in names:  # adapter weights and config, andesvl_adapter.json, metrics.json
        shutil.copytree(source / "adapters" / name, output / "adapters" / name)
    return names


def copy_training_and_eval(work: Path, output: Path) -> None:
    for stage_model in sorted(work.glob("runs/base/*/model")):
        stage = stage_model.parent.name
        (output / "training" / stage).mkdir(parents=True)
        for file in STAGE_FILES:
            shutil.copy2(stage_model / file, output / "training" / stage / file)
    reports = sorted((work / "eval").glob("*.json"))
    if not reports:
        raise SystemExit(f"no evaluation report under {work / 'eval'}: run andesvl_tools/evaluate.py first")
    (output / "eval").mkdir()
    for report in reports:
        shutil.copy2(report, output / "eval" / report.name)


def write_demo_examples(data: Path, output: Path) -> int:
    """The first examples of each test split, images copied, in DEMO_PLAN order (+ easy-vqa again, base)."""
    (output / "images").mkdir()
    plan = [*DEMO_PLAN, ("vqa", None, 1)]
    lines, seen = [], {}
    for task, adapter, count in plan:
        rows = [json.loads(line) for line in (data / task / "test.jsonl").read_text().splitlines()]
        start = seen.get(task, 0)
        for row in rows[start : start + count]:
            for message in row["messages"]:
                for part in message["content"] if isinstance(message["content"], list) else []:
                    if part.get("type") == "image":
                        name = f"{task}_{Path(part['path']).name}"
                        shutil.copy2(data / task / part["path"], output / "images" / name)
                        part["path"] = f"images/{name}"
            lines.append(json.dumps({"task": task, "adapter": adapter, **row}, ensure_ascii=False))
        seen[task] = start + count
    (output / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)


def folder_bytes(folder: Path) -> int:
    """Size with symlinks followed: what a user downloads."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    source = args.work / "AndesVL-Tiny"
    if not (source / "model.safetensors").is_file():
        raise SystemExit(f"{source} holds no model.safetensors: run scripts/train_tiny.sh first")
    check_output(args.output, args.work)
    check_output(args.demo_output, args.work)
    with staged_folder(args.output) as output:  # the old folder is replaced only when every file was written
        linked = link_or_copy_repo_files(source, output)
        adapters = copy_adapters(source, output)
        copy_training_and_eval(args.work, output)
        (output / "README.md").write_text(CARD.format(adapters=", ".join(f"`{name}`" for name in adapters)))
    with staged_folder(args.demo_output) as demo_output:
        examples = write_demo_examples(args.work / "datasets", demo_output)
    summary = {
        "output": str(args.output),
        "bytes": folder_bytes(args.output),
        "adapters": adapters,
        "linked_to_root": linked,
        "demo_examples": examples,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
