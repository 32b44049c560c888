"""Questions with single-word answers derived from a scene's recorded layout, one function per type."""
from __future__ import annotations

import random
from collections import Counter

from .draw import COLOURS, SHAPES

QUESTION_TYPES = ("colour", "count", "relation", "ocr")
DESCRIBE = "Name the objects from left to right."  # a training-only turn with a multi-word answer
SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA's short-answer prompt
PLURAL = {s: s + "s" for s in SHAPES}


def _box(obj: dict) -> list[float]:
    r = obj["size"] / 2
    return [obj["cx"] - r, obj["cy"] - r, obj["cx"] + r, obj["cy"] + r]


def unique_shape_types(scene: dict) -> list[str]:
    n = Counter(s["shape"] for s in scene["shapes"])
    return [t for t in SHAPES if n[t] == 1]


def unique_described(scene: dict) -> list[int]:
    """Indices of shapes whose (colour, shape) description names exactly one object."""
    n = Counter((s["colour"], s["shape"]) for s in scene["shapes"])
    return [i for i, s in enumerate(scene["shapes"]) if n[(s["colour"], s["shape"])] == 1]


def relation_pairs(scene: dict, min_dx: float) -> list[tuple[int, int]]:
    """Pairs of shapes of unique type at least min_dx apart. Named by type only: a colour in the
    question would answer a colour question asked in another turn of the same conversation."""
    sh = scene["shapes"]
    types = unique_shape_types(scene)
    idx = [i for i, s in enumerate(sh) if s["shape"] in types]
    return [(i, j) for i in idx for j in idx if i != j and abs(sh[i]["cx"] - sh[j]["cx"]) >= min_dx]


def colour_questions(scene: dict, rng: random.Random, k: int, **_) -> list[dict]:
    shapes = rng.sample(unique_shape_types(scene), min(k, len(unique_shape_types(scene))))
    out = []
    for t in shapes:
        obj = next(s for s in scene["shapes"] if s["shape"] == t)
        out.append(dict(category="colour", text=f"What colour is the {t}?", answer=obj["colour"], regions=[_box(obj)]))
    return out


def count_questions(scene: dict, rng: random.Random, k: int, **_) -> list[dict]:
    """Counts of a shape or a colour (absent ones too); the answer value is drawn first, so counts are balanced."""
    by_count: dict[int, list] = {}
    for kind, values in (("shape", SHAPES), ("colour", tuple(COLOURS))):
        for value in values:
            objs = [s for s in scene["shapes"] if s[kind] == value]
            by_count.setdefault(len(objs), []).append((kind, value, objs))
    out = []
    for _ in range(k):
        n = rng.choice(sorted(c for c, group in by_count.items() if group))
        kind, value, objs = by_count[n].pop(rng.randrange(len(by_count[n])))
        text = f"How many {PLURAL[value]} are there?" if kind == "shape" else f"How many {value} shapes are there?"
        out.append(dict(category="count", text=text, answer=str(n), regions=[_box(s) for s in objs]))
    return out


def forest_pairs(pairs: list[tuple[int, int]], rng: random.Random, k: int) -> list[tuple[int, int]]:
    """Up to k of `pairs`, in a random order, whose shapes never close a cycle (an undirected forest).

    Left/right answers along a cycle constrain each other within a conversation ("Is A left of B?
    left" answers "Is B left of A?"; with "Is B left of C? left" also "Is A left of C?"). Along a forest
    every combination of answers is possible, so no turn gives another's answer away.
    """
    root: dict[int, int] = {}

    def find(a: int) -> int:
        while root.get(a, a) != a:
            a = root[a]
        return a

    out = []
    for i, j in rng.sample(pairs, len(pairs)):
        a, b = find(i), find(j)
        if len(out) < k and a != b:
            out.append((i, j))
            root[a] = b
    return out


def relation_questions(scene: dict, rng: random.Random, k: int, min_dx: float = 0, **_) -> list[dict]:
    """Left/right of two shapes named by type; with k > 1 (training conversations) the pairs form a forest."""
    pairs = relation_pairs(scene, min_dx)
    chosen = rng.sample(pairs, min(k, len(pairs))) if k == 1 else forest_pairs(pairs, rng, k)
    out = []
    for i, j in chosen:
        a, b = scene["shapes"][i], scene["shapes"][j]
        text = f"Is the {a['shape']} to the left or right of the {b['shape']}?"
        answer = "left" if a["cx"] < b["cx"] else "right"
        out.append(dict(category="relation", text=text, answer=answer, regions=[_box(a), _box(b)]))
    return out


def ocr_questions(scene: dict, rng: random.Random, k: int, **_) -> list[dict]:
    t = scene["text"]
    return [dict(category="ocr", text="What number is written in the image?", answer=t["value"], regions=[_box(t)])][:k]


MAKERS = {"colour": colour_questions, "count": count_questions, "relation": relation_questions, "ocr": ocr_questions}


def describe(scene: dict) -> dict:
    """Every object, left to right: "red circle, 7, blue square". Dense supervision for training only."""
    objs = [(s["cx"], f"{s['colour']} {s['shape']}", s) for s in scene["shapes"]]
    objs.append((scene["text"]["cx"], scene["text"]["value"], scene["text"]))
    objs.sort(key=lambda o: o[0])
    return dict(category="describe", text=DESCRIBE, answer=", ".join(o[1] for o in objs),
                regions=[_box(o[2]) for o in objs])


def make_questions(scene: dict, rng: random.Random, per_type: int, min_dx: float) -> list[dict]:
    """Up to `per_type` questions of every type, in a random order; each {category, text, answer, regions}."""
    qs = [q for t in QUESTION_TYPES for q in MAKERS[t](scene, rng, per_type, min_dx=min_dx)]
    rng.shuffle(qs)
    return qs


def phrasebook() -> str:
    """Every word the questions and answers use, one phrasing a line: extra corpus for the tokenizer."""
    from llava.conversation import conv_templates

    lines = [conv_templates["vicuna_v1"].system, "USER: ASSISTANT:", SUFFIX.strip(), DESCRIBE]
    lines += [f"What colour is the {s}? How many {PLURAL[s]} are there?" for s in SHAPES]
    lines += [f"How many {c} shapes are there? The {c} {s}." for c in COLOURS for s in SHAPES]
    lines += [f"Is the {a} to the left or right of the {b}?" for a in SHAPES for b in SHAPES if a != b]
    lines += ["What number is written in the image? " + " ".join(str(d) for d in range(10))]
    return "\n".join(lines)
