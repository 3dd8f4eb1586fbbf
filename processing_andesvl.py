"""AndesVL processor: the image processor plus the Qwen3 tokenizer, joined by the image placeholder.

Every image in a prompt is written `<image>` (by the chat template or by hand); the processor replaces the i-th
marker with `<img>` + N x `<|vision_pad|>` + `</img>`, where N = patches / merge_size**2 of the i-th image, the
same count the model's 2x2 merge produces. The result is exactly what `AndesVLForConditionalGeneration.forward`
accepts: `input_ids`, `attention_mask`, `pixel_values` (packed patches) and `image_grid_hw`.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_andesvl import OVERRIDABLE_KEYS, load_image

IMAGE_KWARGS = OVERRIDABLE_KEYS  # per-call image processor options (resize_mode, max_size, ...)
CHAT_ROLES = ("system", "user", "assistant")
IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")
TEXT_KWARGS = (
    "padding",
    "padding_side",
    "truncation",
    "max_length",
    "pad_to_multiple_of",
    "add_special_tokens",
    "return_attention_mask",
    "return_token_type_ids",
    "return_offsets_mapping",
)
# Keys transformers' apply_chat_template itself adds to the processor call (assistant masks, video sampling).
FORWARDED_KWARGS = ("return_text_replacement_offsets", "do_sample_frames")
# Tokens that delimit turns and documents; written only by the chat template (and the tokenizer's own eos/pad/bos).
TURN_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@functools.lru_cache(maxsize=8)
def template_variables(chat_template: str) -> frozenset[str] | None:
    """Names a Jinja chat template reads (its variables), or None when jinja2 cannot parse it."""
    try:
        import jinja2.meta
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(chat_template)))
    except jinja2.TemplateError:
        return None


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return chat messages with list content in transformers' part format, validated.

    String content becomes one text part (transformers 4.57 only reads list content); OpenAI-style
    `{"type": "image_url", "image_url": {"url": ...}}` parts become `{"type": "image", "url": ...}`. Unknown roles
    and content types, an empty conversation and non-string text raise a ValueError naming the message.
    """
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError(
            "The conversation is empty (or not a list); give at least one message "
            "{'role': 'system' | 'user' | 'assistant', 'content': ...}."
        )
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"Message {index} must be a dict with 'role' and 'content', got {message!r:.80}.")
        if message["role"] not in CHAT_ROLES:
            raise ValueError(f"Message {index} has unknown role {message['role']!r}; expected one of {CHAT_ROLES}.")
        content = message.get("content")
        if content is None:
            content = []
        elif isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif not isinstance(content, (list, tuple)):
            raise ValueError(
                f"Message {index} content must be a string or a list of parts, got {type(content).__name__}."
            )
        normalized.append({**message, "content": [_normalize_part(part, index) for part in content]})
    return normalized


def _normalize_part(part: Any, index: int) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image_url":
        url = part["image_url"]["url"] if isinstance(part.get("image_url"), dict) else part.get("image_url")
        return {"type": "image", "url": url}
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(
                f"Message {index} has a text part whose 'text' is {type(part.get('text')).__name__}, not a str."
            )
        return part
    if kind == "image":  # with a source, or a bare marker for processor(text=..., images=...) calls
        return part
    raise ValueError(
        f"Message {index} has an unsupported content part {part!r:.120}; expected {{'type': 'text', 'text': str}}, "
        f"{{'type': 'image', one of {IMAGE_SOURCE_KEYS}: ...}} or {{'type': 'image_url', 'image_url': {{'url': ...}}}}."
    )


class AndesVLProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor ([`AndesVLImageProcessor`]): resizes, pads, normalizes and patchifies images.
        tokenizer ([`Qwen2Tokenizer`]): the AndesVL (Qwen3) tokenizer.
        chat_template (`str`, *optional*): Jinja template; the repo ships `chat_template.jinja`.
        allow_remote_images (`bool`, *optional*, defaults to `False`): fetch `http(s)://` image URLs. Off by default,
            so a prompt never triggers network access unless the caller opts in.
        allow_special_tokens_in_text (`bool`, *optional*, defaults to `False`): in `apply_chat_template` (and so in
            the model's `chat()` and the pipeline), let message text contain the turn and image markers
            (`control_tokens`: `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, `<image>`, `<img>`, `<|vision_pad|>`,
            `</img>`), which are then tokenized as control tokens. Off by default: such text raises a ValueError
            naming the token and the message, so user text cannot forge a turn or an image span. Task tokens
            (`<|object_ref_start|>`, `<|box_start|>`, `<think>`, ...) are allowed: prompts and answers use them.
            Also a keyword of `apply_chat_template`. The raw `processor(text=...)` path is never checked: there the
            caller writes the template.
    """

    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    image_placeholder = "<image>"
    image_start_token = "<img>"
    image_token = "<|vision_pad|>"
    image_end_token = "</img>"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        allow_remote_images: bool = False,
        allow_special_tokens_in_text: bool = False,
        **kwargs: Any,
    ):
        self.allow_remote_images = allow_remote_images
        self.allow_special_tokens_in_text = allow_special_tokens_in_text
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_hw"]

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        audio=None,
        return_tensors: str | None = None,
        allow_remote_images: bool | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize `text` with every `<image>` expanded for the matching image of `images`.

        `images` is one image, a flat list (in order of appearance over all texts) or a per-text nested list; each
        image may be a PIL image, array, tensor, local path, `data:` URL or base64 string. Keyword arguments named in
        `IMAGE_KWARGS` go to the image processor, those in `TEXT_KWARGS` to the tokenizer; variables of the chat
        template (transformers 4.57's `apply_chat_template` forwards them here) are ignored; any other keyword raises
        a TypeError naming it.
        """
        if videos is not None or audio is not None:
            raise ValueError("AndesVL takes images and text only; videos and audio are not supported.")
        if text is None:
            raise ValueError("AndesVLProcessor needs `text` (use the chat template or write one <image> per image).")
        texts = [text] if isinstance(text, str) else list(text)
        images_per_text = self._group_images(images, texts)
        image_kwargs = {key: kwargs.pop(key) for key in IMAGE_KWARGS if key in kwargs}
        text_kwargs = {key: kwargs.pop(key) for key in TEXT_KWARGS if key in kwargs}
        self._check_unknown_kwargs(kwargs)
        allow_remote = self.allow_remote_images if allow_remote_images is None else allow_remote_images
        limits = {  # the image processor's limits, or this call's overrides
            key: image_kwargs[key] if image_kwargs.get(key) is not None else getattr(self.image_processor, key)
            for key in ("max_image_pixels", "max_image_bytes")
        }
        flat_images = [
            load_image(image, allow_remote=allow_remote, **limits) for group in images_per_text for image in group
        ]
        data: dict[str, Any] = {}
        if flat_images:
            image_inputs = self.image_processor(flat_images, return_tensors="pt", **image_kwargs)
            data.update(pixel_values=image_inputs["pixel_values"], image_grid_hw=image_inputs["image_grid_hw"])
            tokens_per_image = self.image_processor.num_image_tokens(image_inputs["image_grid_hw"])
            texts = self._expand_image_placeholders(texts, tokens_per_image)

        text_inputs = self.tokenizer(texts, return_tensors=None, **text_kwargs)
        self._check_image_token_count(text_inputs["input_ids"], data.get("image_grid_hw"))
        data.update(input_ids=text_inputs["input_ids"], attention_mask=text_inputs["attention_mask"])
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _check_unknown_kwargs(self, kwargs: dict[str, Any]) -> None:
        """TypeError for keywords that are neither processor options nor chat-template variables (a typo such as
        `max_lenght=` or `resize_mod=` would otherwise be silently ignored)."""
        variables = template_variables(self.chat_template) if isinstance(self.chat_template, str) else frozenset()
        if variables is None:  # the template could not be introspected: its variables cannot be told apart
            return
        unknown = sorted(key for key in kwargs if key not in variables and key not in FORWARDED_KWARGS)
        if unknown:
            raise TypeError(
                f"AndesVLProcessor got unexpected keyword argument(s) {unknown}. Image options: {list(IMAGE_KWARGS)}; "
                f"text options: {list(TEXT_KWARGS)}; chat-template variables: {sorted(variables)}."
            )

    def _group_images(self, images, texts: list[str]) -> list[list[Any]]:
        """Match images to texts by the `<image>` markers; raise with both counts when they disagree."""
        markers = [t.count(self.image_placeholder) for t in texts]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        nested = len(images) > 0 and all(isinstance(group, (list, tuple)) for group in images)
        if nested and len(images) != len(texts):
            raise ValueError(f"Got {len(images)} lists of images for {len(texts)} texts; give one list per text.")
        if not nested:
            flat = list(images)
            if len(flat) != sum(markers):
                raise ValueError(
                    f"The text has {sum(markers)} {self.image_placeholder} markers but {len(flat)} images were given; "
                    f"write one {self.image_placeholder} per image (the chat template does this for image parts)."
                )
            images, start = [], 0
            for count in markers:
                images.append(flat[start : start + count])
                start += count
        for index, (group, count) in enumerate(zip(images, markers)):
            if len(group) != count:
                raise ValueError(
                    f"Text {index} has {count} {self.image_placeholder} markers but {len(group)} images were given."
                )
        return [list(group) for group in images]

    def _expand_image_placeholders(self, texts: list[str], tokens_per_image: list[int]) -> list[str]:
        spans = iter(f"{self.image_start_token}{self.image_token * n}{self.image_end_token}" for n in tokens_per_image)
        expanded = []
        for text in texts:
            pieces = text.split(self.image_placeholder)
            expanded.append(pieces[0] + "".join(next(spans) + piece for piece in pieces[1:]))
        return expanded

    def _check_image_token_count(self, input_ids: list[list[int]], image_grid_hw) -> None:
        expected = 0 if image_grid_hw is None else sum(self.image_processor.num_image_tokens(image_grid_hw))
        found = sum(ids.count(self.image_token_id) for ids in input_ids)
        if found != expected:
            raise ValueError(
                f"The tokenized text holds {found} {self.image_token} tokens but the images need {expected}; "
                f"the text may contain {self.image_token} literally, or was truncated (truncation cuts image spans)."
            )

    @property
    def control_tokens(self) -> tuple[str, ...]:
        """Turn and image markers: only the chat template and the processor write them (longest first)."""
        tokenizer_tokens = (self.tokenizer.eos_token, self.tokenizer.pad_token, self.tokenizer.bos_token)
        image_tokens = (self.image_placeholder, self.image_start_token, self.image_token, self.image_end_token)
        tokens = {token for token in (*TURN_TOKENS, *tokenizer_tokens, *image_tokens) if token}
        return tuple(sorted(tokens, key=len, reverse=True))

    def _check_control_tokens(self, messages: list[dict[str, Any]]) -> None:
        """Raise if message text holds a turn or image marker (`control_tokens`)."""
        pattern = re.compile("|".join(re.escape(token) for token in self.control_tokens))
        for index, message in enumerate(messages):
            for part in message["content"]:
                match = pattern.search(part["text"]) if part.get("type") == "text" else None
                if match:
                    raise ValueError(
                        f"Message {index} ({message['role']}) contains the control token {match.group()!r} in its "
                        f"text; turn and image markers come only from the chat template and the processor. Remove "
                        f"it, or pass allow_special_tokens_in_text=True to tokenize it as a control token."
                    )

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs: Any):
        """transformers' `apply_chat_template` on a normalized conversation (see `normalize_messages`).

        Message text holding a turn or image marker (`control_tokens`) raises a ValueError unless
        `allow_special_tokens_in_text` (keyword here, or the processor attribute) is True.
        """
        if kwargs.get("sanitize_control_tokens"):
            raise ValueError(
                "sanitize_control_tokens is not supported by AndesVLProcessor: turn and image markers in message "
                "text are rejected by default (allow_special_tokens_in_text=True tokenizes them as control tokens)."
            )
        allow_special = kwargs.pop("allow_special_tokens_in_text", None)
        if allow_special is None:
            allow_special = getattr(self, "allow_special_tokens_in_text", False)
        if not isinstance(conversation, (list, tuple)) or len(conversation) == 0:
            raise ValueError("The conversation is empty (or not a list); give at least one message.")
        batched = isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        normalized = [normalize_messages(messages) for messages in conversations]
        if not allow_special:
            for messages in normalized:
                self._check_control_tokens(messages)
        return super().apply_chat_template(normalized if batched else normalized[0], chat_template, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


__all__ = ["AndesVLProcessor"]
