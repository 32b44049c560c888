"""Convert a haotian-liu LLaVA-1.5 checkpoint (plus its CLIP vision tower) to a llava-hf
`LlavaForConditionalGeneration` folder for transformers 5.x: the same weights, renamed.

The image placeholder is a new token `<image>` with id = the old vocabulary size (as llava-hf's
checkpoints add it): its embedding row is replaced by image features and its LM-head row is zero.
Token ids otherwise stay the same, so both backends see the same sequence.
"""
from __future__ import annotations

import json
import os

import torch

# Copied from transformers==4.37.2 models/llava/convert_llava_weights_to_hf.py (KEYS_TO_MODIFY_MAPPING):
# haotian-liu names -> llava-hf's (4.x) names, applied in order.
KEYS_TO_MODIFY_MAPPING = {
    "model.vision_tower.": "",
    "model.mm_projector": "multi_modal_projector",
    "model": "model.model",
    "vision_model.model": "vision_model",
    "lm_head": "language_model.lm_head",
    "model.model": "language_model.model",
    "multi_modal_projector.0": "multi_modal_projector.linear_1",
    "multi_modal_projector.2": "multi_modal_projector.linear_2",
}
# ours: llava-hf 4.x names -> the 5.x module tree (LlavaModel split from the head in 4.52)
V4_TO_V5 = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
            "vision_tower.vision_model.": "model.vision_tower.",
            "multi_modal_projector.": "model.multi_modal_projector."}


def convert_state_dict_to_hf(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        for old, new in KEYS_TO_MODIFY_MAPPING.items():  # (transformers 4.37.2)
            if old in key:
                key = key.replace(old, new)
        for old, new in V4_TO_V5.items():  # ours
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def _read_safetensors(folder: str) -> dict:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(folder, f)))
    return state


def convert_llava_to_hf(llava_dir: str, vision_dir: str, out_dir: str) -> str:
    """`llava_dir`: haotian-liu checkpoint (config.json with mm_* keys, safetensors);
    `vision_dir`: its CLIP vision tower (CLIPVisionModel folder). Writes `out_dir`; returns it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    with open(os.path.join(llava_dir, "config.json")) as f:
        old = json.load(f)
    if old.get("mm_projector_type") != "mlp2x_gelu" or old.get("mm_vision_select_feature") != "patch":
        raise ValueError(f"{llava_dir}: only LLaVA-1.5's layout converts (mlp2x_gelu projector, patch features)")
    vocab = old["vocab_size"]
    text = LlamaConfig(**{k: old[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                              "max_position_embeddings", "bos_token_id", "eos_token_id",
                                              "pad_token_id") if k in old},
                       rope_parameters={"rope_type": "default", "rope_theta": old.get("rope_theta", 10000.0)},
                       vocab_size=vocab + 1)
    config = LlavaConfig(text_config=text, vision_config=CLIPVisionConfig.from_pretrained(vision_dir),
                         image_token_index=vocab, vision_feature_select_strategy="default",
                         vision_feature_layer=old["mm_vision_select_layer"], projector_hidden_act="gelu")
    state = _read_safetensors(llava_dir)
    # the tower's weights under the names LLaVA's CLIPVisionTower gives them in a full checkpoint
    state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in _read_safetensors(vision_dir).items()})
    state = convert_state_dict_to_hf(state)
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):  # the <image> row: zeros
        state[name] = torch.cat([state[name], state[name].new_zeros(1, state[name].shape[1])])
    model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"conversion left missing {sorted(missing)} / unexpected {sorted(unexpected)} weights")
    model.save_pretrained(out_dir)
    return out_dir
