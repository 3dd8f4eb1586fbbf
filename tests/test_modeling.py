"""Model tests on tiny random AndesVL repos (both encoder types) and on meta-device builds of the four official sizes.

Run: `.venv/tf4/bin/python -m pytest tests/test_modeling.py -q` (and the same with `.venv/tf5`).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel

from conftest import IMAGE_TOKEN_ID, build_repo, load_model, load_processor, packed_inputs, random_image

# Official parameter counts (README of the official repos; tied lm_head counted once).
OFFICIAL_PARAMETERS = {"0.6B": 695_069_952, "1B": 927_010_816, "2B": 2_055_731_200, "4B": 4_359_721_984}
TEXT_SHAPES = {  # hidden, layers, heads, intermediate of the Qwen3 text models
    "0.6B": (1024, 28, 16, 3072),
    "1B": (1024, 28, 16, 3072),
    "2B": (2048, 28, 16, 6144),
    "4B": (2560, 36, 32, 9728),
}


def official_keys(size: str) -> dict[str, tuple[int, ...]]:
    """The official checkpoint layout written out from the spec (section 2.1), independently of the model code."""
    hidden, layers, heads, intermediate = TEXT_SHAPES[size]
    keys: dict[str, tuple[int, ...]] = {"language_model.model.embed_tokens.weight": (151936, hidden)}
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        keys |= {
            p + "self_attn.q_proj.weight": (heads * 128, hidden),
            p + "self_attn.k_proj.weight": (8 * 128, hidden),
            p + "self_attn.v_proj.weight": (8 * 128, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * 128),
            p + "self_attn.q_norm.weight": (128,),
            p + "self_attn.k_norm.weight": (128,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    keys["language_model.model.norm.weight"] = (hidden,)
    if size == "0.6B":
        v, dv = "vision_encoder.vision_model.", 768
        keys |= {
            v + "embeddings.proj.weight": (768, 768),
            v + "embeddings.proj.bias": (768,),
            v + "embeddings.pos_embed.weight": (1024, 768),
        }
        for i in range(12):
            p = f"{v}encoder.layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                keys |= {p + f"self_attn.{name}.weight": (768, 768), p + f"self_attn.{name}.bias": (768,)}
            for norm in ("layer_norm1", "layer_norm2"):
                keys |= {p + f"{norm}.weight": (768,), p + f"{norm}.bias": (768,)}
            keys |= {
                p + "mlp.fc1.weight": (3072, 768),
                p + "mlp.fc1.bias": (3072,),
                p + "mlp.fc2.weight": (768, 3072),
                p + "mlp.fc2.bias": (768,),
            }
        keys |= {v + "post_layernorm.weight": (768,), v + "post_layernorm.bias": (768,)}
    else:
        v, dv = "vision_encoder.", 1024
        keys |= {
            v + "preprocessor.patchifier.proj.weight": (1024, 3, 14, 14),
            v + "preprocessor.patchifier.proj.bias": (1024,),
            v + "preprocessor.patchifier.norm.weight": (1024,),
            v + "preprocessor.pos_embed": (1, 1024, 1024),
        }
        for i in range(24):
            p = f"{v}trunk.blocks.{i}."
            keys |= {
                p + "norm_1.weight": (1024,),
                p + "attn.qkv.weight": (3072, 1024),
                p + "attn.proj.weight": (1024, 1024),
                p + "norm_2.weight": (1024,),
                p + "mlp.fc1.weight": (2816, 1024),
                p + "mlp.fc3.weight": (2816, 1024),
                p + "mlp.fc2.weight": (1024, 2816),
            }
        keys[v + "trunk.post_trunk_norm.weight"] = (1024,)
    keys |= {
        "mlp.0.weight": (4 * dv, 4 * dv),
        "mlp.0.bias": (4 * dv,),
        "mlp.2.weight": (hidden, 4 * dv),
        "mlp.2.bias": (hidden,),
    }
    return keys


@pytest.fixture(scope="module")
def official_meta_models(tmp_path_factory):
    """The four official sizes built on the meta device from repo folders assembled by build_repo (no weights)."""
    models = {}
    for size in OFFICIAL_PARAMETERS:
        folder = tmp_path_factory.mktemp("official") / f"AndesVL-{size}-Instruct"
        build_repo.write_repo_files(folder, build_repo.official_config(size))
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        with torch.device("meta"):
            models[size] = AutoModel.from_config(config, trust_remote_code=True)
    return models


@pytest.mark.parametrize("size", list(OFFICIAL_PARAMETERS))
def test_official_key_layout_and_parameter_count(official_meta_models, size):
    model = official_meta_models[size]
    state = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "language_model.lm_head.weight"}
    assert state == official_keys(size)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS[size]
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight


def _official_checkpoint(model, with_lm_head: bool) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone().to(torch.bfloat16) for k, v in model.state_dict().items()}
    if not with_lm_head:
        del state["language_model.lm_head.weight"]
    return state


@pytest.mark.parametrize("fmt", ["safetensors-no-lm-head", "bin-with-lm-head"])
def test_official_layout_checkpoint_loads_without_missing_or_unexpected_keys(tiny_repo, tiny_model, tmp_path, fmt):
    folder = tmp_path / "AndesVL-1B-Instruct"
    shutil.copytree(tiny_repo, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    state = _official_checkpoint(tiny_model, with_lm_head=fmt.startswith("bin"))
    if fmt.startswith("bin"):
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    build_repo.verify_checkpoint(folder, folder)
    model, info = load_model_with_info(folder, dtype=torch.bfloat16)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    embed = model.language_model.model.embed_tokens.weight
    assert model.language_model.lm_head.weight.data_ptr() == embed.data_ptr()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state.get(key, embed)), key


def load_model_with_info(folder, **kwargs):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True, **kwargs
    )


def test_verify_checkpoint_reports_counts(tiny_repo, tiny_model, tmp_path):
    state = _official_checkpoint(tiny_model, with_lm_head=False)
    state["mlp.9.weight"] = state.pop("mlp.2.weight")
    state["mlp.0.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing, 1 unexpected, 1 mismatched"):
        build_repo.verify_checkpoint(tiny_repo, tmp_path)


def test_non_persistent_buffers_are_analytic_after_from_pretrained(tiny_model):
    vision = tiny_model.config.vision_config
    text = tiny_model.config.text_config
    head_dim = vision.hidden_size // vision.num_attention_heads
    vision_inv_freq = 1.0 / vision.rope_theta ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))
    text_inv_freq = 1.0 / 1e6 ** (torch.arange(0, text.head_dim, 2).float() / text.head_dim)
    buffers = dict(tiny_model.named_buffers())
    persistent = set(tiny_model.state_dict())
    non_persistent = {name for name in buffers if name not in persistent}
    assert non_persistent, "expected rotary buffers"
    for name in non_persistent:
        expected = vision_inv_freq if name.startswith("vision_encoder") else text_inv_freq
        torch.testing.assert_close(buffers[name], expected, rtol=0, atol=1e-7, msg=name)


def test_eager_matches_sdpa(tiny_repo):
    eager = load_model(tiny_repo, attn_implementation="eager")
    sdpa = load_model(tiny_repo, attn_implementation="sdpa")
    assert eager.config.vision_config._attn_implementation == "eager"
    assert sdpa.config.vision_config._attn_implementation == "sdpa"
    inputs = packed_inputs(eager.config, [(4, 4), (2, 6), (6, 2)])
    with torch.no_grad():
        torch.testing.assert_close(eager(**inputs).logits, sdpa(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_packed_image_equals_same_image_alone(tiny_model):
    inputs = packed_inputs(tiny_model.config, [(4, 6), (2, 2), (6, 4)], seed=3)
    pixel_values, grid = inputs["pixel_values"], inputs["image_grid_hw"]
    first = int(grid[0].prod())
    with torch.no_grad():
        packed = tiny_model.get_image_features(pixel_values, grid)
        alone = tiny_model.get_image_features(pixel_values[:first], grid[:1])
    torch.testing.assert_close(packed[: first // 4], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed[first // 4 : first // 4 + 1], alone[:1], atol=1e-3)


def test_cached_generation_equals_uncached(tiny_model):
    inputs = packed_inputs(tiny_model.config, [(4, 4), (2, 4)], seed=1)
    kwargs = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    cached = tiny_model.generate(**inputs, use_cache=True, **kwargs)
    uncached = tiny_model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_images_are_encoded_only_in_prefill(tiny_model):
    calls = []
    handle = tiny_model.vision_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        tiny_model.generate(
            **packed_inputs(tiny_model.config, [(4, 4)]), max_new_tokens=5, min_new_tokens=5, do_sample=False
        )
    finally:
        handle.remove()
    assert len(calls) == 1


def _conversation(num_images: int, text: str, seed: int) -> list[dict]:
    sizes = [(56, 84), (120, 64), (30, 30)]
    parts = [{"type": "image", "image": random_image(*sizes[(seed + i) % 3], seed=seed + i)} for i in range(num_images)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def test_batched_left_padded_generation_equals_one_by_one(tiny_repo, tiny_model):
    processor = load_processor(tiny_repo)
    conversations = [
        _conversation(0, "Hello there, how are you doing today?", 0),
        _conversation(1, "What is this?", 1),
        _conversation(2, "Are the two images the same colour? Answer briefly please.", 2),
    ]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    batch = processor.apply_chat_template(conversations, padding=True, **kwargs)
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 1).all()
    generate = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        batched = tiny_model.generate(**batch, **generate)[:, batch["input_ids"].shape[1] :]
        batched_logits = tiny_model(**batch).logits[:, -1]
        for row, conversation in enumerate(conversations):
            single = processor.apply_chat_template(conversation, **kwargs)
            alone = tiny_model.generate(**single, **generate)[:, single["input_ids"].shape[1] :]
            assert torch.equal(batched[row], alone[0]), f"row {row}"
            torch.testing.assert_close(batched_logits[row], tiny_model(**single).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_save_and_reload_reproduces_logits_exactly(tiny_model, tmp_path):
    folder = tmp_path / "AndesVL-0.6B-resaved"
    tiny_model.save_pretrained(folder)
    reloaded = load_model(folder)
    inputs = packed_inputs(tiny_model.config, [(4, 4), (2, 2)])
    with torch.no_grad():
        assert torch.equal(tiny_model(**inputs).logits, reloaded(**inputs).logits)


def test_labels_give_a_loss_and_gradients_reach_every_part(tiny_repo):
    model = load_model(tiny_repo).train()
    inputs = packed_inputs(model.config, [(4, 4)])
    labels = inputs["input_ids"].clone()
    labels[labels == IMAGE_TOKEN_ID] = -100
    output = model(**inputs, labels=labels)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    output.loss.backward()
    for name in ("vision_encoder", "mlp", "language_model"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


def test_gradient_checkpointing_matches_plain_backward(tiny_repo):
    inputs = packed_inputs(load_model(tiny_repo).config, [(4, 4)])
    grads = []
    for checkpointing in (False, True):
        model = load_model(tiny_repo).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append(model.mlp[0].weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_logits_to_keep_returns_last_positions(tiny_model):
    inputs = packed_inputs(tiny_model.config, [(2, 2)])
    with torch.no_grad():
        full = tiny_model(**inputs).logits
        last = tiny_model(**inputs, logits_to_keep=1).logits
    assert last.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(last[:, -1], full[:, -1])


def test_image_token_feature_mismatch_raises_with_both_counts(tiny_model):
    inputs = packed_inputs(tiny_model.config, [(4, 4)])
    ids = inputs["input_ids"]
    inputs["input_ids"] = torch.cat([ids[:, :4], ids[:, 5:]], dim=1)  # one <|vision_pad|> fewer
    with pytest.raises(ValueError, match=r"has 3 <\|vision_pad\|> tokens, its grid needs 4"):
        tiny_model(**inputs)


@pytest.mark.parametrize(
    "pixels_rows, grid, message",
    [(10, [[4, 4]], r"10 patches but image_grid_hw describes 16"), (9, [[3, 3]], r"divisible by merge_size=2")],
)
def test_bad_packed_images_raise(tiny_model, pixels_rows, grid, message):
    vision = tiny_model.config.vision_config
    pixel_values = torch.zeros(pixels_rows, vision.num_channels * vision.patch_size**2)
    with pytest.raises(ValueError, match=message):
        tiny_model.get_image_features(pixel_values, torch.tensor(grid))


def test_position_table_is_resized_per_image(tiny_model):
    """A grid equal to the table's own grid reproduces the table; other grids are bicubic resizes of it."""
    modeling = type(tiny_model).__module__
    resize = __import__(modeling, fromlist=["resize_position_table"]).resize_position_table
    side = 8
    table = torch.randn(side * side, 5)
    same = resize(table, torch.tensor([[side, side]]), 2)
    raster = __import__(modeling, fromlist=["to_block_order"]).to_block_order(table.reshape(side, side, 5), 2)
    torch.testing.assert_close(same, raster)
    assert resize(table, torch.tensor([[4, 6], [2, 2]]), 2).shape == (24 + 4, 5)


def test_bfloat16_forward_is_finite(tiny_repo):
    model = load_model(tiny_repo, dtype=torch.bfloat16)
    inputs = packed_inputs(model.config, [(4, 4)])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_the_lm_head_gets_the_kept_positions_as_a_dense_tensor(tiny_repos):
    """generate's prefill keeps one position: Qwen3 hands the head a strided view of it, for which torch's CPU matmul
    copies the transposed [vocab, hidden] weight (bf16: 1.2 s per prefill at the 0.6B shape). The head's pre-hook
    makes it dense; the logits are those of the view, bit for bit."""
    model = load_model(tiny_repos["aimv2"], dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    seen = []
    probe = head.register_forward_hook(lambda module, args, output: seen.append(args[0].stride()))  # after pre-hooks
    inputs = packed_inputs(model.config, [(4, 4)])
    hidden = model.config.text_config.hidden_size
    try:
        with torch.no_grad():
            kept = model(**inputs, logits_to_keep=1).logits  # [B, 1, V]
            assert seen[-1] == (hidden, hidden, 1)  # dense [B, 1, H]
            hooks = dict(head._forward_pre_hooks)
            head._forward_pre_hooks.clear()
            try:
                strided = model(**inputs, logits_to_keep=1).logits
            finally:
                head._forward_pre_hooks.update(hooks)
            assert seen[-1][0] == inputs["input_ids"].shape[1] * hidden  # without the hook: the strided view
    finally:
        probe.remove()
    assert kept.shape[1] == 1 and torch.equal(kept, strided)
