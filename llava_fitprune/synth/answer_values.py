"""Value targets for the answer heads: what an answer head reads must also be written in what it outputs.

The alignment loss (`grounding.py`) makes answer head k, at the position that predicts the answer,
attend to the objects the question names k-th. That decides where the head looks, not what it
carries: in the session-4 model the heads looked at the right shapes, yet a linear probe found no
trace of their x position at the answer position, and left/right stayed at chance (docs/synth.md).
Here each answer head's output at that position (its attention-weighted values, before `o_proj`)
must also predict, through a small linear probe that is thrown away after training, the attributes
of the objects it was sent to: their mean x position, their colour mix and the written digit. The
probe is linear, so the head's output must carry them linearly; which one an answer needs, and how
to compare two heads' x, stays with the task loss.

Pure functions of tensors and scene records apart from `answer_head_outputs`, which reads one layer's
projections, and `ValueProbe`, the probe.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .draw import COLOURS
from .grounding import DIGIT_WORD, answer_queries, layer_head_logprobs, named_objects

NUM_DIGITS = 10
X_STD = math.sqrt(1 / 12)  # std of a uniform position in [0, 1]: x targets are standardised with it
COLOUR_NAMES = tuple(COLOURS)


def word_attributes(scene: dict, word: str, grid: int) -> dict | None:
    """What the objects named by `word` look like: {"x": mean centre column as a fraction of the width,
    "colour": [len(COLOURS)] colour mix or None, "digit": the written digit or None}; None if `word`
    names no object. Centres come from the objects' cells (row, column, size) on the `grid`-wide grid."""
    objects = [obj for obj, words in named_objects(scene) if word in words]
    if not objects:
        return None
    x = sum(o["cells"][1] + o["cells"][2] / 2 for o in objects) / len(objects) / grid
    colour = None
    if word != DIGIT_WORD:
        colour = torch.zeros(len(COLOUR_NAMES))
        for o in objects:
            colour[COLOUR_NAMES.index(o["colour"])] += 1 / len(objects)
    return {"x": x, "colour": colour, "digit": int(objects[0]["value"]) if word == DIGIT_WORD else None}


def value_targets(input_ids: torch.Tensor, labels: torch.Tensor, scenes: list[dict], word_ids: dict[int, str],
                  image_token_id: int, grid: int, pool: int, heads: tuple[int, ...],
                  prompt_end_id: int) -> list[tuple[int, int, int, dict]]:
    """(batch row, query position, head, word_attributes) for every answer target of `grounding.answer_targets`
    (same rows, positions and heads, in the same order)."""
    queries = answer_queries(input_ids, labels, word_ids, image_token_id, (grid // pool) ** 2, heads, prompt_end_id)
    out = []
    for b, q, word, head in queries:
        attrs = word_attributes(scenes[b], word, grid)
        if attrs is not None:
            out.append((b, q, head, attrs))
    return out


def answer_head_outputs(model, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, layer: int,
                        head: int) -> torch.Tensor:
    """One head's output (attention-weighted values, before o_proj) of decoder layer `layer` at the queries
    (rows[i], positions[i]); hidden: [B, N, D] that layer's input, no left padding. Returns [n, head_dim]."""
    block = model.get_model().layers[layer]
    attn = block.self_attn
    d = attn.head_dim
    kv_head = head // attn.num_key_value_groups
    values = attn.v_proj(block.input_layernorm(hidden))[..., kv_head * d:(kv_head + 1) * d]  # [B, N, d]
    probs = layer_head_logprobs(model, hidden, rows, positions, layer, head).exp()  # attn: [n, N]
    return torch.einsum("nk,nkd->nd", probs.to(values.dtype), values[rows])  # [n, d]


class ValueProbe(nn.Module):
    """One linear read-out per answer head: head output [n, head_dim] -> [n, 1 + colours + digits]
    (standardised x, colour mix, one-hot digit). Trained alongside the model, never saved with it."""

    def __init__(self, head_dim: int, heads: tuple[int, ...]):
        super().__init__()
        self.readouts = nn.ModuleDict({str(h): nn.Linear(head_dim, 1 + len(COLOUR_NAMES) + NUM_DIGITS) for h in heads})

    def forward(self, outputs: torch.Tensor, head: int) -> torch.Tensor:
        return self.readouts[str(head)](outputs)


def value_loss(model, probe: ValueProbe, hidden: torch.Tensor, targets: list[tuple[int, int, int, dict]],
               layer: int, x_weight: float = 1.0) -> torch.Tensor:
    """Mean over targets of the squared errors of what `probe` reads from each target's head output: the
    standardised x (times x_weight), the colour mix (objects with a colour) and the one-hot written digit.
    All bounded regressions: once a head carries an attribute, its term stops pulling (a cross-entropy
    would keep growing its logits). hidden: [B, N, D] the input of decoder layer `layer`."""
    if not targets:
        return hidden.sum() * 0
    losses = []
    nc = len(COLOUR_NAMES)
    for h in sorted({t[2] for t in targets}):
        mine = [t for t in targets if t[2] == h]
        rows = torch.tensor([t[0] for t in mine], device=hidden.device)
        positions = torch.tensor([t[1] for t in mine], device=hidden.device)
        pred = probe(answer_head_outputs(model, hidden, rows, positions, layer, h).float(), h)  # [n, 1 + C + 10]
        x = torch.tensor([(t[3]["x"] - 0.5) / X_STD for t in mine], device=hidden.device)  # [n]
        has_colour = torch.tensor([t[3]["colour"] is not None for t in mine], device=hidden.device)  # [n]
        colour = torch.stack([t[3]["colour"] if t[3]["colour"] is not None else torch.zeros(nc) for t in mine])  # [n, C]
        has_digit = torch.tensor([t[3]["digit"] is not None for t in mine], device=hidden.device)  # [n]
        digit = F.one_hot(torch.tensor([t[3]["digit"] or 0 for t in mine]), NUM_DIGITS).float()  # [n, 10]
        loss = x_weight * (pred[:, 0] - x) ** 2  # [n]
        loss = loss + has_colour * (pred[:, 1:1 + nc] - colour.to(pred.device)).pow(2).sum(-1)
        loss = loss + has_digit * (pred[:, 1 + nc:] - digit.to(pred.device)).pow(2).sum(-1)
        losses.append(loss)
    return torch.cat(losses).mean()
