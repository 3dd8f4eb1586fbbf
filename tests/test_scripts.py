"""Smoke tests of the command-line scripts on tiny random repos (their answers are meaningless; their plumbing is not).

Run: `.venv/tf4/bin/python -m pytest tests/test_scripts.py -q` (and the same with `.venv/tf5`).
"""

from __future__ import annotations

import json
import shutil

import pytest

from andesvl_tools import chat
from conftest import ROOT, build_repo, load_model

DEMO_IMAGE = ROOT / "assets" / "demo_shapes.png"


def test_chat_cli_streamed_equals_plain(tiny_repo, tmp_path, capsys):
    common = ["--model", str(tiny_repo), "--image", str(DEMO_IMAGE), "--max-new-tokens", "6"]
    chat.main(common + ["--output", str(tmp_path / "plain.json"), "What is shown?"])
    chat.main(common + ["--stream", "--output", str(tmp_path / "stream.json"), "What is shown?"])
    plain = json.loads((tmp_path / "plain.json").read_text())
    streamed = json.loads((tmp_path / "stream.json").read_text())
    assert plain["answer"] == streamed["answer"]
    assert plain["answer"] in capsys.readouterr().out


def test_chat_cli_thinking_and_two_images(tiny_repo, tmp_path):
    args = [
        "--model",
        str(tiny_repo),
        "--image",
        str(DEMO_IMAGE),
        "--image",
        str(DEMO_IMAGE),
        "--thinking",
        "--max-new-tokens",
        "3",
        "--output",
        str(tmp_path / "out.json"),
        "Same picture twice?",
    ]
    chat.main(args)
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["answer"].startswith("<think>") and report["images"] == [str(DEMO_IMAGE)] * 2


def test_chat_cli_with_a_scenario_adapter(tiny_repos, tmp_path):
    from test_adapters import make_adapter

    repo = tmp_path / "AndesVL-1B-tiny"
    shutil.copytree(tiny_repos["aimv2"], repo)
    make_adapter(repo, repo / "adapters" / "ocr", rank=4, seed=3)
    common = ["--model", str(repo), "--image", str(DEMO_IMAGE), "--max-new-tokens", "4"]
    chat.main(common + ["--adapter", "ocr", "--output", str(tmp_path / "ocr.json"), "Read it."])
    assert json.loads((tmp_path / "ocr.json").read_text())["adapter"] == "ocr"
    with pytest.raises(ValueError, match=r"Unknown adapter 'gui'.*\['ocr'\]"):
        chat.main(common + ["--adapter", "gui", "Read it."])


def test_build_repo_with_weights_verifies_and_copies(tiny_repos, tmp_path):
    output = tmp_path / "AndesVL-0.6B-assembled"
    report = build_repo.build(None, "siglip2", output, weights=tiny_repos["siglip2"], link=True, seed=1)
    assert report["weights"] == ["model.safetensors"] and (output / "model.safetensors").is_symlink()
    assert report["checked_keys"] > 0
    for name in build_repo.SHARED_FILES + ("config.json", "preprocessor_config.json", "processor_config.json"):
        assert (output / name).is_file(), name


def test_build_repo_rejects_weights_of_another_encoder(tiny_repos, tmp_path):
    with pytest.raises(ValueError, match=r"\d+ missing, \d+ unexpected"):
        build_repo.build(None, "siglip2", tmp_path / "AndesVL-x", weights=tiny_repos["aimv2"], link=True, seed=0)


def test_build_repo_cli_requires_a_size(capsys):
    with pytest.raises(SystemExit):
        build_repo.parse_args(["--output", "x"])
    with pytest.raises(ValueError, match="Unknown size '3B'"):
        build_repo.official_config("3B")


def test_build_repo_tiny_head_dim_option(tmp_path):
    """`--head-dim 32` (the smallest head vLLM's CPU attention takes) builds a tiny repo that loads with that head;
    other sizes and official sizes are refused with the valid choices."""
    args = build_repo.parse_args(["--tiny", "aimv2", "--head-dim", "32", "--output", str(tmp_path / "AndesVL-1B-hd32")])
    build_repo.build(None, args.tiny, args.output, None, False, args.seed, args.head_dim)
    config = json.loads((args.output / "config.json").read_text())
    assert config["text_config"]["head_dim"] == 32
    model = load_model(args.output)
    assert model.language_model.model.layers[0].self_attn.head_dim == 32
    with pytest.raises(ValueError, match=r"Unknown tiny head_dim 24; expected one of \[16, 32\]"):
        build_repo.tiny_config("aimv2", head_dim=24)
    with pytest.raises(ValueError, match="--tiny builds only"):
        build_repo.build("0.6B", None, tmp_path / "AndesVL-0.6B", None, False, 0, head_dim=32)
    with pytest.raises(SystemExit):
        build_repo.parse_args(["--tiny", "aimv2", "--head-dim", "24", "--output", "x"])


def test_benchmark_quick_smoke(tmp_path):
    """Every section of andesvl_tools/benchmark.py runs and reports its ratios (tiny shapes; the numbers mean
    nothing)."""
    from andesvl_tools import benchmark

    output = tmp_path / "bench.json"
    benchmark.main(["--quick", "--repeats", "1", "--decode-tokens", "4", "--no-variant-rss", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["decode"]["ratio_andesvl_over_qwen3"] > 0
    assert all(report["vision"][res]["ratio_ours_over_siglip2"] > 0 for res in report["vision"] if "x" in res)
    assert report["prefill"]["prefill_seconds_per_image"] > 0
    assert report["adapters"]["switch"]["ratio_reload_over_set_adapter"] > 0
    assert report["adapters"]["mixed_batch"]["ratio_mixed_over_adapter_by_adapter_throughput"] > 0
    assert report["quant"]["int4"]["decode_weight_mb_per_token"] < report["quant"]["fp32"]["decode_weight_mb_per_token"]
    quant = report["quant"]
    assert quant["int8_kernel"]["decode_weight_mb_per_token"] < quant["bf16"]["decode_weight_mb_per_token"]
    assert all(quant[name]["prefill_s"]["median"] > 0 and quant[f"ratio_{name}_over_bf16_prefill_s"] > 0
               for name in ("int4_kernel", "int8_kernel"))  # fmt: skip
    head, no_head = quant["int4_kernel_head"], quant["int4_kernel"]  # the quantized LM head reads ~4x fewer bytes
    assert head["decode_weight_mb_per_token"] < no_head["decode_weight_mb_per_token"] / 2
    assert quant["ratio_int4_kernel_head_over_fp32_tokens_per_s"] > 0
    # int3 is smaller saved but decodes from the int4 kernel's 4-bit copy: its bytes per token are int4's, and it holds
    # both copies
    int3 = quant["int3_kernel_head"]
    assert int3["model_weight_mb"] < head["model_weight_mb"] and int3["resident_weight_mb"] > int3["model_weight_mb"]
    assert int3["decode_weight_mb_per_token"] > head["decode_weight_mb_per_token"] * 0.9
    assert report["environment"]["cpu"]["model"]


def test_benchmark_measures_each_quantized_variant_in_a_fresh_process(tmp_path):
    """The quant section's peak RSS per variant comes from a process of its own that loads the variant's saved folder
    and decodes: above that process's RSS after its imports, below the parent's peak (which holds every variant; a
    child reading ru_maxrss would inherit the parent's high-water mark over exec)."""
    from andesvl_tools import benchmark

    output = tmp_path / "bench.json"
    arguments = ["--quick", "--sections", "quant", "--quant-variants", "fp32,int4_kernel_head", "--repeats", "1"]
    benchmark.main([*arguments, "--decode-tokens", "4", "--output", str(output)])
    quant = json.loads(output.read_text())["quant"]
    for name in ("fp32", "int4_kernel_head"):
        memory = quant[name]["memory"]
        assert memory["rss_after_imports_mb"] < memory["rss_after_load_mb"] < memory["peak_rss_mb"]
        assert memory["peak_rss_mb"] < quant["peak_rss_mb"]
    assert quant["int4_kernel_head"]["memory"]["dtype"] == "torch.bfloat16"  # saved and loaded as the kernels' dtype
    assert quant["ratio_int4_kernel_head_over_fp32_peak_rss"] > 0


def test_benchmark_names_what_a_llama_cpp_tree_lacks(tmp_path):
    """`--llama-cpp DIR` (the quant section's peer, built outside CI by scripts/build_llama_cpp.sh) must be a built
    llama.cpp tree; anything else stops before any model is built, naming the missing files."""
    from andesvl_tools import benchmark

    with pytest.raises(SystemExit, match=r"missing .*convert_hf_to_gguf\.py.*llama-quantize.*llama-bench"):
        benchmark.main(
            ["--quick", "--sections", "quant", "--llama-cpp", str(tmp_path), "--output", str(tmp_path / "b")]
        )
    with pytest.raises(SystemExit):
        benchmark.main(["--quick", "--sections", "quant", "--quant-variants", "fp32,int2"])
