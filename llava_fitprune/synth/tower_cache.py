"""The frozen-tower side of the LLaVA stage: tower features computed once per image, and the pooled curriculum.

With the tower frozen (as in LLaVA's own fine-tuning stage) its output for an image never changes, so
`FrozenTowerFeatures` runs each image through it once and later steps start at the projector. The
curriculum (`--pool-schedule 4:200,2:150`) averages pool x pool patches before the projector for the
first steps: fewer image tokens to search while attention is still uniform.
"""
from __future__ import annotations

import contextlib
import math

import torch


def parse_pool_schedule(text: str) -> list[tuple[int, int]]:
    """ "4:250,2:200" -> [(4, 250), (2, 200)]: (pool factor, steps), in order; "" -> []."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            factor, steps = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"pool schedule entry {part!r}: write FACTOR:STEPS, e.g. 4:250,2:200") from None
        if factor < 1 or steps < 0:
            raise ValueError(f"pool schedule entry {part!r}: the factor must be >= 1 and the steps >= 0")
        out.append((factor, steps))
    return out


def pool_at(step: int, schedule: list[tuple[int, int]]) -> int:
    for factor, steps in schedule:
        if step < steps:
            return factor
        step -= steps
    return 1


def pool_patches(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Average `factor` x `factor` neighbourhoods of the square patch grid.

    features: [B, P, C] (P = side * side) -> [B, P / factor^2, C], row-major like the input
    """
    if factor == 1:
        return features
    B, P, C = features.shape
    side = math.isqrt(P)
    if side * side != P or side % factor:
        raise ValueError(f"cannot pool {P} patches (a {side}-wide grid) by {factor}")
    grid = features.transpose(1, 2).reshape(B, C, side, side)  # [B, C, side, side]
    return torch.nn.functional.avg_pool2d(grid, factor).flatten(2).transpose(1, 2)  # [B, P / f^2, C]


class FrozenTowerFeatures:
    """The frozen vision tower's features of every training item, computed once on first use.

    With the tower frozen (as in LLaVA's own fine-tuning stage) its output for an image never
    changes, so each image goes through it once; later steps start at the projector. Items keep their
    token ids and labels, so LLaVA's dataset tokenizes each conversation once too.

    `pool` > 1 (a curriculum for the first steps) averages pool x pool patches before the projector:
    fewer image tokens to search while attention is still uniform.
    """

    def __init__(self, model, dataset, dtype: torch.dtype = torch.float16):
        self.model, self.dataset, self.dtype = model, dataset, dtype
        self.items: dict[int, dict] = {}
        self.by_image: dict[str, torch.Tensor] = {}  # records cut from one conversation share their image
        self.pool = 1

    def _image_name(self, i: int):
        records = getattr(self.dataset, "list_data_dict", None)  # LLaVA's dataset; a plain list: by index
        return records[i]["image"] if records is not None else i

    def batch(self, idx: list[int], collate) -> dict:
        missing = [i for i in idx if i not in self.items]
        if missing:
            fresh = [self.dataset[i] for i in missing]
            todo = {}  # image -> pixels, each image once
            for i, f in zip(missing, fresh):
                name = self._image_name(i)
                if name not in self.by_image:
                    todo.setdefault(name, f["image"])
            if todo:
                with torch.no_grad():
                    feats = self.model.get_vision_tower()(torch.stack(list(todo.values())))  # [b, P, C]
                self.by_image.update(zip(todo, feats.to(self.dtype)))
            for i, f in zip(missing, fresh):
                self.items[i] = {**{k: v for k, v in f.items() if k != "image"},
                                 "features": self.by_image[self._image_name(i)]}
        items = [self.items[i] for i in idx]
        batch = collate([{k: v for k, v in it.items() if k != "features"} for it in items])
        batch["images"] = torch.stack([it["features"] for it in items]).float()  # [B, P, C] tower features
        return batch

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """LLaVA's encode_images on images [B, 3, H, W] or on tower features [B, P, C]."""
        inner = self.model.get_model()
        features = x if x.dim() == 3 else inner.get_vision_tower()(x)
        return inner.mm_projector(pool_patches(features, self.pool))

    @contextlib.contextmanager
    def installed(self):
        """Within the block, this model instance's encode_images is `self.encode` (instance attribute only)."""
        self.model.encode_images = self.encode
        try:
            yield self
        finally:
            del self.model.encode_images
