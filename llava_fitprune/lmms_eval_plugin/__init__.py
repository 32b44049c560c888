"""lmms-eval models for the transformers-native backend (llava-hf LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision,
Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL).

`pip install` of this package registers them with lmms-eval (>= 0.6) through the entry-point group
`lmms_eval.models` (setup.py), which lmms-eval's model registry (`lmms_eval/models/registry_v2.py`,
`ModelRegistryV2.load_entrypoint_manifests`) reads at import:

    python -m lmms_eval --model fitprune_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,reduction_ratio=0.6 --tasks mme --log_samples

This module imports nothing heavy: lmms-eval loads it to list the models, and imports `model.py` (torch,
transformers) only for the model it runs.
"""
from __future__ import annotations

# lmms-eval model name -> class in llava_fitprune.lmms_eval_plugin.model
MODEL_CLASSES: dict[str, str] = {
    "fitprune_llava_hf": "FitPruneLlavaHF",
    "fitprune_llava_next_hf": "FitPruneLlavaNextHF",
    "fitprune_llava_onevision": "FitPruneLlavaOnevision",
    "fitprune_qwen2_vl": "FitPruneQwen2_VL",
    "fitprune_qwen2_5_vl": "FitPruneQwen2_5_VL",
    "fitprune_qwen3_vl": "FitPruneQwen3VL",
    "fitprune_internvl": "FitPruneInternVL",
}


def manifests():
    """The entry point's payload: one `ModelManifest` per model (simple, i.e. lmms-eval's doc_to_visual /
    doc_to_text interface)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=f"{__name__}.model.{cls}")
            for name, cls in MODEL_CLASSES.items()]
