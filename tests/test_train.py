"""Staged AndesVL training (`andesvl_tools/train.py`): a micro AndesVL-Tiny through align -> pretrain -> sft on
`make_datasets.py --small` data of two tasks (a few CPU steps each), and the labelled-positions loss of the model.

Run: `.venv/tf4/bin/python -m pytest tests/test_train.py -q` (and the same with `.venv/tf5`).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from andesvl_tools import finetune_lora as ft
from andesvl_tools import make_datasets, train
from conftest import load_model, load_processor, packed_inputs

TASKS = "ocr,multi"


def run_argv(data, work, output, *extra: str) -> list[str]:
    return [
        "--init",
        "tiny-aimv2",
        "--micro",
        "--data",
        str(data),
        "--tasks",
        TASKS,
        "--stages",
        "align,pretrain,sft",
        "--val",
        "--max-val-examples",
        "2",
        "--max-steps",
        "2",
        "--per-device-batch-size",
        "2",
        "--save-steps",
        "2",
        "--eval-steps",
        "2",
        "--logging-steps",
        "1",
        "--learning-rate",
        "1e-2",
        "--num-threads",
        "1",
        "--work-dir",
        str(work),
        "--output",
        str(output),
        *extra,
    ]


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    """`--num-threads 1` (much faster on a busy 2-core CPU) sets torch's global thread count: restore it."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """All three stages, 2 steps each; returns (data, work-dir, output, summary)."""
    base = tmp_path_factory.mktemp("train")
    data, work, output = base / "data", base / "work", base / "AndesVL-Tiny-micro"
    make_datasets.main(["--output", str(data), "--small", "--tasks", TASKS])
    summary = train.main(run_argv(data, work, output))
    return data, work, output, summary


def test_every_stage_writes_metrics_and_a_loss_plot(run):
    _, work, output, summary = run
    assert list(summary["stages"]) == ["align", "pretrain", "sft"]
    assert json.loads((work / "args.json").read_text())["stages"] == ["align", "pretrain", "sft"]
    for stage in summary["stages"]:
        folder = work / stage / "model"
        metrics = json.loads((folder / train.METRICS_NAME).read_text())
        assert metrics["stage"] == stage and metrics["global_step"] == 2
        assert metrics["trained_modules"] == list(train.STAGES[stage].modules)
        assert [point["step"] for point in metrics["train_loss_curve"]] == [1, 2]
        assert metrics["eval_curve"] and metrics["eval_examples"] == 2 and metrics["tasks"] == TASKS.split(",")
        with Image.open(folder / train.PLOT_NAME) as plot:
            assert plot.format == "PNG" and plot.size == (720, 420)
        assert (work / stage / "checkpoints" / "checkpoint-2").is_dir()
    assert (output / train.METRICS_NAME).is_file() and (output / train.PLOT_NAME).is_file()


def test_align_trains_only_the_projector(run):
    _, work, _, _ = run
    before = load_file(str(work / "init" / "model.safetensors"))
    after = load_file(str(work / "align" / "model" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {key for key in before if key.startswith("mlp.")}
    pretrained = load_file(str(work / "pretrain" / "model" / "model.safetensors"))
    assert any(not torch.equal(after[key], pretrained[key]) for key in after if key.startswith("language_model."))
    assert any(not torch.equal(after[key], pretrained[key]) for key in after if key.startswith("vision_encoder."))


def test_final_folder_loads_and_answers(run):
    data, _, output, _ = run
    config = json.loads((output / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["auto_map"]["AutoModelForImageTextToText"]
    model, processor = load_model(output, dtype=torch.float32), load_processor(output)
    record = json.loads((data / "ocr" / "test.jsonl").read_text().splitlines()[0])
    image = str(data / "ocr" / record["messages"][0]["content"][0]["path"])
    messages = [{"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": "Read it."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(processor.decode(generated[0, inputs["input_ids"].shape[1] :]), str)


def test_resume_skips_finished_stages_and_refuses_a_fresh_run_over_checkpoints(run, capsys):
    data, work, output, summary = run
    with pytest.raises(SystemExit, match="--resume"):
        train.main(run_argv(data, work, output))
    resumed = train.main(run_argv(data, work, output, "--resume"))
    assert resumed["stages"] == summary["stages"]
    assert capsys.readouterr().out.count("done, skipped") == 3


def test_micro_and_demo_configs_have_the_requested_shapes():
    demo = train.TINY_DEMO
    assert demo["vision_config"]["hidden_size"] == 128 and demo["vision_config"]["image_size"] // 14 == 16
    assert demo["text_config"]["vocab_size"] == 151936 and demo["text_config"]["head_dim"] == 32
    assert demo["text_config"]["hidden_size"] == 80  # bfloat16 export <= 48 MB with the 16 MB of tokenizer files
    assert demo["tie_word_embeddings"] and train.MICRO["text_config"]["num_hidden_layers"] == 1


def labelled_batch(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows (one image prompt, one padded text row) with -100 labels on prompts, images and padding."""
    image_row = packed_inputs(config, [(4, 4)], seed=seed)
    ids = image_row["input_ids"][0]
    generator = torch.Generator().manual_seed(seed)
    text_row = torch.randint(0, 1000, (len(ids) - 5,), generator=generator)
    input_ids = torch.stack([ids, torch.cat([text_row, torch.zeros(5, dtype=torch.long)])])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -5:] = 0
    labels = input_ids.clone()
    labels[0, : len(ids) - 2] = -100  # only the two tokens after the image are learned
    labels[1, :3] = -100
    labels[1, -5:] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": image_row["pixel_values"],
        "image_grid_hw": image_row["image_grid_hw"],
    }


def test_labelled_positions_loss_equals_the_full_logits_loss(tiny_repos):
    """By default `forward` keeps transformers' contract ([B, S, vocab] logits, the language model's loss); the
    training tools' `labelled_logits_only=True` gives the same loss with logits at the labelled positions only."""
    model = load_model(tiny_repos["aimv2"], dtype=torch.float32)
    batch = labelled_batch(model.config)
    vocab = model.config.text_config.vocab_size
    with torch.no_grad():
        default = model(**batch)
        cheap = model(**batch, labelled_logits_only=True)
        inputs_embeds = model.get_input_embeddings()(batch["input_ids"])
        # the projector per conversation row, as forward runs it (the padded [B, T_max, 4*Dv] matmul can round
        # differently from the packed one on some CPUs, e.g. Xeon with AMX)
        tokens_per_row = (batch["input_ids"] == model.config.image_token_id).sum(-1).tolist()
        features = model.get_image_features(batch["pixel_values"], batch["image_grid_hw"], tokens_per_row)
        inputs_embeds = model.merge_image_features(batch["input_ids"], inputs_embeds, features)
        full = model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
    selected = batch["labels"][:, 1:] != -100
    assert default.logits.shape == (*batch["input_ids"].shape, vocab)
    assert torch.equal(default.logits, full.logits) and torch.equal(default.loss, full.loss)
    assert torch.allclose(cheap.loss, full.loss, atol=1e-5, rtol=0)
    assert cheap.logits.shape == (int(selected.sum()), vocab)
    assert torch.allclose(cheap.logits, full.logits[:, :-1][selected].float(), atol=1e-5)
    without_labels = model(**{key: value for key, value in batch.items() if key != "labels"})
    assert without_labels.logits.shape == (*batch["input_ids"].shape, vocab) and without_labels.loss is None


def test_the_training_collator_asks_for_labelled_logits_only():
    collator = ft.ChatCollator(pad_token_id=0)
    batch = collator([{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])}])
    assert batch["labelled_logits_only"] is True


def test_resume_continues_an_interrupted_stage_from_its_last_checkpoint(run, tmp_path):
    data, _, output, _ = run
    work, final = tmp_path / "work", tmp_path / "final"
    argv = [
        "--init",
        str(output),
        "--stage",
        "sft",
        "--data",
        str(data),
        "--tasks",
        "ocr",
        "--max-steps",
        "2",
        "--per-device-batch-size",
        "2",
        "--save-steps",
        "1",
        "--save-total-limit",
        "3",
        "--logging-steps",
        "1",
        "--num-threads",
        "1",
        "--work-dir",
        str(work),
        "--output",
        str(final),
    ]
    train.main(argv)
    shutil.rmtree(work / "sft" / "model")  # as if killed after checkpoint-1
    shutil.rmtree(work / "sft" / "checkpoints" / "checkpoint-2")
    train.main([*argv, "--resume"])
    metrics = json.loads((final / train.METRICS_NAME).read_text())
    assert metrics["resumed_from"].endswith("checkpoint-1") and metrics["global_step"] == 2
    assert [point["step"] for point in metrics["train_loss_curve"]] == [1, 2]


def test_align_with_train_modules_drop_answers_and_task_limit(run, tmp_path):
    """The AndesVL-Tiny align recipe: every module trains, yes/no answers are skipped, a task is capped."""
    data, _, _, _ = run
    work = tmp_path / "work"
    argv = [
        "--init",
        "tiny-aimv2",
        "--micro",
        "--stage",
        "align",
        "--data",
        str(data),
        "--tasks",
        TASKS,
        "--train-modules",
        "vision_encoder,mlp,language_model",
        "--drop-answers",
        "yes,no",
        "--task-limit",
        "ocr=3",
        "--max-steps",
        "1",
        "--per-device-batch-size",
        "2",
        "--num-threads",
        "1",
        "--work-dir",
        str(work),
        "--output",
        str(tmp_path / "out"),
    ]
    train.main(argv)
    metrics = json.loads((work / "align" / "model" / train.METRICS_NAME).read_text())
    assert metrics["trained_modules"] == ["vision_encoder", "mlp", "language_model"]
    assert metrics["train_examples"] == 3  # 3 ocr; every multi answer is yes/no
    before = load_file(str(work / "init" / "model.safetensors"))
    after = load_file(str(work / "align" / "model" / "model.safetensors"))
    for prefix in ("vision_encoder.", "mlp.", "language_model."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix


def test_drop_answers_and_flag_parsers():
    examples = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "q"}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
        }
        for answer in ("Yes", "red", " no ", "triangle")
    ]
    kept = train.drop_answers(examples, ["yes", "no"])
    assert [e["messages"][-1]["content"][0]["text"] for e in kept] == ["red", "triangle"]
    assert train.task_limits("ocr=1000, gui=5") == {"ocr": 1000, "gui": 5}
    assert train.module_list("mlp,language_model") == ["mlp", "language_model"]
    for parser, bad, message in (
        (train.task_limits, "ocr=0", "N >= 1"),
        (train.task_limits, "cat=3", "unknown"),
        (train.module_list, "mlp,lm_head", "unknown module"),
    ):
        with pytest.raises(Exception, match=message):
            parser(bad)


def test_a_stage_with_no_example_left_fails_with_a_clear_message(run, tmp_path):
    data, _, _, _ = run
    argv = [
        "--init",
        "tiny-aimv2",
        "--micro",
        "--stage",
        "align",
        "--data",
        str(data),
        "--tasks",
        "multi",
        "--drop-answers",
        "yes,no",
        "--num-threads",
        "1",
        "--work-dir",
        str(tmp_path / "w"),
        "--output",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit, match=r"stage align: no training example left \(tasks \['multi'\]"):
        train.main(argv)


def test_vision_records_keep_labelled_vqa_images_and_their_first_named_shape_and_colour():
    def example(images, question, answer):
        content = [{"type": "image", "path": path} for path in images] + [{"type": "text", "text": question}]
        return {
            "messages": [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
        }

    examples = [
        example(["a.png"], "what color is the shape?", "Teal"),
        example(["a.png"], "is it red?", "no"),
        example(["b.png"], "is there a circle?", "yes"),
        example(["a.png"], "what shape?", "triangle "),
        example(["c.png", "d.png"], "same shape?", "circle"),
        example(["e.png"], "what shape?", "circle"),
    ]
    records = train.vision_records(examples, "vqa")
    assert [record["image"] for record in records] == ["a.png", "e.png"]
    shapes, colors = train.IMAGE_LABELS["shape"], train.IMAGE_LABELS["color"]
    assert train.image_labels(records[0]["answers"]) == {
        "shape": shapes.index("triangle"),
        "color": colors.index("teal"),
    }
    assert train.image_labels(records[1]["answers"]) == {"shape": shapes.index("circle"), "color": train.IGNORE_INDEX}


def test_token_grid_follows_the_image_processors_resize_and_padding(tiny_repos):
    image_processor = load_processor(tiny_repos["aimv2"]).image_processor
    canvas, content = image_processor.target_size(160, 60)  # 168 x 84 canvas, 168 x 63 content 10 px down
    grid = train.TokenGrid.of(image_processor, (160, 60), torch.tensor([canvas[1] // 14, canvas[0] // 14]))
    assert (grid.rows, grid.cols, grid.offset) == (3, 6, (0, (canvas[1] - content[1]) // 2))
    assert grid.token_at(0, 0) == 0 and grid.token_at(159.9, 59.9) == grid.tokens - 1
    assert grid.token_at(-50, 500) == (grid.rows - 1) * grid.cols  # clamped, never out of the grid
    for index in range(grid.tokens):
        x1, y1, x2, y2 = grid.token_box(index)
        assert grid.token_at((x1 + x2) / 2, (y1 + y2) / 2) == index
    with pytest.raises(ValueError, match="canvas"):
        train.TokenGrid.of(image_processor, (160, 60), torch.tensor([4, 12]))


def test_sincos_position_table_codes_row_and_column_apart():
    side, width = 6, 16
    table = train.sincos_position_table(side, width)  # [side * side, width]
    grid = table.reshape(side, side, width)
    torch.testing.assert_close(grid[:, :1, : width // 2].expand(-1, side, -1), grid[..., : width // 2])  # row only
    torch.testing.assert_close(grid[:1, :, width // 2 :].expand(side, -1, -1), grid[..., width // 2 :])  # column only
    torch.testing.assert_close(grid[2, 3, [0, width // 4]], torch.tensor([math.sin(2.0), math.cos(2.0)]))
    assert len({tuple(row.tolist()) for row in table}) == side * side  # every place has its own code
    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        train.sincos_position_table(side, 6)


def test_token_positions_are_row_major_centres_per_image():
    grids = torch.tensor([[4, 6], [2, 2]])  # patches: 2 x 3 and 1 x 1 visual tokens
    positions = train.token_positions(grids, 2)
    assert positions.shape == (6 + 1, 2)
    torch.testing.assert_close(
        positions[:6], torch.tensor([[0.25, c / 6] for c in (1, 3, 5)] + [[0.75, c / 6] for c in (1, 3, 5)])
    )
    torch.testing.assert_close(positions[6], torch.tensor([0.5, 0.5]))


def test_position_head_exists_only_with_a_weight(tiny_repos):
    """Off by default (the shipped recipe's warm-up, seeded, is unchanged); on, it adds its L1 term to the loss."""
    model = load_model(tiny_repos["aimv2"])
    assert "position" not in train.VisionWarmupHeads(model).heads
    heads = train.VisionWarmupHeads(model, 1.0)
    inputs = packed_inputs(model.config, [(6, 4), (2, 2)])
    tokens = int(inputs["image_grid_hw"].prod(-1).sum()) // heads.group
    targets = {name: torch.tensor([train.IGNORE_INDEX]) for name in train.IMAGE_LABELS}
    targets |= {
        "chars": torch.full((tokens, train.CHAR_SLOTS), train.IGNORE_INDEX),
        "element": torch.full((tokens,), train.IGNORE_INDEX),
        "box": torch.full((tokens, 4), -1.0),
    }
    out = heads(inputs["pixel_values"], inputs["image_grid_hw"], **targets)
    where = train.token_positions(inputs["image_grid_hw"], 2)
    torch.testing.assert_close(out["loss"], (out["position"] - where).abs().mean())


@pytest.fixture(scope="module")
def dense_data(tmp_path_factory, tiny_repos):
    """Small ocr + gui data and its vision records and dataset."""
    data = tmp_path_factory.mktemp("dense") / "data"
    make_datasets.main(["--output", str(data), "--small", "--tasks", "ocr,gui"])
    records = {
        task: train.vision_records(train.load_task_split(data, [task], "train", 0), task) for task in ("ocr", "gui")
    }
    dataset = train.VisionTargetDataset(
        records["ocr"] + records["gui"], load_processor(tiny_repos["aimv2"]).image_processor
    )
    return data, records, dataset


def test_ocr_targets_hold_every_character_once_in_reading_order(dense_data):
    _, records, dataset = dense_data
    for index, record in enumerate(records["ocr"]):
        item, text = dataset[index], record["meta"]["text"]
        chars = item["chars"]  # [tokens, CHAR_SLOTS]
        assert chars.shape == (item["image_grid_hw"].prod() // 4, train.CHAR_SLOTS)
        held = [train.OCR_CHARS[c] for token in chars.tolist() for c in token if 0 <= c < train.NO_CHAR]
        assert sorted(held) == sorted(text)
        cols = int(item["image_grid_hw"][0, 1]) // 2
        by_column = sorted(
            (index % cols, slot, char)
            for index, token in enumerate(chars.tolist())
            for slot, char in enumerate(token)
            if 0 <= char < train.NO_CHAR
        )
        assert (
            "".join(train.OCR_CHARS[char] for _, _, char in by_column) == text
            or len(set(index // cols for index, token in enumerate(chars.tolist()) if token[0] >= 0)) > 1
        )  # one row: exact order
        empty = chars[:, 0] == train.IGNORE_INDEX
        assert (chars[empty] == train.IGNORE_INDEX).all() and not (chars[~empty] == train.IGNORE_INDEX).any()
        for name in ("shape", "color", "element"):
            assert (item[name] == train.IGNORE_INDEX).all()


def test_ocr_targets_refuse_unknown_characters_and_miscounted_centres(dense_data, tiny_repos):
    image_processor = load_processor(tiny_repos["aimv2"]).image_processor
    grid = train.TokenGrid.of(image_processor, (160, 60), torch.tensor([6, 12]))
    with pytest.raises(ValueError, match="'a-b' has 3 characters but 2 centres"):
        train.char_targets("a-b", [[10, 30], [20, 30]], grid)
    with pytest.raises(ValueError, match="character '-' is not one of the 62 OCR_CHARS"):
        train.char_targets("a-b", [[10, 30], [20, 30], [30, 30]], grid)
    with pytest.raises(ValueError, match="more than 3 characters in one visual token"):
        train.char_targets("abcd", [[10, 30]] * 4, grid)


def test_gui_targets_name_every_label_and_box_the_elements(dense_data):
    _, records, dataset = dense_data
    offset = len(records["ocr"])
    for index, record in enumerate(records["gui"]):
        item, meta = dataset[offset + index], record["meta"]
        width, height = meta["image_size"]
        named = {train.GUI_LABELS[e] for e in item["element"].tolist() if e != train.IGNORE_INDEX}
        assert named == set(meta["labels"])
        boxed = item["box"][:, 0] >= 0
        expected = {(x1 / width, y1 / height, x2 / width, y2 / height) for x1, y1, x2, y2 in meta["boxes_px"]}
        got = {tuple(round(v, 5) for v in box) for box in item["box"][boxed].tolist()}
        assert got <= {tuple(round(v, 5) for v in box) for box in expected} and len(got) == len(expected)
        assert (item["chars"] == train.IGNORE_INDEX).all()


def test_vision_warm_up_trains_only_the_encoder_and_projector(tmp_path):
    """The `vision` stage: label heads over the visual tokens of the vqa, ocr and gui images; the heads are not
    saved."""
    data, work = tmp_path / "data", tmp_path / "work"
    make_datasets.main(["--output", str(data), "--small", "--tasks", "vqa,ocr,gui"])
    train.main(
        [
            "--init",
            "tiny-aimv2",
            "--micro",
            "--stage",
            "vision",
            "--vision-tasks",
            "vqa,ocr,gui",
            "--data",
            str(data),
            "--val",
            "--max-steps",
            "2",
            "--per-device-batch-size",
            "4",
            "--eval-steps",
            "2",
            "--num-threads",
            "1",
            "--learning-rate",
            "1e-2",
            "--position-table",
            "sincos",
            "--position-loss-weight",
            "1",
            "--work-dir",
            str(work),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    metrics = json.loads((work / "vision" / "model" / train.METRICS_NAME).read_text())
    assert metrics["trained_modules"] == ["vision_encoder", "mlp"] and metrics["tasks"] == ["vqa", "ocr", "gui"]
    assert metrics["global_step"] == 2 and metrics["final_eval_loss"] > 0
    accuracy = metrics["val_accuracy"]
    errors = {"box_error", "position_error"}
    assert {"chars", "element", *errors} <= set(accuracy) <= {*train.IMAGE_LABELS, "chars", "element", *errors}
    assert all(0 <= value <= 1 for name, value in accuracy.items() if name not in errors)
    assert all(0 < accuracy[name] < 1000 for name in errors)
    before = load_file(str(work / "init" / "model.safetensors"))
    after = load_file(str(work / "vision" / "model" / "model.safetensors"))
    table = before["vision_encoder.preprocessor.pos_embed"][0]  # --position-table sincos
    torch.testing.assert_close(table, train.sincos_position_table(int(len(table) ** 0.5), table.shape[1]))
    assert before.keys() == after.keys()  # no label-head weights in the saved model
    changed = {key.split(".")[0] for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"vision_encoder", "mlp"}


def test_vision_warm_up_without_labelled_images_fails_with_a_clear_message(tmp_path):
    data = tmp_path / "data"
    make_datasets.main(["--output", str(data), "--small", "--tasks", "vqa"])
    lines = (data / "vqa" / "train.jsonl").read_text().splitlines()
    yes_no = [line for line in lines if json.loads(line)["messages"][1]["content"] in ("yes", "no")]
    (data / "vqa" / "train.jsonl").write_text("\n".join(yes_no) + "\n")
    argv = [
        "--init",
        "tiny-aimv2",
        "--micro",
        "--stage",
        "vision",
        "--vision-tasks",
        "vqa",
        "--data",
        str(data),
        "--num-threads",
        "1",
        "--work-dir",
        str(tmp_path / "w"),
        "--output",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit, match=r"stage vision: no labelled train image in \['vqa'\]"):
        train.main(argv)


def test_vision_warm_up_on_data_without_the_dense_meta_fails_with_a_clear_message(dense_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dense_data[0] / "ocr", data / "ocr")
    lines = [json.loads(line) for line in (data / "ocr" / "train.jsonl").read_text().splitlines()]
    for line in lines:
        del line["meta"]["char_centers"]
    (data / "ocr" / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = [
        "--init",
        "tiny-aimv2",
        "--micro",
        "--stage",
        "vision",
        "--vision-tasks",
        "ocr",
        "--data",
        str(data),
        "--num-threads",
        "1",
        "--work-dir",
        str(tmp_path / "w"),
        "--output",
        str(tmp_path / "o"),
    ]
    with pytest.raises(
        SystemExit,
        match=rf"{len(lines)} of {len(lines)} ocr images lack the meta \['text', "
        r"'char_centers'\] .* regenerate the data",
    ):
        train.main(argv)
