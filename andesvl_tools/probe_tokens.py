"""What an AndesVL model's visual tokens carry: linear read-outs on the GUI screens of `andesvl_tools/make_datasets.py`.

    python -m andesvl_tools.probe_tokens --model AndesVL-Tiny --data outputs/tiny/datasets --output probe.json

Both probes read the visual tokens as the language model sees them (`get_image_features`: encoder, 2x2 merge,
projector), one GUI screen at a time, and fit on some screens and score on others:

- position: ridge regression from each token to its own (row, column) centre on the token grid (0-1). Reports the
  held-out R2 and mean absolute error (0-1000) per axis. Grounding answers need this: a token that does not know where
  it is cannot say where the target is.
- label: softmax regression from each token that lies on a label text to that label (`train.GUI_LABELS`, the target
  `train.gui_targets` gives the vision warm-up), fitted on train screens and scored on val screens. The same read-out
  of the token's raw pixels (its 2x2 patches) and the majority label give the scale. Grounding by name needs this:
  the answer is the box of the element whose label the question names.

The model loads through `AutoModelForImageTextToText` / `AutoProcessor` with `trust_remote_code=True`, as users load
it. Seeded; prints a table and writes the numbers to `--output` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import finetune_lora as ft
from . import train


def load(model_dir: str):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    return model.eval(), ft.load_processor(model_dir).image_processor


def gui_screens(data: Path, split: str, count: int) -> list[dict]:
    """The first `count` screens of `data/gui/<split>.jsonl` as the vision warm-up reads them (`train.vision_records`:
    validated lines, resolved image paths, the generator's meta checked)."""
    path = data / "gui" / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"no GUI split at {path}: generate it with andesvl_tools/make_datasets.py --tasks gui")
    records = train.vision_records(ft.load_jsonl(path), "gui")
    if len(records) < count:
        raise SystemExit(f"{path} has {len(records)} screens, fewer than the {count} asked for")
    return records[:count]


@torch.no_grad()
def screen_tokens(model, item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One screen, as `train.VisionTargetDataset` prepares it for the warm-up -> its visual tokens [T, D], their raw
    pixels [T, group * C*p*p], grid centres [T, 2] and label targets [T] (IGNORE_INDEX on tokens without label text)."""
    pixels, grid_hw = item["pixel_values"].float(), item["image_grid_hw"]
    group, merge = model.config.image_token_group, model.config.vision_config.merge_size
    return {
        "tokens": model.get_image_features(pixels, grid_hw),  # [T, D]
        "pixels": pixels.reshape(-1, pixels.shape[-1] * group),  # [T, group * C*p*p], patches in 2x2-block order
        "positions": train.token_positions(grid_hw, merge),
        "labels": item["element"],
    }


def collect(model, image_processor, records: list[dict]) -> dict[str, torch.Tensor]:
    dataset = train.VisionTargetDataset(records, image_processor)
    screens = [screen_tokens(model, dataset[index]) for index in range(len(dataset))]
    return {key: torch.cat([screen[key] for screen in screens]) for key in screens[0]}


def ridge_position(fit: dict, score: dict, l2: float) -> dict[str, float]:
    """Ridge read-out of (row, column) from the tokens: held-out R2 and mean absolute error (0-1000) per axis."""

    def design(tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens.double(), torch.ones(len(tokens), 1, dtype=torch.double)], dim=1)

    x, y = design(fit["tokens"]), fit["positions"].double()
    weights = torch.linalg.solve(x.T @ x + l2 * torch.eye(x.shape[1], dtype=torch.double), x.T @ y)
    target = score["positions"].double()
    predicted = design(score["tokens"]) @ weights
    r2 = 1 - ((predicted - target) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)
    error = (predicted - target).abs().mean(0) * 1000
    return {
        "r2_row": round(float(r2[0]), 4),
        "r2_column": round(float(r2[1]), 4),
        "error_row": round(float(error[0]), 1),
        "error_column": round(float(error[1]), 1),
    }


def softmax_label(
    fit_x: torch.Tensor, fit_y: torch.Tensor, score_x: torch.Tensor, score_y: torch.Tensor, steps: int, seed: int
) -> dict[str, float]:
    """Softmax regression (standardized features, Adam, full batch) -> fit and held-out accuracy."""
    mean, std = fit_x.mean(0), fit_x.std(0) + 1e-5
    fit_x, score_x = (fit_x - mean) / std, (score_x - mean) / std
    torch.manual_seed(seed)
    head = torch.nn.Linear(fit_x.shape[1], len(train.GUI_LABELS))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(fit_x), fit_y).backward()
        optimizer.step()
    with torch.no_grad():
        return {
            "fit_accuracy": round(float((head(fit_x).argmax(-1) == fit_y).float().mean()), 4),
            "accuracy": round(float((head(score_x).argmax(-1) == score_y).float().mean()), 4),
        }


def label_probe(fit: dict, score: dict, steps: int, seed: int) -> dict[str, object]:
    """Label read-out from the visual tokens and from the raw pixels, over the tokens that lie on a label text."""
    fit_on, score_on = fit["labels"] != train.IGNORE_INDEX, score["labels"] != train.IGNORE_INDEX
    if not fit_on.any() or not score_on.any():
        raise SystemExit(
            f"label probe: {int(fit_on.sum())} fit and {int(score_on.sum())} scored tokens lie on a "
            "label text; it needs both"
        )
    fit_y, score_y = fit["labels"][fit_on], score["labels"][score_on]
    majority = torch.bincount(fit_y, minlength=len(train.GUI_LABELS)).argmax()
    return {
        "fit_tokens": int(fit_on.sum()),
        "scored_tokens": int(score_on.sum()),
        "classes": len(train.GUI_LABELS),
        "classes_seen": len(set(fit_y.tolist())),
        "majority_accuracy": round(float((score_y == majority).float().mean()), 4),
        "visual_tokens": softmax_label(fit["tokens"][fit_on], fit_y, score["tokens"][score_on], score_y, steps, seed),
        "raw_pixels": softmax_label(fit["pixels"][fit_on], fit_y, score["pixels"][score_on], score_y, steps, seed),
    }


def report(results: dict) -> str:
    position, label = results["position"], results["label"]
    return "\n".join(
        [
            f"| probe ({results['model']}) | read-out | fit | held-out |",
            "|---|---|---:|---:|",
            f"| position (ridge, {results['screens']['position']} screens) | R2 row / column | | "
            f"{position['r2_row']:.2f} / {position['r2_column']:.2f} |",
            f"| position | mean error row / column (0-1000) | | "
            f"{position['error_row']:.0f} / {position['error_column']:.0f} |",
            f"| label ({label['classes_seen']} of {label['classes']} labels) | visual tokens | "
            f"{label['visual_tokens']['fit_accuracy']:.1%} | {label['visual_tokens']['accuracy']:.1%} |",
            f"| label | raw pixels | {label['raw_pixels']['fit_accuracy']:.1%} | "
            f"{label['raw_pixels']['accuracy']:.1%} |",
            f"| label | majority | | {label['majority_accuracy']:.1%} |",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", required=True, help="AndesVL folder (loaded with trust_remote_code=True)")
    parser.add_argument("--data", type=Path, required=True, help="make_datasets.py output with a gui task")
    parser.add_argument(
        "--position-screens",
        type=int,
        default=40,
        help="GUI test screens for the position probe: fitted on the first half, scored on the rest",
    )
    parser.add_argument("--label-fit-screens", type=int, default=1500, help="GUI train screens the label probe fits")
    parser.add_argument("--label-score-screens", type=int, default=300, help="GUI val screens the label probe scores")
    parser.add_argument("--ridge", type=float, default=1e-2, help="L2 of the position read-out")
    parser.add_argument("--label-steps", type=int, default=300, help="full-batch Adam steps of the label read-out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=None, help="write the numbers here (JSON)")
    args = parser.parse_args(argv)
    if args.position_screens < 2:
        parser.error(f"--position-screens {args.position_screens}: the position probe needs at least 2 screens")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    model, image_processor = load(args.model)
    screens = gui_screens(args.data, "test", args.position_screens)
    half = len(screens) // 2
    position = ridge_position(
        collect(model, image_processor, screens[:half]), collect(model, image_processor, screens[half:]), args.ridge
    )
    fit = collect(model, image_processor, gui_screens(args.data, "train", args.label_fit_screens))
    score = collect(model, image_processor, gui_screens(args.data, "val", args.label_score_screens))
    results = {
        "model": str(args.model),
        "data": str(args.data),
        "seed": args.seed,
        "screens": {
            "position": args.position_screens,
            "label_fit": args.label_fit_screens,
            "label_score": args.label_score_screens,
        },
        "position": position,
        "label": label_probe(fit, score, args.label_steps, args.seed),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(report(results))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
