"""AndesVL configuration: a native-resolution ViT (AIMv2 or SigLIP2 flavour), a 2x2 token merge + MLP projector, and
a stock Qwen3 language model.

The official checkpoints (`OPPOer/AndesVL-*`) ship `config.json` files with `model_type` `andesvl-aimv2-qwen3`
(1B/2B/4B) or `andesvl-siglip2-qwen3` (0.6B); both load verbatim into `AndesVLConfig`, which picks the vision
config class from `vision_config["model_type"]` and writes the official `model_type` back when saving.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig
from transformers.models.qwen3 import Qwen3Config

OFFICIAL_MODEL_TYPES = ("andesvl-aimv2-qwen3", "andesvl-siglip2-qwen3")


class AndesVLAimv2VisionConfig(PretrainedConfig):
    r"""
    AIMv2 NaViT-RoPE vision encoder (AndesVL 1B/2B/4B). Field names and defaults follow the official
    `configuration_aimv2_navit_rope.py`; the official `config.json` overrides several defaults (`image_size` 448,
    `preserve_original_pe` true, `interpolate_pe_method` "two_dim"), so always load it from the JSON.

    Args:
        hidden_size (`int`, *optional*, defaults to 1024): width of the encoder.
        intermediate_size (`int`, *optional*, defaults to 2816): SwiGLU hidden width.
        num_hidden_layers (`int`, *optional*, defaults to 24): number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 8): attention heads (head_dim = hidden / heads).
        num_channels (`int`, *optional*, defaults to 3): input channels.
        image_size (`int`, *optional*, defaults to 224): pre-training resolution; the learned position table has
            `(image_size // patch_size) ** 2` rows and is bicubically resized to each image's patch grid.
        patch_size (`int`, *optional*, defaults to 14): side of a square patch in pixels.
        rms_norm_eps (`float`, *optional*, defaults to 1e-5): RMSNorm epsilon.
        attention_dropout (`float`, *optional*, defaults to 0.0): attention-probability dropout (training only).
        projection_dropout (`float`, *optional*, defaults to 0.0): kept for checkpoint compatibility (unused).
        qkv_bias (`bool`, *optional*, defaults to `False`): bias on the fused qkv projection.
        use_bias (`bool`, *optional*, defaults to `False`): bias on the attention output and MLP projections.
        hidden_stride (`int`, *optional*, defaults to 2): token-merge factor per side (2x2 patches -> 1 LLM token).
        window_size (`int`, *optional*, defaults to 112): window attention size in pixels, used only by blocks not
            in `fullatt_block_indexes`.
        fullatt_block_indexes (`list[int]`, *optional*): blocks with full attention; `None` (all released
            checkpoints) means every block attends over its whole image, so window attention is never used.
        temporal_patch_size (`int`, *optional*, defaults to 1): kept for checkpoint compatibility (images only).
        preserve_original_pe (`bool`, *optional*, defaults to `False`): add the learned absolute position table.
        interpolate_pe_method (`str`, *optional*, defaults to `"one_dim"`): how the table is resized; the released
            checkpoints use `"two_dim"` (bicubic on the 2-D grid).
        disable_rope (`bool`, *optional*, defaults to `False`): turn off the 2-D rotary embedding.
        rope_theta (`float`, *optional*, defaults to 10000.0): base of the 2-D rotary frequencies.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the random init (training from scratch).
    """

    model_type = "aimv2"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 1024,
        intermediate_size: int = 2816,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 8,
        num_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 14,
        rms_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        projection_dropout: float = 0.0,
        qkv_bias: bool = False,
        use_bias: bool = False,
        hidden_stride: int = 2,
        window_size: int = 112,
        fullatt_block_indexes: list[int] | None = None,
        temporal_patch_size: int = 1,
        preserve_original_pe: bool = False,
        interpolate_pe_method: str = "one_dim",
        disable_rope: bool = False,
        min_pixels: int = 3136,
        max_pixels: int = 1960000,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.rms_norm_eps = rms_norm_eps
        self.attention_dropout = attention_dropout
        self.projection_dropout = projection_dropout
        self.qkv_bias = qkv_bias
        self.use_bias = use_bias
        self.hidden_stride = hidden_stride
        self.window_size = window_size
        self.fullatt_block_indexes = fullatt_block_indexes
        self.temporal_patch_size = temporal_patch_size
        self.preserve_original_pe = preserve_original_pe
        self.interpolate_pe_method = interpolate_pe_method
        self.disable_rope = disable_rope
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        _check_vision_shapes(self)
        if fullatt_block_indexes is not None:
            raise ValueError(
                f"fullatt_block_indexes={fullatt_block_indexes}: window attention is not implemented; every released "
                "AndesVL checkpoint uses null (full attention in all blocks)."
            )
        if preserve_original_pe and interpolate_pe_method != "two_dim":
            raise ValueError(
                f"interpolate_pe_method={interpolate_pe_method!r} is not supported; the released checkpoints use "
                "'two_dim' (bicubic resize of the 2-D position grid)."
            )

    @property
    def merge_size(self) -> int:
        return self.hidden_stride

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table (a square grid)."""
        return (self.image_size // self.patch_size) ** 2


class AndesVLSiglip2VisionConfig(PretrainedConfig):
    r"""
    SigLIP2 NaViT-RoPE vision encoder (AndesVL 0.6B). Defaults are the SigLIP2-Base values of the official code.

    Args:
        hidden_size (`int`, *optional*, defaults to 768): width of the encoder.
        intermediate_size (`int`, *optional*, defaults to 3072): MLP hidden width.
        num_hidden_layers (`int`, *optional*, defaults to 12): number of transformer layers.
        num_attention_heads (`int`, *optional*, defaults to 12): attention heads.
        num_channels (`int`, *optional*, defaults to 3): input channels.
        patch_size (`int`, *optional*, defaults to 16): side of a square patch in pixels.
        hidden_act (`str`, *optional*, defaults to `"gelu_pytorch_tanh"`): MLP activation; `"gelu"` selects the
            exact-erf GELU of the vLLM port.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): LayerNorm epsilon.
        attention_dropout (`float`, *optional*, defaults to 0.0): attention-probability dropout (training only).
        rope_theta (`float`, *optional*, defaults to 10000.0): base of the 2-D rotary frequencies.
        num_patches (`int`, *optional*, defaults to 1024): rows of the learned position table (a square grid).
        preserve_original_pe (`bool`, *optional*, defaults to `True`): add the learned absolute position table.
        hidden_stride (`int`, *optional*, defaults to 2): token-merge factor per side.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the random init.
    """

    model_type = "siglip2_navit_rope_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_channels: int = 3,
        patch_size: int = 16,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        rope_theta: float = 10000.0,
        num_patches: int = 1024,
        preserve_original_pe: bool = True,
        hidden_stride: int = 2,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.rope_theta = rope_theta
        self.num_patches = num_patches
        self.preserve_original_pe = preserve_original_pe
        self.hidden_stride = hidden_stride
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        _check_vision_shapes(self)
        if math.isqrt(num_patches) ** 2 != num_patches:
            raise ValueError(f"num_patches={num_patches} must be a perfect square (a square position grid).")

    @property
    def merge_size(self) -> int:
        return self.hidden_stride

    @property
    def num_positions(self) -> int:
        return self.num_patches


VISION_CONFIG_CLASSES = {
    AndesVLAimv2VisionConfig.model_type: AndesVLAimv2VisionConfig,
    AndesVLSiglip2VisionConfig.model_type: AndesVLSiglip2VisionConfig,
}


def _check_vision_shapes(config: PretrainedConfig) -> None:
    """Validate what the 2-D RoPE and the token merge need, so a bad config fails at construction."""
    heads, width = config.num_attention_heads, config.hidden_size
    if width % heads:
        raise ValueError(f"hidden_size={width} is not divisible by num_attention_heads={heads}.")
    if (width // heads) % 4:
        raise ValueError(f"head_dim={width // heads} must be a multiple of 4 for the 2-D rotary embedding.")


class AndesVLConfig(PretrainedConfig):
    r"""
    AndesVL composite configuration.

    Args:
        vision_config (`dict` or config, *optional*): the vision encoder; `{"model_type": "aimv2", ...}` builds an
            [`AndesVLAimv2VisionConfig`], `{"model_type": "siglip2_navit_rope_model", ...}` an
            [`AndesVLSiglip2VisionConfig`]. Defaults to AIMv2-Large.
        text_config (`dict` or [`Qwen3Config`], *optional*): the Qwen3 language model. Defaults to Qwen3-0.6B shape.
        image_token_id (`int`, *optional*, defaults to 151654): `<|vision_pad|>`, the placeholder each visual token
            replaces.
        image_start_token_id (`int`, *optional*, defaults to 151652): `<img>`, opens an image span.
        image_end_token_id (`int`, *optional*, defaults to 151653): `</img>`, closes an image span.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`): share the LM head with the input embedding.
            Kept at the top level (transformers 5 reads it there) and mirrored into `text_config` (4.x reads it there).
        quantization (`dict`, *optional*): a weight-only quantized base (see `quantization_andesvl.py`):
            `{"bits": 4 | 8, "group_size": int, "modules": regex, "scale_dtype": "float16" | "bfloat16" | "float32",
            "lm_head": bool}`. The `nn.Linear`s whose full names fullmatch `modules` (and, with `lm_head`, the LM head,
            which needs `tie_word_embeddings=False`) are built as `AndesVLQuantizedLinear` (state keys `qweight`,
            `scales`). `None` (default) means a float model. Written by `andesvl_tools/quantize.py`.
    """

    model_type = "andesvl"
    sub_configs = {"vision_config": PretrainedConfig, "text_config": Qwen3Config}

    def __init__(
        self,
        vision_config: dict | PretrainedConfig | None = None,
        text_config: dict | Qwen3Config | None = None,
        image_token_id: int = 151654,
        image_start_token_id: int = 151652,
        image_end_token_id: int = 151653,
        tie_word_embeddings: bool = True,
        quantization: dict | None = None,
        **kwargs: Any,
    ):
        self.vision_config = _build_vision_config(vision_config)
        self.text_config = _build_text_config(text_config)
        self.text_config.tie_word_embeddings = tie_word_embeddings
        self.image_token_id = image_token_id
        self.image_start_token_id = image_start_token_id
        self.image_end_token_id = image_end_token_id
        self.quantization = quantization
        kwargs.pop("model_type", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def vision_type(self) -> str:
        """`"aimv2"` or `"siglip2"`: which encoder family the vision config describes."""
        return "siglip2" if isinstance(self.vision_config, AndesVLSiglip2VisionConfig) else "aimv2"

    @property
    def image_token_group(self) -> int:
        """ViT patches merged into one LLM token (4 for the 2x2 merge)."""
        return self.vision_config.merge_size**2

    @classmethod
    def get_config_dict(cls, *args: Any, **kwargs: Any) -> tuple[dict, dict]:
        # The official JSON names the variant in `model_type`; both variants are this class.
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") in OFFICIAL_MODEL_TYPES:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["model_type"] = f"andesvl-{self.vision_type}-qwen3"
        output["vision_config"] = self.vision_config.to_dict()
        output["text_config"] = self.text_config.to_dict()
        return output


def _build_vision_config(vision_config: dict | PretrainedConfig | None) -> PretrainedConfig:
    if isinstance(vision_config, PretrainedConfig):
        return vision_config
    vision_config = dict(vision_config or {})
    vision_type = vision_config.pop("model_type", AndesVLAimv2VisionConfig.model_type)
    if vision_type not in VISION_CONFIG_CLASSES:
        raise ValueError(
            f"Unknown vision_config model_type {vision_type!r}; expected one of {sorted(VISION_CONFIG_CLASSES)}."
        )
    return VISION_CONFIG_CLASSES[vision_type](**vision_config)


def _build_text_config(text_config: dict | Qwen3Config | None) -> Qwen3Config:
    if isinstance(text_config, PretrainedConfig):
        return text_config
    text_config = dict(text_config or {})
    text_type = text_config.pop("model_type", "qwen3")
    if text_type != "qwen3":
        raise ValueError(f"AndesVL's language model is Qwen3; text_config has model_type {text_type!r}.")
    return Qwen3Config(**text_config)


__all__ = ["AndesVLAimv2VisionConfig", "AndesVLConfig", "AndesVLSiglip2VisionConfig"]
