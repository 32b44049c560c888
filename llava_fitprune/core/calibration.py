"""Calibration samples for `fit`, independent of any model family: the types each adapter fills
(`adapters/llava/calibration.py`, `adapters/hf/calibration.py`) and the reading and sampling of LLaVA's
question-jsonl format.

Sampling: the question file is read in order; `num_samples` of its lines are picked with
`random.Random(seed).sample(range(len(lines)), num_samples)` and used in file order (sorted
indices). Asking for more samples than the file holds is an error, not a silent clamp.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence



class CalibrationError(ValueError):
    """A calibration set that cannot be used: the message names the problem and the fix."""


@dataclass
class CalibrationSample:
    question_id: Any
    inputs_embeds: torch.Tensor  # [1, N, D] layer-0 inputs (image features inserted)
    visual_mask: torch.Tensor  # [1, N] bool, True at visual tokens
    text_mask: torch.Tensor  # [1, N] bool, True at text tokens after the image
    # (cos, sin) [1, N, head_dim] of every position, for models whose rotary positions are not 0..N-1
    # (Qwen2.5-VL's M-RoPE: adapters/hf/calibration.py); None: the decoder's own 1-D table
    rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def num_tokens(self) -> int:
        return self.inputs_embeds.shape[1]

    @property
    def num_visual(self) -> int:
        return int(self.visual_mask.sum())


@dataclass
class CalibrationSet:
    samples: list[CalibrationSample]
    meta: dict[str, Any] = field(default_factory=dict)  # deterministic provenance (no paths, no times)

    def __len__(self) -> int:
        return len(self.samples)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_questions(path: str) -> list[dict]:
    """LLaVA question jsonl -> list of dicts; every line needs `question_id`, `image`, `text`."""
    if not os.path.isfile(path):
        raise CalibrationError(f"question file {path} does not exist")
    questions = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{lineno} is not valid JSON ({e})") from None
            missing = [k for k in ("question_id", "text") if k not in q]
            if missing:
                raise CalibrationError(f"{path}:{lineno} lacks {missing}: each line needs question_id, image, text")
            if not q.get("image"):
                raise CalibrationError(
                    f"{path}:{lineno} (question_id {q['question_id']!r}) has no image: FitPrune's fit measures "
                    f"attention to visual tokens, so every calibration sample needs one; drop text-only lines")
            questions.append(q)
    if not questions:
        raise CalibrationError(f"question file {path} is empty: it needs at least one question with an image")
    return questions


def sample_questions(questions: Sequence[dict], num_samples: int, seed: int) -> list[dict]:
    if num_samples < 1:
        raise CalibrationError(f"num_samples must be >= 1, got {num_samples}")
    if num_samples > len(questions):
        raise CalibrationError(
            f"asked for {num_samples} calibration samples but the question file has {len(questions)}: "
            f"pass --num-samples {len(questions)} or fewer")
    picked = sorted(random.Random(seed).sample(range(len(questions)), num_samples))
    return [questions[i] for i in picked]
