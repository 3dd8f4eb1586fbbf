"""1+N scenario adapters with plain peft, on tiny random repos: the three user paths of the README.

Adapters here are initialised non-trivially (`init_lora_weights=False`: B is not zero), so every "switching changes
the output" assertion can fail. Run: `.venv/tf4/bin/python -m pytest tests/test_adapters.py -q` (and with tf5).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import ROOT, load_model, packed_inputs

HUB_ID = "org/AndesVL-tiny"
RANKS = {"ocr": 4, "gui": 8}


def make_adapter(base_folder, output, rank: int, seed: int, **lora_kwargs) -> None:
    model = load_model(base_folder)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        init_lora_weights=False,
        target_modules=model.default_lora_target_modules,
        **lora_kwargs,
    )
    get_peft_model(model, config).save_pretrained(output)
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = HUB_ID
    (output / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


@pytest.fixture(scope="module")
def adapter_repo(tiny_repos, tmp_path_factory):
    """A tiny AIMv2 repo with two scenario adapters of different ranks under adapters/."""
    repo = tmp_path_factory.mktemp("adapters") / "AndesVL-1B-tiny"
    shutil.copytree(tiny_repos["aimv2"], repo)
    for seed, (name, rank) in enumerate(RANKS.items()):
        make_adapter(repo, repo / "adapters" / name, rank, seed=seed + 1)
    return repo


@pytest.fixture(scope="module")
def inputs(adapter_repo):
    return packed_inputs(load_model(adapter_repo).config, [(4, 4)])


def logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def lora_module_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]


def test_default_targets_never_touch_the_vision_encoder_or_projector(adapter_repo):
    model = PeftModel.from_pretrained(load_model(adapter_repo), adapter_repo, subfolder="adapters/ocr")
    names = lora_module_names(model)
    assert names and all(".language_model.model.layers." in name for name in names)
    assert len(names) == 7 * model.config.text_config.num_hidden_layers


def test_integrated_api_switch_disable_enable_delete(adapter_repo, inputs):
    model = load_model(adapter_repo)
    assert model.available_adapters() == ["gui", "ocr"]
    base = logits(model, inputs)
    model.load_scenario_adapter("ocr")
    ocr = logits(model, inputs)
    model.load_scenario_adapter("gui")
    gui = logits(model, inputs)
    model.set_adapter("ocr")
    assert torch.equal(logits(model, inputs), ocr)
    model.set_adapter("gui")
    assert not torch.allclose(ocr, base, atol=1e-3) and not torch.allclose(gui, ocr, atol=1e-3)
    model.disable_adapters()
    assert torch.equal(logits(model, inputs), base)
    model.enable_adapters()
    assert torch.equal(logits(model, inputs), gui)
    model.delete_adapter("ocr")
    assert not any("ocr" in name for name, _ in model.named_parameters())
    assert any(".gui." in name for name, _ in model.named_parameters())


def test_integrated_load_adapter_from_local_subfolder_path(adapter_repo, inputs):
    model = load_model(adapter_repo)
    model.load_adapter(str(adapter_repo / "adapters" / "ocr"), adapter_name="ocr")
    reference = load_model(adapter_repo)
    reference.load_scenario_adapter("ocr")
    assert torch.equal(logits(model, inputs), logits(reference, inputs))


def test_peft_mixed_batch_equals_each_row_with_its_adapter(adapter_repo):
    model = PeftModel.from_pretrained(
        load_model(adapter_repo), adapter_repo, subfolder="adapters/ocr", adapter_name="ocr"
    )
    model.load_adapter(adapter_repo, adapter_name="gui", subfolder="adapters/gui")
    single = packed_inputs(model.config, [(4, 4)])
    batch = {
        **single,
        "input_ids": single["input_ids"].repeat(3, 1),
        "pixel_values": single["pixel_values"].repeat(3, 1),
        "image_grid_hw": single["image_grid_hw"].repeat(3, 1),
    }
    names = ["ocr", "gui", "__base__"]
    generate = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    mixed_logits = logits(model, batch, adapter_names=names)
    mixed = model.generate(**batch, adapter_names=names, **generate)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone_logits, alone = logits(model, single), model.generate(**single, **generate)
        else:
            model.set_adapter(name)
            alone_logits, alone = logits(model, single), model.generate(**single, **generate)
        torch.testing.assert_close(mixed_logits[row], alone_logits[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(mixed[row], alone[0]), name


def test_hotswap_equals_a_fresh_load(adapter_repo, inputs):
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    model = PeftModel.from_pretrained(load_model(adapter_repo), adapter_repo, subfolder="adapters/ocr")
    prepare_model_for_compiled_hotswap(model, target_rank=max(RANKS.values()))
    before = logits(model, inputs)
    hotswap_adapter(model, str(adapter_repo), adapter_name="default", subfolder="adapters/gui")
    fresh = PeftModel.from_pretrained(load_model(adapter_repo), adapter_repo, subfolder="adapters/gui")
    swapped = logits(model, inputs)
    torch.testing.assert_close(swapped, logits(fresh, inputs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(swapped, before, atol=1e-3)


def test_merge_and_unload_matches_the_unmerged_adapter(adapter_repo, inputs):
    model = PeftModel.from_pretrained(load_model(adapter_repo), adapter_repo, subfolder="adapters/gui")
    unmerged = logits(model, inputs)
    merged = model.merge_and_unload()
    assert not lora_module_names(merged)
    torch.testing.assert_close(logits(merged, inputs), unmerged, rtol=1e-4, atol=1e-4)


def test_projector_can_be_trained_through_modules_to_save(adapter_repo, inputs, tmp_path):
    make_adapter(adapter_repo, tmp_path / "proj", rank=4, seed=7, modules_to_save=["mlp.0", "mlp.2"])
    model = PeftModel.from_pretrained(load_model(adapter_repo), tmp_path / "proj", is_trainable=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("mlp.0.modules_to_save" in name for name in trainable)
    assert not any("vision_encoder" in name for name in trainable)
    assert all("lora_" in name or "modules_to_save" in name for name in trainable)


@pytest.mark.parametrize("order", [("full", "lora"), ("lora", "full")])
def test_lora_and_full_copy_of_one_module_clash_with_a_clear_error(adapter_repo, tmp_path, order):
    """peft cannot hold LoRA on the projector and a full copy of it (modules_to_save) at once: loading the second
    adapter names the modules and the way out, instead of peft's TypeError deep in injection."""
    repo = tmp_path / "AndesVL-1B-clash"
    shutil.copytree(adapter_repo, repo, symlinks=True)
    make_adapter(repo, repo / "adapters" / "full", rank=4, seed=3, modules_to_save=["mlp.0", "mlp.2"])
    model = load_model(repo)
    torch.manual_seed(4)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=r"(mlp\.[02]|.*q_proj)")
    get_peft_model(model, config).save_pretrained(repo / "adapters" / "lora")
    model = load_model(repo)
    model.load_scenario_adapter(order[0])
    with pytest.raises(ValueError, match=r"cannot be loaded next to .*: 2 modules clash, mlp\.0 .*--train-projector"):
        model.load_scenario_adapter(order[1])
    fresh = load_model(repo)  # each loads on its own
    fresh.load_scenario_adapter(order[1])


def test_an_adapter_without_a_projector_copy_runs_the_base_projector_next_to_one_with_it(
    adapter_repo, inputs, tmp_path
):
    """`proj` saves the projector in full (`--train-projector`), `gui` does not: with both loaded, each adapter, and
    a disable / enable round under each, computes exactly what it computes alone (transformers' own set_adapter
    raised "Adapter gui not found in {'proj'}")."""
    repo = tmp_path / "AndesVL-1B-proj"
    shutil.copytree(adapter_repo, repo, symlinks=True)
    model = load_model(repo)
    torch.manual_seed(5)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=model.default_lora_target_modules,
        modules_to_save=["mlp.0", "mlp.2"],
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # a projector copy that differs from the base
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(repo / "adapters" / "proj")
    alone = {}
    for name in ("proj", "gui"):
        single = load_model(repo)
        single.load_scenario_adapter(name)
        alone[name] = logits(single, inputs)
    assert not torch.allclose(alone["proj"], alone["gui"])

    model = load_model(repo)
    base = logits(model, inputs)
    model.load_scenario_adapter("proj")
    model.load_scenario_adapter("gui")
    assert torch.equal(logits(model, inputs), alone["gui"])
    model.set_adapter("proj")
    assert torch.equal(logits(model, inputs), alone["proj"])
    for name in ("gui", "proj"):
        model.set_adapter(name)
        model.disable_adapters()
        assert torch.equal(logits(model, inputs), base)
        model.enable_adapters()
        assert torch.equal(logits(model, inputs), alone[name]), name
    model.disable_adapters()
    model.set_adapter("gui")
    model.set_adapter("proj")  # switching while disabled keeps every module disabled
    assert torch.equal(logits(model, inputs), base)
    model.enable_adapters()
    assert torch.equal(logits(model, inputs), alone["proj"])
    with pytest.raises(ValueError, match=r"1 adapter\(s\) not loaded: \['chart'\]"):
        model.set_adapter("chart")


def test_unknown_adapter_lists_the_available_ones(adapter_repo):
    with pytest.raises(ValueError, match=r"Unknown adapter 'chart'.*\['gui', 'ocr'\]"):
        load_model(adapter_repo).load_scenario_adapter("chart")


@pytest.mark.parametrize("damage", ["missing", "corrupt", "other-base"])
def test_broken_adapter_gives_a_clear_error(adapter_repo, tmp_path, damage):
    repo = tmp_path / "AndesVL-1B-broken"
    shutil.copytree(adapter_repo, repo, symlinks=True)
    weights = repo / "adapters" / "ocr" / "adapter_model.safetensors"
    if damage == "missing":
        weights.unlink()
        message = "has no adapter_model.safetensors"
    elif damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:100])
        message = "not a readable safetensors file"
    else:
        from safetensors.torch import load_file, save_file

        state = load_file(weights)
        state = {k: torch.zeros(v.shape[0], v.shape[1] * 2) if ".lora_A." in k else v for k, v in state.items()}
        save_file(state, weights)
        message = r"does not fit this model .* needs"
    with pytest.raises(ValueError, match=message):
        load_model(repo).load_scenario_adapter("ocr")


def _hub_cache(adapter_repo, tmp_path) -> dict[str, str]:
    """Lay the repo out as a Hub cache entry of `org/AndesVL-tiny`; returns the env of an offline subprocess."""
    snapshot = tmp_path / "hub" / "models--org--AndesVL-tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(adapter_repo, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_hub_style_id_offline(adapter_repo, tmp_path):
    """`org/AndesVL-tiny` from the Hub cache, fully offline: the model, its adapter list, and both adapter APIs."""
    code = f"""
import torch
from conftest import load_model, packed_inputs
from peft import PeftModel
from huggingface_hub import snapshot_download
model = load_model({HUB_ID!r})
assert model.available_adapters() == ["gui", "ocr"], model.available_adapters()
inputs = packed_inputs(model.config, [(4, 4)])
model.load_scenario_adapter("ocr")
via_model = model(**inputs).logits
folder = snapshot_download({HUB_ID!r}) + "/adapters/ocr"
peft_model = PeftModel.from_pretrained(load_model({HUB_ID!r}), folder)
assert torch.equal(peft_model(**inputs).logits, via_model)
print("ok")
"""
    result = _run(code, _hub_cache(adapter_repo, tmp_path))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.xfail(
    strict=True,
    reason="peft 0.21.2 offline mode joins `subfolder` twice (save_and_load.py, "
    "load_peft_weights); online Hub ids are unaffected. Use model.load_scenario_adapter offline.",
)
def test_peft_subfolder_from_hub_id_offline(adapter_repo, tmp_path):
    code = f"""
from conftest import load_model
from peft import PeftModel
PeftModel.from_pretrained(load_model({HUB_ID!r}), {HUB_ID!r}, subfolder="adapters/ocr")
"""
    result = _run(code, _hub_cache(adapter_repo, tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.xfail(
    int(transformers.__version__.split(".")[0]) < 5,
    strict=True,
    reason="transformers 4.57's load_adapter looks up adapter_kwargs' subfolder online only "
    "(LocalEntryNotFoundError offline); 5.x resolves it from the cache. README: Offline Hub ids.",
)
def test_integrated_load_adapter_subfolder_from_hub_id_offline(adapter_repo, tmp_path):
    code = f"""
from conftest import load_model
model = load_model({HUB_ID!r})
model.load_adapter({HUB_ID!r}, adapter_name="ocr", adapter_kwargs={{"subfolder": "adapters/ocr"}})
assert "ocr" in model.peft_config
print("ok")
"""
    result = _run(code, _hub_cache(adapter_repo, tmp_path))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


SHIPPED_ROWS = (
    ("ocr", "ocr"),
    ("gui", "gui"),
    ("vqa", "__base__"),
    ("ocr", "ocr-qalft-int4"),
    ("gui", "gui-qalft-int4"),
)


def shipped_conversations(processor, rows):
    """One AndesVL-Tiny example conversation per (task, adapter) row, each row of a task a different example."""
    examples = [json.loads(line) for line in (ROOT / "assets/andesvl-tiny/examples.jsonl").read_text().splitlines()]
    seen: dict[str, int] = {}
    conversations = []
    for task, _ in rows:
        example = [e for e in examples if e["task"] == task][seen.get(task, 0)]
        seen[task] = seen.get(task, 0) + 1
        content = [
            {**part, "path": str(ROOT / "assets/andesvl-tiny" / part["path"])} if part["type"] == "image" else part
            for part in example["messages"][0]["content"]
        ]
        conversations.append([{"role": "user", "content": content}])
    return conversations


def encode_one(processor, conversation):
    return processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def test_shipped_adapters_in_a_mixed_batch_equal_each_row_alone():
    """README path (b) with all four adapters AndesVL-Tiny ships and the base in one batch: each row's greedy answer
    equals that row run alone with its adapter (before the LoRA-only adapters, `ocr` saved a projector copy and
    mixing it with `gui` failed inside peft with KeyError: 'gui')."""
    from conftest import load_processor

    repo = ROOT / "AndesVL-Tiny"
    processor = load_processor(repo)
    names = [name for _, name in SHIPPED_ROWS]
    conversations = shipped_conversations(processor, SHIPPED_ROWS)
    batch = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    adapters = [name for name in dict.fromkeys(names) if name != "__base__"]
    model = PeftModel.from_pretrained(
        load_model(repo), repo, subfolder=f"adapters/{adapters[0]}", adapter_name=adapters[0]
    )
    for name in adapters[1:]:
        model.load_adapter(repo, adapter_name=name, subfolder=f"adapters/{name}")
    generate = dict(max_new_tokens=8, do_sample=False)
    mixed = model.generate(**batch, adapter_names=names, **generate)[:, batch["input_ids"].shape[1] :]
    for row, (name, conversation) in enumerate(zip(names, conversations)):
        single = encode_one(processor, conversation)
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(**single, **generate)
        else:
            model.set_adapter(name)
            alone = model.generate(**single, **generate)
        alone = alone[0, single["input_ids"].shape[1] :]
        got = mixed[row][: len(alone)]
        assert got.tolist() == alone.tolist(), (name, processor.decode(got), processor.decode(alone))
    model.set_adapter(adapters[0])  # the PeftModel still works for a one-row generate afterwards
    model.generate(**encode_one(processor, conversations[0]), **generate)


def test_shipped_adapters_hotswap_equals_a_fresh_load():
    """README path (c) with the shipped adapters: ocr -> gui swapped in place (prepared for rank 32) answers the GUI
    example exactly as a PeftModel freshly loaded with gui."""
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    from conftest import load_processor

    repo = ROOT / "AndesVL-Tiny"
    processor = load_processor(repo)
    single = encode_one(processor, shipped_conversations(processor, [("gui", "gui")])[0])
    generate = dict(max_new_tokens=12, do_sample=False)
    model = PeftModel.from_pretrained(load_model(repo), repo, subfolder="adapters/ocr")
    prepare_model_for_compiled_hotswap(model, target_rank=32)
    as_ocr = model.generate(**single, **generate)
    hotswap_adapter(model, str(repo), adapter_name="default", subfolder="adapters/gui")
    swapped = model.generate(**single, **generate)
    fresh = PeftModel.from_pretrained(load_model(repo), repo, subfolder="adapters/gui").generate(**single, **generate)
    assert swapped.tolist() == fresh.tolist(), (processor.decode(swapped[0]), processor.decode(fresh[0]))
    assert swapped.tolist() != as_ocr.tolist()
