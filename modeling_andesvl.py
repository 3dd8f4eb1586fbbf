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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM, Qwen3RMSNorm

from .adapters_andesvl import AndesVLAdapterMixin
from .chat_andesvl import AndesVLChatMixin
from .configuration_andesvl import AndesVLAimv2VisionConfig, AndesVLConfig, AndesVLSiglip2VisionConfig
from .quantization_andesvl import replace_linear_with_quantized

if TYPE_CHECKING:  # never imported here; listed so transformers 4.57, which copies only the relative imports a
    # module names itself when it loads a local folder, also copies the files the chat mixin imports
    from .image_processing_andesvl import AndesVLImageProcessor  # noqa: F401
    from .processing_andesvl import AndesVLProcessor  # noqa: F401

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


class VisionGeometry(NamedTuple):
    """What the image grids fix for an encoder pass, computed from `image_grid_hw` read as Python ints (eager only,
    `image_geometry`), so that the pass itself (`encode_patches`) is tensor-only and exportable (one fixed grid).

    position_table: the learned table resized to every grid, [N, D] (None when the encoder has none).
    position_embeddings: the 2-D rotary (cos, sin), each [N, head_dim] (None without RoPE).
    cu_seqlens: per-image boundaries [num_images + 1] (None: all patches are one image).
    """

    position_table: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    cu_seqlens: torch.Tensor | None


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
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Attention within each image (`cu_seqlens` boundaries; None: one image, the path export traces)."""
        implementation = self.config._attn_implementation or "sdpa"
        attention: Callable = (
            eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        )
        common = dict(attention_mask=None, scaling=self.scaling, is_causal=False, **kwargs)
        common["dropout"] = self.attention_dropout if self.training else 0.0
        if cu_seqlens is None:
            return attention(self, query, key, value, **common)[0]
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

    def position_table(self, image_grid_hw: torch.Tensor) -> torch.Tensor | None:
        """The learned table resized to every grid, [N, D] in block order (None without one)."""
        if self.pos_embed is None:
            return None
        return resize_position_table(self.pos_embed[0], image_grid_hw, self.merge_size)

    def forward(self, pixel_values: torch.Tensor, position_table: torch.Tensor | None) -> torch.Tensor:
        tokens = self.patchifier(pixel_values)  # [N, D]
        return tokens if position_table is None else tokens + position_table


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
        return self.encode_patches(pixel_values, self.image_geometry(image_grid_hw), **kwargs)

    def image_geometry(self, image_grid_hw: torch.Tensor) -> VisionGeometry:
        return VisionGeometry(
            self.preprocessor.position_table(image_grid_hw),
            encode_positions(self.rotary_emb, image_grid_hw, self.config.merge_size),
            image_cu_seqlens(image_grid_hw),
        )

    def encode_patches(self, pixel_values: torch.Tensor, geometry: VisionGeometry, **kwargs: Any) -> torch.Tensor:
        """The tensor-only encoder pass: [N, C*p*p] patches -> [N, D], with the grids' `geometry`."""
        hidden_states = self.preprocessor(pixel_values, geometry.position_table)
        return self.trunk(hidden_states, geometry.cu_seqlens, geometry.position_embeddings, **kwargs)


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

    def position_table(self, image_grid_hw: torch.Tensor) -> torch.Tensor | None:
        """The learned table resized to every grid, [N, D] in block order (None without one)."""
        if self.pos_embed is None:
            return None
        return resize_position_table(self.pos_embed.weight, image_grid_hw, self.merge_size)

    def forward(self, pixel_values: torch.Tensor, position_table: torch.Tensor | None) -> torch.Tensor:
        tokens = self.proj(pixel_values.to(self.proj.weight.dtype))  # [N, D]
        return tokens if position_table is None else tokens + position_table


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
        return self.encode_patches(pixel_values, self.image_geometry(image_grid_hw), **kwargs)

    def image_geometry(self, image_grid_hw: torch.Tensor) -> VisionGeometry:
        return VisionGeometry(
            self.embeddings.position_table(image_grid_hw),
            encode_positions(self.rotary_emb, image_grid_hw, self.config.merge_size),
            image_cu_seqlens(image_grid_hw),
        )

    def encode_patches(self, pixel_values: torch.Tensor, geometry: VisionGeometry, **kwargs: Any) -> torch.Tensor:
        """The tensor-only encoder pass: [N, C*p*p] patches -> [N, D], with the grids' `geometry`."""
        hidden_states = self.embeddings(pixel_values, geometry.position_table)
        hidden_states = self.encoder(hidden_states, geometry.cu_seqlens, geometry.position_embeddings, **kwargs)
        return self.post_layernorm(hidden_states)


class AndesVLSiglip2VisionModel(nn.Module):
    """SigLIP2-Base with native resolution and 2-D RoPE (google/siglip2-base-patch16-512 lineage)."""

    def __init__(self, config: AndesVLSiglip2VisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = AndesVLSiglip2Transformer(config)

    def forward(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.vision_model(pixel_values, image_grid_hw, **kwargs)

    def image_geometry(self, image_grid_hw: torch.Tensor) -> VisionGeometry:
        return self.vision_model.image_geometry(image_grid_hw)

    def encode_patches(self, pixel_values: torch.Tensor, geometry: VisionGeometry, **kwargs: Any) -> torch.Tensor:
        return self.vision_model.encode_patches(pixel_values, geometry, **kwargs)


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


def merge_patches(features: torch.Tensor, image_token_group: int) -> torch.Tensor:
    """Encoder output [N, Dv] in 2x2-block order -> one row per visual token, [N/4, 4*Dv] (a reshape)."""
    return features.reshape(-1, features.shape[-1] * image_token_group)


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


def dense_head_input(head: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of the LM head: the hidden states of the kept positions as a dense tensor. Qwen3 hands the head
    `hidden_states[:, -k:, :]`, a view with the whole prompt's batch stride; for that view torch 2.13's CPU `matmul`
    copies the transposed [vocab, hidden] weight before a batched bf16 matmul (1.2 s at the 0.6B shape, against 16 ms
    for a dense input, in every `generate` prefill). The dense copy is k x hidden values; the logits are the same."""
    hidden = args[0]
    if hidden.dim() == 3 and hidden.stride() != (hidden.shape[1] * hidden.shape[2], hidden.shape[2], 1):
        return (hidden.clone(memory_format=torch.contiguous_format), *args[1:])
    return None


class AndesVLForConditionalGeneration(AndesVLChatMixin, AndesVLAdapterMixin, AndesVLPreTrainedModel, GenerationMixin):
    """Vision encoder -> 2x2 merge -> MLP projector -> Qwen3. Children are named as in the official checkpoints.

    The conveniences come from their own files: the official `chat()` / `completion()` API (`chat_andesvl.py`) and
    the "1+N" adapter helpers (`adapters_andesvl.py`)."""

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
        self.get_output_embeddings().register_forward_pre_hook(dense_head_input)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)
        value.register_forward_pre_hook(dense_head_input)

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
        merged = merge_patches(features, self.config.image_token_group)  # [N/4, 4*Dv]
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
        labelled_logits_only: bool = False,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        r"""
        pixel_values (`float[num_patches, C*p*p]`): all images of the batch as packed, block-ordered patches.
        image_grid_hw (`int64[num_images, 2]`): the (rows, cols) patch grid of each image, in order of appearance.
        labels (`int64[B, S]`, *optional*): next-token targets (shifted inside); -100 is ignored. The loss is the
            language model's (transformers' `loss_function`) and `logits` keep the `[B, S, vocab]` contract (or the
            `logits_to_keep` positions).
        labelled_logits_only (`bool`, defaults to `False`): with `labels`, run the language model head only where
            the next-token label is set (`causal_lm_loss_on_labelled_positions`, the same loss; cheap with a 152k
            vocabulary): `logits` are then `[num_labelled, vocab]`, one row per labelled position in row-major order.
            The training tools pass it.
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
        if labels is not None and labelled_logits_only:
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
            labels=labels,
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


def _cached_length(past_key_values) -> int:
    """Tokens already in the KV cache (0 without one)."""
    return past_key_values.get_seq_length() if hasattr(past_key_values, "get_seq_length") else 0


__all__ = ["AndesVLForConditionalGeneration", "AndesVLPreTrainedModel"]
