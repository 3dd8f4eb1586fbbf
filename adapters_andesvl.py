"""The "1+N" scenario-adapter conveniences of AndesVL: thin helpers over transformers' integrated peft API.

`AndesVLAdapterMixin` is composed by `AndesVLForConditionalGeneration`, so `model.available_adapters()`,
`model.load_scenario_adapter(name)` and the fixed `set_adapter` / `enable_adapters` work on the model; it imports
neither the model nor the processor (peft is imported by transformers once an adapter is loaded).

A quantized base's linears (`AndesVLQuantizedLinear`) are no `nn.Linear`: peft wraps them with the LoRA layer here,
through its custom-module route (`LoraConfig._register_custom_module`). The model's `add_adapter`, `load_adapter` and
`load_scenario_adapter` register it themselves; for `get_peft_model` / `PeftModel.from_pretrained`, pass a config
through `model.register_lora_layers(config)`.
"""

from __future__ import annotations

import json
import logging
import re
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

from .quantization_andesvl import AndesVLQuantizedLinear

MERGE_REFUSAL = (
    "Merging a LoRA adapter into the quantized base (peft `merge_adapter`, `merge_and_unload`) is not supported: the "
    "base has no float weight to merge into. Keep adapters unmerged, or merge into the float model and quantize again."
)


class AndesVLAdapterMixin:
    """Adapter management for a transformers model with `PeftAdapterMixin` (`load_adapter`, `active_adapters`)."""

    def available_adapters(self) -> list[str]:
        """Names of the scenario adapters shipped as `adapters/<name>/` in the repo this model was loaded from."""
        return sorted(
            path.parent.name for path in _repo_folder(self.name_or_path).glob("adapters/*/adapter_config.json")
        )

    def register_lora_layers(self, config: Any) -> Any:
        """`config` (a peft `LoraConfig`) with the LoRA layer for this model's quantized linears registered (peft's
        custom-module route); other configs, and configs for a float base, are returned as they are."""
        if self._has_quantized_linears() and hasattr(config, "_register_custom_module"):
            config._register_custom_module(lora_layer_mapping())
        return config

    def add_adapter(self, adapter_config: Any, adapter_name: str | None = None) -> None:
        """transformers' `add_adapter`, with `register_lora_layers(adapter_config)` first."""
        super().add_adapter(self.register_lora_layers(adapter_config), adapter_name)

    def load_adapter(self, peft_model_id: str | None = None, adapter_name: str | None = None, *args, **kwargs) -> Any:
        """transformers' `load_adapter`. On a quantized base the adapter's config is read first (a Hub id's adapter
        folder is downloaded) and passed with `register_lora_layers` applied: peft has no LoRA layer of its own for
        the quantized linears."""
        if peft_model_id is None or args or kwargs.get("peft_config") is not None:
            return super().load_adapter(peft_model_id, adapter_name, *args, **kwargs)
        if not self._has_quantized_linears():
            return super().load_adapter(peft_model_id, adapter_name, **kwargs)
        try:  # in a try block: transformers requires every package imported outside one (peft is optional)
            from peft import PeftConfig
        except ImportError as error:
            raise ImportError("Loading an adapter needs peft: pip install peft") from error

        adapter_kwargs = dict(kwargs.pop("adapter_kwargs", None) or {})
        subfolder = adapter_kwargs.pop("subfolder", None) or kwargs.pop("subfolder", None) or ""
        folder = _repo_folder(str(peft_model_id), f"{subfolder}/*" if subfolder else "adapter_*") / subfolder
        config = PeftConfig.from_pretrained(str(folder))
        config.inference_mode = not kwargs.get("is_trainable", False)
        kwargs["peft_config"] = self.register_lora_layers(config)
        if adapter_kwargs:
            kwargs["adapter_kwargs"] = adapter_kwargs
        return super().load_adapter(str(folder), adapter_name, **kwargs)

    def _has_quantized_linears(self) -> bool:
        return any(isinstance(module, AndesVLQuantizedLinear) for module in self.modules())

    def enable_adapters(self) -> None:
        """transformers' `enable_adapters`, which turns the LoRA layers back on but not the full copies of
        `modules_to_save` (a projector trained with `--train-projector`) that `disable_adapters` turned off: without
        this, every adapter used after a disable/enable round would run on the base projector. A copy comes back
        only where the active adapter saved one."""
        super().enable_adapters()
        active = self.active_adapters()
        for wrapper in self._modules_to_save_wrappers():
            wrapper.enable_adapters(self._saves_copy(wrapper, active))

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """transformers' `set_adapter`, except for modules that some loaded adapters save in full (`modules_to_save`)
        and the one being activated does not: transformers asks them to switch too and fails ("Adapter gui not found
        in {'ocr'}", with `ocr` trained with `--train-projector` and `gui` without). Like peft's own
        `PeftModel.set_adapter`, such a module runs its base weights while that adapter is active."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if name not in getattr(self, "peft_config", {})]
        if unknown:
            raise ValueError(
                f"{len(unknown)} adapter(s) not loaded: {unknown}; loaded: {list(getattr(self, 'peft_config', {}))}."
            )
        try:  # in a try block: transformers requires every package imported outside one (peft is optional)
            from peft.tuners.tuners_utils import BaseTunerLayer  # installed once an adapter is loaded
        except ImportError as error:
            raise ImportError("set_adapter needs peft: pip install peft") from error

        layers = [module for module in self.modules() if isinstance(module, BaseTunerLayer)]
        enabled = not any(layer.disable_adapters for layer in layers)  # disable_adapters() stays in force
        for layer in layers:
            layer.set_adapter(adapter_name)
        for wrapper in self._modules_to_save_wrappers():
            saved = self._saves_copy(wrapper, names)
            if saved:
                wrapper.set_adapter(adapter_name)
            wrapper.enable_adapters(saved and enabled)

    def _modules_to_save_wrappers(self) -> list[nn.Module]:
        return [module for module in self.modules() if type(module).__name__ == "ModulesToSaveWrapper"]

    @staticmethod
    def _saves_copy(wrapper: nn.Module, adapter_names: list[str]) -> bool:
        """Whether every one of these adapters saved its own copy of the wrapped module."""
        return all(name in wrapper._adapters for name in adapter_names)

    def load_scenario_adapter(self, name: str, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Load and activate `adapters/<name>/` of this model's repo (local folder or Hub id) with `load_adapter`.

        The adapter folder is resolved locally first (for a Hub id: a snapshot of just that folder), which also
        sidesteps transformers 4.57 ignoring `subfolder` for local repos; its weights are checked against this
        model before peft sees them. `kwargs` go to `load_adapter`.
        """
        available = self.available_adapters()
        if name not in available:
            raise ValueError(f"Unknown adapter {name!r} for {self.name_or_path}; available adapters: {available}.")
        folder = _repo_folder(self.name_or_path, f"adapters/{name}/*") / "adapters" / name
        check_adapter_matches_model(folder, self)
        check_adapter_fits_loaded_adapters(folder, self)
        check_adapter_fits_quantized_base(folder, self)
        adapter_name = adapter_name or name
        if adapter_name in (getattr(self, "peft_config", None) or {}):
            raise ValueError(f"An adapter named {adapter_name!r} is already loaded; pass another adapter_name.")
        previous = self.active_adapters() if getattr(self, "peft_config", None) else []
        loaded = list(getattr(self, "peft_config", None) or {})
        report_logger, report_filter = logging.getLogger("transformers.integrations.peft"), _SpuriousLoadReport(loaded)
        report_logger.addFilter(report_filter)
        try:
            self.load_adapter(str(folder), adapter_name=adapter_name, **kwargs)
            self._check_tied_token_rows(adapter_name)
            self.set_adapter(adapter_name)
        except Exception:
            self._unload_failed_adapter(adapter_name, previous)
            raise
        finally:
            report_logger.removeFilter(report_filter)

    def _unload_failed_adapter(self, adapter_name: str, previous: list[str]) -> None:
        """Leave the loaded set as it was before a failed load: drop the half-loaded adapter, re-activate the old."""
        if adapter_name in (getattr(self, "peft_config", None) or {}):
            self.delete_adapter(adapter_name)
        if previous and getattr(self, "peft_config", None):
            self.set_adapter(previous if len(previous) > 1 else previous[0])

    def _check_tied_token_rows(self, adapter_name: str) -> None:
        """An adapter's trainable-token rows (peft `trainable_token_indices`) are saved once, under `embed_tokens`;
        with tied embeddings the output rows must be those same rows, or they would stay at the base's values."""
        inputs = getattr(getattr(self.get_input_embeddings(), "token_adapter", None), "trainable_tokens_delta", {})
        if adapter_name not in inputs or not self.config.tie_word_embeddings:
            return
        outputs = getattr(getattr(self.get_output_embeddings(), "token_adapter", None), "trainable_tokens_delta", {})
        if adapter_name not in outputs or outputs[adapter_name] is not inputs[adapter_name]:
            raise RuntimeError(
                f"Adapter {adapter_name!r} trains {inputs[adapter_name].shape[0]} token rows of the tied embeddings, "
                "but peft did not tie them to the output layer; upgrade peft (>= 0.15)."
            )


@cache
def lora_layer_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """peft's custom-module mapping for a quantized base: `{AndesVLQuantizedLinear: its LoRA layer}`. The LoRA layer
    is peft's `lora.Linear` (adapter weights, dropout, scaling, mixed batches, hot-swapping) over the quantized
    layer's own forward; merging is refused, there is no float weight to merge into. Built on first use: peft is
    optional until an adapter is loaded."""
    try:  # in a try block: transformers requires every package imported outside one (peft is optional)
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError as error:
        raise ImportError("LoRA adapters need peft: pip install peft") from error

    class AndesVLQuantizedLoraLinear(LoraLinear):
        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
            if config.use_dora:
                raise ValueError(
                    "DoRA needs the base layer's float weight; a quantized base has none (use_dora=False)."
                )
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            raise NotImplementedError(MERGE_REFUSAL)

    return {AndesVLQuantizedLinear: AndesVLQuantizedLoraLinear}


def _repo_folder(name_or_path: str, pattern: str = "adapters/*/adapter_config.json") -> Path:
    """A local repo as is; for a Hub id, the (cached) snapshot holding only the files matching `pattern`."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=[pattern]))


def check_adapter_fits_loaded_adapters(folder: Path, model: nn.Module) -> None:
    """Raise a clear ValueError, instead of peft's errors deep in injection or at the next forward, when the adapter in
    `folder` cannot live next to the adapters already loaded: it puts LoRA on a module that a loaded adapter trains in
    full (`modules_to_save`), or the other way round (e.g. `--train-projector` next to LoRA on `mlp.0`); or only one
    side has trainable token rows (peft's token layer raises KeyError for an active adapter without rows)."""
    config = read_adapter_config(folder)
    targets, saved = config.get("target_modules") or [], config.get("modules_to_save") or []

    def listed(name: str, keys: list[str]) -> bool:  # peft's rule for a list of module names: name suffixes
        return any(name == key or name.endswith(f".{key}") for key in keys)

    def lora_target(name: str) -> bool:  # a string of target modules is a regex, fullmatched
        return re.fullmatch(targets, name) is not None if isinstance(targets, str) else listed(name, targets)

    clashes, with_rows = [], set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "ModulesToSaveWrapper" and lora_target(name):
            owners = sorted(module.modules_to_save) or "a deleted adapter (peft keeps its wrapper)"
            clashes.append(f"{name} (LoRA here, trained in full by {owners})")
        elif hasattr(module, "lora_A") and listed(name, saved):
            clashes.append(f"{name} (trained in full here, LoRA of {sorted(module.lora_A)})")
        elif kind == "TrainableTokensLayer":
            with_rows.update(module.token_indices)
    loaded, with_rows = sorted(getattr(model, "peft_config", None) or {}), sorted(with_rows)
    without_rows = [name for name in loaded if name not in with_rows]
    if loaded and (without_rows if config.get("trainable_token_indices") else with_rows):
        raise ValueError(
            f"Adapter {folder} cannot be loaded next to the adapters already loaded: peft cannot switch between "
            f"adapters with trainable token rows ({with_rows or 'this one'}) and adapters without them "
            f"({without_rows or 'this one'}). Load it on a freshly loaded model, or train all adapters of the set "
            "alike (all or none with finetune_lora.py --train-answer-tokens)."
        )
    if clashes:
        raise ValueError(
            f"Adapter {folder} cannot be loaded next to the adapters already loaded: {len(clashes)} modules clash, "
            f"{'; '.join(clashes[:3])}. peft cannot hold LoRA and a full copy (modules_to_save) of one module: load "
            "it on a freshly loaded model, or train both adapters the same way (both with or both without "
            "finetune_lora.py --train-projector)."
        )


class _SpuriousLoadReport(logging.Filter):
    """Drops transformers 5's adapter load report when all it lists as MISSING are keys that are not missing: the
    adapters loaded before this one (`...lora_A.<loaded>.weight`: 5.x expects every LoRA key of the model from the new
    adapter's file) and the names that peft's trainable-token wrappers add, the tied output copy of the rows
    (`lm_head.token_adapter.trainable_tokens_delta.<name>`; peft saves them once, under `embed_tokens`, and shares
    them, which `_check_tied_token_rows` verifies) and the wrapped base weights (`...token_adapter.base_layer.weight`,
    loaded with the base model). Nothing is newly initialized."""

    WRAPPER_NAMES = ("lm_head.token_adapter.trainable_tokens_delta.", ".token_adapter.base_layer.")

    def __init__(self, loaded: list[str] | tuple[str, ...] = ()):
        super().__init__()
        self.loaded_markers = tuple(f".{name}." for name in loaded)

    def filter(self, record: logging.LogRecord) -> bool:
        rows = [line.split("|") for line in record.getMessage().splitlines() if line.count("|") >= 2]
        rows = [(key.strip(), status.strip()) for key, status, *_ in rows]
        rows = [(key, status) for key, status in rows if key not in ("Key", "") and set(key) != {"-"}]
        names = self.WRAPPER_NAMES + self.loaded_markers
        spurious = [status == "MISSING" and any(name in key for name in names) for key, status in rows]
        return not rows or not all(spurious)


def read_adapter_config(folder: Path) -> dict:
    """`adapter_config.json` as a dict, or a ValueError that names the file."""
    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable adapter config ({error}).") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    return config


def check_adapter_fits_quantized_base(folder: Path, model: nn.Module) -> None:
    """On a quantized base: token rows cannot reach a quantized LM head (ValueError), and a QALFT adapter trained
    against another quantization scheme than this base's still loads, with a warning naming both schemes."""
    quantization = getattr(model.config, "quantization", None)
    if not quantization:
        return
    if quantization.get("lm_head") and read_adapter_config(folder).get("trainable_token_indices"):
        raise ValueError(
            f"Adapter {folder} trains embedding token rows, but this base's LM head is quantized (quantization "
            "lm_head=true, untied): the adapter's output rows cannot be applied. Use a base quantized without "
            "--lm-head."
        )
    metadata = folder / "andesvl_adapter.json"
    trained = json.loads(metadata.read_text()).get("qalft") if metadata.is_file() else None
    if not trained:
        return
    keys = ("bits", "group_size", "scale_dtype", "modules", "lm_head")

    def scheme(spec: dict) -> dict:
        # metadata written before the lm_head key existed: no quantized head
        return {key: spec.get(key, False if key == "lm_head" else None) for key in keys}

    if scheme(trained) != scheme(quantization):
        logging.getLogger(__name__).warning(
            "Adapter %s was trained with QALFT against %s, but this base is quantized with %s: it loads, but its "
            "answers may differ from its evaluated ones; quantize the base with that scheme to match.",
            folder.name,
            scheme(trained),
            scheme(quantization),
        )


def check_adapter_matches_model(folder: Path, model: nn.Module) -> None:
    """Raise a clear ValueError when an adapter folder is missing, corrupt, or was trained for another base."""
    config = read_adapter_config(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"Adapter folder {folder} has no adapter_model.safetensors.")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises several error types for damaged files
        raise ValueError(f"{weights} is not a readable safetensors file ({error}).") from error
    adapter_keys = [key for key in shapes if ".lora_" in key or key.endswith(".token_adapter.trainable_tokens_delta")]
    if not adapter_keys and not config.get("modules_to_save"):
        raise ValueError(
            f"{weights} holds no LoRA or token-row tensors ({len(shapes)} tensors): it would load and change nothing."
        )
    problems = []
    for key, shape in shapes.items():
        if key.endswith(".token_adapter.trainable_tokens_delta"):  # peft trainable tokens: (tokens, embedding width)
            width = model.config.text_config.hidden_size  # the embedding may already be wrapped by a loaded adapter
            if shape[1] != width:
                problems.append(f"{key}: adapter token rows of width {shape[1]}, this model's embeddings have {width}")
            continue
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module_name = key.removeprefix("base_model.model.").split(".lora_")[0]
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            problems.append(f"{key}: this model has no module {module_name}")
            continue
        expected = (shape[0], module.in_features) if ".lora_A." in key else (module.out_features, shape[1])
        if shape != expected:
            problems.append(f"{key}: adapter shape {shape}, this model needs {expected}")
    if problems:
        raise ValueError(
            f"Adapter {folder} does not fit this model ({len(problems)} of {len(shapes)} tensors; it was trained "
            f"for another base?): " + "; ".join(problems[:3])
        )


__all__ = ["AndesVLAdapterMixin", "check_adapter_matches_model", "lora_layer_mapping", "read_adapter_config"]
