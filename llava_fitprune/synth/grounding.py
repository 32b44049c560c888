"""Word-region alignment for training (as MDETR aligns words with boxes): question words attend to what they name.

A from-scratch decoder must learn two hops to answer "What colour is the star?": find the star's
patches from the word "star", and carry what it read to the answer position. Until one hop works
the other gets no gradient, and on 2 CPU cores the plateau outlasts the training budget
(docs/synth.md). This loss supervises the first hop, at one head of one decoder layer (layer 2 in the
shipped model, so the look-up sits behind the first pruned layers; at layer 0 it would happen before
any method drops a token): each question token that names a shape type ("star", "stars"), a colour ("red") or the
written digit ("number") puts its attention on the image patches of the objects it names, taken from the scene layout.

With `answer_targets` (as in the shipped model) the look-up itself is supervised too: at the position that predicts an
answer, one head attends to the objects the question names first and another head to those it names
second ("Is the star to the left or right of the circle?": one head on the star, one on the circle), so
the answer position reads both positions it must compare. What those heads must carry (x, colour,
digit of what they read) is `answer_values.py`; which answer, and how to compare, are left to the task
loss, as is every other head and layer.

Pure functions of tensors apart from `layer_head_logprobs`, which reads one layer's projections.
"""
from __future__ import annotations

import math

import torch

from .draw import COLOURS, SHAPES
from .questions import PLURAL

DIGIT_WORD = "number"  # "What number is written in the image?" names the written digit
GROUNDED_WORDS = SHAPES + tuple(COLOURS) + (DIGIT_WORD,)


def word_token_ids(tokenizer) -> dict[int, str]:
    """Token id -> grounded word, for every shape (singular or plural), colour and digit word that is a single
    SentencePiece token."""
    out = {}
    forms = [(w, w) for w in GROUNDED_WORDS] + [(PLURAL[s], s) for s in SHAPES]  # "stars" names the stars
    for form, word in forms:
        ids = tokenizer(form, add_special_tokens=False).input_ids
        if len(ids) == 1:
            out[ids[0]] = word
    if not out:
        raise ValueError("no shape or colour word is a single token: the tokenizer was not trained on the phrasebook")
    return out


def named_objects(scene: dict) -> list[tuple[dict, tuple[str, ...]]]:
    """Every object of a scene with the words that name it: a shape by its type and its colour, the written
    digit by "number"."""
    named = [(obj, (obj["shape"], obj["colour"])) for obj in scene["shapes"]]
    if "text" in scene:
        named.append((scene["text"], (DIGIT_WORD,)))
    return named


def object_masks(scene: dict, grid: int) -> dict[str, torch.Tensor]:
    """Word -> [grid * grid] bool mask of the patches of the objects that word names ("star": every star,
    "number": the written digit)."""
    masks: dict[str, torch.Tensor] = {}
    for obj, words in named_objects(scene):
        r, c, k = obj["cells"]
        for word in words:
            m = masks.setdefault(word, torch.zeros(grid, grid, dtype=torch.bool))
            m[r:r + k, c:c + k] = True
    return {w: m.flatten() for w, m in masks.items()}


def pool_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """[side * side] bool -> [(side / factor)^2]: a pooled patch is on if any of its patches is."""
    if factor == 1:
        return mask
    side = math.isqrt(mask.numel())
    grid = mask.view(1, 1, side, side).float()
    return (torch.nn.functional.max_pool2d(grid, factor) > 0).flatten()


def image_token_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """input_ids: [B, T] before LLaVA splices the image in -> [B] position of each row's one image token."""
    is_image = input_ids == image_token_id  # [B, T]
    counts = is_image.sum(1)
    for b in (counts != 1).nonzero()[:, 0].tolist():
        raise ValueError(f"row {b} has {int(counts[b])} image tokens; grounding expects exactly one")
    return is_image.float().argmax(1)


def _pooled_masks(scene: dict, grid: int, pool: int) -> dict[str, torch.Tensor]:
    return {w: pool_mask(m, pool) for w, m in object_masks(scene, grid).items()}


def grounding_targets(input_ids: torch.Tensor, labels: torch.Tensor, scenes: list[dict], word_ids: dict[int, str],
                      image_token_id: int, grid: int, pool: int) -> list[tuple[int, int, torch.Tensor]]:
    """(batch row, query position in the expanded sequence, [P] patch mask) for every grounded question word.

    input_ids, labels: [B, T] before LLaVA splices the image in (one image token per row); the image
    becomes P = (grid / pool)^2 tokens, so a text position t after it moves to t + P - 1. Only
    unlabelled tokens (the user's words, not answers) after the image are grounded, and only words
    that name at least one object.
    """
    P = (grid // pool) ** 2
    out = []
    for b, start in enumerate(image_token_positions(input_ids, image_token_id).tolist()):
        masks = _pooled_masks(scenes[b], grid, pool)
        for t in range(start + 1, input_ids.shape[1]):
            word = word_ids.get(int(input_ids[b, t]))
            if word in masks and labels[b, t] == -100:
                out.append((b, t + P - 1, masks[word]))
    return out


def parse_heads(text: str) -> tuple[int, ...]:
    """Answer heads as written on the command line and in train_record.json: "1,2" -> (1, 2); "" -> ()."""
    try:
        heads = tuple(int(h) for h in text.split(",")) if text.strip() else ()
    except ValueError:
        raise ValueError(f"answer heads must be comma-separated head indices like '1,2', got {text!r}") from None
    if len(set(heads)) != len(heads):
        raise ValueError(f"answer heads must be distinct (one head per named object), got {text!r}")
    return heads


def prompt_end_token_id(tokenizer, template: str = "vicuna_v1") -> int:
    """Id of the last token of the assistant's role as the template writes it ("ASSISTANT:" -> ":")."""
    from llava.conversation import conv_templates

    conv = conv_templates[template].copy()
    conv.append_message(conv.roles[0], "x")
    conv.append_message(conv.roles[1], None)
    return tokenizer(conv.get_prompt()).input_ids[-1]


def answer_queries(input_ids: torch.Tensor, labels: torch.Tensor, word_ids: dict[int, str], image_token_id: int,
                   num_image_tokens: int, heads: tuple[int, ...], prompt_end_id: int) -> list[tuple[int, int, str, int]]:
    """(batch row, query position in the expanded sequence, grounded word, head) at the position that predicts each answer.

    That position holds prompt_end_id, the last token of the assistant's role ("ASSISTANT:" -> ":"), as
    the last prompt token does at inference. LLaVA's vicuna_v1 masking may label that token itself
    (its instruction length is off by one for some tokenizers), so it is the first labelled token of
    a turn or the one before it. The k-th distinct grounded word of the question ("star", then
    "circle") goes to heads[k]; words past len(heads) go nowhere. Positions as in `grounding_targets`
    (the image becomes num_image_tokens tokens).
    """
    out = []
    for b, start in enumerate(image_token_positions(input_ids, image_token_id).tolist()):
        named: list[str] = []
        for t in range(start + 1, input_ids.shape[1]):
            if labels[b, t] == -100:
                word = word_ids.get(int(input_ids[b, t]))
                if word is not None and word not in named:
                    named.append(word)
            elif labels[b, t - 1] == -100:  # t: the first labelled token of a turn
                q = t if int(input_ids[b, t]) == prompt_end_id else t - 1
                if int(input_ids[b, q]) != prompt_end_id:
                    raise ValueError(f"row {b}: the answer at position {t} does not follow the assistant role's last "
                                     f"token (id {prompt_end_id}); is the conversation template vicuna_v1?")
                out += [(b, q + num_image_tokens - 1, word, head) for word, head in zip(named, heads)]
                named = []
    return out


def answer_targets(input_ids: torch.Tensor, labels: torch.Tensor, scenes: list[dict], word_ids: dict[int, str],
                   image_token_id: int, grid: int, pool: int, heads: tuple[int, ...],
                   prompt_end_id: int) -> list[tuple[int, int, torch.Tensor, int]]:
    """(batch row, query position, [P] patch mask, head) at the position that predicts each answer
    (`answer_queries`): heads[k] attends to the objects named by the question's k-th grounded word.
    Words naming no object ("How many stars?" with no star) give none."""
    masks = [_pooled_masks(scene, grid, pool) for scene in scenes]
    queries = answer_queries(input_ids, labels, word_ids, image_token_id, (grid // pool) ** 2, heads, prompt_end_id)
    return [(b, q, masks[b][word], head) for b, q, word, head in queries if word in masks[b]]


def layer_head_logprobs(model, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, layer: int,
                        head: int) -> torch.Tensor:
    """Log attention probabilities of one head of decoder layer `layer` for the queries (rows[i], positions[i]).

    hidden: [B, N, D] the layer's input (inputs_embeds for layer 0, else hidden_states[layer] of the
    decoder's output), no left padding; returns [n, N], -inf on future keys. Recomputes LlamaAttention's
    own q/k (input norm, projections, RoPE) for that head.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    block = model.get_model().layers[layer]
    attn = block.self_attn
    d = attn.head_dim
    x = block.input_layernorm(hidden)  # [B, N, D]
    B, N, _ = x.shape
    q = attn.q_proj(x[rows, positions])[:, head * d:(head + 1) * d]  # [n, d]
    kv_head = head // attn.num_key_value_groups
    k = attn.k_proj(x)[..., kv_head * d:(kv_head + 1) * d]  # [B, N, d]
    cos, sin = attn.rotary_emb(k, seq_len=N)
    pos = torch.arange(N, device=x.device)
    k, _ = apply_rotary_pos_emb(k[:, None], k[:, None], cos, sin, pos[None].expand(B, N))  # [B, 1, N, d]
    q, _ = apply_rotary_pos_emb(q[:, None, None], q[:, None, None], cos, sin, positions[:, None])  # [n, 1, 1, d]
    logits = torch.einsum("nd,nkd->nk", q[:, 0, 0], k[rows, 0]) / math.sqrt(d)  # attn logits: [n, N]
    logits = logits.masked_fill(pos[None, :] > positions[:, None], float("-inf"))
    return torch.log_softmax(logits.float(), dim=-1)


def grounding_loss(model, hidden: torch.Tensor, image_starts: torch.Tensor, targets: list[tuple], head: int = 0,
                   layer: int = 0) -> torch.Tensor:
    """Mean over targets of -log(attention mass on the target patches) at decoder layer `layer`.

    hidden: [B, N, D] that layer's input; image_starts: [B] position of each row's first image token;
    targets: (row, position, [P] mask) from `grounding_targets`, supervising `head`, or
    (row, position, [P] mask, head) from `answer_targets`, each naming its own head.
    """
    if not targets:
        return hidden.sum() * 0
    targets = [t if len(t) == 4 else (*t, head) for t in targets]
    P = targets[0][2].numel()
    losses = []
    for h in sorted({t[3] for t in targets}):
        mine = [t for t in targets if t[3] == h]
        rows = torch.tensor([t[0] for t in mine], device=hidden.device)
        positions = torch.tensor([t[1] for t in mine], device=hidden.device)
        logp = layer_head_logprobs(model, hidden, rows, positions, layer, h)  # [n, N]
        idx = image_starts[rows][:, None] + torch.arange(P, device=logp.device)  # [n, P]
        image_logp = logp.gather(1, idx)  # [n, P]
        mask = torch.stack([t[2] for t in mine]).to(logp.device)  # [n, P]
        losses.append(-torch.logsumexp(image_logp.masked_fill(~mask, float("-inf")), dim=-1))
    return torch.cat(losses).mean()
