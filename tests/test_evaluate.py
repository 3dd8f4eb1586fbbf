"""andesvl_tools/evaluate.py: box parsing, IoU, answer normalization, the scorers, and a smoke run of main() on a tiny
random
repo with a scenario adapter and an int4 copy, over make_datasets.py --small data for all four tasks.

Run: `.venv/tf4/bin/python -m pytest tests/test_evaluate.py -q` (and the same with `.venv/tf5`).
"""

from __future__ import annotations

import json
import shutil

import pytest
from test_adapters import make_adapter

from andesvl_tools import evaluate, make_datasets, quantize

# ----------------------------------------------------------------------------------------------------------------------
# Unit tests
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, box",
    [
        ("<|box_start|>(12,34),(560,780)<|box_end|>", (12.0, 34.0, 560.0, 780.0)),
        ("(12,34),(560,780)", (12.0, 34.0, 560.0, 780.0)),
        ("The button is at ( 1, 2 ) , ( 3.5 ,4 ).", (1.0, 2.0, 3.5, 4.0)),
        ("<|box_start|>(0,0),(1000,1000)<|box_end|> and (5,5),(6,6)", (0.0, 0.0, 1000.0, 1000.0)),
    ],
)
def test_parse_box_with_and_without_tokens(text, box):
    assert evaluate.parse_box(text) == box


@pytest.mark.parametrize("text", ["", "garbage", "(1,2)", "(1,2),(3)", "<|box_start|>(a,b),(c,d)<|box_end|>", None])
def test_parse_box_garbage_is_none(text):
    assert evaluate.parse_box(text) is None


def test_box_iou():
    assert evaluate.box_iou((10, 10, 50, 50), (10, 10, 50, 50)) == 1.0
    assert evaluate.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert evaluate.box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    # 10x10 boxes shifted by 5 in x: intersection 50, union 150
    assert evaluate.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    # a box inside another: 25 / 100
    assert evaluate.box_iou((0, 0, 10, 10), (0, 0, 5, 5)) == pytest.approx(0.25)
    assert evaluate.box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # empty boxes
    assert evaluate.box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # inverted box


@pytest.mark.parametrize(
    "raw, normalized",
    [("Red", "red"), ("  circle.\n", "circle"), ("Yes!", "yes"), ("blue?!", "blue"), ("no", "no"), ("", "")],
)
def test_normalize_answer(raw, normalized):
    assert evaluate.normalize_answer(raw) == normalized


def test_score_vqa():
    scores = evaluate.score_vqa(["Red.", "circle", "green", ""], ["red", "Circle", "blue", "yes"])
    assert scores["accuracy"] == 0.5 and scores["n"] == 4 and scores["correct"] == [True, True, False, False]


def test_score_ocr_is_case_sensitive_and_reports_case_insensitive():
    scores = evaluate.score_ocr(["Hello", "hello", "1234 ", "12345"], ["Hello", "Hello", "1234", "1234"])
    assert scores["accuracy"] == 0.5
    assert scores["accuracy_case_insensitive"] == 0.75
    assert scores["n"] == 4
    assert scores["char_error_rate"] == 2 / 18  # "hello" vs "Hello": 1 substitution; "12345" vs "1234": 1 insertion


@pytest.mark.parametrize(
    "a, b, distance",
    [
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("kitten", "sitting", 3),
        ("8979276", "9999999", 5),
        ("Human", "HUMAN", 4),
        ("1234", "2341", 2),
    ],
)
def test_edit_distance(a, b, distance):
    assert evaluate.edit_distance(a, b) == distance == evaluate.edit_distance(b, a)


def test_char_error_rate_counts_an_empty_answer_as_every_character_wrong():
    assert evaluate.score_ocr(["", "abc"], ["abcd", "abc"])["char_error_rate"] == 4 / 7


def test_score_gui_iou_threshold_and_unparseable():
    target = "<|box_start|>(0,0),(100,100)<|box_end|>"
    predictions = [target, "(0,0),(100,100)", "(0,0),(100,60)", "(0,0),(100,40)", "no idea", ""]
    scores = evaluate.score_gui(predictions, [target] * len(predictions))
    assert scores["correct"] == [True, True, True, False, False, False]
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["unparseable"] == 2 and scores["n"] == 6
    assert scores["mean_iou"] == pytest.approx((1 + 1 + 0.6 + 0.4) / 6)


def test_scores_by_group_rescore_each_kind_and_skip_ungrouped_examples():
    examples = [
        {"target": "1234", "group": "number"},
        {"target": "Human", "group": "word"},
        {"target": "42", "group": "number"},
        {"target": "cat", "group": None},
        {"target": "dog"},
    ]
    grouped = evaluate.scores_by_group("ocr", ["1234", "human", "43", "cat", "dog"], examples)
    assert list(grouped) == ["number", "word"]
    assert grouped["number"] == {"accuracy": 0.5, "accuracy_case_insensitive": 0.5, "char_error_rate": 1 / 6, "n": 2}
    assert grouped["word"]["accuracy"] == 0 and grouped["word"]["accuracy_case_insensitive"] == 1
    assert evaluate.scores_by_group("vqa", ["red"], [{"target": "red", "group": None}]) == {}


def test_examples_are_grouped_by_the_tasks_meta_field():
    example = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Read it."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "1234"}]},
        ],
        "meta": {"kind": "number", "element": "row"},
        "source": "x.jsonl:1",
    }
    assert evaluate.to_prompt_and_target(example, evaluate.GROUP_FIELDS["ocr"])["group"] == "number"
    assert evaluate.to_prompt_and_target(example, evaluate.GROUP_FIELDS["gui"])["group"] == "row"
    assert evaluate.to_prompt_and_target(example)["group"] is None
    assert evaluate.to_prompt_and_target({**example, "meta": {}}, "kind")["group"] is None


def test_score_multi_yes_no():
    scores = evaluate.score_multi(["Yes", "no.", "Yes, they are.", "maybe", "yesno"], ["yes", "no", "no", "yes", "yes"])
    assert scores["correct"] == [True, True, False, False, False]
    assert scores["accuracy"] == pytest.approx(0.4) and scores["invalid"] == 2


def test_limit_spec():
    assert evaluate.limit_spec("4") == 4
    assert evaluate.limit_spec("vqa=300,ocr=100") == {"vqa": 300, "ocr": 100}
    assert evaluate.limit_of({"vqa": 3}, "gui") is None and evaluate.limit_of(7, "gui") == 7
    for bad in ("0", "vqa=x", "foo=3"):
        with pytest.raises(Exception):
            evaluate.limit_spec(bad)


@pytest.mark.parametrize(
    "a_only, b_only, p_value",
    [
        (0, 0, 1.0),  # no disagreement: no evidence
        (5, 0, 2 / 32),  # 5 of 5 disagreements one way: 2 * 0.5**5
        (0, 5, 2 / 32),  # symmetric
        (1, 0, 1.0),  # one disagreement can never be significant (capped at 1)
        (7, 3, 2 * (1 + 10 + 45 + 120) / 1024),  # 2 * P(X <= 3), X ~ Binomial(10, 1/2) = 0.34375
    ],
)
def test_mcnemar_p_value_is_the_exact_two_sided_binomial_test(a_only, b_only, p_value):
    assert evaluate.mcnemar_p_value(a_only, b_only) == pytest.approx(p_value)


def test_paired_comparison_counts_each_kind_of_pair():
    comparison = evaluate.paired_comparison("1101100", "1011000")
    assert comparison == {
        "n": 7,
        "accuracy_a": pytest.approx(4 / 7),
        "accuracy_b": pytest.approx(3 / 7),
        "a_only": 2,
        "b_only": 1,
        "both": 2,
        "neither": 2,
        "p_value": pytest.approx(1.0),
    }
    with pytest.raises(ValueError, match="different examples: 3 vs 2"):
        evaluate.paired_comparison("101", "10")


def test_compare_names_an_unknown_row_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match=r"1 row\(s\) this evaluation does not produce: \['adapter:gui'\]"):
        evaluate.main(
            [
                "--model",
                str(tmp_path / "no-model"),
                "--data",
                str(tmp_path),
                "--adapter",
                "ocr",
                "--compare",
                "adapter:gui",
                "base",
            ]
        )


# ----------------------------------------------------------------------------------------------------------------------
# Smoke run of main()
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_report(tiny_repos, tmp_path_factory):
    work = tmp_path_factory.mktemp("evaluate")
    repo = work / "AndesVL-1B-tiny"
    shutil.copytree(tiny_repos["aimv2"], repo)
    make_adapter(repo, repo / "adapters" / "ocr", rank=4, seed=1)
    quantized = work / "AndesVL-1B-tiny-int4"
    quantize.main(["--model", str(repo), "--output", str(quantized), "--bits", "4", "--check-tokens", "1"])
    make_datasets.main(["--output", str(work / "data"), "--small", "--seed", "0"])
    output = work / "report.json"
    report = evaluate.main(
        [
            "--model",
            str(repo),
            "--data",
            str(work / "data"),
            "--limit",
            "4",
            "--adapter",
            "ocr",
            "--quantized-model",
            str(quantized),
            "--output",
            str(output),
            "--batch-size",
            "4",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
            "--compare",
            "int4 base + adapter:ocr",
            "adapter:ocr",
            "--compare",
            "adapter:ocr",
            "base",
        ]
    )
    return report, output


ROWS = ["base", "adapter:ocr", "adapter:ocr (disabled again)", "int4 base", "int4 base + adapter:ocr"]


def test_smoke_report_has_every_row_and_task(smoke_report):
    report, output = smoke_report
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    assert list(report["rows"]) == ROWS
    assert report["split"] == "test" and report["limit"] == 4 and report["args"]["adapter"] == ["ocr"]
    for row in report["rows"].values():
        assert set(row) == set(evaluate.TASKS)
        for scores in row.values():
            assert scores["n"] == 4 and 0.0 <= scores["accuracy"] <= 1.0
            assert len(scores["examples"]) == 4
            assert len(scores["per_example"]) == 4 and scores["per_example"].count("1") == round(4 * scores["accuracy"])
            assert [example["correct"] for example in scores["examples"]] == [c == "1" for c in scores["per_example"]]
            assert all(isinstance(example["prediction"], str) for example in scores["examples"])
        assert 0 <= row["gui"]["unparseable"] <= 4 and 0.0 <= row["ocr"]["accuracy_case_insensitive"] <= 1.0
        for task in evaluate.GROUP_FIELDS:  # every OCR and GUI line has a kind: the groups cover the 4 examples
            groups = row[task].get("by_group", {})
            assert sum(scores["n"] for scores in groups.values()) == 4
            assert set(groups) <= {"number", "word", "button", "row"}
    for name in ROWS:
        assert f"| {name} |" in report["table"]


def test_smoke_report_writes_one_json_per_task(smoke_report):
    report, output = smoke_report
    for task in evaluate.TASKS:
        per_task = json.loads(output.with_name(f"report.{task}.json").read_text())
        assert per_task["task"] == task and per_task["split"] == "test"
        assert per_task["rows"] == json.loads(json.dumps({name: row[task] for name, row in report["rows"].items()}))
        assert [(c["a"], c["b"]) for c in per_task["comparisons"]] == [
            ("int4 base + adapter:ocr", "adapter:ocr"),
            ("adapter:ocr", "base"),
        ]


def test_a_one_task_report_gets_no_per_task_copy(tmp_path):
    assert evaluate.task_report_paths(tmp_path / "r.json", ["ocr"]) == {}
    assert evaluate.task_report_paths(tmp_path / "r.json", ["ocr", "gui"]) == {
        "ocr": tmp_path / "r.ocr.json",
        "gui": tmp_path / "r.gui.json",
    }


def test_smoke_report_compares_each_pair_on_every_task(smoke_report):
    report = smoke_report[0]
    assert len(report["comparisons"]) == 2 * len(evaluate.TASKS)
    for comparison in report["comparisons"]:
        a, b = (report["rows"][comparison[side]][comparison["task"]] for side in ("a", "b"))
        assert comparison["accuracy_a"] == pytest.approx(a["accuracy"])
        assert comparison["accuracy_b"] == pytest.approx(b["accuracy"])
        assert comparison == {**comparison, **evaluate.paired_comparison(a["per_example"], b["per_example"])}
        assert comparison["a_only"] + comparison["b_only"] + comparison["both"] + comparison["neither"] == 4


def test_disabled_adapter_row_equals_the_base_row(smoke_report):
    rows = smoke_report[0]["rows"]
    strip = lambda row: {task: {k: v for k, v in scores.items() if k != "seconds"} for task, scores in row.items()}
    assert strip(rows["adapter:ocr (disabled again)"]) == strip(rows["base"])


def test_adapter_changes_some_prediction(smoke_report):
    rows = smoke_report[0]["rows"]
    predictions = lambda row: [e["prediction"] for scores in row.values() for e in scores["examples"]]
    assert predictions(rows["adapter:ocr"]) != predictions(rows["base"])
    assert predictions(rows["int4 base + adapter:ocr"]) != predictions(rows["int4 base"])
