"""LLaVA's own supervised dataset and collator over a synthetic split (vicuna_v1 masking)."""
from __future__ import annotations

import json
import os
import tempfile

import torch

EPOCH_SEED_STRIDE = 100_003  # seed -> per-epoch generator seeds that no other seed reuses


def split_conversations(records: list[dict], questions_per_sample: int) -> list[dict]:
    """Cut each multi-turn record into records of `questions_per_sample` consecutive question/answer
    pairs (the last may be shorter), each opening with the image, as LLaVA's single-image records do.

    0 keeps the records whole. More records of fewer turns show more distinct images per step at the
    same number of tokens while the image tokens are few (the pooled curriculum).
    """
    if questions_per_sample < 0:
        raise ValueError(f"questions_per_sample must be >= 0 (0: whole conversations), got {questions_per_sample}")
    if questions_per_sample == 0:
        return records
    from llava.constants import DEFAULT_IMAGE_TOKEN as IMAGE_TOKEN

    out = []
    for rec in records:
        turns = rec["conversations"]
        if len(turns) % 2 or any(t["from"] != ("human", "gpt")[i % 2] for i, t in enumerate(turns)):
            raise ValueError(f"record {rec.get('id')}: turns must alternate human/gpt")
        pairs = [(turns[i]["value"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, ""), turns[i + 1]["value"])
                 for i in range(0, len(turns), 2)]
        for k in range(0, len(pairs), questions_per_sample):
            chunk = pairs[k:k + questions_per_sample]
            conv = []
            for j, (q, a) in enumerate(chunk):
                conv += [{"from": "human", "value": (IMAGE_TOKEN + "\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
            out.append({**rec, "id": f"{rec.get('id')}#{k // questions_per_sample}", "conversations": conv})
    return out


def llava_dataset(split_dir: str, tokenizer, image_processor, image_aspect_ratio: str = "pad",
                  questions_per_sample: int = 0):
    """`llava.train.train.LazySupervisedDataset` over split_dir/conversations.json with split_dir/images.

    Items: {"input_ids": (T,), "labels": (T,) with -100 outside assistant answers, "image": (3, H, W)}.
    questions_per_sample > 0: the records cut by `split_conversations` instead of whole conversations.
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
    if questions_per_sample == 0:
        return LazySupervisedDataset(data_path, tokenizer, args)
    with open(data_path) as f:
        records = split_conversations(json.load(f), questions_per_sample)
    with tempfile.TemporaryDirectory() as tmp:  # LazySupervisedDataset reads the file once, at init
        path = os.path.join(tmp, "conversations.json")
        with open(path, "w") as f:
            json.dump(records, f)
        return LazySupervisedDataset(path, tokenizer, args)


def llava_collator(tokenizer):
    """`DataCollatorForSupervisedDataset`: right-pads ids/labels, attention_mask, stacks images (B, 3, H, W)."""
    from llava.train.train import DataCollatorForSupervisedDataset

    return DataCollatorForSupervisedDataset(tokenizer=tokenizer)


def epoch_order(num: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation of range(num), different for every epoch."""
    g = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(num, generator=g).tolist()
