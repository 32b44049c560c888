"""The `--model-path` rule every entry point checks before anything loads (no torch imported here)."""
from __future__ import annotations

import os
import re
from typing import Optional

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name: the only non-path form a model may take


def model_path_problem(path: str) -> Optional[str]:
    """What is wrong with a model path, or None: a local folder must hold config.json; anything else
    must look like a Hugging Face id (`org/name`, which is checked when it downloads)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return None
        return "this folder has no config.json: pass a LLaVA checkpoint folder"
    if os.path.exists(path):
        return "is a file: pass the checkpoint's folder"
    if not HUB_ID.fullmatch(path) or path.startswith(("./", "../", "~")):
        return "not found (no such folder): pass a LLaVA checkpoint folder or a Hugging Face id (org/name)"
    return None
