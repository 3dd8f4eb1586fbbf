"""The shipped AndesVL-Tiny (AndesVL-Tiny/): a complete folder within the size budget, loadable offline, and still
reaching its recorded accuracies on the fixed held-out subset, with and without its scenario adapters.

The subset is regenerated here by andesvl_tools/make_datasets.py (seeded; test examples do not depend on the other
sizes)
and scored by andesvl_tools/evaluate.py with the exact command recorded in `AndesVL-Tiny/eval/ci_subset.json`.

Run: `.venv/tf4/bin/python -m pytest tests/test_tiny_checkpoint.py -q` (and the same with `.venv/tf5`).
"""

from __future__ import annotations

import json
import os

import pytest

from andesvl_tools import evaluate, make_datasets
from conftest import ROOT, load_model

TINY = ROOT / "AndesVL-Tiny"
RECORDED = TINY / "eval" / "ci_subset.json"
MAX_BYTES = 48_000_000  # the budget for the whole folder (weights, tokenizer, configs, adapters), in bytes
MARGIN = 0.03  # absolute accuracy: other transformers lines / BLAS builds may flip a borderline greedy token
SHIPPED_ADAPTERS = ["gui", "gui-qalft-int4", "ocr", "ocr-qalft-int4"]


def recorded() -> dict:
    return json.loads(RECORDED.read_text())


def test_folder_is_complete_and_within_budget():
    size = sum(path.stat().st_size for path in TINY.rglob("*") if path.is_file())  # symlinks followed
    assert size <= MAX_BYTES, f"AndesVL-Tiny is {size / 1e6:.1f} MB, over 48 MB"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modeling_andesvl.py",
        "README.md",
        "preprocessor_config.json",
        "chat_template.jinja",
    ):
        assert (TINY / name).is_file(), name
    for path in TINY.iterdir():
        if path.is_symlink():  # shared files point at the root's copy, inside the repo
            target = path.resolve()
            assert target.parent == ROOT and target.is_file(), (path, os.readlink(path))
    assert sorted(p.parent.name for p in TINY.glob("adapters/*/adapter_model.safetensors")) == SHIPPED_ADAPTERS
    for stage in ("vision", "align", "pretrain", "sft"):
        assert (TINY / "training" / stage / "loss_curve.png").is_file()


def test_loads_with_auto_classes_and_lists_its_adapters():
    model = load_model(TINY)
    assert type(model).__name__ == "AndesVLForConditionalGeneration"
    assert model.config.vision_type == "aimv2" and model.config.text_config.model_type == "qwen3"
    assert model.available_adapters() == SHIPPED_ADAPTERS


@pytest.fixture(scope="module")
def ci_report(tmp_path_factory):
    """Re-run the recorded evaluate.py command on freshly generated data."""
    work = tmp_path_factory.mktemp("tiny-eval")
    args = recorded()["args"]
    limits = args["limit"]
    make_datasets.main(
        [
            "--output",
            str(work / "data"),
            "--seed",
            "0",
            "--tasks",
            ",".join(args["tasks"]),
            "--train-size",
            "1",
            "--val-size",
            "1",
            *[f"--{task}-test-size={limits[task]}" for task in args["tasks"]],
        ]
    )
    argv = [
        "--model",
        str(TINY),
        "--data",
        str(work / "data"),
        "--tasks",
        ",".join(args["tasks"]),
        "--limit",
        ",".join(f"{task}={n}" for task, n in limits.items()),
        "--batch-size",
        str(args["batch_size"]),
        "--max-new-tokens",
        str(args["max_new_tokens"]),
        "--dtype",
        args["dtype"],
        "--device",
        "cpu",
        "--output",
        str(work / "report.json"),
    ]
    for name in args["adapter"]:
        argv += ["--adapter", name]
    return evaluate.main(argv)


def test_recorded_subset_is_the_documented_one():
    args = recorded()["args"]
    assert args["split"] == "test" and args["adapter"] == ["ocr", "gui"]
    assert args["limit"] == {"vqa": 300, "ocr": 100, "gui": 100}


@pytest.mark.slow
def test_shipped_checkpoint_reaches_its_recorded_accuracy(ci_report):
    expected = recorded()["rows"]
    assert list(ci_report["rows"]) == list(expected)
    for row, tasks in expected.items():
        for task, scores in tasks.items():
            measured = ci_report["rows"][row][task]
            assert measured["n"] == scores["n"]
            assert abs(measured["accuracy"] - scores["accuracy"]) <= MARGIN, (
                f"{row} / {task}: accuracy {measured['accuracy']:.3f}, recorded {scores['accuracy']:.3f}"
            )


@pytest.mark.slow
def test_disabling_an_adapter_restores_the_base_exactly(ci_report):
    rows = ci_report["rows"]
    strip = lambda row: {task: {k: v for k, v in s.items() if k != "seconds"} for task, s in row.items()}
    for name in ("ocr", "gui"):
        assert strip(rows[f"adapter:{name} (disabled again)"]) == strip(rows["base"])


@pytest.mark.slow
def test_each_adapter_changes_the_answers(ci_report):
    rows = ci_report["rows"]
    predictions = lambda row: [e["prediction"] for scores in row.values() for e in scores["examples"]]
    for name in ("ocr", "gui"):
        assert predictions(rows[f"adapter:{name}"]) != predictions(rows["base"])


# ----------------------------------------------------------------------------------------------------------------------
# The main command's job (andesvl_tools/demo.py) and the shipping step (andesvl_tools/ship_tiny.py)
# ----------------------------------------------------------------------------------------------------------------------


def test_demo_answers_the_bundled_examples_swapping_adapters(tmp_path, capsys):
    from andesvl_tools import demo

    results = demo.main(["--output", str(tmp_path / "demo.json")])
    assert [(r["task"], r["adapter"]) for r in results] == (
        [("vqa", None)] * 4 + [("multi", None)] * 2 + [("ocr", "ocr")] * 4 + [("gui", "gui")] * 3 + [("vqa", None)]
    )
    out = capsys.readouterr().out
    assert out.index("loaded adapters/ocr") < out.index("loaded adapters/gui") < out.index("adapters disabled: base")
    for result in results:
        assert result["truth"] and f"truth: {result['truth']!r}" in out and f"model: {result['answer']!r}" in out
        assert (
            result["correct"] == evaluate.SCORERS[result["task"]]([result["answer"]], [result["truth"]])["correct"][0]
        )
    assert json.loads((tmp_path / "demo.json").read_text()) == json.loads(json.dumps(results))


def test_demo_rejects_examples_without_an_adapter_field(tmp_path):
    from andesvl_tools import demo

    lines = (ROOT / "assets" / "andesvl-tiny" / "examples.jsonl").read_text().splitlines()
    broken = [json.loads(line) for line in lines[:3]]
    del broken[1]["adapter"]
    (tmp_path / "images").symlink_to(ROOT / "assets" / "andesvl-tiny" / "images")
    (tmp_path / "examples.jsonl").write_text("\n".join(json.dumps(line) for line in broken) + "\n")
    with pytest.raises(ValueError, match=r"1 of 3 lines have no 'adapter' field \(lines \[2\]\)"):
        demo.load_examples(tmp_path / "examples.jsonl")


@pytest.fixture(scope="module")
def fake_work(tiny_repos, tmp_path_factory):
    """A train_tiny.sh output folder in miniature: a tiny random model with one adapter, stage metrics, a report."""
    import shutil

    from test_adapters import make_adapter

    work = tmp_path_factory.mktemp("tiny-work")
    model = work / "AndesVL-Tiny"
    shutil.copytree(tiny_repos["aimv2"], model)
    make_adapter(model, model / "adapters" / "ocr", rank=2, seed=0)
    for stage in ("align", "pretrain", "sft"):
        (work / "runs" / "base" / stage / "model").mkdir(parents=True)
        for name in ("training_metrics.json", "loss_curve.png"):
            (work / "runs" / "base" / stage / "model" / name).write_text(stage)
    (work / "eval").mkdir()
    (work / "eval" / "ci_subset.json").write_text("{}")
    make_datasets.main(["--output", str(work / "datasets"), "--small", "--seed", "0"])
    return work


def test_ship_links_shared_files_and_copies_trained_ones(fake_work, tmp_path):
    from andesvl_tools import ship_tiny

    output, demo_output = tmp_path / "AndesVL-Tiny", tmp_path / "demo"
    summary = ship_tiny.main(["--work", str(fake_work), "--output", str(output), "--demo-output", str(demo_output)])
    assert summary["adapters"] == ["ocr"] and summary["demo_examples"] == 14
    for name in ("modeling_andesvl.py", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (output / name).is_symlink() and (output / name).resolve() == ROOT / name
    for name in (
        "config.json",
        "model.safetensors",
        "README.md",
        "adapters/ocr/adapter_model.safetensors",
        "training/sft/loss_curve.png",
        "eval/ci_subset.json",
    ):
        assert (output / name).is_file() and not (output / name).is_symlink(), name
    assert load_model(output).available_adapters() == ["ocr"]
    lines = [json.loads(line) for line in (demo_output / "examples.jsonl").read_text().splitlines()]
    first_test = json.loads((fake_work / "datasets" / "vqa" / "test.jsonl").read_text().splitlines()[0])
    assert lines[0]["messages"][1] == first_test["messages"][1] and lines[0]["adapter"] is None
    assert all(
        (demo_output / part["path"]).is_file()
        for line in lines
        for part in line["messages"][0]["content"]
        if part["type"] == "image"
    )


def test_ship_refuses_a_folder_whose_code_differs_from_the_root(fake_work, tmp_path):
    import shutil

    from andesvl_tools import ship_tiny

    work = tmp_path / "work"
    shutil.copytree(fake_work, work, symlinks=True)
    with open(work / "AndesVL-Tiny" / "modeling_andesvl.py", "a") as handle:
        handle.write("# stale\n")
    with pytest.raises(SystemExit, match=r"1 file\(s\) .* differ from the repo root's: \['modeling_andesvl.py'\]"):
        ship_tiny.main(["--work", str(work), "--output", str(tmp_path / "out"), "--demo-output", str(tmp_path / "d")])
