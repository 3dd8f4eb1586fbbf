"""The official AndesVL `chat()` / `completion()` API, as thin wrappers over the processor and `generate`.

`AndesVLChatMixin` is composed by `AndesVLForConditionalGeneration`, so code written for the official repos
(`model.chat(messages, tokenizer, image_processor, ...)`) runs unchanged; it builds an `AndesVLProcessor` from the
tokenizer and image processor it is given and imports nothing from the model.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import GenerationConfig, GenerationMixin

from .image_processing_andesvl import AndesVLImageProcessor
from .processing_andesvl import IMAGE_KWARGS, IMAGE_SOURCE_KEYS, AndesVLProcessor, normalize_messages


class AndesVLChatMixin:
    """`chat()` and `completion()` for a generation model with an AndesVL config (`vision_config` patch sizes)."""

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


__all__ = ["AndesVLChatMixin"]
