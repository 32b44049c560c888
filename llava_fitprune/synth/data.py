"""LLaVA's own supervised dataset and collator over a synthetic split (vicuna_v1 masking)."""
from __future__ import annotations

import os

import torch

EPOCH_SEED_STRIDE = 100_003  # seed -> per-epoch generator seeds that no other seed reuses


def llava_dataset(split_dir: str, tokenizer, image_processor, image_aspect_ratio: str = "pad"):
    """`llava.train.train.LazySupervisedDataset` over split_dir/conversations.json with split_dir/images.

    Items: {"input_ids": (T,), "labels": (T,) with -100 outside assistant answers, "image": (3, H, W)}.
    """
    from llava import conversation as conversation_lib
    from llava.train.train import DataArguments, LazySupervisedDataset

    data_path = os.path.join(split_dir, "conversations.json")
    image_folder = os.path.join(split_dir, "images")
    for p in (data_path, image_folder):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: make the split with python -m llava_fitprune.synth.scenes")
    if conversation_lib.default_conversation.version != "v1":  # LLaVA's train() sets it from --version
        raise RuntimeError("llava.conversation.default_conversation is not vicuna_v1; "
                           "LLaVA's preprocess() would mask labels for another template")
    args = DataArguments(data_path=data_path, image_folder=image_folder, image_aspect_ratio=image_aspect_ratio)
    args.image_processor = image_processor
    args.is_multimodal = True
    args.mm_use_im_start_end = False
    return LazySupervisedDataset(data_path, tokenizer, args)


def llava_collator(tokenizer):
    """`DataCollatorForSupervisedDataset`: right-pads ids/labels, attention_mask, stacks images (B, 3, H, W)."""
    from llava.train.train import DataCollatorForSupervisedDataset

    return DataCollatorForSupervisedDataset(tokenizer=tokenizer)


def epoch_order(num: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation of range(num), different for every epoch."""
    g = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(num, generator=g).tolist()
