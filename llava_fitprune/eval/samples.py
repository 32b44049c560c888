"""Questions as model inputs: prompt with LLaVA's conversation template, image through its processor.

Each eval module turns its question file into `Item`s (no model needed, so bad input fails before
the model loads); `EvalDataset` builds the tensors, in DataLoader workers when there are any.
"""
from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from PIL import Image
from torch.utils.data import Dataset

from .io import EvalInputError


@dataclass
class Item:
    record: dict  # fields copied into the answer: question_id, prompt, and e.g. round_id
    text: str  # the user turn, without the image token (the dataset adds it)
    image_path: Optional[str] = None
    image_b64: Optional[str] = None
    extra: dict = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.image_path is not None or self.image_b64 is not None

    def load_image(self) -> Image.Image:
        if self.image_b64 is not None:
            try:
                return Image.open(io.BytesIO(base64.b64decode(self.image_b64))).convert("RGB")
            except Exception as e:  # noqa: BLE001 - any decoding failure is bad input
                raise EvalInputError(f"question {self.record.get('question_id')}: its base64 image does not "
                                     f"decode ({type(e).__name__}: {e})") from None
        qid = self.record.get("question_id")
        try:
            return Image.open(self.image_path).convert("RGB")
        except FileNotFoundError:
            raise EvalInputError(f"image file {self.image_path} (question {qid}) does not exist") from None
        except OSError as e:  # PIL's UnidentifiedImageError, truncated files
            raise EvalInputError(f"image file {self.image_path} (question {qid}) cannot be read: {e}") from None


def check_images(items: list[Item], image_folder: str, shown: int = 5) -> None:
    """Fail before loading the model when image files are missing, naming them."""
    missing = [it.image_path for it in items if it.image_path is not None and not os.path.isfile(it.image_path)]
    if missing:
        more = f" and {len(missing) - shown} more" if len(missing) > shown else ""
        raise EvalInputError(f"{len(missing)} image file(s) do not exist under --image-folder {image_folder!r}: "
                             f"{', '.join(missing[:shown])}{more}")


@dataclass
class Sample:
    index: int  # position in the pending list
    input_ids: torch.Tensor  # [T] with IMAGE_TOKEN_INDEX where the image goes
    image: Optional[torch.Tensor]  # [3, H, W]
    image_size: Optional[tuple]


class EvalDataset(Dataset):
    def __init__(self, items: list[Item], tokenizer, image_processor, model_config, conv_mode: str):
        self.items, self.tokenizer, self.image_processor = items, tokenizer, image_processor
        self.model_config, self.conv_mode = model_config, conv_mode

    def __len__(self) -> int:
        return len(self.items)

    def prompt(self, item: Item) -> str:
        from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
        from llava.conversation import conv_templates

        qs = item.text
        if item.has_image:
            token = DEFAULT_IMAGE_TOKEN
            if getattr(self.model_config, "mm_use_im_start_end", False):
                token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
            qs = token + "\n" + qs
        conv = conv_templates[self.conv_mode].copy()
        conv.append_message(conv.roles[0], qs)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def __getitem__(self, index: int) -> Sample:
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images, tokenizer_image_token

        item = self.items[index]
        input_ids = tokenizer_image_token(self.prompt(item), self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        image = size = None
        if item.has_image:
            pil = item.load_image()
            image = process_images([pil], self.image_processor, self.model_config)[0]
            size = pil.size
        return Sample(index, input_ids, image, size)


def make_batches(items: list[Item], batch_size: int) -> list[list[int]]:
    """Consecutive indices, at most `batch_size` per batch; a batch never mixes image and text-only."""
    batches: list[list[int]] = []
    for i, item in enumerate(items):
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and items[last[0]].has_image == item.has_image:
            last.append(i)
        else:
            batches.append([i])
    return batches


def collate(samples: list[Sample]) -> list[Sample]:
    return samples


def pad_batch(samples: list[Sample], pad_id: int):
    """Right-padded input_ids [B, T] and attention_mask [B, T] (None for a single sample, as LLaVA runs)."""
    if len(samples) == 1:
        return samples[0].input_ids[None], None
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for row, s in enumerate(samples):
        ids[row, : len(s.input_ids)] = s.input_ids
        mask[row, : len(s.input_ids)] = True
    return ids, mask
