"""Weight-only quantization (`quantization_andesvl.py`, `andesvl_tools/quantize.py`) and QALFT's fake quantizer.

The quantized base of "1+N LoRA" must be bit-identical to what QALFT trains against, load through the Auto classes
with zero missing/unexpected keys, and take plain peft LoRA adapters. Tiny random repos from conftest; CPU only.
Run: `.venv/tf4/bin/python -m pytest tests/test_quantization.py -q` (and the same with `.venv/tf5`).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModel

from andesvl_tools import build_repo, quantize
from conftest import ROOT, load_model, packed_inputs

_spec = importlib.util.spec_from_file_location("quantization_andesvl", ROOT / "quantization_andesvl.py")
qz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qz)

GROUP = 64
# Max |logit difference| / std(float logits) on the fixed input, measured on the tiny random repos: int8 ~0.05, int4
# ~0.9, int3 ~2.0 (random 64-wide layers have no outliers to protect, so int4's 18x coarser step (127/7) shows fully).
# The bounds leave ~2x headroom; a wrong scale, group order or packing gives differences of many stds.
RELATIVE_LOGIT_TOLERANCE = {8: 0.1, 4: 1.8, 3: 3.6}


def random_weight(out_features: int, in_features: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Gaussian weights with an all-zero group and an outlier, the two edge cases of amax scaling."""
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05
    weight[0, :GROUP] = 0.0
    weight[1, 3] = 2.0
    return weight.to(dtype)


@pytest.fixture(scope="module")
def cached_model():
    """Load each folder once for the read-only tests (tests that change a model load their own)."""
    models = {}

    def load(folder):
        if folder not in models:
            models[folder] = load_model(folder)
        return models[folder]

    return load


@pytest.fixture(scope="module")
def quantize_tiny(tiny_repos, tmp_path_factory):
    """Run andesvl_tools/quantize.py once per (encoder, bits): returns (source folder, quantized folder, CLI report)."""
    runs = {}

    def run(vision_type: str, bits: int):
        if (vision_type, bits) not in runs:
            source = tiny_repos[vision_type]
            output = tmp_path_factory.mktemp("quantized") / f"{source.name}-int{bits}"
            report = quantize.main(["--model", str(source), "--output", str(output), "--bits", str(bits)])
            runs[vision_type, bits] = source, output, report
        return runs[vision_type, bits]

    return run


def quantized_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if hasattr(module, "qweight")]


# ----------------------------------------------------------------------------------------------------------------------
# The quantizer
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_error_is_at_most_half_a_step(bits, scale_dtype):
    weight = random_weight(48, 256)
    codes, scales = qz.quantize_weight(weight, bits, GROUP, scale_dtype)
    assert codes.dtype == torch.int8 and codes.shape == (48, 256)
    assert scales.dtype == getattr(torch, scale_dtype) and scales.shape == (48, 256 // GROUP)
    qmax = 2 ** (bits - 1) - 1
    assert int(codes.min()) >= -qmax - 1 and int(codes.max()) <= qmax and int(codes.abs().max()) == qmax
    step = scales.float().repeat_interleave(GROUP, dim=1)  # [out, in]
    error = (weight - qz.dequantize_weight(codes, scales, GROUP)).abs()
    assert bool((error <= step / 2 * (1 + 1e-6)).all())
    assert bool((codes[0, :GROUP] == 0).all()) and bool(torch.isfinite(scales).all())  # the all-zero group


def test_int4_pack_unpack_is_exact_and_takes_half_a_byte_per_weight():
    codes = torch.randint(-8, 8, (6, 40), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = qz.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 20)
    assert torch.equal(qz.unpack_int4(packed), codes)
    assert qz.pack_int4(torch.tensor([[-1, 7, -8, 0]], dtype=torch.int8)).tolist() == [[0x7F, 0x08]]
    layer = qz.AndesVLQuantizedLinear.from_linear(nn.Linear(128, 16, bias=False), bits=4, group_size=GROUP)
    assert layer.qweight.nbytes == 128 * 16 // 2 and layer.scales.nbytes == 16 * 2 * 2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sub_byte_codes_pack_into_a_bit_stream_of_bits_per_weight(bits):
    """int2 / int3 / int4 codes packed per row as a little-endian bit stream: exact round trip, `bits` bits per
    weight on disk, and for int4 exactly `pack_int4`'s nibble layout (the stream's 4-bit case)."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    codes = torch.randint(low, high, (6, 40), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    packed = qz.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 40 * bits // 8)
    assert torch.equal(qz.unpack_codes(packed, bits), codes)
    if bits == 4:
        assert torch.equal(packed, qz.pack_int4(codes))
    if bits == 3:  # codes 0, 1, 2 .. in stream order: 0b000, 0b001, 0b010, 0b011, 0b100 (-4), 0b101 (-3), ...
        ramp = torch.tensor([[0, 1, 2, 3, -4, -3, -2, -1]], dtype=torch.int8)
        assert qz.pack_codes(ramp, 3).tolist() == [[0b10001000, 0b11000110, 0b11111010]]
    layer = qz.AndesVLQuantizedLinear.from_linear(nn.Linear(128, 16, bias=False), bits=bits, group_size=GROUP)
    assert layer.qweight.nbytes == 128 * 16 * bits // 8
    with pytest.raises(ValueError, match=rf"int{bits} packing needs in_features to be a multiple of"):
        qz.AndesVLQuantizedLinear(126 if bits != 4 else 125, 4, bits=bits, group_size=qz.PER_ROW)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantize_forward_is_exactly_the_dequantized_weight(bits, dtype):
    weight = random_weight(32, 128, dtype=dtype)
    expected = qz.dequantize_weight(*qz.quantize_weight(weight, bits, GROUP), GROUP, dtype)
    fake = qz.fake_quantize(weight, bits, GROUP)
    assert fake.dtype == dtype and torch.equal(fake, expected)
    layer = qz.AndesVLQuantizedLinear.from_linear(_linear_with(weight), bits, GROUP)
    # inputs that need gradients, as in training (decode-sized bf16 inputs without them take the kernel, whose
    # dequantized weight is checked against fake_quantize below)
    inputs = torch.randn(3, 128).to(dtype).requires_grad_(True)
    assert torch.equal(layer(inputs), F.linear(inputs, fake))  # deployed forward == QALFT forward


def _linear_with(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(weight.dtype)
    linear.weight.data.copy_(weight)
    return linear


def test_fake_quantize_passes_gradients_straight_through():
    weight = random_weight(16, 128).requires_grad_()
    inputs = torch.randn(5, 128, requires_grad=True)
    upstream = torch.randn(16, 128)
    qz.fake_quantize(weight, 4, GROUP).backward(upstream)
    assert torch.equal(weight.grad, upstream)  # STE: d fake_quantize(w) / dw = identity

    weight.grad = None
    grad_output = torch.randn(5, 16)
    F.linear(inputs, qz.fake_quantize(weight, 4, GROUP)).backward(grad_output)
    reference_inputs = inputs.detach().clone().requires_grad_()
    fake = qz.fake_quantize(weight.detach(), 4, GROUP)
    F.linear(reference_inputs, fake).backward(grad_output)
    assert torch.equal(inputs.grad, reference_inputs.grad)  # the input sees the fake-quantized weight
    assert torch.equal(weight.grad, grad_output.T @ inputs.detach())  # and w gets what the fake weight got


def test_bad_specs_raise_clear_errors(tiny_repos, cached_model):
    weight = random_weight(8, 128)
    with pytest.raises(ValueError, match=r"bits=5 is not supported"):
        qz.quantize_weight(weight, 5, GROUP)
    with pytest.raises(ValueError, match=r"group_size=48 .*in_features=128"):
        qz.quantize_weight(weight, 4, 48)
    with pytest.raises(ValueError, match=r"Unknown quantization keys \['bit'\]"):
        qz.normalize_spec({"bit": 4})
    with pytest.raises(ValueError, match=r"scale_dtype='float8'"):
        qz.normalize_spec({"scale_dtype": "float8"})
    model = cached_model(tiny_repos["aimv2"])  # both errors are raised before anything is replaced
    with pytest.raises(ValueError, match=r"matches none of the model's \d+ nn.Linear modules"):
        qz.quantize_model(model, modules_regex=r"vision_tower\..*")
    with pytest.raises(ValueError, match=r"group_size=48 does not divide in_features of 14 of the 14 selected"):
        qz.quantize_model(model, group_size=48)
    with pytest.raises(ValueError, match=r"amax/7.5"):
        quantize.resolve_backend("torchao")


# ----------------------------------------------------------------------------------------------------------------------
# andesvl_tools/quantize.py on tiny repos
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(
    scope="module", params=[("aimv2", 4), ("aimv2", 8), ("siglip2", 4), ("aimv2", 3)], ids=lambda p: f"{p[0]}-int{p[1]}"
)
def quantized(request, quantize_tiny):
    """(source folder, quantized folder, CLI report) for one encoder and bit width."""
    return quantize_tiny(*request.param)


def test_cli_writes_a_complete_folder_that_loads_cleanly_and_generates(quantized):
    source, output, report = quantized
    for path in source.iterdir():
        if not quantize.is_weight_file(path):
            assert (output / path.name).exists(), path.name
    config = json.loads((output / "config.json").read_text())
    assert config["quantization"] == {
        "bits": report["bits"],
        "group_size": GROUP,
        "modules": qz.DEFAULT_MODULES,
        "scale_dtype": "bfloat16",  # the default: the CPU kernels' scales
        "lm_head": False,
    }
    assert config["torch_dtype"] == config["dtype"] == report["compute_dtype"] == "bfloat16"
    assert json.loads((output / quantize.REPORT_NAME).read_text())["check"] == report["check"]

    model, info = AutoModel.from_pretrained(output, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    assert len(quantized_names(model)) == report["quantized_modules"] == 14  # 2 layers x 7 projections
    inputs = packed_inputs(model.config, [(4, 4)])
    generated = model.eval().generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    assert len(report["check"]["greedy_tokens_quantized"]) == 4


def test_quantized_logits_stay_close_to_the_float_model(quantized, cached_model):
    source, output, report = quantized
    float_model, quantized_model = cached_model(source), cached_model(output)
    inputs = packed_inputs(float_model.config, [(4, 4), (2, 6)], seed=1)
    with torch.no_grad():
        expected, actual = float_model(**inputs).logits, quantized_model(**inputs).logits
    relative = (actual - expected).abs().max() / expected.std()
    assert 0 < relative < RELATIVE_LOGIT_TOLERANCE[report["bits"]]
    assert 0 < report["check"]["relative_logit_diff"] < RELATIVE_LOGIT_TOLERANCE[report["bits"]]


def test_fake_quantize_equals_the_saved_model_bit_for_bit(quantized, cached_model):
    source, output, report = quantized
    float_model, quantized_model = cached_model(source), cached_model(output)
    for name in quantized_names(quantized_model):
        weight = float_model.get_submodule(name).weight
        fake = qz.fake_quantize(weight, report["bits"], GROUP, "bfloat16")
        assert torch.equal(quantized_model.get_submodule(name).dequantized_weight(torch.float32), fake), name


def test_bits_per_weight_and_sizes_count_the_scales(quantized):
    _, output, report = quantized
    assert report["bits_per_weight_quantized_modules"] == report["bits"] + 16 / GROUP  # int4 g64 bf16 -> 4.25
    assert report["model_bytes_before"] - report["model_bytes_after"] == (
        report["quantized_modules_bytes_before"] - report["quantized_modules_bytes_after"]
    )
    assert report["quantized_modules_bytes_after"] * 8 == report["quantized_weights"] * (report["bits"] + 16 / GROUP)
    assert report["weights_on_disk_after"] < report["weights_on_disk_before"]
    assert abs(report["saved_model_bytes"] - report["weights_on_disk_after"]) < 2**16  # safetensors header
    assert report["bits_per_weight_saved_model"] == 8 * report["saved_model_bytes"] / (
        report["model_bytes_before"] / 4  # the tiny source is fp32
    )
    assert report["backend"] == "torch"


def test_vision_tower_projector_and_lm_head_stay_float(quantized, cached_model):
    _, output, _ = quantized
    model = cached_model(output)
    names = quantized_names(model)
    assert names and all(name.startswith("language_model.model.layers.") for name in names)
    for name, module in model.named_modules():
        if name.startswith(("vision_encoder", "mlp")) and isinstance(module, nn.Linear):
            assert not hasattr(module, "qweight") and module.weight.is_floating_point(), name
    lm_head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert type(lm_head) is nn.Linear and lm_head.weight is embed.weight  # still tied
    assert model.default_lora_target_modules == qz.DEFAULT_MODULES  # the quantized layers are the LoRA targets


def test_meta_build_of_a_quantized_config_matches_the_checkpoint(quantized):
    _, output, _ = quantized  # build_repo's key/shape check builds the model from config.json on the meta device
    assert build_repo.verify_checkpoint(output, output)["checked_keys"]


# ----------------------------------------------------------------------------------------------------------------------
# The quantized base in use: dtype moves, bf16 save/load, plain peft LoRA
# ----------------------------------------------------------------------------------------------------------------------


def test_bf16_model_quantized_saved_and_reloaded_matches_fake_quantize(tiny_repos, tmp_path):
    model = load_model(tiny_repos["siglip2"], dtype=torch.bfloat16)
    selected = qz.select_linear_modules(model, qz.DEFAULT_MODULES)
    weights = {name: linear.weight.detach().clone() for name, linear in selected}
    quantize.quantization_module(model).quantize_model(model, bits=4, scale_dtype="float16")
    model.save_pretrained(tmp_path)
    quantize.copy_non_weight_files(tiny_repos["siglip2"], tmp_path)
    quantize.write_config(tiny_repos["siglip2"], tmp_path, model.config.quantization)
    reloaded = load_model(tmp_path, dtype=torch.bfloat16)
    for name, weight in weights.items():
        layer = reloaded.get_submodule(name)
        assert layer.scales.dtype == torch.float16  # not cast to the model dtype on load
        fake = qz.fake_quantize(weight, 4, GROUP, "float16")
        assert torch.equal(layer.dequantized_weight(torch.bfloat16), fake), name
        inputs = torch.randn(2, layer.in_features, dtype=torch.bfloat16)
        assert torch.equal(layer(inputs), F.linear(inputs, fake)), name


def test_dtype_moves_keep_codes_and_scales(quantize_tiny):
    _, output, _ = quantize_tiny("aimv2", 4)
    model = load_model(output)
    layer = model.get_submodule(quantized_names(model)[0])
    qweight, scales = layer.qweight.clone(), layer.scales.clone()
    model.to(torch.float16)  # a bfloat16 -> float16 cast would round the scales
    assert torch.equal(layer.qweight, qweight) and torch.equal(layer.scales, scales)
    assert layer.scales.dtype == torch.bfloat16 and model.dtype == torch.float16
    assert layer.compute_dtype == torch.float16
    assert not isinstance(layer, nn.Linear) and not hasattr(layer, "weight")  # no float weight, no stand-in for one
    inputs = torch.randn(2, layer.in_features, dtype=torch.float16)
    assert torch.equal(layer(inputs), F.linear(inputs, layer.dequantized_weight(torch.float16)))


def test_plain_peft_lora_on_the_quantized_base(quantize_tiny, tmp_path):
    _, output, _ = quantize_tiny("aimv2", 4)  # int8 layers are the same class; only the code unpacking differs
    model = load_model(output, dtype=torch.float32)  # fp32 compute: exact comparisons (bf16 decoding: see below)
    inputs = packed_inputs(model.config, [(4, 4)])
    with torch.no_grad():
        base = model(**inputs).logits
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=qz.DEFAULT_MODULES, init_lora_weights=False)
    with pytest.raises(ValueError, match="AndesVLQuantizedLinear.* is not supported"):  # peft alone has no LoRA layer
        get_peft_model(copy.deepcopy(model), LoraConfig(**config.to_dict()))
    peft_model = get_peft_model(model, model.register_lora_layers(config))  # peft's custom-module route
    lora_layers = [module for module in peft_model.modules() if hasattr(module, "lora_A")]
    assert len(lora_layers) == 14
    assert all(type(layer.base_layer).__name__ == "AndesVLQuantizedLinear" for layer in lora_layers)
    assert all(layer.lora_A["default"].weight.dtype == torch.float32 for layer in lora_layers)
    with torch.no_grad():
        adapted = peft_model(**inputs).logits
        assert not torch.allclose(adapted, base)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(**inputs).logits, base)

    peft_model.train()
    peft_model(**inputs).logits.float().pow(2).mean().backward()
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable.values())
    assert all(p.grad is None for name, p in peft_model.named_parameters() if "lora_" not in name)

    peft_model.eval()
    with pytest.raises(NotImplementedError, match=r"Merging a LoRA adapter into the quantized base .* not supported"):
        peft_model.merge_adapter()
    with pytest.raises(NotImplementedError, match=r"Merging a LoRA adapter into the quantized base"):
        peft_model.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(peft_model(**inputs).logits, adapted)  # the failed merge changed nothing

    peft_model.save_pretrained(tmp_path / "adapters" / "qa")
    with torch.no_grad():
        base = load_model(output, dtype=torch.float32)
        saved = base.register_lora_layers(LoraConfig.from_pretrained(tmp_path, subfolder="adapters/qa"))
        wrapped = PeftModel.from_pretrained(base, tmp_path, subfolder="adapters/qa", config=saved)
        assert torch.equal(wrapped(**inputs).logits, adapted)
        integrated = load_model(output, dtype=torch.float32)
        integrated.load_adapter(str(tmp_path / "adapters" / "qa"), adapter_name="qa")
        integrated.set_adapter("qa")
        assert torch.equal(integrated(**inputs).logits, adapted)
        # a repo folder plus subfolder (which transformers 4.57 ignores for local folders) goes through the same route
        integrated.load_adapter(str(tmp_path), adapter_name="again", adapter_kwargs={"subfolder": "adapters/qa"})
        integrated.set_adapter("again")
        assert torch.equal(integrated(**inputs).logits, adapted)
        # transformers' add_adapter (training a new adapter on the quantized base) registers the LoRA layer too
        integrated.add_adapter(LoraConfig(r=2, target_modules=qz.DEFAULT_MODULES), adapter_name="new")
        assert sorted(integrated.peft_config) == ["again", "new", "qa"]


def test_config_field_round_trips(quantized):
    _, output, report = quantized
    config = AutoConfig.from_pretrained(output, trust_remote_code=True)
    assert config.quantization["bits"] == report["bits"]
    assert config.to_dict()["quantization"] == config.quantization
    assert type(config)(**config.to_dict()).quantization == config.quantization


def test_group_size_defaults_to_one_that_divides_the_model_and_a_bad_one_names_the_valid_sizes(tmp_path, capsys):
    """README's `quantize.py --bits 4` on AndesVL-Tiny (widths 80, 128, 384): 64 does not divide 80, so the default
    falls to 16 and says so; an explicit 64 fails naming the sizes that would work."""
    output = tmp_path / "int4"
    report = quantize.main(
        ["--model", str(ROOT / "AndesVL-Tiny"), "--output", str(output), "--bits", "4", "--check-tokens", "1"]
    )
    assert report["group_size"] == 16
    assert "group size 16" in capsys.readouterr().out
    with pytest.raises((ValueError, SystemExit)) as error:
        quantize.main(
            [
                "--model",
                str(ROOT / "AndesVL-Tiny"),
                "--output",
                str(tmp_path / "bad"),
                "--bits",
                "4",
                "--group-size",
                "64",
                "--check-tokens",
                "1",
            ]
        )
    assert "sizes that do: [16, 8, 4, 2, 1]" in str(error.value) + capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------------------------------
# The packed int4 CPU kernel (torch's _weight_int4pack_mm_for_cpu): bf16 scales, bf16 activations, decode-sized inputs
# ----------------------------------------------------------------------------------------------------------------------


def int4_layer(group_size: int, seed: int = 0, bias: bool = True, bits: int = 4) -> nn.Module:
    linear = nn.Linear(256, 96, bias=bias)
    linear.weight.data = random_weight(96, 256, seed)
    layer = qz.AndesVLQuantizedLinear.from_linear(linear, bits, group_size, "bfloat16")
    return layer.to(torch.bfloat16).eval()  # a bf16 compute dtype (the bias); the scales keep their dtype


@pytest.mark.parametrize("block_rows", [None, 64], ids=["one-block", "64-row-blocks"])
@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (4, 128), (3, 64), (3, 128), (2, 128)])
def test_the_int4_kernel_dequantizes_exactly_what_the_quantizer_and_qalft_produce(
    bits, group_size, block_rows, monkeypatch
):
    """The kernel applied to the identity returns its dequantized weight: bit for bit the layer's own
    `dequantized_weight(bf16)` and QALFT's `fake_quantize` of the float weight in bf16 (int2 / int3 codes run on
    the int4 kernel too), whether its layout is packed at once or in blocks of 64-row tiles (`block_rows`: the 96
    rows as 64 + 32, as the LM head's 151,936 rows are packed)."""
    if block_rows:
        monkeypatch.setattr(qz, "QUANTIZE_BLOCK_ELEMENTS", block_rows * 256)
    layer = int4_layer(group_size, bias=False, bits=bits)
    identity = torch.eye(layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not layer.uses_int4_kernel(identity)  # 256 rows: the dequantized path
        packed, scales_and_zeros = layer._int4_kernel_weights()
        kernel_weight = torch.ops.aten._weight_int4pack_mm_for_cpu(identity, packed, group_size, scales_and_zeros).t()
    assert torch.equal(kernel_weight, layer.dequantized_weight(torch.bfloat16))
    fake = qz.fake_quantize(random_weight(96, 256), bits, group_size, "bfloat16")
    assert torch.equal(kernel_weight, fake.bfloat16())
    assert int(layer.codes().min()) >= -(2 ** (bits - 1)) and int(layer.codes().max()) <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("amx", [False, True], ids=["no-amx", "amx"])
def test_decode_rows_take_the_kernel_and_agree_with_the_dequantized_path(amx, monkeypatch):
    """Up to `kernel_max_rows` rows (4; 32 on a CPU with AMX tiles, where the other path multiplies in bf16)."""
    monkeypatch.setattr(qz, "cpu_has_amx_tiles", lambda: amx)
    assert qz.kernel_max_rows(4) == (qz.AMX_INT4_KERNEL_MAX_ROWS if amx else qz.INT4_KERNEL_MAX_ROWS)
    layer = int4_layer(64)
    limit = qz.kernel_max_rows(4)
    for rows, expect_kernel in ((1, True), (limit, True), (limit + 1, False)):
        x = torch.randn(1, rows, 256, generator=torch.Generator().manual_seed(rows)).bfloat16()
        with torch.no_grad():
            assert layer.uses_int4_kernel(x) == expect_kernel and layer.prefills_blockwise(x) == (not expect_kernel)
            got = layer(x)
            reference = F.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias.float())
        assert got.shape == (1, rows, 96) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), reference, rtol=2e-2, atol=2e-2)
    fp16_scales = qz.AndesVLQuantizedLinear.from_linear(nn.Linear(256, 96), 4, 64, "float16")
    assert not fp16_scales.uses_int4_kernel(torch.randn(1, 256).bfloat16())  # the kernel would round the scales


def test_the_kernel_layout_follows_reloaded_weights_and_inputs_that_need_gradients_fall_back():
    layer, other = int4_layer(64, seed=0), int4_layer(64, seed=1)
    x = torch.randn(1, 256).bfloat16()
    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict(other.state_dict())  # in-place copies: the cached kernel layout must be rebuilt
        assert torch.equal(layer(x), other(x)) and not torch.equal(layer(x), before)
    x.requires_grad_(True)
    assert not layer.uses_int4_kernel(x)  # QALFT / LoRA training through the base: the differentiable path
    layer(x).float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def assert_kernel_decodes_like_the_dequantized_path(folder, kernel_check: str) -> list[nn.Module]:
    """`folder` loaded in bf16 with a peft LoRA on top: decode steps take the kernel that `kernel_check` (the layer's
    `uses_int4_kernel` / `uses_int8_kernel`) selects, the prefill does not, and the greedy tokens equal those of the
    dequantized path. Returns the quantized layers."""
    model = load_model(folder, dtype=torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=model.default_lora_target_modules, init_lora_weights=False)
    model = get_peft_model(model, model.register_lora_layers(config)).eval()
    layers = [module for module in model.modules() if type(module).__name__ == "AndesVLQuantizedLinear"]
    assert layers
    calls = []
    for layer in layers:
        original = getattr(layer, kernel_check)
        setattr(layer, kernel_check, lambda x, original=original: calls.append(original(x)) or calls[-1])
    # a prompt longer than any kernel takes (on every CPU), so that the prefill is the dequantized path
    inputs = packed_inputs(model.config, [(4, 4)], text=tuple(range(1000, 1000 + qz.AMX_INT4_KERNEL_MAX_ROWS)))
    with torch.no_grad():
        fast = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert any(calls) and not all(calls)  # decode steps on the kernel, the prefill dequantized
        for layer in layers:
            setattr(layer, kernel_check, lambda x: False)
        slow = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert fast.tolist() == slow.tolist()
    return layers


@pytest.mark.parametrize("bits", [4, 3])
def test_a_bf16_scale_int4_folder_decodes_through_the_kernel_with_a_lora_adapter(bits, tiny_repos, tmp_path):
    """From the CLI to generate: `--scale-dtype bfloat16`, loaded in bf16, a peft LoRA on top; decode steps take the
    kernel (prefill does not), and the greedy tokens equal those of the dequantized path. int3 (3.25 bits per weight
    on disk at group 64) decodes on the same int4 kernel."""
    output = tmp_path / f"int{bits}-bf16"
    quantize.main(
        [
            "--model",
            str(tiny_repos["aimv2"]),
            "--output",
            str(output),
            "--bits",
            str(bits),
            "--scale-dtype",
            "bfloat16",
            "--group-size",
            "64",
        ]
    )
    assert_kernel_decodes_like_the_dequantized_path(output, "uses_int4_kernel")


# ----------------------------------------------------------------------------------------------------------------------
# The int8 CPU kernel (torch's _weight_int8pack_mm): one bf16 scale per output row (group_size -1), bf16 activations
# ----------------------------------------------------------------------------------------------------------------------


def int8_row_layer(seed: int = 0, bias: bool = True) -> nn.Module:
    linear = nn.Linear(256, 96, bias=bias)
    linear.weight.data = random_weight(96, 256, seed)
    layer = qz.AndesVLQuantizedLinear.from_linear(linear, 8, qz.PER_ROW, "bfloat16")
    return layer.to(torch.bfloat16).eval()


def test_per_row_int8_has_one_scale_per_row_and_the_kernel_dequantizes_exactly_what_qalft_produces():
    layer = int8_row_layer(bias=False)
    assert layer.scales.shape == (96, 1) and layer.qweight.dtype == torch.int8
    identity = torch.eye(layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not layer.uses_int8_kernel(identity)  # 256 rows: the dequantized path
        kernel_weight = torch.ops.aten._weight_int8pack_mm(identity, layer.qweight, layer.scales.reshape(-1)).t()
    assert torch.equal(kernel_weight, layer.dequantized_weight(torch.bfloat16))
    fake = qz.fake_quantize(random_weight(96, 256), 8, qz.PER_ROW, "bfloat16")
    assert torch.equal(kernel_weight, fake.bfloat16())
    # per row = one group as wide as the row: the same codes and scales as group_size=in_features
    codes, scales = qz.quantize_weight(random_weight(96, 256), 8, 256, "bfloat16")
    assert torch.equal(codes, layer.qweight) and torch.equal(scales, layer.scales)


@pytest.mark.parametrize("amx", [False, True], ids=["no-amx", "amx"])
def test_int8_decode_rows_take_the_kernel_and_other_int8_settings_do_not(amx, monkeypatch):
    monkeypatch.setattr(qz, "cpu_has_amx_tiles", lambda: amx)
    assert qz.kernel_max_rows(8) == (qz.AMX_INT8_KERNEL_MAX_ROWS if amx else qz.INT8_KERNEL_MAX_ROWS)
    layer = int8_row_layer()
    limit = qz.kernel_max_rows(8)
    for rows, expect_kernel in ((1, True), (limit, True), (limit + 1, False)):
        x = torch.randn(1, rows, 256, generator=torch.Generator().manual_seed(rows)).bfloat16()
        with torch.no_grad():
            assert layer.uses_int8_kernel(x) == expect_kernel and not layer.uses_int4_kernel(x)
            got = layer(x)
            reference = F.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias.float())
        assert got.shape == (1, rows, 96) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), reference, rtol=2e-2, atol=2e-2)
    x = torch.randn(1, 256).bfloat16()
    grouped = qz.AndesVLQuantizedLinear.from_linear(nn.Linear(256, 96), 8, 64, "bfloat16").to(torch.bfloat16)
    fp16_scales = qz.AndesVLQuantizedLinear.from_linear(nn.Linear(256, 96), 8, qz.PER_ROW, "float16")
    assert not grouped.uses_int8_kernel(x) and not fp16_scales.uses_int8_kernel(x)
    x.requires_grad_(True)
    assert not layer.uses_int8_kernel(x)  # training through the base: the differentiable path


def test_group_size_minus_one_is_the_only_non_positive_group_size():
    assert qz.normalize_spec({"bits": 8, "group_size": -1})["group_size"] == qz.PER_ROW
    for bad in (0, -2):
        with pytest.raises(ValueError, match="positive integer or -1"):
            qz.normalize_spec({"bits": 8, "group_size": bad})


def test_a_per_row_int8_folder_decodes_through_the_kernel_with_a_lora_adapter(tiny_repos, tmp_path):
    """`--bits 8 --group-size -1 --scale-dtype bfloat16` from the CLI, loaded in bf16 with a peft LoRA: decode steps
    take the int8 kernel (prefill does not) and the greedy tokens equal those of the dequantized path."""
    output = tmp_path / "int8-row"
    argv = ["--model", str(tiny_repos["siglip2"]), "--output", str(output), "--bits", "8", "--group-size", "-1"]
    quantize.main([*argv, "--scale-dtype", "bfloat16"])
    assert json.loads((output / "config.json").read_text())["quantization"]["group_size"] == -1
    layers = assert_kernel_decodes_like_the_dequantized_path(output, "uses_int8_kernel")
    assert all(layer.scales.shape[1] == 1 for layer in layers)


def test_the_int8_kernel_gets_aligned_tensors_and_widths_it_cannot_take_dequantize():
    """torch 2.13's `_weight_int8pack_mm` crashes on codes or inputs off a 16 / 32-byte boundary and on widths that
    are not multiples of 16: misaligned views (as safetensors loads them) are copied first, other widths dequantize."""
    layer = int8_row_layer(seed=2)
    with torch.no_grad():
        expected = layer(torch.randn(1, 3, 256, generator=torch.Generator().manual_seed(0)).bfloat16())
    storage = torch.empty(layer.qweight.numel() + 64, dtype=torch.int8)
    view = storage[8 : 8 + layer.qweight.numel()].view_as(layer.qweight)  # 8 bytes off the allocator's alignment
    view.copy_(layer.qweight)
    layer.qweight = view
    assert not qz.is_aligned(layer.qweight) and qz.is_aligned(layer._int8_kernel_weight())
    padded = torch.empty(3 * 256 + 4, dtype=torch.bfloat16)
    x = padded[4:].view(1, 3, 256)  # 8 bytes off
    x.copy_(torch.randn(1, 3, 256, generator=torch.Generator().manual_seed(0)).bfloat16())
    assert not qz.is_aligned(x)
    with torch.no_grad():
        assert layer.uses_int8_kernel(x)
        assert torch.equal(layer(x), expected)  # the same kernel on the same values, from aligned copies
    narrow = nn.Linear(72, 32)
    narrow_layer = qz.AndesVLQuantizedLinear.from_linear(narrow, 8, qz.PER_ROW, "bfloat16").to(torch.bfloat16)
    x72 = torch.randn(1, 72).bfloat16()
    with torch.no_grad():
        assert not narrow_layer.uses_int8_kernel(x72)
        torch.testing.assert_close(
            narrow_layer(x72).float(),
            F.linear(x72.float(), narrow_layer.dequantized_weight(), narrow.bias.float()),
            rtol=2e-2,
            atol=2e-2,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Prompts in fp32, and the quantized LM head (`--lm-head`)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_rows", [None, 8])
@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, qz.PER_ROW), (4, 16), (3, 64)])
@pytest.mark.parametrize("bf16_matmul", [False, True], ids=["fp32-prompts", "bf16-prompts"])
def test_half_precision_prompts_multiply_the_dequantized_weight_block_by_block(
    bits, group_size, block_rows, bf16_matmul, monkeypatch
):
    """Inputs longer than the kernels take (prefill) multiply the dequantized weight block by block on CPU and come
    back in the input's dtype. Without native bf16 matmuls in fp32: exactly `F.linear` in fp32 with `code * scale`,
    the weight QALFT trains with in fp32, on each block of output rows (`block_rows`: 12 blocks of 8 rows; None: one
    block), and within fp32 rounding of one unblocked matmul (the CPU's GEMM may sum a block of 8 rows in another
    order than 96: it does on an AMD EPYC with AVX-512). With them (AMX tiles or AVX-512 BF16), bf16 inputs in bf16
    with the decode kernels' bf16 weight (a bf16 matmul: oneDNN's K-blocking may differ between blocks, so compared
    within bf16 rounding); fp16 inputs stay in fp32."""
    if block_rows:
        monkeypatch.setattr(qz, "PREFILL_BLOCK_ELEMENTS", block_rows * 256)
    monkeypatch.setattr(qz, "cpu_has_bf16_matmul", lambda: bf16_matmul)
    linear = nn.Linear(256, 96)
    linear.weight.data = random_weight(96, 256, seed=3)
    layer = qz.AndesVLQuantizedLinear.from_linear(linear, bits, group_size).to(torch.bfloat16).eval()
    rows = qz.kernel_max_rows(bits) + 1
    x = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    fake = qz.fake_quantize(linear.weight.detach(), bits, group_size)  # fp32, bf16 scales (the default)
    with torch.no_grad():
        assert layer.prefills_blockwise(x) and not layer.uses_int4_kernel(x) and not layer.uses_int8_kernel(x)
        assert qz.prefill_dtype(x.dtype) == (torch.bfloat16 if bf16_matmul else torch.float32)
        assert qz.prefill_dtype(torch.float16) == torch.float32
        got = layer(x)
        assert got.dtype == torch.bfloat16
        if bf16_matmul:
            expected = F.linear(x, layer.dequantized_weight(torch.bfloat16), layer.bias)
            assert torch.allclose(got.float(), expected.float(), rtol=2**-7, atol=2**-7)
        else:
            step = qz.PREFILL_BLOCK_ELEMENTS // 256  # output rows per block
            blocks = [F.linear(x.float(), fake[start : start + step]) for start in range(0, 96, step)]
            expected = torch.cat(blocks, dim=-1) + layer.bias.float()
            assert torch.equal(got, expected.bfloat16())
            unblocked = F.linear(x.float(), fake, layer.bias.float())
            torch.testing.assert_close(got.float(), unblocked, rtol=2**-8, atol=1e-4)
        assert not layer.prefills_blockwise(x[:, :1]) and not layer.prefills_blockwise(x.float())
    x.requires_grad_(True)
    layer(x).float().sum().backward()  # training through the base: the blockwise matmul is differentiable
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def lm_head_folder(tiny_repos, tmp_path_factory):
    output = tmp_path_factory.mktemp("lm_head") / "int4-lm-head"
    argv = ["--model", str(tiny_repos["aimv2"]), "--output", str(output), "--bits", "4", "--lm-head"]
    return tiny_repos["aimv2"], output, quantize.main(argv)


def test_a_quantized_lm_head_gets_its_own_codes_and_the_embedding_stays_exact(lm_head_folder, cached_model):
    source, output, report = lm_head_folder
    config = json.loads((output / "config.json").read_text())
    assert config["quantization"]["lm_head"] is True
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    assert report["quantized_modules"] == 14 + 1 and not any(report["check"]["loading_info"].values())
    float_model = cached_model(source)
    model, info = AutoModel.from_pretrained(output, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert type(head).__name__ == "AndesVLQuantizedLinear" and type(embed) is nn.Embedding
    source_embed = float_model.get_input_embeddings().weight
    assert torch.equal(embed.weight.float(), source_embed.bfloat16().float())  # float rows, as saved (bf16)
    fake = qz.fake_quantize(source_embed, 4, GROUP)
    assert torch.equal(head.dequantized_weight(torch.float32), fake)  # the same quantizer as the projections
    keys = set(model.state_dict())
    assert {"language_model.lm_head.qweight", "language_model.lm_head.scales"} <= keys
    assert "language_model.lm_head.weight" not in keys and "language_model.model.embed_tokens.weight" in keys
    x = torch.randn(1, 1, head.in_features).bfloat16()
    with torch.no_grad():
        assert head.to(torch.bfloat16).uses_int4_kernel(x)  # decode steps read the head's packed codes too


def test_a_quantized_lm_head_decodes_through_the_kernel_with_a_lora_adapter(lm_head_folder):
    _, output, _ = lm_head_folder
    layers = assert_kernel_decodes_like_the_dequantized_path(output, "uses_int4_kernel")
    assert any(layer.out_features == 151936 for layer in layers)  # the LM head (one row per vocabulary entry)


def test_a_tied_config_cannot_ask_for_a_quantized_lm_head(tiny_repos):
    config = AutoConfig.from_pretrained(tiny_repos["aimv2"], trust_remote_code=True)
    config.quantization = {"bits": 4, "lm_head": True}
    with pytest.raises(ValueError, match=r"lm_head=true needs tie_word_embeddings=false"):
        AutoModel.from_config(config, trust_remote_code=True)
    with pytest.raises(ValueError, match=r"lm_head=1 must be true or false"):
        qz.normalize_spec({"lm_head": 1})


def test_scenario_adapters_on_a_quantized_base_are_checked_against_its_scheme(lm_head_folder, tmp_path, caplog):
    """Token rows cannot reach a quantized LM head (clear error, nothing loaded); a QALFT adapter trained against
    another scheme than the base's loads with a warning that names both schemes."""
    source, quantized_folder, _ = lm_head_folder
    repo = tmp_path / "AndesVL-int4-head"
    shutil.copytree(quantized_folder, repo)
    model = load_model(source)
    torch.manual_seed(0)
    for name, extra in (("rows", {"trainable_token_indices": [11, 12]}), ("qalft", {})):
        config = LoraConfig(r=2, lora_alpha=4, target_modules=qz.DEFAULT_MODULES, init_lora_weights=False, **extra)
        peft_model = get_peft_model(copy.deepcopy(model), config)
        peft_model.save_pretrained(repo / "adapters" / name)
    trained = {"bits": 4, "group_size": 16, "modules": qz.DEFAULT_MODULES, "scale_dtype": "float16"}
    (repo / "adapters" / "qalft" / "andesvl_adapter.json").write_text(json.dumps({"qalft": trained}))
    base = load_model(repo)
    with pytest.raises(ValueError, match=r"trains embedding token rows, but this base's LM head is quantized"):
        base.load_scenario_adapter("rows")
    assert not getattr(base, "peft_config", None)  # nothing half-loaded
    with caplog.at_level(logging.WARNING):
        base.load_scenario_adapter("qalft")
    assert "'group_size': 16" in caplog.text and "'group_size': 64" in caplog.text
    assert base.active_adapters() == ["qalft"]


@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, qz.PER_ROW), (3, 64), (2, 128)])
def test_quantizing_block_by_block_gives_the_codes_and_scales_of_one_pass(bits, group_size, monkeypatch):
    """Large weights (the 4B LM head) are quantized a block of rows at a time, with the same result."""
    weight = random_weight(96, 256, seed=5)
    whole = qz.quantize_weight(weight, bits, group_size)
    packed = qz.pack_codes(whole[0], bits) if bits in qz.PACKED_BITS else None
    monkeypatch.setattr(qz, "QUANTIZE_BLOCK_ELEMENTS", 256 * 7)  # 14 blocks, the last one short
    blocks = qz.quantize_weight(weight, bits, group_size)
    assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1])
    if packed is not None:  # int2 / int3 codes are packed a block of rows at a time too
        assert torch.equal(qz.pack_codes(whole[0], bits), packed)
    weight[3, 4], weight[90, 1] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 non-finite values out of 24576"):
        qz.quantize_weight(weight, bits, group_size)
