"""A tiny random Qwen3-VL checkpoint (`Qwen3VLForConditionalGeneration`) built offline, as `tiny.py`
builds the other families: interleaved M-RoPE, q/k norms, a head_dim other than hidden / heads, GQA,
and DeepStack features added after the first `len(deepstack_visual_indexes)` text layers."""
from __future__ import annotations

import os

import torch

from .tiny import QWEN_TEMPLATE, TinyVlmSpec, _spread, _text_kwargs, build_tokenizer

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def build_tiny_qwen3_vl(out_dir: str, spec: TinyVlmSpec | None = None, head_dim: int = 24,
                        deepstack_layers: int = 3) -> str:
    """DeepStack from the first `deepstack_layers` vision blocks into text layers 0..deepstack_layers-1."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = spec or TinyVlmSpec(num_kv_heads=2, vision_layers=3)
    if deepstack_layers > min(spec.vision_layers, spec.num_layers):
        raise ValueError(f"deepstack_layers={deepstack_layers} needs as many vision and text layers")
    tok = build_tokenizer(QWEN_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]  # temporal, height, width (sum = head_dim / 2)
    text = dict(**_text_kwargs(spec, len(tok)), head_dim=head_dim,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": section,
                                 "mrope_interleaved": True},
                pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=None)
    vision = dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden_size,
                  intermediate_size=2 * spec.vision_hidden_size, num_heads=spec.vision_heads,
                  out_hidden_size=spec.hidden_size, patch_size=spec.patch_size, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=list(range(deepstack_layers)))
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    config.pad_token_id = ids["<|endoftext|>"]
    torch.manual_seed(spec.seed)
    model = Qwen3VLForConditionalGeneration(config)
    _spread(model, spec.init_std)
    unit = spec.patch_size * 2
    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * unit * unit, max_pixels=64 * unit * unit,
                                               patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2)
    tok.chat_template = QWEN_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    # Qwen3VLProcessor needs torchvision (its video processor): saved apart, as for Qwen2.5-VL (tiny.py)
    tok.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir
