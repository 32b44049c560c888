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
    source: Optional[str] = None  # where the question is, for errors: e.g. "mmbench.tsv line 3 (index 1001)"
    # LLaVA's model_vqa_loader / model_vqa convert every image to RGB; model_vqa_science and
    # model_vqa_mmbench pass the file's own mode (a palette PNG pads differently): each module says.
    convert_rgb: bool = True

    @property
    def has_image(self) -> bool:
        return self.image_path is not None or self.image_b64 is not None

    def _decoded(self, image: Image.Image) -> Image.Image:
        if self.convert_rgb:
            return image.convert("RGB")
        image.load()  # decode now, so a broken file fails here, naming the question
        return image

    def load_image(self) -> Image.Image:
        qid = self.record.get("question_id")
        if self.image_b64 is not None:
            try:
                return self._decoded(open_b64_image(self.image_b64))
            except Exception as e:  # noqa: BLE001 - any decoding failure is bad input
                raise b64_image_error(self.source or f"question {qid}", e) from None
        try:
            return self._decoded(Image.open(self.image_path))
        except FileNotFoundError:
            raise EvalInputError(f"image file {self.image_path} (question {qid}) does not exist: check "
                                 f"--image-folder") from None
        except OSError as e:  # PIL's UnidentifiedImageError, truncated files
            raise EvalInputError(f"image file {self.image_path} (question {qid}) cannot be read: {e}; replace "
                                 f"the file (a readable image) or remove question {qid} from the question "
                                 f"file") from None


def open_b64_image(text: str) -> Image.Image:
    """A base64 image cell opened as LLaVA's `load_image_from_base64` opens it (lazily: pixels on load)."""
    return Image.open(io.BytesIO(base64.b64decode(text)))


def b64_image_error(where: str, error: Exception) -> EvalInputError:
    return EvalInputError(f"{where}: its base64 image does not decode ({type(error).__name__}: {error}); replace the "
                          f"row's image cell with a base64 PNG or JPEG, or remove the row")


def process_like_stock(image: Image.Image, image_processor, model_config) -> tuple[torch.Tensor, bool]:
    """LLaVA's `process_images` on the image as the stock module passes it, and whether it had to be
    converted to RGB first: only where stock crashes (a grayscale, 1-bit or 16-bit image padded to
    square, whose mode takes no RGB fill colour)."""
    from llava.mm_utils import process_images

    try:
        return process_images([image], image_processor, model_config)[0], False
    except (TypeError, ValueError):
        if image.mode == "RGB":
            raise
        return process_images([image.convert("RGB")], image_processor, model_config)[0], True


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
    converted_to_rgb: bool = False  # stock would have crashed on the file's own mode


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
        from llava.mm_utils import tokenizer_image_token

        item = self.items[index]
        input_ids = tokenizer_image_token(self.prompt(item), self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        image = size = None
        converted = False
        if item.has_image:
            pil = item.load_image()
            image, converted = process_like_stock(pil, self.image_processor, self.model_config)
            size = pil.size
        return Sample(index, input_ids, image, size, converted)


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
