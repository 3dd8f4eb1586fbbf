"""Scenario-adapter fine-tuning (`andesvl_tools/finetune_lora.py`) on a tiny random AIMv2 repo: data validation,
assistant-only labels, the collator, and short Trainer runs (smoke/overfit, QALFT, kill + resume); CPU, a few steps.

Run: `.venv/tf4/bin/python -m pytest tests/test_finetune.py -q` (and the same with `.venv/tf5`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import TrainerCallback

from andesvl_tools import finetune_lora as ft
from conftest import IMAGE_TOKEN_ID, load_model, load_processor, packed_inputs, random_image

NAME = "smoke"
METRIC_KEYS = {
    "scenario",
    "global_step",
    "epochs",
    "train_examples",
    "eval_examples",
    "train_loss_curve",
    "final_train_loss",
    "mean_train_loss",
    "eval_curve",
    "eval",
    "qalft",
    "trainable_parameters",
    "total_parameters",
    "wall_time_s",
    "resumed_from",
    "args",
}


def conversation(index: int, image: str | None = "img/0.png") -> dict:
    user = [{"type": "text", "text": f"What is in picture {index}?"}]
    if image:
        user.insert(0, {"type": "image", "path": image})
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": f"A red square {index}."}]}


def write_jsonl(path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def write_dataset(folder, count: int, with_images: bool = True):
    """`count` conversations in folder/data.jsonl, each with its own small PNG under folder/img/ (relative paths)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        random_image(28 * (1 + index % 2), 28, seed=index).save(folder / "img" / f"{index}.png")
    records = [conversation(index, f"img/{index}.png" if with_images else None) for index in range(count)]
    write_jsonl(folder / "data.jsonl", records)
    return folder / "data.jsonl"


def run_args(repo, data, work, output, *extra: str) -> list[str]:
    """The smoke configuration: 4 steps of batch 2 over 4 training conversations, eval (2 held out) every 2 steps.

    The answers share most tokens and the learning rate is high, so it is also a tiny overfitting run.
    """
    return [
        "--model",
        str(repo),
        "--name",
        NAME,
        "--train-file",
        str(data),
        "--eval-fraction",
        "0.34",
        "--max-steps",
        "4",
        "--per-device-batch-size",
        "2",
        "--learning-rate",
        "1e-2",
        "--save-steps",
        "2",
        "--eval-steps",
        "2",
        "--logging-steps",
        "1",
        "--work-dir",
        str(work),
        "--output-dir",
        str(output),
        *extra,
    ]


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def repo(tiny_repos, tmp_path_factory):
    """A copy of the tiny AIMv2 repo (adapters get written into it)."""
    folder = tmp_path_factory.mktemp("finetune") / "AndesVL-1B-tiny"
    shutil.copytree(tiny_repos["aimv2"], folder)
    return folder


@pytest.fixture(scope="module")
def processor(repo):
    return load_processor(repo)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), 6)


@pytest.fixture
def reuse_processor(processor, monkeypatch):
    """Runs after the smoke run skip re-reading the 151k-token tokenizer (~2 s each on CPU)."""
    monkeypatch.setattr(ft, "load_processor", lambda model: processor)


@pytest.fixture(scope="module")
def smoke(repo, dataset, tmp_path_factory):
    """One uninterrupted smoke run, written into the repo as adapters/smoke: (metrics, adapter folder)."""
    work = tmp_path_factory.mktemp("smoke_work")
    output = repo / "adapters" / NAME
    return ft.main(run_args(repo, dataset, work, output)), output


# ----------------------------------------------------------------------------------------------------------------------
# Data and tokenization
# ----------------------------------------------------------------------------------------------------------------------


def labelled_spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for index, label in enumerate(labels + [-100]):
        if label != -100 and start is None:
            start = index
        elif label == -100 and start is not None:
            spans.append((start, index))
            start = None
    return spans


def test_labels_cover_exactly_the_assistant_turns_of_the_inference_prompt(processor, tmp_path):
    random_image(56, 28).save(tmp_path / "cat.png")
    record = {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {
                "role": "user",
                "content": [{"type": "image", "path": "cat.png"}, {"type": "text", "text": "What is it?"}],
            },
            {
                "role": "assistant",
                "content": "<think>Fur, whiskers.</think>\n\nA cat.",
            },  # reasoning dropped by template
            {"role": "user", "content": "And its colour?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Mostly grey."}]},
        ]
    }
    messages = ft.parse_record(json.dumps(record), tmp_path)["messages"]
    example = ft.ChatEncoder(processor)(messages)
    expected = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    assert ids == torch.as_tensor(expected["input_ids"]).flatten().tolist()
    assert torch.equal(example["pixel_values"], torch.as_tensor(expected["pixel_values"]))
    decoded = [processor.tokenizer.decode(ids[start:end]) for start, end in labelled_spans(labels)]
    assert decoded == ["A cat.<|im_end|>", "Mostly grey.<|im_end|>"]
    assert all(label in (-100, token) for label, token in zip(labels, ids))
    image_positions = [index for index, token in enumerate(ids) if token == IMAGE_TOKEN_ID]
    assert image_positions and all(labels[index] == -100 for index in image_positions)


def test_an_answer_starting_with_newlines_keeps_the_inference_ids(processor, tmp_path):
    """The header's "\n" merges with leading newlines of the answer into one token, which is labelled (it holds
    answer text); the ids still equal the chat template's."""
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nHello."}]}
    messages = ft.parse_record(json.dumps(record), tmp_path)["messages"]
    example = ft.ChatEncoder(processor)(messages)
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    assert ids == torch.as_tensor(processor.apply_chat_template(messages, tokenize=True)).flatten().tolist()
    [(start, end)] = labelled_spans(labels)
    assert processor.tokenizer.decode(ids[start:end]) == "\n\n\nHello.<|im_end|>"


def test_max_length_truncates_text_but_never_an_image(processor, tmp_path):
    random_image(28, 28).save(tmp_path / "a.png")
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "path": "a.png"}]},
            {"role": "assistant", "content": "one two three four five six seven eight"},
        ]
    }
    messages = ft.parse_record(json.dumps(record), tmp_path)["messages"]
    full = ft.ChatEncoder(processor)(messages)
    ids = full["input_ids"].tolist()
    image_end = ids.index(processor.tokenizer.convert_tokens_to_ids("</img>"))
    cut = ft.ChatEncoder(processor, max_length=len(ids) - 3)(messages)
    assert cut["input_ids"].tolist() == ids[:-3] and cut["labels"].tolist() == full["labels"].tolist()[:-3]
    with pytest.raises(ValueError, match=r"data\.jsonl:7: .* image span .* at least"):
        ft.ChatEncoder(processor, max_length=image_end)(messages, source="data.jsonl:7")
    with pytest.raises(ValueError, match=r"data\.jsonl:7: .* no assistant token"):
        ft.ChatEncoder(processor, max_length=image_end + 2)(messages, source="data.jsonl:7")


def test_collator_right_pads_and_packs_the_images_in_order(repo, processor, tmp_path):
    path = write_dataset(tmp_path, 3)
    examples = ft.load_jsonl(path)
    examples[1] = ft.load_jsonl(write_dataset(tmp_path / "text", 2, with_images=False))[1]
    encoded = [ft.ChatEncoder(processor)(example["messages"]) for example in examples]
    batch = ft.ChatCollator(processor.tokenizer.pad_token_id)(encoded)
    lengths = [len(example["input_ids"]) for example in encoded]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["attention_mask"].sum(1).tolist() == lengths
    for row, example in enumerate(encoded):
        assert torch.equal(batch["input_ids"][row, : lengths[row]], example["input_ids"])
        assert bool((batch["input_ids"][row, lengths[row] :] == processor.tokenizer.pad_token_id).all())
        assert bool((batch["labels"][row, lengths[row] :] == -100).all())
    assert torch.equal(batch["pixel_values"], torch.cat([encoded[0]["pixel_values"], encoded[2]["pixel_values"]]))
    assert torch.equal(batch["image_grid_hw"], torch.cat([encoded[0]["image_grid_hw"], encoded[2]["image_grid_hw"]]))
    assert math.isfinite(load_model(repo)(**batch).loss.item())


@pytest.mark.parametrize(
    "line, bad, message",
    [
        (3, '{"messages": [', "invalid JSON"),
        (2, json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), "unknown role 'bot'"),
        (4, json.dumps(conversation(4, "img/missing.png")), "image file not found: 'img/missing.png'"),
        (1, json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant message"),
        (
            2,
            json.dumps({"messages": [{"role": "user", "content": [{"type": "video", "path": "v.mp4"}]}]}),
            "unsupported content part",
        ),
    ],
    ids=["bad-json", "unknown-role", "missing-image", "no-assistant", "unknown-part-type"],
)
def test_a_malformed_line_is_reported_with_file_and_line_number(tmp_path, line, bad, message):
    path = write_dataset(tmp_path, 4)
    records = path.read_text().splitlines()
    records[line - 1] = bad
    write_jsonl(path, records)
    with pytest.raises(ValueError, match=rf"1 of 4 lines .*data\.jsonl.*\n  data\.jsonl line {line}: .*{message}"):
        ft.load_jsonl(path)


def test_bad_data_fails_before_the_model_is_loaded(tmp_path):
    path = tmp_path / "broken.jsonl"
    write_jsonl(path, ["{}", "not json"])
    expected = r"2 of 2 lines .*broken\.jsonl are malformed:\n  broken\.jsonl line 1: .*\n  broken\.jsonl line 2: inval"
    with pytest.raises(ValueError, match=expected):
        ft.main(
            [
                "--model",
                str(tmp_path / "no-model"),
                "--name",
                "x",
                "--train-file",
                str(path),
                "--work-dir",
                str(tmp_path / "work"),
                "--output-dir",
                str(tmp_path / "adapter"),
            ]
        )


def test_eval_fraction_split_is_seeded_and_disjoint():
    examples = [{"source": f"d.jsonl:{index}"} for index in range(20)]
    train, held_out = ft.split_examples(examples, 0.25, seed=3)
    assert len(held_out) == 5 and len(train) == 15
    assert not {e["source"] for e in train} & {e["source"] for e in held_out}
    assert ft.split_examples(examples, 0.25, seed=3) == (train, held_out) != ft.split_examples(examples, 0.25, seed=4)


# ----------------------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------------------


def test_smoke_run_learns(smoke):
    """The tiny random base ties 64-wide embeddings (std 0.02) to 152k logits, so no adapter takes the loss far below
    ln(152k) = 11.9; a working one still takes it down by several tenths and predicts most held-out answer tokens."""
    metrics = smoke[0]
    losses = [point["loss"] for point in metrics["train_loss_curve"]]
    assert losses[-1] < losses[0] - 0.5, losses
    first, last = metrics["eval_curve"][0], metrics["eval_curve"][-1]
    assert last["eval_loss"] < first["eval_loss"] and last["eval_token_accuracy"] > 0.5, metrics["eval_curve"]


def test_smoke_run_writes_a_loadable_adapter_that_changes_the_logits(smoke, repo):
    metrics, output = smoke
    assert {path.name for path in output.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        ft.ADAPTER_INFO_NAME,
        ft.METRICS_NAME,
    }
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/AndesVL-4B" and config["r"] == 16
    assert set(metrics) >= METRIC_KEYS and json.loads((output / ft.METRICS_NAME).read_text()) == metrics
    assert metrics["global_step"] == 4 and [point["step"] for point in metrics["train_loss_curve"]] == [1, 2, 3, 4]
    assert [point["step"] for point in metrics["eval_curve"]] == [2, 4]
    assert (metrics["train_examples"], metrics["eval_examples"]) == (4, 2) and metrics["qalft"] is None
    assert all(metrics["eval"][key] == value for key, value in metrics["eval_curve"][-1].items() if key != "step")
    info = json.loads((output / ft.ADAPTER_INFO_NAME).read_text())
    assert info["scenario"] == NAME and info["steps"] == 4 and info["qalft"] is None and info["lora"]["r"] == 16

    model = load_model(repo)
    inputs = packed_inputs(model.config, [(4, 4)])
    base = logits(model, inputs)
    assert NAME in model.available_adapters()
    model.load_scenario_adapter(NAME)
    assert not torch.allclose(logits(model, inputs), base, atol=1e-4)


@pytest.mark.parametrize("lm_head", [False, True], ids=["projections", "with-lm-head"])
def test_qalft_forward_uses_exactly_the_deployed_quantized_weights(repo, lm_head):
    """Every linear that `quantize_model` replaces computes with its dequantized weight under QALFT; with the LM head
    (`--qalft-lm-head`) the tied head too, while the embedding lookup keeps the float rows (as the untied deployed
    base does)."""
    model = load_model(repo)
    quantization = ft.quantization_module(model)
    spec = quantization.normalize_spec({"bits": 4, "lm_head": lm_head})
    deployed = load_model(repo)
    quantization.quantize_model(deployed, bits=4, group_size=spec["group_size"], lm_head=lm_head)
    embedding = model.get_input_embeddings().weight.detach().clone()
    names = ft.apply_qalft(model, spec, quantization)
    assert names and all(".language_model.model.layers." in f".{name}" for name in names[: len(names) - lm_head])
    assert (names[-1] == "language_model.lm_head") == lm_head
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # the lookup stays exact
    expected = {name: deployed.get_submodule(name).dequantized_weight(torch.float32) for name in names}
    checked = {}

    def check(name):
        def hook(module, args, output):
            checked[name] = torch.equal(output, F.linear(args[0], expected[name], module.bias))

        return hook

    model = ft.add_lora(model, ft.parse_args(["--model", str(repo), "--name", "q", "--train-file", "x.jsonl"]))
    for name in names:
        layer = model.get_base_model().get_submodule(name)
        getattr(layer, "base_layer", layer).register_forward_hook(check(name))  # the LM head carries no LoRA
    model.train()(**packed_inputs(model.config, [(4, 4)]))
    assert sorted(checked) == sorted(names) and all(checked.values())
    if lm_head:
        inputs = packed_inputs(model.config, [(4, 4)])
        with torch.no_grad():
            assert torch.equal(model.eval()(**inputs).logits, deployed.eval()(**inputs).logits)


def test_qalft_lm_head_flag_needs_qalft_and_refuses_token_rows(repo):
    base = ["--model", str(repo), "--name", "q", "--train-file", "x.jsonl", "--qalft-lm-head"]
    with pytest.raises(SystemExit):
        ft.parse_args(base)  # no --qalft: no bits for the head
    with pytest.raises(SystemExit):
        ft.parse_args([*base, "--qalft", "int4", "--train-answer-tokens"])
    assert ft.parse_args([*base, "--qalft", "int4"]).qalft_lm_head


@pytest.mark.parametrize("lm_head", [False, True], ids=["projections", "with-lm-head"])
def test_qalft_run_saves_a_plain_adapter_for_float_and_quantized_bases(
    smoke, repo, dataset, tmp_path, reuse_processor, lm_head
):
    output = repo / "adapters" / "qalft"
    metrics = ft.main(
        [
            *(["--qalft-lm-head"] if lm_head else []),
            "--model",
            str(repo),
            "--name",
            "qalft",
            "--train-file",
            str(dataset),
            "--qalft",
            "int4",
            "--max-steps",
            "2",
            "--per-device-batch-size",
            "2",
            "--learning-rate",
            "1e-2",
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    assert metrics["qalft"]["bits"] == 4 and metrics["qalft"]["lm_head"] == lm_head
    assert json.loads((output / ft.ADAPTER_INFO_NAME).read_text())["qalft"] == metrics["qalft"]
    assert set(adapter_tensors(output)) == set(adapter_tensors(smoke[1]))

    reference = load_model(repo)
    quantization = ft.quantization_module(reference)
    ft.apply_qalft(reference, metrics["qalft"], quantization)
    reference.load_scenario_adapter("qalft")
    quantized = load_model(repo)
    quantization.quantize_model(quantized, bits=4, group_size=metrics["qalft"]["group_size"], lm_head=lm_head)
    quantized.load_scenario_adapter("qalft")
    inputs = packed_inputs(quantized.config, [(4, 4)])
    assert torch.equal(logits(quantized, inputs), logits(reference, inputs))
    plain = load_model(repo)  # and the plain float base takes it like any other adapter
    plain.load_scenario_adapter("qalft")
    assert torch.isfinite(logits(plain, inputs)).all()


def test_answer_tokens_train_only_their_embedding_rows_tied_to_the_output(
    smoke, repo, dataset, processor, tmp_path, reuse_processor
):
    """`--train-answer-tokens` (+ `--train-projector`): the adapter holds one delta row per token of the training
    answers plus `<|im_end|>`, moves exactly those input and (tied) output rows, and switches off exactly."""
    name = "tokens"
    ft.main(
        [
            "--model",
            str(repo),
            "--name",
            name,
            "--train-file",
            str(dataset),
            "--train-projector",
            "--train-answer-tokens",
            "--max-steps",
            "2",
            "--per-device-batch-size",
            "2",
            "--learning-rate",
            "1e-1",
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    output = repo / "adapters" / name
    tokenizer = processor.tokenizer
    answers = [json.loads(line)["messages"][-1]["content"] for line in dataset.read_text().splitlines()]
    expected = {tokenizer.convert_tokens_to_ids(ft.TURN_END)}
    expected.update(token for answer in answers for token in tokenizer(answer, add_special_tokens=False)["input_ids"])
    config = json.loads((output / "adapter_config.json").read_text())
    assert sorted(config["trainable_token_indices"]) == sorted(expected)
    tensors = adapter_tensors(output)
    deltas = [key for key in tensors if key.endswith(".token_adapter.trainable_tokens_delta")]
    assert deltas == ["base_model.model.language_model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    info = json.loads((output / ft.ADAPTER_INFO_NAME).read_text())
    assert info["lora"]["trainable_tokens"] == len(expected) and info["lora"]["modules_to_save"] == ["mlp.0", "mlp.2"]

    model = load_model(repo)
    inputs = packed_inputs(model.config, [(4, 4)])
    rows = sorted(expected)
    others = torch.tensor([token for token in range(200) if token not in expected])
    base_weight = model.get_input_embeddings().weight.detach().clone()
    base = logits(model, inputs)
    reports = RecordingHandler()
    logging.getLogger("transformers.integrations.peft").addHandler(reports)
    try:
        model.load_scenario_adapter(name)
    finally:
        logging.getLogger("transformers.integrations.peft").removeHandler(reports)
    embeddings = model.get_input_embeddings()(torch.arange(base_weight.shape[0]))
    moved = (embeddings - base_weight).abs().sum(-1)
    assert (moved[rows] > 0).all() and (moved[others] == 0).all()
    hidden = torch.randn(1, 1, base_weight.shape[1])
    assert torch.allclose(model.get_output_embeddings()(hidden)[0, 0], embeddings @ hidden[0, 0], atol=1e-5)
    adapted = logits(model, inputs)
    assert not torch.allclose(adapted, base, atol=1e-4)
    model.disable_adapters()
    assert torch.equal(logits(model, inputs), base)
    model.enable_adapters()  # the projector's full copy comes back too, not only the LoRA layers
    assert torch.equal(logits(model, inputs), adapted)
    # peft cannot switch between adapters with and without token rows: a clear error names both sides, either order
    mixed = load_model(repo)
    mixed.load_scenario_adapter(name)
    mixed.load_scenario_adapter(name, adapter_name="again")  # a second adapter with token rows loads next to it
    single = load_model(repo)
    single.load_scenario_adapter(name)
    assert torch.equal(logits(mixed, inputs), logits(single, inputs))
    with pytest.raises(ValueError, match=r"token rows \(\['again', 'tokens'\]\) and adapters without them \(this"):
        mixed.load_scenario_adapter(NAME)
    mixed = load_model(repo)
    mixed.load_scenario_adapter(NAME)
    with pytest.raises(ValueError, match=r"token rows \(this one\) and adapters without them \(\[.smoke"):
        mixed.load_scenario_adapter(name)
    # transformers 5 reports the tied output rows and the wrapped base weights as MISSING ("newly initialized"); they
    # are not (the checks above), and that report is silenced, but no other
    assert not [message for message in reports.messages if "MISSING" in message], "\n".join(reports.messages)
    package = type(model).__module__.rsplit(".", 1)[0]
    report_filter = sys.modules[f"{package}.adapters_andesvl"]._SpuriousLoadReport(["ocr"])
    other = "Key | Status |\n----+----+\nlanguage_model.lm_head.weight | MISSING |"
    assert report_filter.filter(logging.makeLogRecord({"msg": other}))
    tied = "Key | Status |\n----+----+\nlanguage_model.lm_head.token_adapter.trainable_tokens_delta.x | MISSING |"
    assert not report_filter.filter(logging.makeLogRecord({"msg": tied}))
    loaded = "Key | Status |\n----+----+\nlanguage_model.model.layers.{0, 1}.mlp.up_proj.lora_B.ocr.weight | MISSING |"
    assert not report_filter.filter(logging.makeLogRecord({"msg": loaded}))  # ocr was loaded before
    assert report_filter.filter(logging.makeLogRecord({"msg": loaded.replace(".ocr.", ".gui.")}))

    wide = repo / "adapters" / "tokens-wide"  # rows of another width: a clear error before peft sees them
    shutil.copytree(output, wide)
    state = adapter_tensors(wide)
    state[deltas[0]] = torch.zeros(state[deltas[0]].shape[0], state[deltas[0]].shape[1] + 1)
    save_file(state, wide / "adapter_model.safetensors")
    try:
        with pytest.raises(ValueError, match=r"does not fit .* token rows of width \d+, this model's embeddings have"):
            load_model(repo).load_scenario_adapter("tokens-wide")
    finally:
        shutil.rmtree(wide)


def test_save_dtype_bfloat16_stores_the_rounded_adapter_that_loads_into_a_float32_model(
    repo, dataset, tmp_path, reuse_processor
):
    """`--save-dtype bfloat16`: every saved tensor (LoRA factors, projector copy, token rows) is the float32 run's
    tensor rounded to bfloat16, the file is about half the size, and it loads into a float32 model as float32."""
    common = [
        "--model",
        str(repo),
        "--train-file",
        str(dataset),
        "--train-projector",
        "--train-answer-tokens",
        "--max-steps",
        "2",
        "--per-device-batch-size",
        "2",
        "--learning-rate",
        "1e-2",
    ]
    for name, dtype in (("f32", "float32"), ("bf16", "bfloat16")):
        ft.main([*common, "--name", name, "--save-dtype", dtype, "--work-dir", str(tmp_path / name)])
    full, half = (repo / "adapters" / name for name in ("f32", "bf16"))
    full_tensors, half_tensors = adapter_tensors(full), adapter_tensors(half)
    assert set(half_tensors) == set(full_tensors)
    assert {tensor.dtype for tensor in full_tensors.values()} == {torch.float32}
    assert {tensor.dtype for tensor in half_tensors.values()} == {torch.bfloat16}
    for key, tensor in full_tensors.items():
        assert torch.equal(half_tensors[key], tensor.to(torch.bfloat16)), key
    sizes = [(folder / "adapter_model.safetensors").stat().st_size for folder in (full, half)]
    assert sizes[1] < 0.55 * sizes[0], sizes

    model = load_model(repo)
    inputs = packed_inputs(model.config, [(4, 4)])
    base = logits(model, inputs)
    model.load_scenario_adapter("bf16")
    assert {param.dtype for param in model.parameters()} == {torch.float32}
    reference = load_model(repo)
    reference.load_scenario_adapter("f32")
    adapted, expected = logits(model, inputs), logits(reference, inputs)
    assert not torch.allclose(adapted, base, atol=1e-4)
    assert torch.allclose(adapted, expected, atol=0.05 * expected.abs().max().item())
    model.disable_adapters()
    assert torch.equal(logits(model, inputs), base)


class RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class KillAfterSave(TrainerCallback):
    """Simulates a job killed right after the checkpoint of `step` was written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"simulated kill after the checkpoint of step {self.step}")


def test_resume_after_a_kill_equals_the_uninterrupted_run(smoke, repo, dataset, tmp_path, reuse_processor):
    args = run_args(repo, dataset, tmp_path / "work", tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="simulated kill"):
        ft.main(args, callbacks=(KillAfterSave(2),))
    assert (tmp_path / "work" / "checkpoint-2").is_dir() and not (tmp_path / "adapter").exists()
    with pytest.raises(ValueError, match="already holds checkpoints .*--resume"):
        ft.main(args)
    metrics = ft.main(args + ["--resume"])
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["global_step"] == 4
    assert metrics["train_loss_curve"] == smoke[0]["train_loss_curve"]
    resumed, uninterrupted = adapter_tensors(tmp_path / "adapter"), adapter_tensors(smoke[1])
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)
