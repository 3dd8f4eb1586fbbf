"""vLLM plugin for AndesVL: serves `AndesVLForConditionalGeneration` repos (the official key layout, both encoder
types) with images, and the "1+N" LoRA adapters one per request.

Installed with `pip install <this repo folder>`; vLLM calls `register` in every process it starts through the
`vllm.general_plugins` entry point, so `LLM(model=..., trust_remote_code=True)` and `vllm serve` find the model.
"""

ARCHITECTURE = "AndesVLForConditionalGeneration"


def register() -> None:
    """Register the AndesVL model class with vLLM (lazily: vLLM imports it only when a repo asks for it)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "andesvl_vllm.model:AndesVLForConditionalGeneration")
