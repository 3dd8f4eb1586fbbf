"""Evaluate an AndesVL repo (base, scenario adapters, int4 base) on the make_datasets.py tasks; write a JSON report.

    python -m andesvl_tools.evaluate --model out/AndesVL-1B-Instruct --data outputs/datasets --tasks vqa,ocr,gui \\
        --limit vqa=300,ocr=100,gui=100 --adapter ocr --adapter gui --output outputs/eval/report.json
    python -m andesvl_tools.evaluate --model out/AndesVL-1B-Instruct --data outputs/datasets --limit 100 \\
        --adapter ocr --quantized-model out/AndesVL-1B-Instruct-int4      # + "int4 base" and "int4 base + adapter:ocr"

Data: `<data>/<task>/<split>.jsonl` written by `andesvl_tools/make_datasets.py`, read with
`andesvl_tools/finetune_lora.py`'s
loader; `--limit` takes the first N lines of each task (one N for all tasks, or `task=N,...`). The prompt is every
message before the last assistant turn, rendered with `processor.apply_chat_template(..., add_generation_prompt=True)`;
that assistant turn is the target. Decoding is greedy, in left-padded batches (`padding=True`), special tokens
skipped.

Rows: `base`; per `--adapter NAME`: `adapter:NAME` (`model.load_scenario_adapter(NAME)`) and `adapter:NAME (disabled
again)` (`model.disable_adapters()`, which must reproduce `base` exactly); with `--quantized-model`: `int4 base` and
`int4 base + adapter:NAME` (the float repo's `adapters/NAME` loaded on the quantized base).

Output: `--output` (all rows and tasks, with a markdown table) and, when it covers more than one task, one JSON per
task beside it (`report.vqa.json`, ...) with every row's scores for that task.

Paired comparison: `--compare ROW_A ROW_B` (repeatable) compares two rows on the same examples of every task, e.g.
`--compare "int4 base + adapter:ocr-qalft-int4" "int4 base + adapter:ocr"`: how many examples only A gets right, only
B, both and neither, and the exact two-sided McNemar p-value (a binomial test on the examples the two rows disagree
on). The report keeps every example's correctness per row and task (`per_example`, a string of 1s and 0s in data
order), so rows of one report can be compared afterwards too.

Metrics (per row and task: `accuracy`, `n`, `per_example`, and the first few predictions under `examples`):
    vqa    exact match of the normalized answer (lowercase, stripped, trailing punctuation removed)
    ocr    exact text (case-sensitive; surrounding whitespace stripped); `accuracy_case_insensitive` too, and
           `char_error_rate` (total Levenshtein distance over total target characters)
    gui    IoU >= 0.5 between the predicted box `(x1,y1),(x2,y2)` (0-1000 normalized, box tokens optional) and the
           answer's box; unparseable predictions score 0 and are counted in `unparseable`; `mean_iou` too
    multi  yes/no accuracy: the first word of the normalized answer; neither yes nor no is counted in `invalid`
Where the data's `meta` says what kind of example a line is (GROUP_FIELDS: OCR `kind` word / number, GUI `element`
button / row), `by_group` repeats the task's scores for each kind.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import string
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .finetune_lora import image_paths, load_jsonl, load_processor
from .make_datasets import TASKS, task_list

SPLITS = ("test", "val")
KEPT_EXAMPLES = 5  # predictions kept per row and task in the report
IOU_THRESHOLD = 0.5
NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
BOX_PATTERN = re.compile(rf"\({NUMBER},{NUMBER}\)\s*,\s*\({NUMBER},{NUMBER}\)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GROUP_FIELDS = {"ocr": "kind", "gui": "element"}  # the meta field whose value splits a task's accuracy in `by_group`


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lowercase, strip whitespace and trailing punctuation ("Red." -> "red")."""
    return text.strip().lower().rstrip(string.punctuation + " \t\n").strip()


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first `(x1,y1),(x2,y2)` in `text` (box tokens optional) as floats, or None when there is none."""
    match = BOX_PATTERN.search(text or "")
    return tuple(float(value) for value in match.groups()) if match else None


def box_intersection(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection area of two (x1, y1, x2, y2) boxes (0 when they do not overlap)."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 for empty or inverted boxes."""
    intersection = box_intersection(a, b)
    area = lambda box: max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
    union = area(a) + area(b) - intersection
    return intersection / union if union > 0 else 0.0


def accuracy(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def score_vqa(predictions: list[str], targets: list[str]) -> dict[str, Any]:
    flags = [normalize_answer(p) == normalize_answer(t) for p, t in zip(predictions, targets)]
    return {"accuracy": accuracy(flags), "n": len(flags), "correct": flags}


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest character insertions, deletions and substitutions turning `a` into `b`."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def score_ocr(predictions: list[str], targets: list[str]) -> dict[str, Any]:
    """Exact match (and case-insensitive), plus the character error rate: total edit distance over total target
    characters (0 is perfect; an empty answer scores 1), which still moves while exact match is 0."""
    predictions, targets = [p.strip() for p in predictions], [t.strip() for t in targets]
    flags = [p == t for p, t in zip(predictions, targets)]
    loose = [p.lower() == t.lower() for p, t in zip(predictions, targets)]
    errors = sum(edit_distance(p, t) for p, t in zip(predictions, targets))
    characters = sum(len(t) for t in targets)
    return {
        "accuracy": accuracy(flags),
        "accuracy_case_insensitive": accuracy(loose),
        "char_error_rate": errors / characters if characters else 0.0,
        "n": len(flags),
        "correct": flags,
    }


def score_gui(predictions: list[str], targets: list[str]) -> dict[str, Any]:
    ious, unparseable = [], 0
    for prediction, target in zip(predictions, targets):
        predicted, truth = parse_box(prediction), parse_box(target)
        if truth is None:
            raise ValueError(f"gui target without a box: {target!r}")
        unparseable += predicted is None
        ious.append(box_iou(predicted, truth) if predicted is not None else 0.0)
    flags = [iou >= IOU_THRESHOLD for iou in ious]
    return {
        "accuracy": accuracy(flags),
        "n": len(flags),
        "unparseable": unparseable,
        "mean_iou": sum(ious) / len(ious) if ious else 0.0,
        "correct": flags,
        "iou": ious,
    }


def yes_no(text: str) -> str | None:
    words = normalize_answer(text).split()
    word = words[0].strip(string.punctuation) if words else ""
    return word if word in ("yes", "no") else None


def score_multi(predictions: list[str], targets: list[str]) -> dict[str, Any]:
    answers = [yes_no(p) for p in predictions]
    flags = [answer is not None and answer == normalize_answer(t) for answer, t in zip(answers, targets)]
    return {"accuracy": accuracy(flags), "n": len(flags), "invalid": sum(a is None for a in answers), "correct": flags}


SCORERS: dict[str, Callable[[list[str], list[str]], dict[str, Any]]] = {
    "vqa": score_vqa,
    "ocr": score_ocr,
    "gui": score_gui,
    "multi": score_multi,
}


# ----------------------------------------------------------------------------------------------------------------------
# Data and generation
# ----------------------------------------------------------------------------------------------------------------------


def text_of(message: dict[str, Any]) -> str:
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def to_prompt_and_target(example: dict[str, Any], group_field: str | None = None) -> dict[str, Any]:
    """Messages before the last assistant turn (the prompt), that turn's text (the target), the prompt's images, and
    the example's group (its meta's `group_field` value, None when absent)."""
    messages = example["messages"]
    last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
    prompt = messages[:last]
    images = image_paths(prompt)
    return {
        "messages": prompt,
        "target": text_of(messages[last]),
        "images": images,
        "source": example["source"],
        "question": text_of(prompt[-1]) if prompt else "",
        "group": example.get("meta", {}).get(group_field) if group_field else None,
    }


def load_task(data: Path, task: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` examples (all with None) of `<data>/<task>/<split>.jsonl`, as prompts and targets."""
    examples = load_jsonl(data / task / f"{split}.jsonl")
    return [to_prompt_and_target(example, GROUP_FIELDS.get(task)) for example in examples[:limit]]


def model_defaults_off() -> dict[str, Any]:
    """transformers 4.x overrides a passed config's default-valued fields (`do_sample=False`!) with the model's
    generation_config unless `use_model_defaults=False`; 5.x fills only unset (None) fields and has no such flag."""
    import transformers

    return {"use_model_defaults": False} if int(transformers.__version__.split(".")[0]) < 5 else {}


MODEL_DEFAULTS_OFF = model_defaults_off()


def generation_config(model, max_new_tokens: int):
    """Greedy decoding with the model's special ids (the shipped config samples; evaluation must not)."""
    from transformers import GenerationConfig

    shipped = model.generation_config
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        eos_token_id=shipped.eos_token_id,
        pad_token_id=shipped.pad_token_id,
        bos_token_id=shipped.bos_token_id,
    )


@torch.no_grad()
def generate_batch(model, processor, batch: list[dict[str, Any]], config) -> list[str]:
    prompts = [processor.apply_chat_template(item["messages"], add_generation_prompt=True) for item in batch]
    images = [item["images"] for item in batch]
    inputs = processor(
        text=prompts, images=images if any(images) else None, padding=True, padding_side="left", return_tensors="pt"
    )
    inputs = inputs.to(model.device, dtype=model.dtype)  # casts only the floating-point pixel_values
    output_ids = model.generate(**inputs, generation_config=config, **MODEL_DEFAULTS_OFF)
    output_ids = output_ids[:, inputs["input_ids"].shape[1] :]
    return [answer.strip() for answer in processor.batch_decode(output_ids, skip_special_tokens=True)]


def predict(model, processor, examples: list[dict[str, Any]], batch_size: int, max_new_tokens: int) -> list[str]:
    config = generation_config(model, max_new_tokens)
    predictions = []
    for start in range(0, len(examples), batch_size):
        predictions += generate_batch(model, processor, examples[start : start + batch_size], config)
    return predictions


PER_EXAMPLE = ("correct", "iou")  # the scorers' per-example lists


def summary(scores: dict[str, Any]) -> dict[str, Any]:
    """A scorer's result without its per-example lists."""
    return {key: value for key, value in scores.items() if key not in PER_EXAMPLE}


def scores_by_group(task: str, predictions: list[str], examples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{group: the task's scores over that group's examples} (sorted by name), for the examples with a group."""
    members: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        if example.get("group") is not None:
            members.setdefault(example["group"], []).append(index)
    score = SCORERS[task]
    return {
        group: summary(score([predictions[i] for i in indices], [examples[i]["target"] for i in indices]))
        for group, indices in sorted(members.items())
    }


def evaluate_task(model, processor, task: str, examples: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """Score one task; keep the first KEPT_EXAMPLES predictions (question, target, prediction, correct)."""
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    predictions = predict(model, processor, examples, args.batch_size, args.max_new_tokens)
    seconds = time.perf_counter() - started
    scored = SCORERS[task](predictions, [example["target"] for example in examples])
    scores, flags = summary(scored), scored["correct"]
    by_group = scores_by_group(task, predictions, examples)
    if by_group:
        scores["by_group"] = by_group
    scores["examples"] = [
        {
            "source": example["source"],
            "question": example["question"],
            "target": example["target"],
            "prediction": prediction,
            "correct": flag,
        }
        for example, prediction, flag in list(zip(examples, predictions, flags))[:KEPT_EXAMPLES]
    ]
    scores["per_example"] = "".join("1" if flag else "0" for flag in flags)
    scores["seconds"] = round(seconds, 3)
    return scores


def evaluate_row(name: str, model, processor, data: dict[str, list], args, timing: dict) -> dict[str, Any]:
    row = {}
    for task, examples in data.items():
        row[task] = evaluate_task(model, processor, task, examples, args)
        print(
            f"[{name}] {task}: accuracy {row[task]['accuracy']:.4f} (n={row[task]['n']}, {row[task]['seconds']:.1f} s)",
            flush=True,
        )
    timing["rows"][name] = round(sum(scores["seconds"] for scores in row.values()), 3)
    return row


# ----------------------------------------------------------------------------------------------------------------------
# Models and rows
# ----------------------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_eval_model(folder: Path, args: argparse.Namespace):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True)
    if args.dtype != "auto":
        model = model.to(DTYPES[args.dtype])
    return model.to(resolve_device(args.device)).eval()


def adapter_row(name: str) -> str:
    return f"adapter:{name}"


def disabled_row(name: str) -> str:
    return f"adapter:{name} (disabled again)"


def quantized_prefix(quantization: dict[str, Any] | None) -> str:
    """'int4 base': the row name of a quantized base with this `quantization` config field."""
    return f"int{(quantization or {}).get('bits', 4)} base"


def quantized_adapter_row(prefix: str, name: str) -> str:
    return f"{prefix} + {adapter_row(name)}"


def float_rows(args, processor, data, timing) -> dict[str, Any]:
    """base, then per adapter: loaded (`load_scenario_adapter`) and disabled again (`disable_adapters`)."""
    started = time.perf_counter()
    model = load_eval_model(args.model, args)
    timing["load_s"]["float"] = round(time.perf_counter() - started, 3)
    rows = {"base": evaluate_row("base", model, processor, data, args, timing)}
    for name in args.adapter:
        model.load_scenario_adapter(name)
        rows[adapter_row(name)] = evaluate_row(adapter_row(name), model, processor, data, args, timing)
        model.disable_adapters()
        rows[disabled_row(name)] = evaluate_row(disabled_row(name), model, processor, data, args, timing)
        model.enable_adapters()
    return rows


def row_names(args: argparse.Namespace) -> list[str]:
    """The rows `float_rows` and `quantized_rows` will produce, in order (known before any model loads)."""
    names = ["base"]
    for name in args.adapter:
        names += [adapter_row(name), disabled_row(name)]
    if args.quantized_model is not None:
        prefix = quantized_prefix(json.loads((args.quantized_model / "config.json").read_text()).get("quantization"))
        names += [prefix] + [quantized_adapter_row(prefix, name) for name in args.adapter]
    return names


def quantized_rows(args, processor, data, timing) -> dict[str, Any]:
    """int4 base alone, then with each adapter of the FLOAT repo's `adapters/` loaded on it."""
    started = time.perf_counter()
    model = load_eval_model(args.quantized_model, args)
    timing["load_s"]["quantized"] = round(time.perf_counter() - started, 3)
    prefix = quantized_prefix(getattr(model.config, "quantization", None))
    rows = {prefix: evaluate_row(prefix, model, processor, data, args, timing)}
    for name in args.adapter:
        model.load_adapter(str(args.model / "adapters" / name), adapter_name=name)
        model.set_adapter(name)
        label = quantized_adapter_row(prefix, name)
        rows[label] = evaluate_row(label, model, processor, data, args, timing)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Paired comparison of two rows
# ----------------------------------------------------------------------------------------------------------------------


def mcnemar_p_value(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar test: P(a split at least this uneven) when each disagreement is a fair coin."""
    disagreements = a_only + b_only
    tail = sum(math.comb(disagreements, k) for k in range(min(a_only, b_only) + 1)) / 2**disagreements
    return min(1.0, 2 * tail)


def paired_comparison(per_example_a: str, per_example_b: str) -> dict[str, Any]:
    """Counts of examples that only A, only B, both or neither get right, and McNemar's p-value."""
    if len(per_example_a) != len(per_example_b):
        raise ValueError(
            f"cannot pair rows scored on different examples: {len(per_example_a)} vs {len(per_example_b)} examples"
        )
    pairs = list(zip(per_example_a, per_example_b))
    a_only, b_only = pairs.count(("1", "0")), pairs.count(("0", "1"))
    n = len(pairs)
    return {
        "n": n,
        "accuracy_a": per_example_a.count("1") / n if n else 0.0,
        "accuracy_b": per_example_b.count("1") / n if n else 0.0,
        "a_only": a_only,
        "b_only": b_only,
        "both": pairs.count(("1", "1")),
        "neither": pairs.count(("0", "0")),
        "p_value": mcnemar_p_value(a_only, b_only),
    }


def check_compared_rows(pairs: list[list[str]], names: list[str]) -> None:
    missing = sorted({name for pair in pairs for name in pair} - set(names))
    if missing:
        raise ValueError(
            f"--compare names {len(missing)} row(s) this evaluation does not produce: {missing}; its rows: {names}"
        )


def compare_rows(rows: dict[str, dict[str, Any]], pairs: list[list[str]], tasks: list[str]) -> list[dict[str, Any]]:
    """`paired_comparison` of each (A, B) pair of row names on every task."""
    check_compared_rows(pairs, list(rows))
    return [
        {"task": task, "a": a, "b": b, **paired_comparison(rows[a][task]["per_example"], rows[b][task]["per_example"])}
        for a, b in pairs
        for task in tasks
    ]


def comparison_line(comparison: dict[str, Any]) -> str:
    return (
        f"[{comparison['task']}] {comparison['a']} {100 * comparison['accuracy_a']:.1f}% vs {comparison['b']} "
        f"{100 * comparison['accuracy_b']:.1f}% (n={comparison['n']}): only A {comparison['a_only']}, only B "
        f"{comparison['b_only']}, McNemar p={comparison['p_value']:.3g}"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Report and CLI
# ----------------------------------------------------------------------------------------------------------------------


def markdown_table(rows: dict[str, dict[str, Any]], tasks: list[str]) -> str:
    """Rows x tasks, accuracy in percent with n."""
    lines = ["| row | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for name, row in rows.items():
        cells = [f"{100 * row[task]['accuracy']:.1f} (n={row[task]['n']})" for task in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_report_paths(output: Path, tasks: list[str]) -> dict[str, Path]:
    """One JSON per task beside the report: report.json -> report.vqa.json, report.ocr.json, ... (none for one task:
    the report itself is that file)."""
    if len(tasks) < 2:
        return {}
    return {task: output.with_name(f"{output.stem}.{task}{output.suffix or '.json'}") for task in tasks}


def task_report(report: dict[str, Any], task: str) -> dict[str, Any]:
    """The report restricted to one task: every row's scores for it."""
    keep = ("model", "quantized_model", "split", "limit", "device", "args")
    return {
        **{key: report[key] for key in keep},
        "task": task,
        "rows": {name: row[task] for name, row in report["rows"].items()},
        "comparisons": [comparison for comparison in report["comparisons"] if comparison["task"] == task],
    }


def limit_spec(text: str) -> dict[str, int] | int:
    """`N` (every task) or `task=N,...` (the listed tasks; the others unlimited)."""
    try:
        if "=" not in text:
            return positive(int(text))
        pairs = (item.split("=") for item in text.split(",") if item.strip())
        limits = {task.strip(): positive(int(value)) for task, value in pairs}
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--limit: expected N or task=N,..., got {text!r} ({error})") from None
    unknown = sorted(set(limits) - set(TASKS))
    if unknown:
        raise argparse.ArgumentTypeError(f"--limit: unknown task(s) {unknown}")
    return limits


def positive(value: int) -> int:
    if value < 1:
        raise ValueError(f"a limit must be >= 1, got {value}")
    return value


def limit_of(limit: dict[str, int] | int | None, task: str) -> int | None:
    return limit.get(task) if isinstance(limit, dict) else limit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="float AndesVL repo folder")
    parser.add_argument("--data", type=Path, required=True, help="make_datasets.py output folder")
    parser.add_argument(
        "--tasks", type=task_list, default=list(TASKS), help="comma-separated subset of vqa,ocr,gui,multi"
    )
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to evaluate (default: %(default)s)")
    parser.add_argument("--limit", type=limit_spec, help="first N examples per task: N or task=N,... (default: all)")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME",
        help="scenario adapter under <model>/adapters/ (repeatable)",
    )
    parser.add_argument("--quantized-model", type=Path, help="int4 base folder from andesvl_tools/quantize.py")
    parser.add_argument(
        "--compare",
        nargs=2,
        action="append",
        default=[],
        metavar=("ROW_A", "ROW_B"),
        help="paired comparison of two rows on every task (repeatable), e.g. "
        "'int4 base + adapter:ocr-qalft-int4' 'int4 base + adapter:ocr'",
    )
    parser.add_argument("--output", type=Path, default=Path("outputs/eval/report.json"), help="JSON report path")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: as loaded")
    return parser


def resolved_args(args: argparse.Namespace) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    print("arguments:", json.dumps(resolved_args(args)), flush=True)
    check_compared_rows(args.compare, row_names(args))  # before the first model loads, not after the last row
    started = time.perf_counter()
    data = {task: load_task(args.data, task, args.split, limit_of(args.limit, task)) for task in args.tasks}
    processor = load_processor(str(args.model))
    timing = {"load_s": {}, "rows": {}}
    rows = float_rows(args, processor, data, timing)
    if args.quantized_model is not None:
        rows.update(quantized_rows(args, processor, data, timing))
    comparisons = compare_rows(rows, args.compare, args.tasks)
    timing["total_s"] = round(time.perf_counter() - started, 3)
    report = {
        "model": str(args.model),
        "quantized_model": str(args.quantized_model) if args.quantized_model else None,
        "split": args.split,
        "limit": args.limit,
        "tasks": args.tasks,
        "rows": rows,
        "timing": timing,
        "comparisons": comparisons,
        "device": str(resolve_device(args.device)),
        "args": resolved_args(args),
    }
    table = markdown_table(rows, args.tasks)
    report["table"] = table
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    for task, path in task_report_paths(args.output, args.tasks).items():
        path.write_text(json.dumps(task_report(report, task), indent=2, ensure_ascii=False) + "\n")
    print(table)
    for comparison in comparisons:
        print(comparison_line(comparison))
    print(f"wrote {args.output} ({timing['total_s']:.1f} s)")
    return report


if __name__ == "__main__":
    main()
