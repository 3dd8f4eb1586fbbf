"""AndesVL in vLLM: the repo's own vision encoder and projector (its remote code), vLLM's Qwen3 as the language model.

Data flow, as in `modeling_andesvl.py`: packed patches [N, C*p*p] + `image_grid_hw` [num_images, 2] -> vision
encoder [N, Dv] -> 2x2 merge + projector [N/4, D_llm] (the model's own `get_image_features`) -> written over the
`<|vision_pad|>` placeholders -> vLLM's `Qwen3ForCausalLM` (paged KV cache, batched multi-LoRA, tensor/pipeline
parallel). The prompt side uses the repo's `AndesVLProcessor`: each `<image>` becomes `<img>` + N pads + `</img>`.

The encoder classes are loaded from the served repo itself (`auto_map`, as `trust_remote_code` does), so eager
transformers and vLLM run one implementation of the vision side; the official state-dict keys load unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import torch
from torch import nn
from transformers import BatchFeature
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsLoRA,
    SupportsMultiModal,
    SupportsPP,
)
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
    cached_encode,
)
from vllm.sequence import IntermediateTensors

IMAGE_PLACEHOLDER = "<image>"  # what the chat template writes per image part; the processor expands it


def hf_model_class(model_config) -> type:
    """The served repo's own `AndesVLForConditionalGeneration` (from its `auto_map`, local folder or Hub cache)."""
    config = model_config.hf_config
    reference = config.auto_map.get("AutoModel") if getattr(config, "auto_map", None) else None
    if not reference:
        raise ValueError(
            f"{model_config.model} has no auto_map['AutoModel'] in config.json; AndesVL's vision code comes from the "
            "repo's modeling_andesvl.py (build the folder with andesvl_tools.build_repo)."
        )
    return get_class_from_dynamic_module(reference, model_config.model, revision=model_config.revision)


class AndesVLProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # AndesVLProcessor takes its image options flat (resize_mode=..., max_size=...), not in transformers'
        # images_kwargs scope: keep every request option flat.
        return {}

    @cached_property
    def image_processor(self):
        return self.get_hf_processor().image_processor

    @property
    def resize_modes(self) -> tuple[str, ...]:
        return sys.modules[type(self.image_processor).__module__].RESIZE_MODES

    def get_image_size_with_most_features(self) -> ImageSize:
        """A square image at the largest canvas either resize rule makes under the served options (for memory
        profiling: a request cannot produce more visual tokens than this)."""
        configured = self.ctx.get_merged_mm_kwargs({})
        # the rules the served model may use: the configured one, else every rule the image processor has
        modes = [configured["resize_mode"]] if configured.get("resize_mode") else self.resize_modes
        best, best_tokens = None, -1
        for mode in modes:
            options = {**configured, "resize_mode": mode}
            side = self.image_processor.expected_canvas_size(10_000, 10_000, **options)[0]
            tokens = self.image_processor.get_number_of_image_tokens(side, side, **options)
            if tokens > best_tokens:
                best, best_tokens = side, tokens
        return ImageSize(width=best, height=best)


class AndesVLDummyInputsBuilder(BaseDummyInputsBuilder[AndesVLProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Mapping[str, MultiModalDummyOptions]
    ) -> MultiModalDataDict:
        size = self.info.get_image_size_with_most_features()
        return {
            "image": self._get_dummy_images(
                width=size.width,
                height=size.height,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image"),
            )
        }


class AndesVLMultiModalProcessor(BaseMultiModalProcessor[AndesVLProcessingInfo]):
    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str:
        # The prompt is tokenized by vLLM; the processor sees the images with one marker each (it checks the count).
        return self.dummy_inputs.get_dummy_text(mm_counts)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        grid_hw = hf_inputs.get("image_grid_hw", torch.empty((0, 2), dtype=torch.long))  # [num_images, 2]
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", grid_hw.prod(-1)),  # packed patches
            "image_grid_hw": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        tokenizer = self.info.get_tokenizer()
        start, pad, end = (
            tokenizer.convert_tokens_to_ids(token)
            for token in (processor.image_start_token, processor.image_token, processor.image_end_token)
        )
        marker = cached_encode(tokenizer, IMAGE_PLACEHOLDER, add_special_tokens=False)  # plain text, several ids

        def image_span(item_index: int) -> PromptUpdateDetails:
            grid_hw = out_mm_kwargs["image"][item_index]["image_grid_hw"].data  # [2]
            (num_tokens,) = processor.image_processor.num_image_tokens(grid_hw)
            return PromptUpdateDetails.select_token_id([start, *[pad] * num_tokens, end], pad)

        return [PromptReplacement(modality="image", target=marker, replacement=image_span)]


@MULTIMODAL_REGISTRY.register_processor(
    AndesVLMultiModalProcessor, info=AndesVLProcessingInfo, dummy_inputs=AndesVLDummyInputsBuilder
)
class AndesVLForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsLoRA, SupportsPP):
    """Children named as in the official checkpoints: `vision_encoder`, `mlp`, `language_model`."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError(f"AndesVL takes images and text only, not {modality}.")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if getattr(config, "quantization", None):
            raise ValueError(
                f"{vllm_config.model_config.model} is an AndesVL weight-only quantized base "
                f"({config.quantization}); vLLM serves the float checkpoint (pass --quantization for vLLM's own "
                "schemes) and the adapters trained against it."
            )
        self.config = config
        model_class = hf_model_class(vllm_config.model_config)
        self.hf_get_image_features = model_class.get_image_features  # one implementation of the vision side
        modeling = sys.modules[model_class.__module__]
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_encoder = modeling.VISION_MODEL_CLASSES[config.vision_type](config.vision_config)
            self.mlp = modeling.AndesVLProjector(config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["Qwen3ForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(
            language_model="language_model", connector="mlp", tower_model="vision_encoder"
        )

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.pop("pixel_values", None)  # [N, C*p*p], the packed patches of this step's images
        image_grid_hw = kwargs.pop("image_grid_hw", None)  # [num_images, 2]
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        image_grid_hw = torch.as_tensor(image_grid_hw).reshape(-1, 2).to(torch.long)
        dtype = next(self.vision_encoder.parameters()).dtype
        features = self.hf_get_image_features(self, pixel_values.to(dtype), image_grid_hw)  # [N/4, D_llm]
        tokens_per_image = (image_grid_hw.prod(-1) // self.config.image_token_group).tolist()
        return list(features.split(tokens_per_image))

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(
            input_ids=input_ids,
            positions=positions,
            intermediate_tensors=intermediate_tensors,
            inputs_embeds=inputs_embeds,
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)


__all__ = ["AndesVLForConditionalGeneration"]
