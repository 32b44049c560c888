"""LVPruning's training forward: module decisions act as an attention mask on the frozen model.

A `MaskedPruning` object is the `key_bias_hook` of one forward (modeling.py): before decoder
layer `l` it returns the additive key bias of the decisions taken so far, then, if a module sits
at `l`, lets it decide from `l`'s input. A decision at `l` therefore masks the dropped vision tokens
as keys for every query from layer `l + 1` on, exactly what removing them by indexing after layer
`l`'s attention does at inference (selector.py).

Decisions are a keep policy p in {0, 1} per token (cumulative over modules). The bias is
log(p (1 - eps) + eps): 0 for kept keys, log(eps) for dropped ones, so softmax(scores + bias)
weighs key j by p_j: DynamicViT's policy-weighted attention, whose gradient to p stays finite for
dropped keys. Modes: "gumbel" (training: binary Gumbel-softmax, straight-through hard decisions)
and "topk" (the inference rule: the recipe's count of lowest keep logits, no noise).
"""
from __future__ import annotations

from typing import Optional

import torch
from llava.constants import IGNORE_INDEX

from ..core.recipe import Recipe
from ..core.scoring import drop_mask_lowest
from .modules import LVPruneModules
from .selector import model_num_visual_tokens, prompt_text

KEEP_EPS = 1e-10  # weight left on a dropped key (relative); its log is the bias, about -23
NOISE_EPS = 1e-6  # keeps the uniform sample of the logistic noise inside (0, 1)
MODES = ("gumbel", "topk")


def key_bias(policy: torch.Tensor) -> torch.Tensor:
    """policy: [B, N] keep in [0, 1] -> additive key bias [B, N] (0 where kept)."""
    return torch.log(policy * (1 - KEEP_EPS) + KEEP_EPS)


def straight_through_keep(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Binary Gumbel-softmax: forward value hard 0/1, gradient of the relaxed sigmoid. [B, N]."""
    u = torch.rand_like(logits).clamp(NOISE_EPS, 1 - NOISE_EPS)
    noise = torch.log(u) - torch.log1p(-u)  # logistic = difference of two Gumbels
    soft = torch.sigmoid((logits + noise) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


class MaskedPruning:
    """The key-bias hook of one batch. visual, text: [B, N] bool (text: the modules' keys)."""

    def __init__(self, modules: LVPruneModules, visual: torch.Tensor, text: torch.Tensor, mode: str = "gumbel",
                 recipe: Optional[Recipe] = None, temperature: Optional[float] = None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        if mode == "topk" and recipe is None:
            raise ValueError("mode 'topk' needs the recipe whose counts the inference path drops")
        self.modules, self.visual, self.text, self.mode = modules, visual, text, mode
        self.temperature = temperature or modules.config.temperature
        self.counts = None
        if recipe is not None:
            per_sample = [recipe.drops_for(n) for n in visual.sum(-1).tolist()]  # [B][L]
            self.counts = [torch.tensor(c, device=visual.device) for c in zip(*per_sample)]  # [L][B]
        self.policy: Optional[torch.Tensor] = None  # [B, N] float, 1 = alive
        self.kept: list[torch.Tensor] = []  # per module: [B] fraction of the sample's visual tokens alive

    def __call__(self, layer_idx: int, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        bias = None if self.policy is None else key_bias(self.policy).to(hidden.dtype)
        if self.modules.has(layer_idx):
            self._decide(layer_idx, hidden)
        return bias

    def _decide(self, layer_idx: int, hidden: torch.Tensor) -> None:
        alive = self.visual if self.policy is None else self.visual & (self.policy.detach() > 0.5)  # [B, N]
        logits = self.modules.at(layer_idx)(hidden, alive, self.text)  # [B, N]
        if self.mode == "gumbel":
            keep = straight_through_keep(logits, self.temperature)
        else:
            counts = self.counts[layer_idx]
            keep = (~drop_mask_lowest(logits.masked_fill(~alive, float("inf")), counts, int(counts.max()))).float()
        keep = torch.where(self.visual, keep, torch.ones_like(keep))  # text is never dropped
        self.policy = keep if self.policy is None else self.policy * keep
        n_visual = self.visual.sum(-1).clamp(min=1)  # [B]
        self.kept.append((self.policy * self.visual).sum(-1) / n_visual)

    @property
    def has_visual(self) -> torch.Tensor:  # [B] bool
        return self.visual.any(-1)

    def ratio_loss(self) -> torch.Tensor:
        """Mean over modules and samples with an image of (kept fraction - target)^2."""
        targets = self.modules.config.keep
        sel = self.has_visual
        if not self.kept or not bool(sel.any()):
            return torch.zeros((), device=self.visual.device)
        return torch.stack([((k[sel] - t) ** 2).mean() for k, t in zip(self.kept, targets)]).mean()

    def kept_means(self) -> list[float]:
        sel = self.has_visual
        return [float(k[sel].detach().mean()) if bool(sel.any()) else float("nan") for k in self.kept]


def masked_forward(model, modules: LVPruneModules, input_ids: torch.Tensor, images: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                   mode: str = "gumbel", num_visual_tokens: Optional[int] = None, image_sizes=None):
    """One forward of the frozen model with the modules' decisions as masks; returns (output, hook).

    The modules' keys are the prompt's text tokens: real, non-visual tokens whose label is
    IGNORE_INDEX (answers excluded, as at inference where they are not there yet).
    """
    if model.recipe is not None:
        raise ValueError("masked_forward runs the dense model with masks: call model.set_pruning(None) first")
    (_, position_ids, attn, _, embeds, labels, visual) = model.prepare_multimodal(
        input_ids, None, attention_mask, None, labels, images, image_sizes)
    B, N = embeds.shape[:2]
    valid = attn.bool() if attn is not None else torch.ones(B, N, dtype=torch.bool, device=embeds.device)
    visual = visual if visual is not None else torch.zeros_like(valid)
    text = prompt_text(valid, visual)
    if labels is not None:
        text = text & (labels == IGNORE_INDEX)
    recipe = None
    if mode == "topk":
        recipe = modules.config.recipe(num_visual_tokens or model_num_visual_tokens(model))
    hook = MaskedPruning(modules, visual, text, mode, recipe)
    out = model(inputs_embeds=embeds, attention_mask=attn, position_ids=position_ids, labels=labels,
                use_cache=False, key_bias_hook=hook)
    return out, hook
