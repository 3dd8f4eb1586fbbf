"""Tests of `andesvl_tools/make_datasets.py`: the four seeded offline data sets (vqa, ocr, gui, multi).

Run: `.venv/tf4/bin/python -m pytest tests/test_datasets.py -q` (and the same with `.venv/tf5`).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import easy_vqa
import numpy as np
import pytest

from andesvl_tools import finetune_lora as ft
from andesvl_tools import make_datasets as md
from conftest import ROOT, load_processor

MODULE = "andesvl_tools.make_datasets"
BOX = re.compile(r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>")
IMAGES_PER_EXAMPLE = {"vqa": 1, "ocr": 1, "gui": 1, "multi": 2}


def run_cli(output: Path, *args: str) -> str:
    command = [sys.executable, "-m", MODULE, "--output", str(output), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def records(folder: Path, task: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / task / f"{split}.jsonl").read_text().splitlines()]


def tree(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def user_text(record: dict) -> str:
    return next(part["text"] for part in record["messages"][0]["content"] if part["type"] == "text")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three `--small` CLI runs: seed 0 twice ("a", "b") and seed 1 ("c"); a's stdout is kept as a/stdout.txt."""
    base = tmp_path_factory.mktemp("datasets")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        stdout = run_cli(base / name, "--small", "--seed", str(seed))
    (base / "stdout.txt").write_text(stdout)
    return {name: base / name for name in "abc"} | {"stdout": base / "stdout.txt"}


def test_cli_writes_the_layout_and_manifest(runs):
    folder = runs["a"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seed"] == 0 and set(manifest["tasks"]) == set(md.TASKS)
    assert set(manifest["packages"]) >= {"easy-vqa", "captcha", "pillow"}
    for task in md.TASKS:
        for split in md.SPLITS:
            entry, path = manifest["tasks"][task][split], folder / task / f"{split}.jsonl"
            assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert entry["examples"] == md.SMALL_SIZES[split] == len(records(folder, task, split))
            assert entry["images"] == len(list((folder / task / "images" / split).glob("*.png"))) > 0
    assert "gui/test: 8 examples" in runs["stdout"].read_text()


def test_same_seed_gives_identical_bytes(runs):
    first, second = tree(runs["a"]), tree(runs["b"])
    assert sum(name.endswith(".png") for name in first) > 100
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_another_seed_gives_other_data(runs):
    for task in md.TASKS:
        for split in md.SPLITS:
            name = f"{task}/{split}.jsonl"
            same = (runs["a"] / name).read_bytes() == (runs["c"] / name).read_bytes()
            assert same == ((task, split) == ("vqa", "test")), (task, split)  # vqa test = the official prefix


def test_every_line_is_accepted_by_the_finetune_loader(runs):
    for task in md.TASKS:
        for split in md.SPLITS:
            examples = ft.load_jsonl(runs["a"] / task / f"{split}.jsonl")
            assert len(examples) == md.SMALL_SIZES[split]
            for example in examples:
                user, assistant = example["messages"]
                images = [part["path"] for part in user["content"] if part["type"] == "image"]
                assert len(images) == IMAGES_PER_EXAMPLE[task] and all(Path(path).is_file() for path in images)
                assert assistant["role"] == "assistant" and assistant["content"][0]["text"]


def test_conversations_encode_with_the_repo_processor(runs, tiny_repos):
    """The chat template + processor take every task's format: labels are exactly the answer plus <|im_end|>."""
    processor = load_processor(tiny_repos["aimv2"])
    encoder = ft.ChatEncoder(processor)
    for task in md.TASKS:
        example = ft.load_jsonl(runs["a"] / task / "train.jsonl")[0]
        encoded = encoder(example["messages"], example["source"])
        learned = [token for token in encoded["labels"].tolist() if token != ft.IGNORE_INDEX]
        answer = example["messages"][1]["content"][0]["text"]
        assert processor.tokenizer.decode(learned) == answer + ft.TURN_END
        assert len(encoded["image_grid_hw"]) == IMAGES_PER_EXAMPLE[task]


def test_vqa_small_test_split_is_a_prefix_of_the_official_one(runs):
    questions, answers, image_ids = easy_vqa.get_test_questions()
    for index, record in enumerate(records(runs["a"], "vqa", "test")):
        assert (user_text(record), record["messages"][1]["content"]) == (questions[index], answers[index])
        assert record["meta"]["image_id"] == image_ids[index] and record["meta"]["question_index"] == index


def test_vqa_full_test_split_equals_the_package(tmp_path):
    md.main(["--output", str(tmp_path), "--tasks", "vqa", "--vqa-train-size", "3", "--vqa-val-size", "2"])
    questions, answers, image_ids = easy_vqa.get_test_questions()
    test = records(tmp_path, "vqa", "test")
    assert len(test) == len(questions) == 9673
    assert [(user_text(r), r["messages"][1]["content"]) for r in test] == list(zip(questions, answers))
    assert {r["meta"]["image_id"] for r in test} == set(image_ids)
    paths = easy_vqa.get_test_image_paths()
    for record in test[::97]:
        copied = tmp_path / "vqa" / record["messages"][0]["content"][0]["path"]
        assert copied.read_bytes() == Path(paths[record["meta"]["image_id"]]).read_bytes()
    assert json.loads((tmp_path / "manifest.json").read_text())["vqa_official"]["test_questions"] == 9673


def test_vqa_train_and_val_are_official_train_questions_on_disjoint_images(runs):
    questions, answers, image_ids = easy_vqa.get_train_questions()
    seen = {}
    for split in ("train", "val"):
        for record in records(runs["a"], "vqa", split):
            meta = record["meta"]
            assert meta["official_split"] == "train"
            assert (user_text(record), record["messages"][1]["content"]) == (
                questions[meta["question_index"]],
                answers[meta["question_index"]],
            )
        seen[split] = {record["meta"]["image_id"] for record in records(runs["a"], "vqa", split)}
    assert not seen["train"] & seen["val"]
    selection = md.vqa_selection(0, {"train": md.ALL, "val": md.ALL, "test": 5})
    train_images, val_images = ({image_ids[i] for i in selection[split]} for split in ("train", "val"))
    assert not train_images & val_images and len(val_images) == 400 and len(train_images) == 3600
    assert sorted(selection["train"] + selection["val"]) == list(range(len(questions)))
    assert selection["test"] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "task, draw",
    [
        ("ocr", md.ocr_draw),
        ("gui", md.gui_layout),
        ("multi", lambda rng: md.multi_pair(rng, rng.choice(["color", "shape"]), rng.random() < 0.5)),
    ],
)
def test_synthetic_splits_never_share_content(task, draw):
    """Many draws per split (no rendering): the content keys (OCR text, GUI label set, image pair) are disjoint."""
    keys = {}
    for split in md.SPLITS:
        keys[split] = set()
        for index in range(400):
            spec, _ = md.draw_in_split(0, task, split, index, draw)
            keys[split].add(draw_key(task, spec))
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    assert len(keys["train"]) > 100  # many distinct contents, so disjointness is not an accident


def draw_key(task: str, spec) -> str:
    if task == "ocr":
        return spec[0]
    if task == "gui":
        return "|".join(sorted(element["label"] for element in spec["elements"]))
    return json.dumps(spec, sort_keys=True)


def test_written_splits_are_disjoint(runs):
    keys = {
        "ocr": lambda r: r["meta"]["key"],
        "gui": lambda r: "|".join(sorted(r["meta"]["labels"])),
        "multi": lambda r: json.dumps(r["meta"]["images"], sort_keys=True),
    }
    for task, key in keys.items():
        sets = [{key(r) for r in records(runs["a"], task, split)} for split in md.SPLITS]
        assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2], task


def check_gui_record(record: dict, image_dir: Path) -> None:
    from PIL import Image

    meta = record["meta"]
    width, height = meta["image_size"]
    match = BOX.fullmatch(record["messages"][1]["content"])
    assert match, record["messages"][1]["content"]
    x1, y1, x2, y2 = (int(value) for value in match.groups())
    assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
    px1, py1, px2, py2 = meta["box_px"]
    assert 0 <= px1 < px2 <= width and 0 <= py1 < py2 <= height
    for norm, pixel, extent in ((x1, px1, width), (y1, py1, height), (x2, px2, width), (y2, py2, height)):
        assert abs(norm - 1000 * pixel / extent) <= 0.5
    assert [x1, y1, x2, y2] == meta["box_norm"]
    assert f"<|obj_ref_start|>{meta['label']}<|obj_ref_end|>" in user_text(record)
    assert (meta["labels"] + [meta["title"]]).count(meta["label"]) == 1
    with Image.open(image_dir / record["messages"][0]["content"][0]["path"]) as image:
        assert image.size == (width, height)
        element = image.crop(meta["box_px"])
        assert len(element.getcolors(element.width * element.height)) > 2  # the element is drawn there, not blank


def test_gui_boxes_are_valid_and_labels_unique(runs):
    for split in md.SPLITS:
        for record in records(runs["a"], "gui", split):
            check_gui_record(record, runs["a"] / "gui")


def test_gui_meta_boxes_every_element_and_its_label_text(runs):
    """`boxes_px` holds every element's box in `labels` order (the asked one among them) and `text_boxes_px` the box
    of the label text drawn inside it: the targets of train.py's vision warm-up."""
    for record in records(runs["a"], "gui", "train"):
        meta = record["meta"]
        assert len(meta["boxes_px"]) == len(meta["text_boxes_px"]) == len(meta["labels"])
        assert meta["boxes_px"][meta["labels"].index(meta["label"])] == meta["box_px"]
        for (x1, y1, x2, y2), (tx1, ty1, tx2, ty2) in zip(meta["boxes_px"], meta["text_boxes_px"]):
            assert x1 <= tx1 < tx2 <= x2 and y1 <= ty1 < ty2 <= y2


def test_ocr_meta_places_every_character_in_reading_order(runs):
    """`char_centers` has one centre per character, inside the image, left to right, on the ink."""
    from PIL import Image

    for record in records(runs["a"], "ocr", "train"):
        meta = record["meta"]
        width, height = meta["image_size"]
        xs = [x for x, _ in meta["char_centers"]]
        assert len(meta["char_centers"]) == len(meta["text"]) and xs == sorted(xs)
        assert all(0 < x < width and 0 < y < height for x, y in meta["char_centers"])
        with Image.open(runs["a"] / "ocr" / record["messages"][0]["content"][0]["path"]) as image:
            gray = np.asarray(image.convert("L"), dtype=int)
        for x, y in meta["char_centers"]:  # some pixel near each centre is much darker than the background
            window = gray[int(y) - 6 : int(y) + 7, int(x) - 4 : int(x) + 5]
            assert window.min() < gray.max() - 60, (meta["text"], x, y)


def test_gui_layouts_fit_and_do_not_overlap():
    for index in range(300):
        spec, _ = md.draw_in_split(3, "gui", "train", index, md.gui_layout)
        boxes = [element["box"] for element in spec["elements"]]
        labels = [element["label"] for element in spec["elements"]] + [spec["title"]]
        assert len(set(labels)) == len(labels)
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            assert 0 <= x1 < x2 <= md.GUI_SIZE[0]
            assert md.STATUS_H + md.TITLE_H < y1 < y2 <= md.GUI_SIZE[1] - md.NAV_H
            for ox1, oy1, ox2, oy2 in boxes[i + 1 :]:
                assert x2 <= ox1 or ox2 <= x1 or y2 <= oy1 or oy2 <= y1


def test_ocr_answers_are_the_rendered_text(runs):
    kinds = Counter()
    for split in md.SPLITS:
        for record in records(runs["a"], "ocr", split):
            text, meta = record["messages"][1]["content"], record["meta"]
            assert text == meta["text"] and meta["key"] == text.lower()
            assert (text.isdigit() and 4 <= len(text) <= 8) or text.lower() in md.WORDS
            kinds[meta["kind"]] += 1
    assert kinds["word"] > 0 and kinds["number"] > 0


def test_multi_answers_are_balanced_and_true(runs):
    for split in md.SPLITS:
        tally = Counter()
        for record in records(runs["a"], "multi", split):
            meta, answer = record["meta"], record["messages"][1]["content"]
            first, second = meta["images"]
            same = first[meta["question_type"]] == second[meta["question_type"]]
            assert answer == ("yes" if same else "no") == meta["answer"]
            tally[meta["question_type"], answer] += 1
        assert len(tally) == 4 and len(set(tally.values())) == 1, tally


def test_size_flags_and_their_precedence():
    args = md.parse_args(["--tasks", "ocr,vqa", "--train-size", "100", "--test-size", "7", "--ocr-train-size", "5"])
    sizes = md.resolve_sizes(args)
    assert list(sizes) == ["vqa", "ocr"]
    assert sizes["ocr"] == {"train": 5, "val": md.DEFAULT_SIZES["val"], "test": 7}
    assert sizes["vqa"] == {"train": 100, "val": md.DEFAULT_SIZES["val"], "test": md.ALL}  # official test untouched
    assert md.resolve_sizes(md.parse_args(["--small"]))["vqa"]["test"] == md.SMALL_SIZES["test"]
    with pytest.raises(SystemExit):
        md.resolve_sizes(md.parse_args(["--gui-test-size", "all"]))
    with pytest.raises(SystemExit):
        md.parse_args(["--tasks", "vqa,speech"])
    with pytest.raises(ValueError, match="vqa val"):
        md.vqa_selection(0, {"train": 1, "val": 10**6, "test": 1})


def test_existing_output_needs_overwrite(tmp_path):
    md.main(["--output", str(tmp_path), "--tasks", "multi", "--small"])
    with pytest.raises(SystemExit, match="--overwrite"):
        md.main(["--output", str(tmp_path), "--tasks", "multi", "--small"])
    md.main(["--output", str(tmp_path), "--tasks", "multi", "--small", "--train-size", "4", "--overwrite"])
    assert len(records(tmp_path, "multi", "train")) == 4
    assert len(list((tmp_path / "multi" / "images" / "train").glob("*.png"))) == 8
