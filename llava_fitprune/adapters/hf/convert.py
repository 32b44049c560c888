"""Convert a haotian-liu LLaVA-1.5 checkpoint (plus its CLIP vision tower) to a llava-hf
`LlavaForConditionalGeneration` folder for transformers 5.x: the same weights, renamed.

The image placeholder is a new token `<image>` with id = the old vocabulary size (as llava-hf's
checkpoints add it): its embedding row is replaced by image features and its LM-head row is zero.
Token ids otherwise stay the same, so both backends see the same sequence. The folder gets a
`LlavaProcessor` too (the LLaVA tokenizer plus `<image>`, the tower's CLIP image processor, the patch
size and feature strategy of the config, LLaVA's vicuna_v1 prompt as chat template), so that
`load_pretrained(out_dir)` works; both are read before anything is written.
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


# LLaVA's conv_vicuna_v1 (llava/conversation.py, llava-torch 1.2.2): "<system> USER: <image>\n<q> ASSISTANT:"
VICUNA_V1_TEMPLATE = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. {% for m in messages %}{% if m['role'] == 'user' %}"
    "USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif m['role'] == 'assistant' %}ASSISTANT: {% for c in m['content'] %}{% if c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def build_processor(llava_dir: str, vision_dir: str, config):
    """The llava-hf processor of a converted checkpoint (`config`: its LlavaConfig)."""
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    for folder, what in ((vision_dir, "preprocessor_config.json"), (llava_dir, "tokenizer_config.json")):
        if not os.path.exists(os.path.join(folder, what)):
            raise ValueError(f"{folder} has no {what}: the converted checkpoint needs it for its processor")
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id != config.image_token_id:
        raise ValueError(f"{llava_dir}: its tokenizer gives <image> the id {image_id}, not the vocabulary size "
                         f"{config.image_token_id} (a tokenizer with added tokens?)")
    return LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(vision_dir), tokenizer=tokenizer,
                          patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=1,  # CLIP's class token
                          chat_template=VICUNA_V1_TEMPLATE, image_token="<image>")


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
    processor = build_processor(llava_dir, vision_dir, config)
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
    processor.save_pretrained(out_dir)
    model.save_pretrained(out_dir)  # the weights last: a folder with them is complete
    return out_dir
