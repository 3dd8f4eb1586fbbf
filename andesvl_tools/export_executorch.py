"""Export an AndesVL folder and its LoRA adapters to ExecuTorch programs in the "1+N" layout (XNNPACK, CPU).

    python -m andesvl_tools.export_executorch --model AndesVL-Tiny --output out/AndesVL-Tiny-et
    python -m andesvl_tools.export_executorch --model AndesVL-Tiny --output out/AndesVL-Tiny-et-8da4w --quantize 8da4w
    python -m andesvl_tools.export_executorch --model AndesVL-Tiny --output out/et --adapters ocr --buckets 168x84

What lands in `--output` (names in `manifest.json`):
- `base.pte`: the methods `token_embedding` (input ids [1, S] -> embeddings [1, S, D]), `text_decoder` (embeddings
  [1, S, D] + cache positions [S] -> next-token logits [1, V]; one method for prefill and decode, with a static KV
  cache of `--max-context` positions inside the program) and one `vision_<W>x<H>` per canvas bucket (the processor's
  packed patches of one image on a W x H canvas -> its visual tokens [W*H / base**2, D]: encoder, 2x2 merge and
  projector);
- `base.ptd`: every base weight, shared by every program (XNNPACK names its weights by content hash, so an adapter
  program that uses a base weight finds it here);
- `adapters/<name>.pte`: one `text_decoder` per LoRA adapter, its LoRA weights unmerged inside (the base weights stay
  in `base.ptd`); adapters that train token rows or full modules are refused (`trainable_token_indices`,
  `modules_to_save`; the shipped adapters of AndesVL-Tiny have neither);
- the tokenizer, chat template and processor files, so `andesvl_tools.executorch_runner` needs nothing else.

A quantized AndesVL folder (`andesvl_tools.quantize`, `config.quantization`), e.g. the int4 group-16 fp16-scale base
that the shipped `*-qalft-int4` adapters were trained against, exports too: every `AndesVLQuantizedLinear` becomes a
plain linear holding its dequantized weight in fp32 (`code * scale`, exactly the weight the eager layer multiplies when
the model runs in fp32), so the programs answer exactly like the eager quantized base, with or without its QALFT
adapters (LoRA unmerged, as for a float base). The weights are then fp32 on the device: XNNPACK's int4 takes groups
that are multiples of 32 only, so a group-16 scheme has no XNNPACK equivalent, and `--quantize 8da4w` on top of a
quantized folder is refused (it would requantize with another scheme than the adapters were trained against).

The vision buckets run the model's own encoder code: `image_geometry` (the grid's position table and rotary tables,
computed once here from Python ints) is kept apart from `encode_patches` (tensor-only), which is what is exported.
The decoder is transformers' `TorchExportableModuleWithStaticCache`, returning only the last position's logits.
`--quantize 8da4w` quantizes the language model's linears (LM head included) with torchao's
`Int8DynamicActivationIntxWeightConfig`: int8 dynamic activations and int4 weights in groups of `--group-size`; a
layer whose input width is not a multiple of it (XNNPACK's int4 needs groups that are multiples of 32) gets int8
weights per output channel instead. The token embedding gets int8 rows (`IntxWeightOnlyConfig`); the vision encoder
stays fp32.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .folders import overlap_error, staged_folder

BASE_DATA = "base"  # base.ptd
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
QUANTIZE_CHOICES = ("none", "8da4w")
# Files the runner needs besides the programs (the processor, its tokenizer and chat template, the generation ids).
PROCESSOR_FILES = (
    "processing_andesvl.py",
    "image_processing_andesvl.py",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="AndesVL folder (config, weights, adapters/)")
    parser.add_argument("--output", type=Path, required=True, help="new folder for the programs and the manifest")
    parser.add_argument(
        "--adapters",
        default="all",
        help="comma-separated adapters/<name> to export, 'all' (default: every adapter of the folder) or 'none'",
    )
    parser.add_argument(
        "--buckets",
        default=None,
        help="comma-separated canvas sizes WxH (multiples of patch_size*merge_size) with one vision program each "
        "(default: the canvases of --bucket-images, else 448x448)",
    )
    parser.add_argument(
        "--bucket-images",
        type=Path,
        nargs="*",
        default=(),
        help="images whose processor canvases become buckets (e.g. one image per task)",
    )
    parser.add_argument("--max-context", type=int, default=512, help="static KV-cache length (prompt + answer)")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="none",
        help="on-device quantization of a float folder (refused for a quantized one)",
    )
    parser.add_argument("--group-size", type=int, default=32, help="8da4w weight group (a multiple of 32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------------------------------


def parse_bucket(text: str, base: int) -> tuple[int, int]:
    """'WxH' -> (width, height), both positive multiples of `base` (patch_size * merge_size)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"Bucket {text!r} is not of the form WxH (e.g. 448x448).")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0 or width % base or height % base:
        raise ValueError(f"Bucket {text!r}: width and height must be positive multiples of {base} (patch x merge).")
    return width, height


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"vision_{bucket[0]}x{bucket[1]}"


def resolve_buckets(args: argparse.Namespace, image_processor) -> list[tuple[int, int]]:
    """The buckets of `--buckets`, plus the canvases the processor gives `--bucket-images`; 448x448 when neither."""
    base = image_processor.base
    buckets = [parse_bucket(text, base) for text in (args.buckets or "").split(",") if text.strip()]
    if args.bucket_images:
        from PIL import Image

        for path in args.bucket_images:
            with Image.open(path) as image:
                buckets.append(tuple(image_processor.expected_canvas_size(*image.size)))
    if not buckets:
        buckets = [parse_bucket("448x448", base)] if 448 % base == 0 else [(base * 16, base * 16)]
    return sorted(set(buckets))


# ----------------------------------------------------------------------------------------------------------------------
# Exportable modules (the model's own submodules; only the wiring is here)
# ----------------------------------------------------------------------------------------------------------------------


class TokenEmbedding(nn.Module):
    """input ids [1, S] -> embeddings [1, S, D]: the language model's own embedding."""

    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class VisionBucket(nn.Module):
    """One image on a fixed canvas: packed patches [h*w, C*p*p] -> visual tokens [h*w / merge**2, D_llm].

    The grid's geometry (resized position table, rotary tables) is computed here once by the encoder's own
    `image_geometry` and kept as buffers; `forward` is the encoder's tensor-only `encode_patches`, the model's 2x2
    merge and its projector, the same code the eager model runs."""

    def __init__(self, model, grid_hw: tuple[int, int]):
        super().__init__()
        modeling = sys.modules[type(model).__module__]  # the remote code the model was loaded with
        self.vision_encoder, self.mlp = model.vision_encoder, model.mlp
        self.merge_patches, self.geometry_type = modeling.merge_patches, modeling.VisionGeometry
        self.image_token_group = model.config.image_token_group
        geometry = model.vision_encoder.image_geometry(torch.tensor([list(grid_hw)]))
        # Buffer names carry the grid: constants outside the delegate are keyed by name in base.ptd, and every
        # bucket's tables differ.
        self.suffix = f"{grid_hw[0]}x{grid_hw[1]}"
        cos, sin = geometry.position_embeddings if geometry.position_embeddings is not None else (None, None)
        for name, tensor in (("position_table", geometry.position_table), ("rope_cos", cos), ("rope_sin", sin)):
            self.register_buffer(f"{name}_{self.suffix}", tensor, persistent=False)
        self.has_table, self.has_rope = geometry.position_table is not None, cos is not None

    def table(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_{self.suffix}")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        geometry = self.geometry_type(
            self.table("position_table") if self.has_table else None,
            (self.table("rope_cos"), self.table("rope_sin")) if self.has_rope else None,
            None,  # one image: no per-image boundaries
        )
        features = self.vision_encoder.encode_patches(pixel_values, geometry)  # [h*w, Dv]
        return self.mlp(self.merge_patches(features, self.image_token_group))  # [h*w / 4, D_llm]


def decoder_class():
    """transformers' static-cache export wrapper, returning the last position's logits only (prefill would
    otherwise materialize [S, vocab])."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    class TextDecoder(TorchExportableModuleWithStaticCache):
        def forward(self, inputs_embeds: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
            for layer in self.static_cache.layers:  # the cache is written from cache_position[0] on
                layer.cumulative_length.copy_(cache_position[0])
            outputs = self.model(
                inputs_embeds=inputs_embeds,
                attention_mask=None,
                past_key_values=self.static_cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return outputs.logits[:, -1]  # [1, vocab]

    return TextDecoder


# ----------------------------------------------------------------------------------------------------------------------
# Loading, quantizing, exporting, lowering
# ----------------------------------------------------------------------------------------------------------------------


def load_for_export(folder: Path, adapter: str | None = None):
    """A fresh fp32 copy of the model (export changes the language model's generation config), eager vision
    attention (the sdpa decomposition stays off XNNPACK), with `adapter` loaded through the model's own helper."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
    if getattr(model.config, "quantization", None):
        dequantize_linears(model)  # before the adapter: its LoRA layers then wrap the plain linears
    model.config.vision_config._attn_implementation = "eager"
    if adapter is not None:
        check_exportable_adapter(folder / "adapters" / adapter)
        model.load_scenario_adapter(adapter)
    return model.eval()


def source_quantization(folder: Path) -> dict[str, Any] | None:
    """The `quantization` spec of an AndesVL folder's config.json (`andesvl_tools.quantize`), None for a float one."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --model must be an AndesVL folder.")
    return json.loads(path.read_text()).get("quantization") or None


def check_quantize_option(folder: Path, source: dict[str, Any] | None, quantize: str) -> None:
    """`--quantize 8da4w` requantizes float weights; on an already quantized folder it would replace the folder's
    scheme (the one its QALFT adapters were trained against) by another one."""
    if source and quantize != "none":
        raise ValueError(
            f"{folder} is already quantized ({source}); --quantize {quantize} would requantize it with another "
            "scheme. Export it without --quantize (its quantized layers are dequantized to fp32, exactly as the "
            "eager model computes), or export the float folder with --quantize 8da4w."
        )


def is_quantized_linear(module: nn.Module) -> bool:
    """An `AndesVLQuantizedLinear` of the remote code the model was loaded with (its own module, not ours)."""
    return type(module).__name__ == "AndesVLQuantizedLinear" and hasattr(module, "dequantized_weight")


def dequantized_linear(module: nn.Module) -> nn.Linear:
    """A plain fp32 linear with the quantized layer's weight `code * scale` (computed in fp32, as the eager layer
    does for fp32 inputs) and its bias."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(module.dequantized_weight(torch.float32))
        if module.bias is not None:
            linear.bias.copy_(module.bias.float())
    return linear.requires_grad_(False)


def dequantize_linears(model) -> int:
    """Replace every quantized linear of `model` by its `dequantized_linear`; returns how many."""
    names = [name for name, module in model.named_modules() if is_quantized_linear(module)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, dequantized_linear(getattr(parent, child)))
    if not names:
        raise ValueError(f"config.quantization is {model.config.quantization}, but the model has no quantized layer.")
    return len(names)


def dequantized_manifest(source: dict[str, Any]) -> dict[str, Any]:
    return {
        "linear": "dequantized",
        "source": source,
        "on_device": "dequantized to fp32 (code * scale, as the eager quantized layer computes in fp32); XNNPACK's "
        "int4 takes no group that is not a multiple of 32",
    }


def check_exportable_adapter(folder: Path) -> None:
    """Only LoRA on linear layers is exported: token rows and saved full modules would rebuild base layers."""
    config = json.loads((folder / "adapter_config.json").read_text())
    extras = {key: config.get(key) for key in ("trainable_token_indices", "modules_to_save") if config.get(key)}
    if config.get("peft_type", "LORA") != "LORA" or extras or config.get("use_dora"):
        raise ValueError(
            f"Adapter {folder.name!r} cannot be exported as a small program: only plain LoRA on linear layers is "
            f"supported (it has peft_type={config.get('peft_type')!r}, use_dora={config.get('use_dora')}, {extras})."
        )


def is_lora_module(name: str) -> bool:
    return "lora_" in name


def quantize_for_device(model, group_size: int) -> dict[str, Any]:
    """XNNPACK's dynamic-activation schemes on the language model's linears (LoRA factors excluded): int4 weights in
    groups of `group_size` where the input width is a multiple of it (8da4w), else int8 weights per output channel
    (8da8w: XNNPACK's int4 takes no group that is not a multiple of 32); int8 rows for the token embedding."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if group_size <= 0 or group_size % 32:
        raise ValueError(f"--group-size must be a positive multiple of 32 (XNNPACK's 8da4w), got {group_size}.")
    language_model = model.language_model
    linears = {
        name: module
        for name, module in language_model.named_modules()
        if isinstance(module, nn.Linear) and not is_lora_module(name)
    }
    grouped = {name for name, module in linears.items() if module.in_features % group_size == 0}
    schemes = (
        (grouped, torch.int4, PerGroup(group_size)),
        (set(linears) - grouped, torch.int8, PerAxis(0)),
    )
    for names, weight_dtype, granularity in schemes:
        if names:
            config = Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity)
            quantize_(language_model, config, filter_fn=lambda module, fqn, names=names: fqn in names)
    quantize_(
        language_model,
        IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
        filter_fn=lambda module, fqn: isinstance(module, nn.Embedding),
    )
    return {
        "linear": "8da4w",
        "description": "int8 dynamic activations; int4 weights in groups, int8 per channel where no group fits",
        "group_size": group_size,
        "int4_grouped_layers": len(grouped),
        "int8_per_channel_layers": len(linears) - len(grouped),
        "embedding": "int8 per row",
    }


def export_text_decoder(model, max_context: int) -> torch.export.ExportedProgram:
    """The language model with a static KV cache of `max_context` positions; sequence length dynamic."""
    from transformers import GenerationConfig

    language_model = model.language_model
    language_model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static")
    decoder = decoder_class()(language_model, batch_size=1, max_cache_len=max_context).eval()
    length = torch.export.Dim("seq_length", min=1, max=max_context - 1)
    example = (torch.zeros(1, 2, model.config.text_config.hidden_size), torch.arange(2))
    with torch.no_grad():
        return torch.export.export(decoder, example, dynamic_shapes=({1: length}, {0: length}), strict=True)


def export_token_embedding(model, max_context: int) -> torch.export.ExportedProgram:
    length = torch.export.Dim("seq_length", min=1, max=max_context - 1)
    with torch.no_grad():
        return torch.export.export(
            TokenEmbedding(model).eval(), (torch.zeros(1, 2, dtype=torch.long),), dynamic_shapes=({1: length},)
        )


def export_vision_bucket(model, bucket: tuple[int, int], patch_size: int) -> torch.export.ExportedProgram:
    grid_hw = (bucket[1] // patch_size, bucket[0] // patch_size)  # (rows, cols)
    patch_dim = model.config.vision_config.num_channels * patch_size**2
    with torch.no_grad():
        return torch.export.export(
            VisionBucket(model, grid_hw).eval(), (torch.zeros(grid_hw[0] * grid_hw[1], patch_dim),), strict=True
        )


def tag_base_constants(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Mark every constant but LoRA factors (and the KV cache) for `base.ptd`; XNNPACK stores the delegated ones
    there under their content hash, so every program that uses the same base weight reads the same entry."""
    if any(type(tensor) not in (torch.Tensor, nn.Parameter) for tensor in program.state_dict.values()):
        program = program.run_decompositions({})  # unwrap torchao's tensor subclasses first, or the tags get lost
    signature = program.graph_signature
    constants = {
        **signature.inputs_to_parameters,
        **signature.inputs_to_buffers,
        **signature.inputs_to_lifted_tensor_constants,
    }
    mutated = set(signature.buffers_to_mutate.values())
    for node in program.graph.nodes:
        target = constants.get(node.name) if node.op == "placeholder" else None
        if target is not None and target not in mutated and not is_lora_module(target):
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = BASE_DATA
    return program


def external_base_tag(node) -> str | None:
    """`base.ptd` for a constant that stays outside the delegate, keyed there by its name. Constant propagation
    (quantized exports) names its results `_prop_tensor_constant<i>` afresh in every method, so those stay in the
    program, where names cannot collide."""
    return None if node.name.startswith("_prop_tensor_constant") else BASE_DATA


def lower(programs: dict[str, torch.export.ExportedProgram], external_base: bool, quantized: bool):
    """XNNPACK-lowered ExecuTorch program of `programs` (one method each). With `external_base`, the constants that
    stay outside the delegate (e.g. the token embedding) also go to `base.ptd`, under their names."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
    config = ExecutorchBackendConfig(
        external_constants=external_base_tag if external_base else False,
        do_quant_fusion_and_const_prop=quantized,
    )
    return edge.to_executorch(config)


def base_programs(model, buckets, patch_size: int, max_context: int) -> dict[str, torch.export.ExportedProgram]:
    programs = {
        "token_embedding": export_token_embedding(model, max_context),
        "text_decoder": decoder_program(model, max_context),
    }
    for bucket in buckets:
        programs[bucket_name(bucket)] = tag_base_constants(export_vision_bucket(model, bucket, patch_size))
    return programs


def decoder_program(model, max_context: int) -> torch.export.ExportedProgram:
    """The text decoder with its base weights tagged for `base.ptd` (the base's and every adapter's)."""
    return tag_base_constants(export_text_decoder(model, max_context))


def merge_lora(model) -> int:
    """Fold the active LoRA adapter into the base linears (peft's layer `merge`: W + scaling * B @ A) and put the
    base linears back in place of the LoRA wrappers, as peft's `merge_and_unload`; returns how many were merged.
    Only plain LoRA is exported (`check_exportable_adapter`): no token rows or saved modules to fold in."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        layer.merge()
        setattr(parent, child, layer.get_base_layer())
    if not names:
        raise ValueError("No LoRA layer to merge: load an adapter first.")
    return len(names)


def write_merged_decoder(folder: Path, adapter: str, max_context: int, path: Path) -> int:
    """A standalone `text_decoder` program of `folder` with `adapter` merged into its weights, every weight inside
    the program (no `base.ptd`); returns its size in bytes. For comparing against the unmerged adapter program."""
    model = load_for_export(folder, adapter)
    merge_lora(model)
    manager = lower({"text_decoder": export_text_decoder(model, max_context)}, external_base=False, quantized=False)
    if external_keys(manager):
        raise ValueError(f"The merged {adapter!r} program reads external data {sorted(external_keys(manager))}.")
    return write_program(manager, path)


def write_program(manager, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        manager.write_to_file(handle)
    return path.stat().st_size


def external_keys(manager) -> dict[str, set[str]]:
    """{data file: names of the weights the program reads from it} (ExecuTorch's named data of the program)."""
    named = manager._named_data  # NamedDataStoreOutput: external_data = {file tag: {key: entry}}
    return {tag: set(entries) for tag, entries in (named.external_data if named else {}).items()}


def check_shared_data(adapter_keys: dict[str, set[str]], base_keys: set[str], name: str) -> int:
    """An adapter program may read only base weights that `base.ptd` holds; returns how many it reads."""
    extra_files = set(adapter_keys) - {BASE_DATA}
    missing = adapter_keys.get(BASE_DATA, set()) - base_keys
    if extra_files or missing:
        raise ValueError(
            f"Adapter program {name!r} does not fit {BASE_DATA}.ptd: {len(missing)} of its "
            f"{len(adapter_keys.get(BASE_DATA, ()))} base weights are not there; other data files: "
            f"{sorted(extra_files)}."
        )
    return len(adapter_keys.get(BASE_DATA, ()))


def selected_adapters(model_folder: Path, text: str) -> list[str]:
    folder = model_folder / "adapters"
    found = folder.iterdir() if folder.is_dir() else ()
    available = sorted(path.name for path in found if (path / "adapter_config.json").is_file())
    if text == "all":
        return available
    if text == "none":
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"Unknown adapters {unknown} in {folder}; available: {available}.")
    return names


def check_output(output: Path, model: Path, overwrite: bool) -> None:
    """The output may not touch the model folder, and replaces an earlier one only with `overwrite`."""
    problem = overlap_error(output, model)
    if problem:
        raise ValueError(f"--output {output} must not be the model folder, contain it or lie inside it ({problem}).")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it.")


def export(args: argparse.Namespace) -> dict[str, Any]:
    """Write the 1+N programs, the processor files and the manifest; returns the manifest."""
    from transformers import AutoProcessor

    if args.max_context < 2:
        raise ValueError(f"--max-context must be at least 2, got {args.max_context}.")
    check_quantize_option(args.model, source_quantization(args.model), args.quantize)
    adapters = selected_adapters(args.model, args.adapters)
    processor = AutoProcessor.from_pretrained(str(args.model), trust_remote_code=True)
    buckets = resolve_buckets(args, processor.image_processor)
    check_output(args.output, args.model, args.overwrite)
    with staged_folder(args.output) as staged:  # an earlier output is replaced only once the new one is complete
        manifest = write_export(args, staged, processor, buckets, adapters)
    return manifest


def write_export(args: argparse.Namespace, output: Path, processor, buckets, adapters: list[str]) -> dict[str, Any]:
    image_processor = processor.image_processor
    started, timings = time.perf_counter(), {}

    model = load_for_export(args.model)
    quantization = quantize_for_device(model, args.group_size) if args.quantize == "8da4w" else None
    source = getattr(model.config, "quantization", None)
    if source:
        quantization = dequantized_manifest(source)
    programs = base_programs(model, buckets, image_processor.patch_size, args.max_context)
    base = lower(programs, external_base=True, quantized=args.quantize == "8da4w")
    sizes = {"base.pte": write_program(base, output / "base.pte")}
    base.write_tensor_data_to_file(str(output))
    sizes[f"{BASE_DATA}.ptd"] = (output / f"{BASE_DATA}.ptd").stat().st_size
    base_keys, shared = external_keys(base).get(BASE_DATA, set()), {}
    timings["base"] = round(time.perf_counter() - started, 1)
    text_config, image_token_id = model.config.text_config, model.config.image_token_id
    del model, base

    quantized = args.quantize == "8da4w"
    for name in adapters:
        began = time.perf_counter()
        adapted = load_for_export(args.model, name)
        if quantized:
            quantize_for_device(adapted, args.group_size)
        programs = {"text_decoder": decoder_program(adapted, args.max_context)}
        manager = lower(programs, external_base=False, quantized=quantized)
        shared[name] = check_shared_data(external_keys(manager), base_keys, name)
        sizes[f"adapters/{name}.pte"] = write_program(manager, output / "adapters" / f"{name}.pte")
        timings[f"adapters/{name}"] = round(time.perf_counter() - began, 1)
        del adapted, manager

    for file_name in PROCESSOR_FILES:
        if (args.model / file_name).is_file():
            shutil.copy2(args.model / file_name, output / file_name)
    manifest = {
        "format": "andesvl-executorch",
        "format_version": FORMAT_VERSION,
        "source": str(args.model),
        "data": f"{BASE_DATA}.ptd",
        "base": "base.pte",
        "adapters": {name: f"adapters/{name}.pte" for name in adapters},
        "buckets": {f"{w}x{h}": bucket_name((w, h)) for w, h in buckets},
        "max_context": args.max_context,
        "hidden_size": text_config.hidden_size,
        "vocab_size": text_config.vocab_size,
        "image_token_id": image_token_id,
        "base_weights_shared": shared,
        "quantization": quantization,
        "sizes_bytes": sizes,
        "export_seconds": timings,
    }
    (output / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    manifest = export(args)
    for name, size in manifest["sizes_bytes"].items():
        print(f"{name:32s} {size / 2**20:9.2f} MiB")
    print(f"wrote {args.output / MANIFEST} ({sum(manifest['export_seconds'].values()):.0f} s)")
    return manifest


if __name__ == "__main__":
    main()
