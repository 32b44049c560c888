"""InternVL (`InternVLForConditionalGeneration`, transformers' native port): the visual tokens are the
`<IMG_CONTEXT>` placeholders (`config.image_token_id`), `image_seq_length` per tile of each image's
dynamic tiling (plus a thumbnail), between `<img>` and `</img>` (text tokens). The language model is
a 1-D-rope Qwen2 or Llama `AutoModel`, served by the generic pruning loop; other language models
(Qwen3 of InternVL3.5, mixture-of-experts ones) are refused before the weights load.

`InternVLImageTextProcessor` stands in for `InternVLProcessor` where that cannot be built (transformers
needs torchvision for its video processor): images and text only, the same outputs.
"""
from __future__ import annotations

from .model import FitPruneVLMMixin

TEXT_MODEL_TYPES = ("qwen2", "llama")  # the language models the pruning loop is tested on for InternVL


def check_config(config) -> None:
    """One line when the checkpoint's language model is not one the pruning loop serves."""
    text_type = config.get_text_config(decoder=True).model_type
    if text_type not in TEXT_MODEL_TYPES:
        raise ValueError(f"InternVL with a {text_type!r} language model is not supported by the transformers "
                         f"backend's pruning (supported: {', '.join(TEXT_MODEL_TYPES)})")


class InternVLPruningMixin(FitPruneVLMMixin):
    @property
    def fitprune_visual_token_ids(self) -> tuple[int, ...]:
        return (self.config.image_token_id,)


class InternVLImageTextProcessor:
    """InternVL's processor for images and text: each `<IMG_CONTEXT>` of the text becomes
    `<img>` + `<IMG_CONTEXT>` x (image_seq_length x the image's tiles) + `</img>`; the image processor
    (GotOcr2's) tiles each image (`crop_to_patches`, as InternVLProcessor asks). Returns input_ids,
    attention_mask, pixel_values [tiles, 3, H, W]."""

    def __init__(self, image_processor, tokenizer, image_seq_length: int):
        self.image_processor, self.tokenizer, self.image_seq_length = image_processor, tokenizer, image_seq_length
        # the tokenizer's named tokens where it has them (InternVL-hf checkpoints), else their usual text
        self.start_image_token = getattr(tokenizer, "start_image_token", None) or "<img>"
        self.end_image_token = getattr(tokenizer, "end_image_token", None) or "</img>"
        self.image_token = getattr(tokenizer, "context_image_token", None) or "<IMG_CONTEXT>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False, **kwargs):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=tokenize, **kwargs)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kwargs):
        text = [text] if isinstance(text, str) else list(text)
        data = {}
        if images is not None:
            data = dict(self.image_processor(images=images, crop_to_patches=True, return_tensors=return_tensors))
            tiles = [int(n) for n in data.pop("num_patches")]
            placeholder, i = "\0", 0
            for s, sample in enumerate(text):
                while self.image_token in sample:
                    if i >= len(tiles):
                        raise ValueError(f"more {self.image_token} in the text than images ({len(tiles)})")
                    expanded = self.start_image_token + placeholder * (self.image_seq_length * tiles[i]) + \
                        self.end_image_token
                    sample = sample.replace(self.image_token, expanded, 1)
                    i += 1
                text[s] = sample.replace(placeholder, self.image_token)
            if i != len(tiles):
                raise ValueError(f"{len(tiles)} images but {i} {self.image_token} tokens in the text")
        enc = self.tokenizer(text, return_tensors=return_tensors, padding=padding, **kwargs)
        return {**enc, **data}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def load_image_text_processor(pretrained: str, config, chat_template=None) -> InternVLImageTextProcessor:
    """`InternVLImageTextProcessor` from a checkpoint's image processor (GotOcr2's, PIL) and tokenizer; the chat
    template is `chat_template` (the one the checkpoint's processor saved), else the tokenizer's."""
    from transformers import AutoTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    tokenizer.chat_template = chat_template or tokenizer.chat_template
    return InternVLImageTextProcessor(GotOcr2ImageProcessorPil.from_pretrained(pretrained), tokenizer,
                                      config.image_seq_length)
