"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) and Qwen2-VL (`Qwen2VLForConditionalGeneration`,
whose text model in transformers 5.24 is Qwen2.5-VL's line for line: rotary embedding, attention, decoder
layer, position-id preamble): the visual tokens are the image (and video) placeholders; M-RoPE position
ids are 3-D ([3, B, N]: temporal, height, width). The stock model computes them (and its rope deltas for
decoding) before the text model; the pruning loop turns them into (cos, sin) rows once and gathers those
rows with the kept tokens, so kept tokens keep their 3-D positions. GQA is the text model's own
(`num_key_value_heads`).

`QwenImageTextProcessor` stands in for `Qwen2_5_VLProcessor` / `Qwen2VLProcessor` where those cannot be
built (transformers needs torchvision for their video processor): images and text only, the same outputs.
"""
from __future__ import annotations

import torch

from .decoder import PruningTextModelMixin
from .model import FitPruneVLMMixin


class QwenPruningMixin(FitPruneVLMMixin):
    @property
    def fitprune_visual_token_ids(self) -> tuple[int, ...]:
        return (self.config.image_token_id, self.config.video_token_id)


class QwenTextPruningMixin(PruningTextModelMixin):
    # Adapted from transformers==5.24.0 models/qwen2_5_vl/modeling_qwen2_5_vl.py Qwen2_5_VLTextModel.forward
    # (the position-id preamble); the text-only row of packed [4, B, N] ids only shapes FA2 masks.
    def fitprune_position_ids(self, position_ids, past, batch, length, device):
        if position_ids is None:
            position_ids = torch.arange(length, device=device) + past
            position_ids = position_ids.view(1, 1, -1).expand(3, batch, -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None, ...].expand(3, position_ids.shape[0], -1)
        if position_ids.ndim == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return position_ids  # [3, B, N]


class QwenImageTextProcessor:
    """Qwen2.5-VL's processor for images and text: `<|image_pad|>` expands to each image's merged
    patch count; returns input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw."""

    def __init__(self, image_processor, tokenizer, image_token: str = "<|image_pad|>", video_token: str = "<|video_pad|>"):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)

    @classmethod
    def from_pretrained(cls, folder: str) -> "QwenImageTextProcessor":
        """From a folder with Qwen2-VL's image processor and a tokenizer (what `save_pretrained` writes)."""
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return cls(Qwen2VLImageProcessorPil.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))

    def save_pretrained(self, folder: str, **kwargs) -> list[str]:
        """The image processor's and the tokenizer's files (its chat template with them): `from_pretrained`,
        and `load_pretrained` on a checkpoint folder, read them back."""
        return [*self.image_processor.save_pretrained(folder, **kwargs), *self.tokenizer.save_pretrained(folder, **kwargs)]

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False, **kwargs):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=tokenize, **kwargs)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kwargs):
        text = [text] if isinstance(text, str) else list(text)
        data = {}
        if images is not None:
            data = dict(self.image_processor(images=images, return_tensors=return_tensors))
            counts = (data["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist()
            placeholder, i = "\0", 0
            for s, sample in enumerate(text):
                while self.image_token in sample:
                    if i >= len(counts):
                        raise ValueError(f"more {self.image_token} in the text than images ({len(counts)})")
                    sample = sample.replace(self.image_token, placeholder * counts[i], 1)
                    i += 1
                text[s] = sample.replace(placeholder, self.image_token)
            if i != len(counts):
                raise ValueError(f"{len(counts)} images but {i} {self.image_token} tokens in the text")
        enc = self.tokenizer(text, return_tensors=return_tensors, padding=padding, **kwargs)
        ids = enc["input_ids"]
        enc["mm_token_type_ids"] = (ids == self.image_token_id).int() + 2 * (ids == self.video_token_id).int()
        return {**enc, **data}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def load_image_text_processor(pretrained: str, config, chat_template=None) -> QwenImageTextProcessor:
    """`QwenImageTextProcessor` from a checkpoint's image processor and tokenizer; the chat template is
    `chat_template` (the one the checkpoint's processor saved), else the tokenizer's."""
    processor = QwenImageTextProcessor.from_pretrained(pretrained)
    processor.tokenizer.chat_template = chat_template or processor.tokenizer.chat_template
    return processor
