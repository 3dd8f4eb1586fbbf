"""The on-device line (requirements/executorch.txt): `andesvl_tools.export_executorch` and its runner, every exported
program checked against the eager model on the same CPU:
- the tiny AIMv2 and SigLIP2 repos (one canvas bucket each): the token embedding, the text decoder (prefill and
  decode steps through the static KV cache) and the vision bucket equal the eager modules within 1e-4; the 8da4w
  decoder equals the eager torchao-quantized language model within a looser bound;
- AndesVL-Tiny in the 1+N layout (one base.ptd, the base program and one small program per shipped float adapter):
  the runner's greedy answers equal `model.generate` on the demo examples of every task, base and each adapter;
- AndesVL-Tiny quantized to the scheme of its `*-qalft-int4` adapters (int4, group 16, fp16 scales), exported with
  those adapters (weights dequantized to fp32): the runner's answers equal `model.generate` on the eager quantized base;
- bucket fitting, adapter refusal and bad input get clear errors.

Export is slow (minutes per program on two cores), so CI exports once per fixture. Skipped where ExecuTorch is not
installed (the tf4 / tf5 lines); the executorch line of scripts/run_tests.sh sets ANDESVL_REQUIRE_EXECUTORCH=1 so
that a missing ExecuTorch fails instead of skipping."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from andesvl_tools.demo import load_examples, switch_adapter

if os.environ.get("ANDESVL_REQUIRE_EXECUTORCH") != "1":
    pytest.importorskip("executorch")

from andesvl_tools import export_executorch as ee
from andesvl_tools.evaluate import generate_batch, generation_config
from andesvl_tools.executorch_runner import (
    ExecutorchAndesVL,
    fit_to_bucket,
    load_manifest,
    load_program,
    nearest_bucket,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "AndesVL-Tiny"
EXAMPLES = ROOT / "assets" / "andesvl-tiny" / "examples.jsonl"
FLOAT_ADAPTERS = ("gui", "ocr")  # the *-qalft-int4 adapters are exported on their int4 base (test_qalft_...)
# The shipped QALFT adapters, by the task (and float adapter) of the demo examples, and the base they were trained for.
QALFT_ADAPTERS = {"ocr": "ocr-qalft-int4", "gui": "gui-qalft-int4"}
QALFT_SCHEME = ["--bits", "4", "--group-size", "16", "--scale-dtype", "float16"]
QALFT_BUCKET = "168x84"  # the ocr canvas; the other examples' images are fitted to it (runner and eager alike)
TOLERANCE = 1e-4
MAX_NEW_TOKENS = 24
BUCKETS = {"aimv2": "56x84", "siglip2": "64x96"}  # grid 6 x 4 at patch 14 (the tiny AIMv2) and 16 (SigLIP2)

pytestmark = pytest.mark.slow


def export_args(model: Path, output: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--output", str(output), *extra]


def load_eager(folder: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_exports(tiny_repos, tmp_path_factory) -> dict[str, Path]:
    """Each tiny random repo exported with one bucket of grid 6 x 4 (BUCKETS) and a 48-position cache."""
    exports = {}
    for vision_type, folder in tiny_repos.items():
        output = tmp_path_factory.mktemp("et") / f"{folder.name}-et"
        ee.main(
            export_args(folder, output, "--buckets", BUCKETS[vision_type], "--max-context", "48", "--adapters", "none")
        )
        exports[vision_type] = output
    return exports


@pytest.mark.parametrize("vision_type", ["aimv2", "siglip2"])
def test_tiny_programs_equal_eager(tiny_repos, tiny_exports, vision_type):
    folder, output = tiny_repos[vision_type], tiny_exports[vision_type]
    manifest = load_manifest(output)
    bucket = BUCKETS[vision_type]
    assert manifest["buckets"] == {bucket: f"vision_{bucket}"} and manifest["adapters"] == {}
    assert sorted(p.name for p in output.glob("*.pt[de]")) == ["base.ptd", "base.pte"]
    program = load_program(output, manifest)
    assert set(program.method_names) == {"token_embedding", "text_decoder", f"vision_{bucket}"}
    model = load_eager(folder)

    ids = torch.tensor([[9707, 11, 1879, 13, 151644, 872]])
    embeds = program.load_method("token_embedding").execute([ids])[0]
    eager_embeds = model.get_input_embeddings()(ids)
    assert torch.equal(embeds, eager_embeds)

    decoder = program.load_method("text_decoder")
    with torch.no_grad():
        eager = model.language_model(inputs_embeds=eager_embeds, use_cache=True)
        logits = decoder.execute([embeds, torch.arange(6)])[0]
        assert logits.shape == (1, model.config.text_config.vocab_size)
        assert (logits - eager.logits[:, -1]).abs().max() < TOLERANCE
        step = model.get_input_embeddings()(torch.tensor([[int(logits.argmax())]]))
        eager_step = model.language_model(inputs_embeds=step, past_key_values=eager.past_key_values, use_cache=True)
        step_logits = decoder.execute([step, torch.tensor([6])])[0]
        assert (step_logits - eager_step.logits[:, -1]).abs().max() < TOLERANCE
        # a second prompt restarts the cache from position 0 (nothing of the first leaks in)
        again = decoder.execute([embeds[:, :3], torch.arange(3)])[0]
        fresh = model.language_model(inputs_embeds=eager_embeds[:, :3]).logits[:, -1]
        assert (again - fresh).abs().max() < TOLERANCE

        vision = model.config.vision_config
        grid = torch.tensor([[6, 4]])  # rows x cols of the bucket's canvas
        pixels = torch.randn(24, vision.num_channels * vision.patch_size**2, generator=torch.Generator().manual_seed(0))
        features = program.load_method(f"vision_{bucket}").execute([pixels])[0]
        eager_features = model.get_image_features(pixels, grid)
        assert features.shape == eager_features.shape == (6, model.config.text_config.hidden_size)
        assert (features - eager_features).abs().max() < TOLERANCE


def test_quantized_decoder_matches_eager_quantized(tiny_repos, tmp_path):
    """8da4w: the exported decoder equals the eager torchao-quantized language model (XNNPACK's kernels vs
    torchao's reference, so a looser bound than fp32), and the base file shrinks."""
    folder = tiny_repos["aimv2"]
    output = tmp_path / "et-8da4w"
    manifest = ee.main(
        export_args(folder, output, "--buckets", "56x56,56x84", "--max-context", "32", "--adapters", "none")
        + ["--quantize", "8da4w"]
    )
    assert manifest["quantization"]["int4_grouped_layers"] > 0
    model = load_eager(folder)
    float_bytes = sum(p.numel() * 4 for p in model.language_model.parameters())
    assert manifest["sizes_bytes"]["base.ptd"] < 0.5 * float_bytes
    ee.quantize_for_device(model, 32)
    program = load_program(output, manifest)
    for bucket in ("56x56", "56x84"):  # every method loads: no two buckets' constants share a name in base.ptd
        program.load_method(f"vision_{bucket}")
    ids = torch.tensor([[9707, 11, 1879, 13]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        exported_embeds = program.load_method("token_embedding").execute([ids])[0]
        assert (exported_embeds - embeds).abs().max() < 1e-5
        eager = model.language_model(inputs_embeds=embeds).logits[:, -1]
        logits = program.load_method("text_decoder").execute([embeds, torch.arange(4)])[0]
    scale = eager.abs().max()
    assert (logits - eager).abs().max() < 0.05 * scale
    assert int(logits.argmax()) == int(eager.argmax())


@pytest.fixture(scope="module")
def tiny_checkpoint_export(tmp_path_factory) -> Path:
    """AndesVL-Tiny: base + the float adapters, one bucket per task's canvas."""
    output = tmp_path_factory.mktemp("et") / "AndesVL-Tiny-et"
    images = [
        ROOT / "assets" / "andesvl-tiny" / "images" / name for name in ("vqa_0.png", "ocr_000000.png", "gui_000000.png")
    ]
    ee.main(
        export_args(TINY, output, "--adapters", ",".join(FLOAT_ADAPTERS), "--max-context", "256", "--bucket-images")
        + [str(path) for path in images]
    )
    return output


def test_tiny_checkpoint_layout(tiny_checkpoint_export):
    output = tiny_checkpoint_export
    manifest = json.loads((output / "manifest.json").read_text())
    assert set(manifest["buckets"]) == {"84x84", "168x84", "196x364"}
    assert sorted(p.name for p in output.glob("*.pt[de]")) == ["base.ptd", "base.pte"]  # one shared weights file
    data = manifest["sizes_bytes"]["base.ptd"]
    for name in FLOAT_ADAPTERS:
        size = (output / "adapters" / f"{name}.pte").stat().st_size
        assert size == manifest["sizes_bytes"][f"adapters/{name}.pte"] < 0.05 * data  # small: LoRA + the graph
        assert manifest["base_weights_shared"][name] > 0  # reads base weights from base.ptd


def test_runner_answers_equal_generate(tiny_checkpoint_export):
    """Every task of the demo, the base and each float adapter, all from one base.ptd: the same greedy answers as
    transformers' `generate` on the eager model (fp32)."""
    from transformers import AutoProcessor

    examples = [e for e in load_examples(EXAMPLES) if e["adapter"] in (None, *FLOAT_ADAPTERS)]
    assert {e["task"] for e in examples} == {"vqa", "multi", "ocr", "gui"}
    assert {e["adapter"] for e in examples} == {None, *FLOAT_ADAPTERS}
    runner = ExecutorchAndesVL(tiny_checkpoint_export)
    model, processor = load_eager(TINY), AutoProcessor.from_pretrained(str(TINY), trust_remote_code=True)
    same = {name: name for name in (None, *FLOAT_ADAPTERS)}
    mismatches = runner_answers_vs_generate(runner, model, processor, examples, same)
    assert not mismatches, mismatches


def runner_answers_vs_generate(runner, model, processor, examples: list[dict], adapters: dict) -> list[tuple]:
    """(task, adapter, eager answer, exported answer) of every example where the runner's greedy answer differs from
    `generate` on the eager `model`; both get the images the runner bucketed (fitted where no bucket matches).
    `adapters` maps an example's adapter to the one to answer with (None: the base)."""
    config, loaded, mismatches = generation_config(model, MAX_NEW_TOKENS), set(), []
    for example in examples:
        adapter = adapters[example["adapter"]]
        images = runner.bucketed_images(example["images"])
        switch_adapter(model, adapter, loaded)
        eager = generate_batch(model, processor, [{**example, "images": images}], config)[0]
        exported = runner.chat(example["messages"], images, adapter, MAX_NEW_TOKENS)
        if exported != eager:
            mismatches.append((example["task"], adapter, eager, exported))
    return mismatches


@pytest.fixture(scope="module")
def qalft_base(tmp_path_factory) -> Path:
    """AndesVL-Tiny quantized with the scheme its *-qalft-int4 adapters were trained against (adapters/ copied)."""
    from andesvl_tools import quantize

    output = tmp_path_factory.mktemp("int4") / "AndesVL-Tiny-int4-g16"
    quantize.main(["--model", str(TINY), "--output", str(output), "--check-tokens", "1", *QALFT_SCHEME])
    return output


def test_qalft_adapters_answer_like_the_eager_quantized_base(qalft_base, tmp_path):
    """The int4 base's quantized layers exported as their fp32 dequantized weights, with both QALFT adapters
    (LoRA unmerged) and one bucket: the base decoder's logits equal the eager quantized model's, and the runner's
    greedy answers equal `generate` on it (fp32) for the base and each adapter on an example of its task."""
    from transformers import AutoProcessor

    output = tmp_path / "int4-et"
    adapters = ",".join(QALFT_ADAPTERS.values())
    manifest = ee.main(
        export_args(qalft_base, output, "--adapters", adapters, "--buckets", QALFT_BUCKET, "--max-context", "160")
    )
    source = json.loads((qalft_base / "config.json").read_text())["quantization"]
    assert manifest["quantization"]["source"] == source and source["group_size"] == 16
    assert manifest["quantization"]["linear"] == "dequantized"
    assert set(manifest["adapters"]) == set(QALFT_ADAPTERS.values())
    assert all(manifest["base_weights_shared"][name] > 0 for name in QALFT_ADAPTERS.values())
    model = load_eager(qalft_base)
    assert any(type(m).__name__ == "AndesVLQuantizedLinear" for m in model.modules())  # the eager side is int4
    runner = ExecutorchAndesVL(output)
    ids = torch.tensor([[9707, 11, 1879, 13, 151644, 872]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        eager_logits = model.language_model(inputs_embeds=embeds).logits[:, -1]
        logits = runner.method("text_decoder").execute([embeds, torch.arange(6)])[0]
    assert (logits - eager_logits).abs().max() < TOLERANCE

    firsts = {}
    for example in load_examples(EXAMPLES):
        firsts.setdefault(example["task"], example)
    examples = [firsts[task] for task in ("vqa", *QALFT_ADAPTERS)]  # the base, then each QALFT adapter's task
    processor = AutoProcessor.from_pretrained(str(qalft_base), trust_remote_code=True)
    mismatches = runner_answers_vs_generate(runner, model, processor, examples, {None: None, **QALFT_ADAPTERS})
    assert not mismatches, mismatches


def test_quantized_folder_refuses_8da4w(qalft_base, tmp_path):
    """--quantize 8da4w on an already quantized folder fails before anything is loaded or exported."""
    with pytest.raises(ValueError, match=r"already quantized .*--quantize 8da4w would requantize"):
        ee.main(export_args(qalft_base, tmp_path / "et", "--quantize", "8da4w"))
    assert not (tmp_path / "et").exists()


def test_runner_rejects_bad_requests(tiny_checkpoint_export):
    runner = ExecutorchAndesVL(tiny_checkpoint_export)
    question = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    with pytest.raises(ValueError, match="Unknown adapter 'nope'.*exported adapters"):
        runner.chat(question, adapter="nope")
    with pytest.raises(ValueError, match="--max-context 256"):
        runner.chat(question, max_new_tokens=300)


def test_image_outside_the_buckets_is_fitted(tiny_checkpoint_export):
    """A 150x50 image (canvas 168x56) has no bucket of its own: it is fitted to the nearest (in aspect ratio)
    bucket, and the eager processor given the fitted image picks that very canvas."""
    runner = ExecutorchAndesVL(tiny_checkpoint_export)
    processor = runner.processor.image_processor
    buckets = list(runner.buckets)
    image = Image.new("RGB", (150, 50), (200, 30, 30))
    assert tuple(processor.expected_canvas_size(150, 50)) == (168, 56)
    bucket = nearest_bucket((168, 56), buckets)
    assert bucket == (168, 84)
    fitted = fit_to_bucket(image, bucket, processor)
    assert tuple(processor.expected_canvas_size(*fitted.size)) == bucket
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape?"}]}]
    inputs = runner.prepare(question, [image])
    assert inputs["image_grid_hw"].tolist() == [[84 // 14, 168 // 14]]
    assert isinstance(runner.chat(question, [image], max_new_tokens=4), str)


def test_export_errors(tiny_repos, tmp_path):
    folder = tiny_repos["aimv2"]
    with pytest.raises(ValueError, match="multiples of 28"):
        ee.main(export_args(folder, tmp_path / "a", "--buckets", "50x56"))
    with pytest.raises(ValueError, match="not of the form WxH"):
        ee.main(export_args(folder, tmp_path / "b", "--buckets", "big"))
    with pytest.raises(ValueError, match="Unknown adapters"):
        ee.main(export_args(folder, tmp_path / "c", "--adapters", "missing"))
    with pytest.raises(ValueError, match="must not be the model folder"):
        ee.main(export_args(folder, folder / "et"))
    (tmp_path / "d").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        ee.main(export_args(folder, tmp_path / "d"))
    with pytest.raises(ValueError, match="multiple of 32"):
        ee.quantize_for_device(load_eager(folder), 48)


def test_token_row_adapters_are_refused(tmp_path):
    adapter = tmp_path / "rows"
    adapter.mkdir()
    config = json.loads((TINY / "adapters" / "ocr" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "trainable_token_indices": [5, 6]}))
    with pytest.raises(ValueError, match="only plain LoRA.*trainable_token_indices"):
        ee.check_exportable_adapter(adapter)
    ee.check_exportable_adapter(TINY / "adapters" / "ocr")  # the shipped one passes


def test_merge_lora_folds_the_adapter_into_plain_linears():
    """The merged model the benchmark's merged_lora section exports: no LoRA layer left, the adapter's logits (not
    the base's) up to float rounding."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    ids = torch.tensor([[9707, 11, 1879, 13, 151644, 872]])
    base, adapted = ee.load_for_export(TINY), ee.load_for_export(TINY, "ocr")
    with torch.no_grad():
        base_logits, lora_logits = (m.language_model(input_ids=ids).logits for m in (base, adapted))
        assert ee.merge_lora(adapted) == 28  # 4 layers x (q, k, v, o, gate, up, down)
        merged_logits = adapted.language_model(input_ids=ids).logits
    assert not any(isinstance(module, BaseTunerLayer) for module in adapted.modules())
    assert (merged_logits - lora_logits).abs().max() < TOLERANCE < (lora_logits - base_logits).abs().max()
    with pytest.raises(ValueError, match="No LoRA layer to merge"):
        ee.merge_lora(base)


def test_merged_adapter_program_answers_like_the_unmerged_one(tiny_checkpoint_export, tmp_path):
    """The benchmark's merged_lora comparison for one shipped adapter: the standalone merged program holds every
    weight (far larger than the adapter program over base.ptd) and gives the unmerged program's logits; quantized
    exports are left out (their adapters would be merged into another base)."""
    from andesvl_tools import executorch_benchmark as eb

    args = eb.parse_args(["--model", str(TINY), "--programs", str(tiny_checkpoint_export), "--rounds", "1"])
    args.prompt_tokens, args.new_tokens, args.threads = 16, 4, 1
    manifest, program = eb.load_base(tiny_checkpoint_export)
    export = (tiny_checkpoint_export, manifest, program.load_method("text_decoder"))
    embeds = eb.prompt_embeddings(eb.load_eager(TINY), args.prompt_tokens)
    row = eb.compare_merged(args, export, "ocr", manifest["adapters"]["ocr"], tmp_path / "ocr.pte", embeds)
    assert row["merged"]["program_bytes"] > 10 * row["unmerged"]["program_bytes"]
    assert row["max_abs_logit_difference"] < TOLERANCE and row["same_next_token"]
    assert row["merged_vs_unmerged"]["decode_tokens_per_s"] > 0
    assert eb.merge_refusal(manifest) is None
    assert "8da4w export" in eb.merge_refusal({**manifest, "quantization": {"linear": "8da4w"}})
    assert "dequantized export" in eb.merge_refusal({**manifest, "quantization": {"linear": "dequantized"}})


def test_benchmark_reports_side_by_side_ratios(tiny_repos, tiny_exports, tmp_path):
    from andesvl_tools import executorch_benchmark

    report = executorch_benchmark.main(
        ["--model", str(tiny_repos["aimv2"]), "--programs", str(tiny_exports["aimv2"]), "--rounds", "1"]
        + ["--prompt-tokens", "8", "--new-tokens", "4", "--threads", "1", "--output", str(tmp_path / "r.json")]
    )
    assert report["cpu"]["model"] and "vector_extensions" in report["cpu"]
    decoder = report["speed"]["decoder"]
    assert set(decoder) == {"eager_fp32", "executorch_fp32"}
    assert decoder["eager_fp32"]["decode_vs_eager"] == 1.0 and decoder["executorch_fp32"]["decode_tokens_per_s"] > 0
    assert set(report["speed"]["vision_ms_per_image"]) == {BUCKETS["aimv2"]}
    memory = report["speed"]["memory_mib"]
    assert set(memory) == {"eager_fp32", "executorch_fp32"}
    assert all(row["peak_rss_mib"] > 0 and row["rss_growth_mib"] > 0 for row in memory.values())
    assert json.loads((tmp_path / "r.json").read_text())["speed"]["decoder"] == decoder
    with pytest.raises(ValueError, match="must stay below 48"):
        executorch_benchmark.main(
            ["--model", str(tiny_repos["aimv2"]), "--programs", str(tiny_exports["aimv2"]), "--prompt-tokens", "60"]
        )
