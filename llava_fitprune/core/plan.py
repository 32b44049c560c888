"""A prefill's pruning schedule on the host: per-layer, per-sample drop counts and sequence lengths.

Backend-independent (plain torch): the transformers-native adapter uses it; the LLaVA adapter's
`PruningDecoderMixin._plan` / `text_after_last_image` compute the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .recipe import Recipe
from .prefill_plan import text_after_last_image  # noqa: F401 (re-exported for the hf adapter)
from .selectors import OracleSelector, TokenSelector


@dataclass
class PrefillPlan:
    drop_counts: list[list[int]]  # [L][B] tokens each sample drops at each layer
    new_lens: list[int]  # padded sequence length entering each layer, plus the final (L + 1)
    visual_entering: list[list[int]]  # [L + 1][B] visual tokens alive entering each layer
    real_entering: list[list[int]]  # [L + 1][B] real (non-padding) tokens entering each layer

    @property
    def prunes(self) -> bool:
        return any(max(c) > 0 for c in self.drop_counts)


def plan_prefill(recipe: Recipe | None, selector: TokenSelector, num_layers: int, visual: torch.Tensor,
                 valid: torch.Tensor) -> PrefillPlan:
    """visual, valid: [B, N] bool. Each sample's visual-token count gets the recipe scaled to it
    (`Recipe.drops_for`); an OracleSelector brings its own counts. One host sync."""
    B, N = visual.shape
    n_visual = visual.sum(-1).tolist()
    n_real = valid.sum(-1).tolist()
    if isinstance(selector, OracleSelector):
        counts = selector.plan_counts(num_layers, B, N, visual.device)[0].tolist()  # [L][B]
    else:
        per_sample = [recipe.drops_for(n) for n in n_visual]  # [B][L]
        counts = [[per_sample[b][l] for b in range(B)] for l in range(num_layers)]
    lens, vis, real = [N], [list(n_visual)], [list(n_real)]
    for l in range(num_layers):
        real.append([r - d for r, d in zip(real[-1], counts[l])])
        lens.append(lens[-1] if max(counts[l]) == 0 else max(real[-1]))
        vis.append([v - d for v, d in zip(vis[-1], counts[l])])
    return PrefillPlan(counts, lens, vis, real)
