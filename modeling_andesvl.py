"""AndesVL: a mobile-side vision-language model (arXiv 2510.11496).

Notable features, in data-flow order:
- Native-resolution ViT over packed images: every image keeps its own aspect ratio; its patches are ordered in
  2x2 blocks (TL, TR, BL, BR), and all images of a batch are concatenated into one sequence with per-image attention.
- Two encoder flavours with the official checkpoint layouts: AIMv2-Large (1B/2B/4B: conv patchifier + RMSNorm,
  SwiGLU blocks, fused qkv) and SigLIP2-Base (0.6B: linear patch embedding, GELU MLP, separate q/k/v).
- A learned absolute position table, bicubically resized to each image's patch grid, plus a 2-D rotary embedding
  (Qwen2-VL style: half the rotary dims rotate with the row, half with the column).
- 2x2 token merge by reshape (patches are already block-ordered), then a 2-layer GELU MLP projector.
- A stock transformers `Qwen3ForCausalLM`; visual tokens replace the `<|vision_pad|>` placeholders.

Attention goes through transformers' attention registry (`eager`, `sdpa`, `flash_attention_*` when installed).
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM, Qwen3RMSNorm

from .configuration_andesvl import AndesVLAimv2VisionConfig, AndesVLConfig, AndesVLSiglip2VisionConfig
from .image_processing_andesvl import AndesVLImageProcessor
from .processing_andesvl import IMAGE_KWARGS, IMAGE_SOURCE_KEYS, AndesVLProcessor, normalize_messages
from .quantization_andesvl import replace_linear_with_quantized

# ----------------------------------------------------------------------------------------------------------------------
# Packed-image geometry shared by both encoders
# ----------------------------------------------------------------------------------------------------------------------


def check_packed_images(pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, merge_size: int) -> None:
    """Fail loudly (with counts) when the packed patches and the per-image grids disagree."""
    if image_grid_hw.ndim != 2 or image_grid_hw.shape[-1] != 2:
        raise ValueError(f"image_grid_hw must have shape [num_images, 2], got {tuple(image_grid_hw.shape)}.")
    if pixel_values.ndim != 2:
        raise ValueError(
            f"pixel_values must be packed patches of shape [num_patches, channels*patch*patch], got "
            f"{tuple(pixel_values.shape)}; use AndesVLProcessor / AndesVLImageProcessor to build them."
        )
    expected = int(image_grid_hw.prod(-1).sum())
    if pixel_values.shape[0] != expected:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patches but image_grid_hw describes {expected} "
            f"({image_grid_hw.shape[0]} images)."
        )
    if bool((image_grid_hw % merge_size != 0).any()):
        raise ValueError(
            f"Every image grid must be divisible by merge_size={merge_size}; got {image_grid_hw.tolist()}."
        )


def to_block_order(grid_hwd: torch.Tensor, merge_size: int) -> torch.Tensor:
    """[h, w, D] in raster order -> [h*w, D] in merge_size x merge_size block order (the processor's patch order)."""
    h, w, dim = grid_hwd.shape
    m = merge_size
    blocks = grid_hwd.reshape(h // m, m, w // m, m, dim).permute(0, 2, 1, 3, 4)  # [h/m, w/m, m, m, D]
    return blocks.reshape(h * w, dim)


def patch_positions(image_grid_hw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Integer (row, col) of every packed patch, restarting at 0 per image: [num_patches, 2]."""
    positions = []
    for h, w in image_grid_hw.tolist():
        rows = torch.arange(h, device=image_grid_hw.device)[:, None].expand(h, w)
        cols = torch.arange(w, device=image_grid_hw.device)[None, :].expand(h, w)
        positions.append(to_block_order(torch.stack([rows, cols], dim=-1), merge_size))
    return torch.cat(positions)


def resize_position_table(table: torch.Tensor, image_grid_hw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Bicubically resize a square learned table [P, D] to every image grid: [num_patches, D] in block order."""
    side = int(round(table.shape[0] ** 0.5))
    grid = table.float().reshape(side, side, -1).permute(2, 0, 1)[None]  # [1, D, side, side]
    resized = []
    for h, w in image_grid_hw.tolist():
        grid_hw = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0]  # [D, h, w]
        resized.append(to_block_order(grid_hw.permute(1, 2, 0), merge_size))
    return torch.cat(resized).to(table.dtype)


def image_cu_seqlens(image_grid_hw: torch.Tensor) -> torch.Tensor:
    """Cumulative patch counts [num_images + 1] (int32), the varlen boundaries of per-image attention."""
    lengths = image_grid_hw.prod(-1).to(torch.int32)
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


class AndesVLVisionRotaryEmbedding(nn.Module):
    """2-D RoPE: a 1-D table of head_dim/2 rotary dims, the first half driven by the row, the second by the column."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.rotary_dim = head_dim // 2
        self.theta = theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
        return 1.0 / (self.theta**exponents)  # [head_dim/4]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions[..., None].float() * self.inv_freq  # [N, 2, head_dim/4]
        angles = angles.flatten(1)  # [N, head_dim/2] = [row angles, col angles]
        emb = torch.cat([angles, angles], dim=-1)  # [N, head_dim]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_pos_emb_vision(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k [N, heads, head_dim] in fp32 (GPT-NeoX rotate-half over the full head_dim)."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # [N, 1, head_dim]
    q, k = query.float(), key.float()
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    return q.to(query.dtype), k.to(key.dtype)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention over [B, heads, S, head_dim]; returns [B, S, heads, head_dim] like the registry kernels."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class AndesVLVisionAttention(nn.Module):
    """Non-causal attention restricted to each packed image; the kernel comes from the attention registry.

    Subclasses only define the projections (`project_qkv`, `project_out`), which differ between the AIMv2 and
    SigLIP2 checkpoints.
    """

    is_causal = False

    def __init__(self, config: AndesVLAimv2VisionConfig | AndesVLSiglip2VisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.num_key_value_groups = 1

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def project_out(self, attn_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        num_patches = hidden_states.shape[0]
        query, key, value = self.project_qkv(hidden_states)  # each [N, heads, head_dim]
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb_vision(query, key, *position_embeddings)
        query, key, value = (t.transpose(0, 1)[None] for t in (query, key, value))  # [1, heads, N, head_dim]
        attn_output = self.attend(query, key, value, cu_seqlens, **kwargs)  # [1, N, heads, head_dim]
        return self.project_out(attn_output.reshape(num_patches, -1))

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        implementation = self.config._attn_implementation or "sdpa"
        attention: Callable = (
            eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        )
        common = dict(attention_mask=None, scaling=self.scaling, is_causal=False, **kwargs)
        common["dropout"] = self.attention_dropout if self.training else 0.0
        if "flash" in implementation:  # varlen kernels attend within each image natively
            max_length = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            varlen = dict(
                cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_length, max_length_k=max_length
            )
            return attention(self, query, key, value, **varlen, **common)[0]
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if len(lengths) == 1:
            return attention(self, query, key, value, **common)[0]
        chunks = zip(*(t.split(lengths, dim=2) for t in (query, key, value)))
        return torch.cat([attention(self, q, k, v, **common)[0] for q, k, v in chunks], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# AIMv2 NaViT-RoPE encoder (AndesVL 1B / 2B / 4B); key layout `vision_encoder.{preprocessor,trunk}.*`
# ----------------------------------------------------------------------------------------------------------------------


class AndesVLAimv2Patchifier(nn.Module):
    def __init__(self, config: AndesVLAimv2VisionConfig):
        super().__init__()
        patch = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=patch, stride=patch)
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # A stride-p conv on one p x p patch is a linear map of the (C, p, p)-flattened patch.
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # [D, C*p*p]
        return self.norm(F.linear(patches.to(weight.dtype), weight, self.proj.bias))  # [N, D]


class AndesVLAimv2Preprocessor(nn.Module):
    def __init__(self, config: AndesVLAimv2VisionConfig):
        super().__init__()
        self.merge_size = config.merge_size
        self.patchifier = AndesVLAimv2Patchifier(config)
        if config.preserve_original_pe:
            self.pos_embed = nn.Parameter(torch.zeros(1, config.num_positions, config.hidden_size))
        else:
            self.pos_embed = None

    def forward(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor) -> torch.Tensor:
        tokens = self.patchifier(pixel_values)  # [N, D]
        if self.pos_embed is not None:
            tokens = tokens + resize_position_table(self.pos_embed[0], image_grid_hw, self.merge_size)
        return tokens


class AndesVLAimv2Attention(AndesVLVisionAttention):
    def __init__(self, config: AndesVLAimv2VisionConfig):
        super().__init__(config)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.use_bias)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.qkv(hidden_states).reshape(hidden_states.shape[0], 3, self.num_heads, self.head_dim)
        return qkv.unbind(1)  # 3 x [N, heads, head_dim]

    def project_out(self, attn_output: torch.Tensor) -> torch.Tensor:
        return self.proj(attn_output)


class AndesVLAimv2MLP(nn.Module):
    """SwiGLU: fc2(silu(fc1(x)) * fc3(x))."""

    def __init__(self, config: AndesVLAimv2VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.use_bias)
        self.fc3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.use_bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(hidden_states)) * self.fc3(hidden_states))


class AndesVLAimv2Block(GradientCheckpointingLayer):
    def __init__(self, config: AndesVLAimv2VisionConfig):
        super().__init__()
        self.norm_1 = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = AndesVLAimv2Attention(config)
        self.norm_2 = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = AndesVLAimv2MLP(config)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings, **kwargs):
        hidden_states = hidden_states + self.attn(self.norm_1(hidden_states), cu_seqlens, position_embeddings, **kwargs)
        return hidden_states + self.mlp(self.norm_2(hidden_states))


class AndesVLAimv2Trunk(nn.Module):
    def __init__(self, config: AndesVLAimv2VisionConfig):
        super().__init__()
        self.blocks = nn.ModuleList(AndesVLAimv2Block(config) for _ in range(config.num_hidden_layers))
        self.post_trunk_norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings, **kwargs):
        for block in self.blocks:
            hidden_states = block(hidden_states, cu_seqlens, position_embeddings, **kwargs)
        return self.post_trunk_norm(hidden_states)


class AndesVLAimv2VisionModel(nn.Module):
    """AIMv2-Large with native resolution and 2-D RoPE (apple/aimv2-large-patch14-448 lineage)."""

    def __init__(self, config: AndesVLAimv2VisionConfig):
        super().__init__()
        self.config = config
        self.preprocessor = AndesVLAimv2Preprocessor(config)
        self.trunk = AndesVLAimv2Trunk(config)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = None if config.disable_rope else AndesVLVisionRotaryEmbedding(head_dim, config.rope_theta)

    def forward(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """pixel_values: [N, C*p*p] packed patches; image_grid_hw: [num_images, 2]. Returns [N, D] in block order."""
        check_packed_images(pixel_values, image_grid_hw, self.config.merge_size)
        hidden_states = self.preprocessor(pixel_values, image_grid_hw)
        position_embeddings = encode_positions(self.rotary_emb, image_grid_hw, self.config.merge_size)
        return self.trunk(hidden_states, image_cu_seqlens(image_grid_hw), position_embeddings, **kwargs)


def encode_positions(rotary_emb: AndesVLVisionRotaryEmbedding | None, image_grid_hw: torch.Tensor, merge_size: int):
    if rotary_emb is None:
        return None
    return rotary_emb(patch_positions(image_grid_hw, merge_size))


# ----------------------------------------------------------------------------------------------------------------------
# SigLIP2 NaViT-RoPE encoder (AndesVL 0.6B); key layout `vision_encoder.vision_model.*`
# ----------------------------------------------------------------------------------------------------------------------


class AndesVLSiglip2Embeddings(nn.Module):
    def __init__(self, config: AndesVLSiglip2VisionConfig):
        super().__init__()
        self.merge_size = config.merge_size
        patch_dim = config.num_channels * config.patch_size**2
        self.proj = nn.Linear(patch_dim, config.hidden_size)
        self.pos_embed = nn.Embedding(config.num_patches, config.hidden_size) if config.preserve_original_pe else None

    def forward(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(pixel_values.to(self.proj.weight.dtype))  # [N, D]
        if self.pos_embed is not None:
            tokens = tokens + resize_position_table(self.pos_embed.weight, image_grid_hw, self.merge_size)
        return tokens


class AndesVLSiglip2Attention(AndesVLVisionAttention):
    def __init__(self, config: AndesVLSiglip2VisionConfig):
        super().__init__(config)
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (hidden_states.shape[0], self.num_heads, self.head_dim)
        return tuple(proj(hidden_states).reshape(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))

    def project_out(self, attn_output: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attn_output)


class AndesVLSiglip2MLP(nn.Module):
    def __init__(self, config: AndesVLSiglip2VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class AndesVLSiglip2EncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: AndesVLSiglip2VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = AndesVLSiglip2Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = AndesVLSiglip2MLP(config)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings, **kwargs):
        attn = self.self_attn(self.layer_norm1(hidden_states), cu_seqlens, position_embeddings, **kwargs)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class AndesVLSiglip2Encoder(nn.Module):
    def __init__(self, config: AndesVLSiglip2VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(AndesVLSiglip2EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings, **kwargs):
        for layer in self.layers:
            hidden_states = layer(hidden_states, cu_seqlens, position_embeddings, **kwargs)
        return hidden_states


class AndesVLSiglip2Transformer(nn.Module):
    def __init__(self, config: AndesVLSiglip2VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = AndesVLSiglip2Embeddings(config)
        self.encoder = AndesVLSiglip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = AndesVLVisionRotaryEmbedding(head_dim, config.rope_theta)

    def forward(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        check_packed_images(pixel_values, image_grid_hw, self.config.merge_size)
        hidden_states = self.embeddings(pixel_values, image_grid_hw)
        position_embeddings = encode_positions(self.rotary_emb, image_grid_hw, self.config.merge_size)
        hidden_states = self.encoder(hidden_states, image_cu_seqlens(image_grid_hw), position_embeddings, **kwargs)
        return self.post_layernorm(hidden_states)


class AndesVLSiglip2VisionModel(nn.Module):
    """SigLIP2-Base with native resolution and 2-D RoPE (google/siglip2-base-patch16-512 lineage)."""

    def __init__(self, config: AndesVLSiglip2VisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = AndesVLSiglip2Transformer(config)

    def forward(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.vision_model(pixel_values, image_grid_hw, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Projector, pre-trained base and the generation model
# ----------------------------------------------------------------------------------------------------------------------


class AndesVLProjector(nn.Sequential):
    """Linear(4*Dv -> 4*Dv) -> GELU (erf) -> Linear(4*Dv -> D_llm); keys `mlp.0.*`, `mlp.2.*`."""

    def __init__(self, config: AndesVLConfig):
        merged_dim = config.vision_config.hidden_size * config.image_token_group
        super().__init__(
            nn.Linear(merged_dim, merged_dim),
            nn.GELU(),
            nn.Linear(merged_dim, config.text_config.hidden_size),
        )


VISION_MODEL_CLASSES = {"aimv2": AndesVLAimv2VisionModel, "siglip2": AndesVLSiglip2VisionModel}


class AndesVLPreTrainedModel(PreTrainedModel):
    config_class = AndesVLConfig
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["AndesVLAimv2Block", "AndesVLSiglip2EncoderLayer", "Qwen3DecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers 5 builds models on the meta device: every non-persistent buffer must be recomputed here.
        std = self.config.vision_config.initializer_range
        if isinstance(module, AndesVLVisionRotaryEmbedding):
            module.inv_freq.copy_(module.compute_inv_freq())
        elif isinstance(module, AndesVLAimv2Preprocessor) and module.pos_embed is not None:
            module.pos_embed.normal_(mean=0.0, std=std)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, Qwen3RMSNorm):
            module.weight.fill_(1.0)


class AndesVLForConditionalGeneration(AndesVLPreTrainedModel, GenerationMixin):
    """Vision encoder -> 2x2 merge -> MLP projector -> Qwen3. Children are named as in the official checkpoints."""

    # transformers 5 (and peft with it) wants the dict form; 4.57's Qwen3 uses a list, and peft rejects a mix of both.
    _tied_weights_keys = (
        {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}
        if isinstance(Qwen3ForCausalLM._tied_weights_keys, dict)
        else ["language_model.lm_head.weight"]
    )
    # Default LoRA targets of the "1+N" scenario adapters: the language model's attention and MLP projections, as a
    # regex (peft full-matches a string) so the vision encoder and the projector are never adapted by accident.
    default_lora_target_modules = (
        r"language_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    )

    def __init__(self, config: AndesVLConfig):
        super().__init__(config)
        self.vision_encoder = VISION_MODEL_CLASSES[config.vision_type](config.vision_config)
        self.mlp = AndesVLProjector(config)
        self.language_model = Qwen3ForCausalLM(config.text_config)
        if config.quantization:  # weight-only quantized base: build the layers whose qweight/scales keys get loaded
            replace_linear_with_quantized(self, config.quantization)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, tokens_per_row: list[int] | None = None
    ) -> torch.Tensor:
        """Packed patches [N, C*p*p] -> projected visual tokens [N / merge_size**2, D_llm], images in order.

        With `tokens_per_row` (visual tokens of each batch row), the projector sees one row per conversation,
        [B, T_max, 4*Dv], so per-row modules (peft mixed-adapter batches, a full projector copy per adapter) apply
        to the right tokens; the result is packed again."""
        features = self.vision_encoder(pixel_values, image_grid_hw)  # [N, Dv], 2x2-block order
        merged = features.reshape(-1, features.shape[-1] * self.config.image_token_group)  # [N/4, 4*Dv]
        if tokens_per_row is None or len(tokens_per_row) < 2 or sum(tokens_per_row) != merged.shape[0]:
            return self.mlp(merged)  # [N/4, D_llm]; a count mismatch is reported by merge_image_features
        rows = nn.utils.rnn.pad_sequence(list(merged.split(tokens_per_row)), batch_first=True)  # [B, T_max, 4*Dv]
        lengths = torch.tensor(tokens_per_row, device=rows.device)
        valid = torch.arange(rows.shape[1], device=rows.device)[None, :] < lengths[:, None]  # [B, T_max]
        return self.mlp(rows)[valid]  # [N/4, D_llm], rows in order

    def check_image_token_layout(self, input_ids: torch.Tensor, image_grid_hw: torch.Tensor | None) -> None:
        """Every image's placeholder run must be exactly `<img>` + N x `<|vision_pad|>` + `</img>`, in order, with N
        from its `image_grid_hw`; no pad and no image delimiter may stand anywhere else (e.g. typed in user text, or
        one span cut by truncation while literal pads elsewhere keep the total right)."""
        config = self.config
        markers = (config.image_token_id, config.image_start_token_id, config.image_end_token_id)
        num_images = 0 if image_grid_hw is None else int(image_grid_hw.shape[0])
        expected = [] if image_grid_hw is None else (image_grid_hw.prod(-1) // config.image_token_group).tolist()
        found, problems = [], []
        for row, ids in enumerate(input_ids.tolist()):
            position = 0
            while position < len(ids):
                token = ids[position]
                if token not in markers:
                    position += 1
                    continue
                end = position + 1
                while end < len(ids) and ids[end] == config.image_token_id:
                    end += 1
                if token != config.image_start_token_id or end >= len(ids) or ids[end] != config.image_end_token_id:
                    problems.append(f"row {row}, position {position}: an image token outside a <img> ... </img> span")
                    position = end
                    continue
                found.append((row, end - position - 1))
                position = end + 1
        if not problems and len(found) != num_images:
            problems.append(f"{len(found)} image spans in input_ids but {num_images} images in image_grid_hw")
        for index, ((row, pads), want) in enumerate(zip(found, expected)):
            if not problems and pads != want:
                problems.append(f"image {index} (row {row}) has {pads} <|vision_pad|> tokens, its grid needs {want}")
        if problems:
            raise ValueError(
                f"Image tokens do not match the images ({len(problems)} problems): {'; '.join(problems[:3])}. Build "
                "inputs with AndesVLProcessor, and do not truncate inside an image span."
            )

    def merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Write the visual tokens, in order, over the `<|vision_pad|>` placeholders of `inputs_embeds`."""
        image_mask = input_ids == self.config.image_token_id  # [B, S]
        num_placeholders, num_features = int(image_mask.sum()), image_features.shape[0]
        if num_placeholders != num_features:
            raise ValueError(
                f"Image features and image tokens do not match: {num_placeholders} image tokens in input_ids, "
                f"{num_features} image features from pixel_values."
            )
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask[..., None].expand_as(inputs_embeds), image_features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        r"""
        pixel_values (`float[num_patches, C*p*p]`): all images of the batch as packed, block-ordered patches.
        image_grid_hw (`int64[num_images, 2]`): the (rows, cols) patch grid of each image, in order of appearance.
        labels (`int64[B, S]`, *optional*): next-token targets (shifted inside); -100 is ignored. With labels, the
            language model head runs only where the next-token label is set (see
            `causal_lm_loss_on_labelled_positions`): the returned `logits` are `[num_labelled, vocab]`, one row per
            labelled position in row-major order, not `[B, S, vocab]`.
        """
        if inputs_embeds is None:
            self.check_context_length(input_ids, past_key_values)
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, S, D]
            if self.has_image_inputs(input_ids, pixel_values, image_grid_hw, past_key_values):
                tokens_per_row = (input_ids == self.config.image_token_id).sum(-1).tolist()
                image_features = self.get_image_features(pixel_values, image_grid_hw, tokens_per_row)  # checks packing
                self.check_image_token_layout(input_ids, image_grid_hw)
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
        elif pixel_values is not None:
            raise ValueError("Pass input_ids (not inputs_embeds) with pixel_values, so image tokens can be located.")
        if labels is not None:
            return self.causal_lm_loss_on_labelled_positions(
                inputs_embeds,
                labels,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def has_image_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_grid_hw: torch.Tensor | None,
        past_key_values=None,
    ) -> bool:
        """Whether this step encodes images; in a first (uncached) step, image tokens without pixels or pixels without
        image tokens raise. Decoding steps from the cache carry no pixels."""
        num_image_tokens = int((input_ids == self.config.image_token_id).sum())
        if pixel_values is None:
            if num_image_tokens and _cached_length(past_key_values) == 0:
                raise ValueError(
                    f"input_ids hold {num_image_tokens} image tokens (<|vision_pad|>) but no pixel_values were given; "
                    "pass the processor's pixel_values and image_grid_hw."
                )
            return False
        if image_grid_hw is None:
            raise ValueError("pixel_values were given without image_grid_hw.")
        if not num_image_tokens:
            raise ValueError(
                f"pixel_values of {pixel_values.shape[0]} patches ({image_grid_hw.shape[0]} images) were given but "
                "input_ids hold no image tokens; put an <image> marker (or an image part) where each image goes."
            )
        return True

    def check_context_length(self, input_ids: torch.Tensor, past_key_values=None) -> None:
        """A prompt beyond the language model's context raises before any compute, instead of generating garbage."""
        past = _cached_length(past_key_values)
        limit = self.config.text_config.max_position_embeddings
        if past + input_ids.shape[-1] > limit:
            raise ValueError(
                f"The input is {past + input_ids.shape[-1]} tokens ({past} cached + {input_ids.shape[-1]} new), "
                f"beyond this model's context of {limit} tokens (text_config.max_position_embeddings)."
            )

    def causal_lm_loss_on_labelled_positions(
        self, inputs_embeds: torch.Tensor, labels: torch.LongTensor, **kwargs: Any
    ) -> CausalLMOutputWithPast:
        """Mean next-token cross-entropy, with `lm_head` computed only where a label is set (cheap with a 152k vocab).

        Hidden state i predicts `labels[:, i + 1]`; positions whose next label is -100 get no logits. The loss equals
        `Qwen3ForCausalLM`'s with the same labels; `logits` are those of the labelled positions only, `[N, vocab]`.
        `num_items_in_batch` (the Trainer's count under gradient accumulation) replaces the mean's denominator.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.language_model.model(inputs_embeds=inputs_embeds, **kwargs)
        targets = labels[:, 1:].to(outputs.last_hidden_state.device)
        selected = targets != -100
        hidden = outputs.last_hidden_state[:, :-1][selected]  # [N, D]
        logits = self.language_model.lm_head(hidden).float()  # [N, vocab]
        loss = F.cross_entropy(logits, targets[selected], reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else selected.sum()
        loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values=None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # Overwritten -- images are encoded only in the prefill step, never again while decoding from the cache.
        model_inputs = super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values, **kwargs)
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_grid_hw"] = image_grid_hw
        return model_inputs

    # ------------------------------------------------------------------------------------------------------------------
    # "1+N" scenario adapters: thin conveniences over transformers' integrated peft API (peft is imported by it)
    # ------------------------------------------------------------------------------------------------------------------

    def available_adapters(self) -> list[str]:
        """Names of the scenario adapters shipped as `adapters/<name>/` in the repo this model was loaded from."""
        return sorted(
            path.parent.name for path in _repo_folder(self.name_or_path).glob("adapters/*/adapter_config.json")
        )

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
        adapter_name = adapter_name or name
        if adapter_name in (getattr(self, "peft_config", None) or {}):
            raise ValueError(f"An adapter named {adapter_name!r} is already loaded; pass another adapter_name.")
        previous = self.active_adapters() if getattr(self, "peft_config", None) else []
        report_logger, report_filter = logging.getLogger("transformers.integrations.peft"), _TiedTokenRowsReport()
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

    # ------------------------------------------------------------------------------------------------------------------
    # The official `chat()` / `completion()` API, as thin wrappers over the processor and `generate`
    # ------------------------------------------------------------------------------------------------------------------

    def chat(self, messages: list, tokenizer, image_processor, **kwargs: Any) -> str | list[str]:
        """Answer OpenAI-style chat `messages` (or a list of conversations, answered as a left-padded batch).

        Keyword arguments: `thinking` / `Thinking` (end the prompt with `<think>`; the answer is returned with it),
        `official_double_header` (repeat the assistant header like the official HF `chat()`),
        `allow_remote_images` (fetch http(s) image URLs), `allow_special_tokens_in_text` (let message text hold turn
        and image markers; refused by default), the image options (`IMAGE_KWARGS`: `resize_mode`, `max_size`,
        `min_size`, `image_scale`, ...); everything else goes to `generate` (e.g. `max_new_tokens`, `do_sample`).
        """
        processor = self._official_processor(tokenizer, image_processor)
        thinking = _pop_thinking(kwargs)
        template_kwargs = {
            "enable_thinking": thinking,
            "official_double_header": kwargs.pop("official_double_header", False),
            "allow_special_tokens_in_text": kwargs.pop("allow_special_tokens_in_text", False),
        }
        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = [normalize_messages(m) for m in (messages if batched else [messages])]
        prompts = [
            processor.apply_chat_template(c, add_generation_prompt=True, **template_kwargs) for c in conversations
        ]
        images = [_image_parts(c) for c in conversations]
        answers = self._generate_text(processor, prompts, images, thinking, **kwargs)
        return answers if batched else answers[0]

    def completion(self, prompt: str, images: list, tokenizer, image_processor, **kwargs: Any) -> str:
        """Continue a raw `prompt` whose `<image>` markers (one per entry of `images`) mark where images go."""
        processor = self._official_processor(tokenizer, image_processor)
        thinking = _pop_thinking(kwargs)
        return self._generate_text(processor, [prompt], [list(images or [])], thinking, **kwargs)[0]

    def _official_processor(self, tokenizer, image_processor) -> AndesVLProcessor:
        if not isinstance(image_processor, AndesVLImageProcessor):  # e.g. the official CLIPImageProcessor
            vision = self.config.vision_config
            image_processor = AndesVLImageProcessor(
                patch_size=vision.patch_size,
                merge_size=vision.merge_size,
                image_mean=list(image_processor.image_mean),
                image_std=list(image_processor.image_std),
            )
        return AndesVLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
        )

    def _generate_text(
        self, processor, prompts: list[str], images: list[list], thinking: bool, **kwargs: Any
    ) -> list[str]:
        call_kwargs = {key: kwargs.pop(key) for key in (*IMAGE_KWARGS, "allow_remote_images") if key in kwargs}
        unknown = sorted(set(kwargs) - _generate_argument_names(self))
        if unknown:
            raise TypeError(
                f"chat() / completion() got {len(unknown)} unexpected keyword argument(s): {unknown}; they take the "
                f"image options {list(IMAGE_KWARGS)}, allow_remote_images, thinking, and generate()'s arguments."
            )
        images = images if any(images) else None
        inputs = processor(
            text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt", **call_kwargs
        )
        inputs = inputs.to(self.device, dtype=self.dtype)  # casts only the floating-point pixel_values
        output_ids = self.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
        answers = processor.batch_decode(output_ids, skip_special_tokens=True)
        return ["<think>" + answer for answer in answers] if thinking else answers


def _generate_argument_names(model: GenerationMixin) -> set[str]:
    """What `generate` accepts by name: its own parameters and every GenerationConfig field."""
    parameters = set(inspect.signature(model.generate).parameters) - {"kwargs", "self"}
    return parameters | set(GenerationConfig().to_dict())


def _cached_length(past_key_values) -> int:
    """Tokens already in the KV cache (0 without one)."""
    return past_key_values.get_seq_length() if hasattr(past_key_values, "get_seq_length") else 0


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


class _TiedTokenRowsReport(logging.Filter):
    """Drops transformers 5's adapter load report when all it lists as MISSING are names that peft's trainable-token
    wrappers add: the tied output copy of the rows (`lm_head.token_adapter.trainable_tokens_delta.<name>`; peft saves
    them once, under `embed_tokens`, and shares them, which `_check_tied_token_rows` verifies) and the wrapped base
    weights (`...token_adapter.base_layer.weight`, loaded with the base model). Nothing is newly initialized."""

    WRAPPER_NAMES = ("lm_head.token_adapter.trainable_tokens_delta.", ".token_adapter.base_layer.")

    def filter(self, record: logging.LogRecord) -> bool:
        rows = [line.split("|") for line in record.getMessage().splitlines() if line.count("|") >= 2]
        rows = [(key.strip(), status.strip()) for key, status, *_ in rows]
        rows = [(key, status) for key, status in rows if key not in ("Key", "") and set(key) != {"-"}]
        spurious = [status == "MISSING" and any(name in key for name in self.WRAPPER_NAMES) for key, status in rows]
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


def _pop_thinking(kwargs: dict[str, Any]) -> bool:
    """The official API's thinking switch: `thinking` (Instruct code) or `Thinking` (Thinking-model README)."""
    lower, upper = kwargs.pop("thinking", False), kwargs.pop("Thinking", False)
    return bool(lower or upper)


def _image_parts(messages: list[dict]) -> list:
    """The image sources of normalized chat messages, in order of appearance."""
    sources = []
    for message in messages:
        for part in message["content"]:
            if part["type"] != "image":
                continue
            source = next((part[key] for key in IMAGE_SOURCE_KEYS if part.get(key) is not None), None)
            if source is None:
                raise ValueError(f"An image part has no source; give one of {IMAGE_SOURCE_KEYS}: {part!r:.80}")
            sources.append(source)
    return sources


__all__ = ["AndesVLForConditionalGeneration", "AndesVLPreTrainedModel"]
