"""Weight-only quantization of AndesVL's language model: the "1" of "1+N LoRA" (one quantized base, N adapters).

Scheme (the single source of truth for the deployed model and for QALFT):
- symmetric, group-wise along the input dim, one scale per (output row, group of `group_size` inputs);
  `group_size` -1 means one group per row (one scale per output row, whatever the layer's width);
- `qmax = 2**(bits-1) - 1`, `scale = amax(|w_group|) / qmax` in fp32, clamped to [tiny, max] of `scale_dtype` and
  stored in `scale_dtype`; `code = clamp(round_half_even(w / float(scale)), -qmax-1, qmax)`;
- dequantized weight = `float(code) * float(scale)`, cast to the compute dtype.

Quantizing and dequantizing are done in fp32 whatever the weight dtype (bf16/fp16 -> fp32 is exact), so the codes
depend only on the weight values, and `fake_quantize(w)` (QALFT, straight-through gradients) is bit-identical to the
weight that `AndesVLQuantizedLinear` computes from the saved `qweight`/`scales`.

On disk: int4 codes are packed two per uint8 (`qweight` [out, in/2]), int2 / int3 codes four per byte / eight per three
bytes (`qweight` [out, in*bits/8], a little-endian bit stream per row: the int4 layout is its 4-bit case), int8 codes
are int8 (`qweight` [out, in]),
`scales` [out, in/group_size] ([out, 1] per row). `config.quantization` (`{"bits", "group_size", "modules",
"scale_dtype", "lm_head"}`) makes `AndesVLForConditionalGeneration.__init__` build the quantized layers, so
`from_pretrained` loads those keys as is. `lm_head` also quantizes the LM head (untied: the input embedding keeps its
float rows, so lookups stay exact).

Decoding on CPU in bf16 (bf16 scales, the default, and bf16 activations) reads the codes directly through torch's
kernels: int4 with a group of 32-256 (`_weight_int4pack_mm_for_cpu`; int2 / int3 codes too, widened to its 4-bit
layout once, so they are smaller on disk but as fast and as large as int4 in memory), int8 with one scale per row
(`_weight_int8pack_mm`). Longer half-precision inputs on CPU (prompts, training batches) multiply the dequantized
weight a block of output rows at a time, in bf16 on CPUs with native bf16 matmuls (AMX tiles or AVX-512 BF16) and in
fp32 elsewhere (`prefill_dtype`);
other settings dequantize the weight per forward in the compute dtype.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_BITS = (2, 3, 4, 8)
# Code widths packed into a bit stream of uint8 (the rest, int8, are stored as they are).
PACKED_BITS = (2, 3, 4)
# 64 divides every in_features of every AndesVL size (hidden 1024/2048/2560, q-out 2048/4096, MLP 3072/6144/9728) and
# of the tiny test models; one default for both bit widths keeps QALFT and deployment from disagreeing silently.
DEFAULT_GROUP_SIZE = 64
# The decoder projections of the Qwen3 language model only: never lm_head / embed_tokens (tied), the vision tower or
# the projector. The same string works as peft `target_modules` (peft fullmatches a string against module names).
DEFAULT_MODULES = r"language_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# torch's packed int4 CPU kernel (`_weight_int4pack_mm_for_cpu`): the group sizes it takes, and the most input rows for
# which it beats dequantizing to bf16 (measured: 2.5x faster at 1 row, slower from 8 rows on; prefill falls back).
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
INT4_KERNEL_MAX_ROWS = 4
# torch's int8 CPU kernel (`_weight_int8pack_mm`) takes one scale per output row: int8 with group_size PER_ROW.
PER_ROW = -1
# Its CPU implementation reads out of bounds (and crashes) unless in_features is a multiple of 16 and the input and the
# codes start on 32- and 16-byte boundaries (measured with torch 2.13): other widths dequantize, and misaligned tensors
# (safetensors views, slices) are copied to fresh, 64-byte aligned memory first.
INT8_KERNEL_IN_MULTIPLE = 16
KERNEL_ALIGNMENT = 64
INT8_KERNEL_MAX_ROWS = 4  # measured (1024x3072, 2 threads, Xeon AMX): 1.4-2.6x bf16 F.linear up to 4 rows, 0.7x at 6
# Where prompts multiply in bf16 on AMX tiles (`prefill_dtype`), the comparison is against that block-by-block
# path, which dequantizes every weight per forward; measured (1024x3072 and 2560x9728, 2 threads, Xeon AMX), the kernel
# takes of its time: int4 0.50-0.53 at 32 rows, 0.67-0.80 at 48, 0.87-1.09 at 64; int8 0.62-0.68 at 16, 0.88-0.96 at
# 24. Batched decode steps (a batch of up to that many sequences) stay on the kernels there.
AMX_INT4_KERNEL_MAX_ROWS = 32
AMX_INT8_KERNEL_MAX_ROWS = 16
# bf16 scales: what both CPU kernels take (with bf16 activations), so a quantized base decodes on them by default.
DEFAULT_SCALE_DTYPE = "bfloat16"
# Inputs with more rows than the kernels take (prefill) multiply the dequantized weight block by block, in bf16 on a
# CPU with native bf16 matmuls (AMX tiles or AVX-512 BF16) and in fp32 elsewhere (`prefill_dtype`). Measured with torch
# 2.13, 230 rows, 2 threads: on a Xeon with AMX a bf16 matmul is 3-5x faster than fp32 (oneDNN's AMX brgemm), and the
# bf16 path 1.4-3x faster than the fp32 one (0.33-0.73x the float base's fp32 matmul); on an AMD EPYC with AVX-512 BF16
# (no AMX) a bf16 matmul takes 0.25-0.35x fp32's time; with AVX2 only (AMD) bf16 is 4.5-5x slower than fp32.
# Weights quantized (and int2 / int3 codes packed) at once: fp32 temporaries of 64 MB each; the 4B LM head (389M
# weights) in one pass took several GB (int3 packing: 14 GB).
QUANTIZE_BLOCK_ELEMENTS = 2**24
# torch's int4 CPU layout packs tiles of 64 output rows on their own, so the kernel layout is built a block of whole
# tiles at a time (tested equal to one call): int32 codes of the 0.6B LM head at once took 0.6 GB, twice, plus 0.16 GB
# of int8 codes, at the first decode step.
INT4_PACK_TILE_ROWS = 64
PREFILL_BLOCK_ELEMENTS = 2**21  # weights dequantized per block of output rows in that path (8 MB in fp32; measured best
# of 2**20-2**22 on 1024- to 9728-wide layers)
SPEC_KEYS = ("bits", "group_size", "modules", "scale_dtype", "lm_head")


# ----------------------------------------------------------------------------------------------------------------------
# Spec validation
# ----------------------------------------------------------------------------------------------------------------------


@functools.cache
def cpu_has_amx_tiles() -> bool:
    """Whether this CPU has AMX tiles and the OS grants their state (oneDNN then multiplies bf16 matrices on them)."""
    supported, init = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_init_amx"))
    return bool(supported and init and supported() and init())


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles, or AVX-512 BF16's dot products), so that a bf16
    matmul beats fp32 (oneDNN; without either, torch's bf16 CPU matmul converts and is several times slower)."""
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return cpu_has_amx_tiles() or bool(avx512_bf16 and avx512_bf16())


def prefill_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """The dtype a half-precision prompt multiplies the dequantized weight in on CPU: bf16 for bf16 inputs on a CPU
    with native bf16 matmuls (the weight is then exactly the decode kernels' bf16 one), else fp32 (the weight is
    exactly `code * scale`, the values QALFT trains with in fp32)."""
    return torch.bfloat16 if input_dtype == torch.bfloat16 and cpu_has_bf16_matmul() else torch.float32


def kernel_max_rows(bits: int) -> int:
    """The most input rows that a layer of `bits` sends to its packed kernel on this CPU."""
    if bits == 8:
        return AMX_INT8_KERNEL_MAX_ROWS if cpu_has_amx_tiles() else INT8_KERNEL_MAX_ROWS
    return AMX_INT4_KERNEL_MAX_ROWS if cpu_has_amx_tiles() else INT4_KERNEL_MAX_ROWS


def qmax_for(bits: int) -> int:
    """Largest code of a `bits`-wide symmetric quantizer (codes span [-qmax-1, qmax]); rejects unsupported widths."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; expected one of {SUPPORTED_BITS}.")
    return 2 ** (bits - 1) - 1


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size == PER_ROW:
        return
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group_size={group_size} must be a positive divisor of in_features={in_features} (or {PER_ROW}: "
            "one scale per output row)."
        )


def group_width(in_features: int, group_size: int) -> int:
    """Inputs per scale of a layer `in_features` wide: `group_size`, or the whole row for PER_ROW."""
    check_group_size(in_features, group_size)
    return in_features if group_size == PER_ROW else group_size


def scale_dtype_of(scale_dtype: str | torch.dtype) -> torch.dtype:
    name = str(scale_dtype).removeprefix("torch.")
    if name not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype!r} is not supported; expected one of {list(SCALE_DTYPES)}.")
    return SCALE_DTYPES[name]


def normalize_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and validate a `config.quantization` dict; returns the JSON-serialisable canonical form."""
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"Unknown quantization keys {unknown}; expected a subset of {list(SPEC_KEYS)}.")
    bits, group_size = spec.get("bits", 4), spec.get("group_size", DEFAULT_GROUP_SIZE)
    qmax_for(bits)
    if not isinstance(group_size, int) or (group_size <= 0 and group_size != PER_ROW):
        raise ValueError(f"group_size={group_size!r} must be a positive integer or {PER_ROW} (one scale per row).")
    modules = spec.get("modules", DEFAULT_MODULES)
    try:
        re.compile(modules)
    except re.error as error:
        raise ValueError(f"modules={modules!r} is not a valid regular expression: {error}.") from None
    scale_dtype = str(scale_dtype_of(spec.get("scale_dtype", DEFAULT_SCALE_DTYPE))).removeprefix("torch.")
    lm_head = spec.get("lm_head", False)
    if not isinstance(lm_head, bool):
        raise ValueError(f"lm_head={lm_head!r} must be true or false (quantize the output layer too).")
    return {"bits": bits, "group_size": group_size, "modules": modules, "scale_dtype": scale_dtype, "lm_head": lm_head}


# ----------------------------------------------------------------------------------------------------------------------
# The quantizer (shared by deployment and QALFT)
# ----------------------------------------------------------------------------------------------------------------------


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int, scale_dtype: str | torch.dtype = DEFAULT_SCALE_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (codes int8 [out, in], scales `scale_dtype` [out, in/group_size]), `QUANTIZE_BLOCK_ELEMENTS`
    weights at a time (every step is row-wise: the result does not depend on the blocks)."""
    qmax = qmax_for(bits)
    out_features, in_features = weight.shape
    group_size = group_width(in_features, group_size)
    scale_dtype = scale_dtype_of(scale_dtype)
    step = max(1, QUANTIZE_BLOCK_ELEMENTS // in_features)
    blocks = [weight.detach()[start : start + step] for start in range(0, out_features, step)]
    num_bad = sum(int((~torch.isfinite(block)).sum()) for block in blocks)
    if num_bad:
        raise ValueError(f"Cannot quantize a weight with {num_bad} non-finite values out of {weight.numel()}.")
    quantized = [quantize_rows(block, qmax, group_size, scale_dtype) for block in blocks]
    if len(quantized) == 1:
        return quantized[0]
    return torch.cat([codes for codes, _ in quantized]), torch.cat([scales for _, scales in quantized])


def quantize_rows(
    weight: torch.Tensor, qmax: int, group_size: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheme on a block of rows [rows, in] -> (codes int8 [rows, in], scales [rows, in/group_size])."""
    rows, in_features = weight.shape
    groups = weight.float().reshape(rows, in_features // group_size, group_size)  # [rows, G, g]
    limits = torch.finfo(scale_dtype)
    # The tiny floor keeps all-zero groups at code 0 instead of 0/0 = NaN.
    scales = (groups.abs().amax(-1) / qmax).clamp(limits.tiny, limits.max).to(scale_dtype)  # [rows, G]
    codes = torch.round(groups / scales.float()[..., None]).clamp(-qmax - 1, qmax)  # [rows, G, g]
    return codes.to(torch.int8).reshape(rows, in_features), scales


def dequantize_weight(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """codes int8 [out, in] and scales [out, in/group_size] -> weight [out, in] in `dtype`."""
    out_features, in_features = codes.shape
    group_size = group_width(in_features, group_size)
    if tuple(scales.shape) != (out_features, in_features // group_size):
        raise ValueError(
            f"scales have shape {tuple(scales.shape)}, expected {(out_features, in_features // group_size)} for codes "
            f"{tuple(codes.shape)} and group_size={group_size}."
        )
    if scales.dtype == dtype:
        # codes and scales are exact in `dtype` and the product is rounded once either way (CPU half-precision
        # arithmetic computes in fp32): the same bits without the fp32 copies (prefill dequantizes every forward)
        groups = codes.to(dtype).reshape(out_features, -1, group_size) * scales[..., None]  # [out, G, g]
        return groups.reshape(out_features, in_features)
    groups = codes.float().reshape(out_features, -1, group_size) * scales.float()[..., None]  # [out, G, g]
    return groups.reshape(out_features, in_features).to(dtype)


class _StraightThroughFakeQuantize(torch.autograd.Function):
    """Forward: the exact dequantized weight. Backward: the identity (straight-through estimator).

    `w + (fq - w).detach()` also passes gradients, but it equals `fq` bit for bit only because `fq - w` happens to be
    exact in floating point here (Sterbenz's lemma); this Function returns `fq` itself by construction.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype) -> torch.Tensor:
        codes, scales = quantize_weight(weight, bits, group_size, scale_dtype)
        return dequantize_weight(codes, scales, group_size, weight.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None, None


def fake_quantize(
    weight: torch.Tensor, bits: int, group_size: int, scale_dtype: str | torch.dtype = DEFAULT_SCALE_DTYPE
) -> torch.Tensor:
    """QALFT: `dequantize(quantize(weight))` in the weight's dtype, with gradients passed unchanged to `weight`."""
    return _StraightThroughFakeQuantize.apply(weight, bits, group_size, scale_dtype_of(scale_dtype))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] [out, in] -> uint8 [out, in/2]; column 2j in the low nibble, 2j+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}.")
    nibbles = codes.to(torch.int16) & 0xF  # two's-complement nibbles [out, in]
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8)


def check_packable(in_features: int, bits: int) -> None:
    """A row of `in_features` codes of `bits` bits must fill whole bytes."""
    if bits in PACKED_BITS and (in_features * bits) % 8:
        multiple = 8 // math.gcd(bits, 8)
        raise ValueError(f"int{bits} packing needs in_features to be a multiple of {multiple}, got {in_features}.")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes [out, in] of `bits` (2, 3 or 4) bits -> uint8 [out, in*bits/8]: per row a little-endian bit stream,
    code j in stream bits j*bits .. j*bits+bits-1 (two's complement). For 4 bits this is `pack_int4`'s layout."""
    check_packable(codes.shape[-1], bits)
    if bits == 4:
        return pack_int4(codes)
    # a block of rows at a time: the bit-level temporaries are ~20 bytes per code (the 4B LM head at once: 14 GB)
    step = max(1, QUANTIZE_BLOCK_ELEMENTS // codes.shape[-1])
    blocks = [pack_rows(codes[start : start + step], bits) for start in range(0, codes.shape[0], step)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_codes` of a block of rows [rows, in] -> uint8 [rows, in*bits/8]."""
    fields = codes.to(torch.int16) & (2**bits - 1)  # [rows, in]
    stream = (fields[..., None] >> torch.arange(bits, dtype=torch.int16)) & 1  # [rows, in, bits], one bit each
    octets = stream.reshape(*codes.shape[:-1], -1, 8)  # [rows, in*bits/8, 8]
    return (octets << torch.arange(8, dtype=torch.int16)).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [out, in*bits/8] -> int8 codes [out, in] (inverse of `pack_codes`), in uint8 throughout like
    `unpack_int4` (every prefill forward unpacks; measured 18x faster than unpacking bit by bit)."""
    if bits == 4:
        return unpack_int4(packed)
    rows = packed.shape[:-1]
    if bits == 2:  # four codes per byte, code k in bits 2k, 2k+1
        fields = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1)  # [out, in/4, 4]
    elif bits == 3:  # eight codes per three bytes b0 b1 b2 (24 stream bits); codes 2 and 5 straddle two bytes
        triples = packed.reshape(*rows, -1, 3)  # [out, in/8, 3]
        b0, b1, b2 = triples[..., 0], triples[..., 1], triples[..., 2]
        fields = torch.stack(
            [b0 & 7, (b0 >> 3) & 7, (b0 >> 6) | ((b1 & 1) << 2), (b1 >> 1) & 7, (b1 >> 4) & 7]
            + [(b1 >> 7) | ((b2 & 3) << 1), (b2 >> 2) & 7, b2 >> 5],
            dim=-1,
        )  # [out, in/8, 8]
    else:
        raise ValueError(f"bits={bits} codes are not packed; expected one of {PACKED_BITS}.")
    half = 2 ** (bits - 1)
    return ((fields ^ half).view(torch.int8) - half).reshape(*rows, -1)  # sign-extend: f ^ half - half


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> int8 codes in [-8, 7] [out, in] (inverse of `pack_int4`), in uint8 / int8 throughout
    (every prefill forward unpacks: half the memory traffic of wider intermediates, measured 2x faster)."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)  # uint8 [out, in]
    return (nibbles ^ 8).view(torch.int8) - 8  # sign-extend 4 -> 8 bits: n ^ 8 - 8


# ----------------------------------------------------------------------------------------------------------------------
# The deployed layer
# ----------------------------------------------------------------------------------------------------------------------


def is_aligned(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.data_ptr() % KERNEL_ALIGNMENT == 0


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a contiguous copy in fresh memory (torch's CPU allocator aligns to 64 bytes) if it is not
    contiguous and 64-byte aligned."""
    return tensor if is_aligned(tensor) else tensor.clone(memory_format=torch.contiguous_format)


class AndesVLQuantizedLinear(nn.Module):
    """Weight-only quantized linear layer: persistent buffers `qweight` and `scales`, an optional float `bias`; no
    float weight (`dequantized_weight(dtype)` computes one).

    peft wraps it through its custom-module route (`LoraConfig._register_custom_module`, which the model's adapter
    methods do: `adapters_andesvl.lora_layer_mapping`); like bitsandbytes' layers it reports `compute_dtype`, which
    peft reads to place and cast the LoRA layers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = DEFAULT_GROUP_SIZE,
        scale_dtype: str | torch.dtype = DEFAULT_SCALE_DTYPE,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        qmax_for(bits)
        check_group_size(in_features, group_size)
        check_packable(in_features, bits)
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        packed = bits in PACKED_BITS
        packed_shape = (out_features, in_features * bits // 8 if packed else in_features)
        code_dtype = torch.uint8 if packed else torch.int8
        self.register_buffer("qweight", torch.zeros(packed_shape, dtype=code_dtype, device=device))
        scales_shape = (out_features, in_features // group_width(in_features, group_size))
        self.register_buffer("scales", torch.zeros(scales_shape, dtype=scale_dtype_of(scale_dtype), device=device))
        bias_tensor = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_parameter("bias", bias_tensor)
        # Zero-size and not saved: it follows `.to(dtype)` casts, so `compute_dtype` follows the model's dtype.
        self.register_buffer("dtype_anchor", torch.empty(0, dtype=dtype, device=device), persistent=False)
        # This layer's state is loaded from the checkpoint, never drawn: transformers' weight initialisation (4.x and
        # 5.x) skips a module marked initialised.
        self._is_hf_initialized = True

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, group_size: int, scale_dtype: str | torch.dtype = DEFAULT_SCALE_DTYPE
    ) -> AndesVLQuantizedLinear:
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bits,
            group_size,
            scale_dtype,
            device=weight.device,
            dtype=weight.dtype,
        )
        codes, scales = quantize_weight(weight, bits, group_size, scale_dtype)
        layer.qweight = pack_codes(codes, bits) if bits in PACKED_BITS else codes
        layer.scales = scales
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer.train(linear.training)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The model's dtype (it follows `.to(dtype)`); the scales keep theirs."""
        return self.dtype_anchor.dtype

    def _apply(self, fn, recurse: bool = True):
        # `.to(dtype)`, `.half()`, `.bfloat16()` would round the scales and break bit-exactness with QALFT: follow
        # device moves, never dtype casts.
        scales = self._buffers["scales"]
        super()._apply(fn, recurse)
        if self._buffers["scales"].dtype != scales.dtype:
            self._buffers["scales"] = scales.to(self._buffers["scales"].device)
        return self

    def codes(self, rows: slice = slice(None)) -> torch.Tensor:
        """int8 codes [out, in] (of the output rows `rows`: each row is packed on its own)."""
        qweight = self.qweight[rows]
        return unpack_codes(qweight, self.bits) if self.bits in PACKED_BITS else qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.codes(), self.scales, self.group_size, dtype)  # [out, in]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.uses_int4_kernel(input):
            packed, scales_and_zeros = self._int4_kernel_weights()
            rows = input.reshape(-1, self.in_features)  # [M, in]
            output = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, self.group_size, scales_and_zeros)
        elif self.uses_int8_kernel(input):
            rows = aligned(input.reshape(-1, self.in_features))  # [M, in]
            output = torch.ops.aten._weight_int8pack_mm(rows, self._int8_kernel_weight(), self.scales.reshape(-1))
        elif self.prefills_blockwise(input):
            return self._prefill_blockwise(input)
        else:
            return F.linear(input, self.dequantized_weight(input.dtype), self.bias)
        output = output.reshape(*input.shape[:-1], self.out_features)
        return output if self.bias is None else output + self.bias.to(output.dtype)

    def _kernel_input(self, input: torch.Tensor, max_rows: int) -> bool:
        """What both packed kernels need of the input and scales: bf16 on CPU, at most `max_rows` rows (decoding),
        and no gradient for the input (the kernels have no backward)."""
        return (
            input.dtype == torch.bfloat16
            and self.scales.dtype == torch.bfloat16
            and input.device.type == "cpu"
            and input.numel() <= max_rows * self.in_features
            and not (torch.is_grad_enabled() and input.requires_grad)
        )

    def prefills_blockwise(self, input: torch.Tensor) -> bool:
        """Whether `forward(input)` multiplies the dequantized weight block by block in `prefill_dtype` and casts the
        result back to the input's dtype: half-precision inputs on CPU with more than `INT4_KERNEL_MAX_ROWS` rows
        (prompts, training batches) that the packed kernels do not take."""
        return (
            input.dtype in (torch.bfloat16, torch.float16)
            and input.device.type == "cpu"
            and input.numel() > max(INT4_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS) * self.in_features
            and not (self.uses_int4_kernel(input) or self.uses_int8_kernel(input))
        )

    def _prefill_blockwise(self, input: torch.Tensor) -> torch.Tensor:
        """`F.linear` in `prefill_dtype` with the dequantized weight, dequantized `PREFILL_BLOCK_ELEMENTS` at a time (a
        block of output rows): the block stays in cache for its matmul, and no full-size weight is allocated (fresh
        multi-MB buffers cost page faults on every forward; measured 2-5x the dequantization itself at 4B widths)."""
        dtype = prefill_dtype(input.dtype)
        rows = input.reshape(-1, self.in_features).to(dtype)  # [M, in]
        step = max(1, PREFILL_BLOCK_ELEMENTS // self.in_features)
        blocks = []
        for start in range(0, self.out_features, step):
            codes = self.codes(slice(start, start + step))  # [rows, in]
            weight = dequantize_weight(codes, self.scales[start : start + step], self.group_size, dtype)
            blocks.append(F.linear(rows, weight))  # [M, rows]
        output = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)  # [M, out]
        if self.bias is not None:
            output = output + self.bias.to(dtype)
        return output.to(input.dtype).reshape(*input.shape[:-1], self.out_features)

    def uses_int8_kernel(self, input: torch.Tensor) -> bool:
        """Whether `forward(input)` reads the int8 codes directly (torch's `_weight_int8pack_mm`): int8 with one bf16
        scale per output row (group_size PER_ROW), in_features a multiple of 16 and a kernel-sized input
        (`_kernel_input`); misaligned codes or inputs are copied to aligned memory first (the kernel crashes on them).
        The kernel's dequantized weight is bit for bit `dequantized_weight(torch.bfloat16)` (tested)."""
        return (
            self.bits == 8
            and self.group_size == PER_ROW
            and self.in_features % INT8_KERNEL_IN_MULTIPLE == 0
            and self._kernel_input(input, kernel_max_rows(8))
            and hasattr(torch.ops.aten, "_weight_int8pack_mm")
        )

    def uses_int4_kernel(self, input: torch.Tensor) -> bool:
        """Whether `forward(input)` reads the packed int4 weights directly (torch's CPU kernel) instead of
        dequantizing: int4 (or int2 / int3, whose codes fit its 4 bits) with bf16 scales, bf16 activations on CPU, a
        group size the kernel takes, at most `kernel_max_rows(bits)` rows (decoding), and no gradient needed for the
        input (the kernel has no backward).
        The kernel's dequantized weight is bit for bit `dequantized_weight(torch.bfloat16)` (tested)."""
        return (
            self.bits in PACKED_BITS
            and self.group_size in INT4_KERNEL_GROUP_SIZES
            and self._kernel_input(input, kernel_max_rows(self.bits))
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        )

    def _kernel_layout(self, name: str, build: Callable[[], Any]) -> Any:
        """`build()`, made on first use and again whenever `qweight` or `scales` changes (in place or replaced);
        kept outside the state dict."""
        key = tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in (self.qweight, self.scales))
        layouts = self.__dict__.setdefault("_kernel_layouts", {})  # name -> (key, layout)
        cached = layouts.get(name)
        if cached is None or cached[0] != key:
            cached = layouts[name] = (key, build())
        return cached[1]

    def kernel_layout_tensors(self) -> list[torch.Tensor]:
        """The kernel layouts built so far (outside the state dict, resident next to `qweight` / `scales`): what decode
        steps read instead of them. int4 (and int2 / int3) codes get a 4-bit packed copy and [in/g, out, 2] scales and
        zero points; int8 codes a copy only when `qweight` is misaligned."""
        layouts = [layout for _, layout in self.__dict__.get("_kernel_layouts", {}).values()]
        return [tensor for layout in layouts for tensor in (layout if isinstance(layout, tuple) else (layout,))]

    def _int8_kernel_weight(self) -> torch.Tensor:
        """`qweight` itself when it is aligned for the kernel, else an aligned copy, kept until `qweight` changes."""
        if is_aligned(self.qweight):
            return self.qweight
        return self._kernel_layout("int8", lambda: aligned(self.qweight))

    def _int4_kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's layout of `qweight` / `scales`, built on first use and again whenever either changes: codes
        c become q = c + 8 (the kernel dequantizes (q - 8) * scale + zero), zero points 0; [in/g, out, 2] scales."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            tiles = max(1, QUANTIZE_BLOCK_ELEMENTS // self.in_features // INT4_PACK_TILE_ROWS)
            step = tiles * INT4_PACK_TILE_ROWS  # output rows per block
            blocks = [
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes(rows).to(torch.int32) + 8, 1)
                for rows in (slice(start, start + step) for start in range(0, self.out_features, step))
            ]  # each [rows, in / 2]: codes c as q = c + 8 in [0, 15]
            packed = blocks[0] if len(blocks) == 1 else torch.cat(blocks)  # [out, in / 2]
            scales = self.scales.t()  # [in/g, out]
            scales_and_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()  # [in/g, out, 2]
            return packed, scales_and_zeros

        return self._kernel_layout("int4", build)

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        return f"{shape}, bits={self.bits}, group_size={self.group_size}, scale_dtype={self.scales.dtype}"


# ----------------------------------------------------------------------------------------------------------------------
# Whole-model helpers
# ----------------------------------------------------------------------------------------------------------------------


def select_linear_modules(model: nn.Module, modules: str) -> list[tuple[str, nn.Linear]]:
    """Every `nn.Linear` whose full name fullmatches `modules`, except the output embedding (tied to the input one)."""
    pattern = re.compile(modules)
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    selected = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, AndesVLQuantizedLinear))
        and module is not output_embeddings
        and pattern.fullmatch(name)
    ]
    if not selected:
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        raise ValueError(
            f"modules={modules!r} matches none of the model's {len(linears)} nn.Linear modules "
            f"(e.g. {linears[:3]}); names are full module paths, matched with re.fullmatch."
        )
    already = [name for name, module in selected if isinstance(module, AndesVLQuantizedLinear)]
    if already:
        raise ValueError(
            f"{len(already)} of the {len(selected)} selected modules are already quantized, e.g. {already[:3]}."
        )
    return selected


def check_groups(selected: list[tuple[str, nn.Linear]], group_size: int) -> None:
    if group_size == PER_ROW:
        return
    bad = [f"{name} (in_features={module.in_features})" for name, module in selected if module.in_features % group_size]
    if bad:
        raise ValueError(
            f"group_size={group_size} does not divide in_features of {len(bad)} of the {len(selected)} selected "
            f"modules, e.g. {bad[:3]}."
        )


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def output_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """(full name, module) of the LM head: the output embedding layer that `spec["lm_head"]` quantizes."""
    head = model.get_output_embeddings()
    names = [name for name, module in model.named_modules() if module is head]
    if not isinstance(head, nn.Linear) or not names:
        raise ValueError(f"lm_head=true needs an nn.Linear output layer; this model's is {type(head).__name__}.")
    return names[0], head


def select_targets(model: nn.Module, spec: dict[str, Any]) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every linear a normalized `spec` quantizes: the `modules` matches, plus the LM head with
    `lm_head`; the group size is checked against all of them."""
    selected = select_linear_modules(model, spec["modules"])
    if spec["lm_head"]:
        selected.append(output_layer(model))
    check_groups(selected, spec["group_size"])
    return selected


def untie_word_embeddings(model: nn.Module) -> None:
    """The quantized LM head has its own codes; the input embedding keeps its float rows (exact lookups)."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def replace_linear_with_quantized(model: nn.Module, spec: dict[str, Any]) -> list[str]:
    """Swap the selected `nn.Linear`s (and the LM head with `lm_head`) for empty `AndesVLQuantizedLinear`s of the same
    shapes (to be loaded)."""
    spec = normalize_spec(spec)
    if spec["lm_head"] and (model.config.tie_word_embeddings or model.config.get_text_config().tie_word_embeddings):
        raise ValueError(
            "quantization.lm_head=true needs tie_word_embeddings=false in config.json (the quantized LM head has its "
            "own codes and the embedding keeps its float rows); this config ties them."
        )
    selected = select_targets(model, spec)
    for name, linear in selected:
        # device=None follows the loading context (meta in 5.x); the bias follows the linear's dtype.
        layer = AndesVLQuantizedLinear(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            spec["bits"],
            spec["group_size"],
            spec["scale_dtype"],
            dtype=linear.weight.dtype,
        )
        set_module(model, name, layer)
    return [name for name, _ in selected]


def state_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, elements) of the saved state: parameters and persistent buffers, tied tensors counted once."""
    tensors = {id(tensor): tensor for tensor in model.state_dict(keep_vars=True).values()}.values()
    return sum(t.numel() * t.element_size() for t in tensors), sum(t.numel() for t in tensors)


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    group_size: int = DEFAULT_GROUP_SIZE,
    modules_regex: str = DEFAULT_MODULES,
    scale_dtype: str | torch.dtype = DEFAULT_SCALE_DTYPE,
    lm_head: bool = False,
) -> dict[str, Any]:
    """Quantize the selected `nn.Linear`s in place, record the spec in `model.config.quantization`, return a report.

    With `lm_head`, the LM head too, with the same bits and groups: a tied head gets its own codes (the model is
    untied, `tie_word_embeddings` false) and the input embedding keeps its float rows, so lookups stay exact.
    Bits per weight count the scales (int4, group 64, bf16 scales: 4 + 16/64 = 4.25); biases stay float and are
    left out of the quantized-module figure but included in the whole-model one (bytes after / elements before).
    """
    spec = {"bits": bits, "group_size": group_size, "modules": modules_regex, "scale_dtype": scale_dtype}
    spec = normalize_spec({**spec, "lm_head": lm_head})
    selected = select_targets(model, spec)
    bytes_before, elements_before = state_bytes(model)
    weights = sum(linear.weight.numel() for _, linear in selected)
    float_bytes = sum(linear.weight.numel() * linear.weight.element_size() for _, linear in selected)
    quantized_bytes = 0
    for name, linear in selected:
        layer = AndesVLQuantizedLinear.from_linear(linear, spec["bits"], spec["group_size"], spec["scale_dtype"])
        quantized_bytes += layer.qweight.nbytes + layer.scales.nbytes
        set_module(model, name, layer)
    if spec["lm_head"]:
        untie_word_embeddings(model)
    bytes_after, _ = state_bytes(model)
    if getattr(model, "config", None) is not None:
        model.config.quantization = spec
    return {
        **spec,
        "quantized_modules": len(selected),
        "quantized_weights": weights,
        "bits_per_weight_quantized_modules": 8 * quantized_bytes / weights,
        "bits_per_weight_model": 8 * bytes_after / elements_before,
        "quantized_modules_bytes_before": float_bytes,
        "quantized_modules_bytes_after": quantized_bytes,
        "model_bytes_before": bytes_before,
        "model_bytes_after": bytes_after,
        "module_names": [name for name, _ in selected],
    }


__all__ = [
    "AndesVLQuantizedLinear",
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_MODULES",
    "PER_ROW",
    "dequantize_weight",
    "fake_quantize",
    "normalize_spec",
    "pack_codes",
    "pack_int4",
    "quantize_model",
    "quantize_weight",
    "replace_linear_with_quantized",
    "unpack_codes",
    "unpack_int4",
]
