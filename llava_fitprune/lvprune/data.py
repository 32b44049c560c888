"""Training data in LLaVA's instruction format, read by LLaVA's own dataset code.

The json LLaVA's `train.py` reads: `[{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}]`, images relative to `--image-folder`.
Tokenisation, the conversation template (LLaVA-1.5: `vicuna_v1`) and the label masking (only the
answers are supervised) are LLaVA's (`llava.train.train.LazySupervisedDataset` and its collator),
so the modules see exactly the sequences LLaVA was fine-tuned on.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

DEFAULT_TEMPLATE = "vicuna_v1"  # LLaVA-1.5's `--version v1`


_CHECKED: dict = {}  # (path, size, mtime, image folder given) -> length: the CLI checks before the model loads


def check_data(data_path: str, image_folder: Optional[str]) -> int:
    """Fail early and clearly on a file that is not LLaVA instruction data. Returns its length.
    A file checked before (unchanged since) is not parsed again (LLaVA's 665K mix is about 1 GB)."""
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"training data {data_path} does not exist")
    stat = os.stat(data_path)
    key = (os.path.abspath(data_path), stat.st_size, stat.st_mtime_ns, bool(image_folder))
    if key not in _CHECKED:
        _CHECKED[key] = _check_data(data_path, image_folder)
    return _CHECKED[key]


def _check_data(data_path: str, image_folder: Optional[str]) -> int:
    with open(data_path) as f:
        data = json.load(f)
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) and "conversations" in d for d in data):
        raise ValueError(f"{data_path}: expected LLaVA instruction data, a non-empty list of "
                         f'{{"id", "image", "conversations": [...]}} objects')
    if any("image" in d for d in data) and not image_folder:
        raise ValueError(f"{data_path} has samples with images: give --image-folder")
    return len(data)


def make_dataset(data_path: str, image_folder: Optional[str], tokenizer, image_processor, model_config,
                 template: str = DEFAULT_TEMPLATE):
    """(dataset, collator): LLaVA's LazySupervisedDataset and DataCollatorForSupervisedDataset."""
    import llava.conversation as conversation_lib
    from llava.train.train import DataArguments, DataCollatorForSupervisedDataset, LazySupervisedDataset

    check_data(data_path, image_folder)
    if template not in conversation_lib.conv_templates:
        raise ValueError(f"unknown conversation template {template!r}; LLaVA has {sorted(conversation_lib.conv_templates)}")
    conversation_lib.default_conversation = conversation_lib.conv_templates[template]  # LLaVA's preprocess reads it
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # what LLaVA's train.py does for v1
    args = DataArguments(data_path=data_path, lazy_preprocess=True, is_multimodal=True, image_folder=image_folder,
                         image_aspect_ratio=getattr(model_config, "image_aspect_ratio", "square"))
    args.image_processor = image_processor
    args.mm_use_im_start_end = getattr(model_config, "mm_use_im_start_end", False)
    return LazySupervisedDataset(data_path, tokenizer, args), DataCollatorForSupervisedDataset(tokenizer)


def epoch_order(num_samples: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's sample order in `epoch`: a seeded permutation, cut to a multiple of `world`."""
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    usable = len(perm) - len(perm) % world
    return perm[rank:usable:world]


def batches(dataset: Dataset, collator, order: list[int], batch_size: int, skip: int = 0,
            num_workers: int = 0) -> Iterator[dict]:
    """Micro-batches over `order`, skipping the first `skip` (resume inside an epoch)."""
    start = skip * batch_size
    if start >= len(order):
        return iter(())
    loader = DataLoader(Subset(dataset, order[start:]), batch_size=batch_size, shuffle=False, collate_fn=collator,
                        num_workers=num_workers, drop_last=False,
                        generator=torch.Generator())  # its own: the global RNG (Gumbel noise) stays untouched
    return iter(loader)


def micro_batches_per_epoch(order_len: int, batch_size: int) -> int:
    return -(-order_len // batch_size)


def to_device(batch: dict, device, dtype) -> dict:
    """input_ids, labels, attention_mask to `device`; images to `device` and the model's `dtype`."""
    out = {k: v.to(device) for k, v in batch.items() if k != "images"}
    images = batch.get("images")
    if isinstance(images, list):
        out["images"] = [im.to(device=device, dtype=dtype) for im in images]
    elif images is not None:
        out["images"] = images.to(device=device, dtype=dtype)
    return out
