"""A tiny random InternVL checkpoint (`InternVLForConditionalGeneration`, transformers' native port)
built offline, as `tiny.py` builds the other families: InternViT, pixel-shuffle projector, dynamic
tiling (GotOcr2's image processor, `crop_to_patches`), a Qwen2 (default) or Llama language model."""
from __future__ import annotations

import os

import torch

from .tiny import QWEN_TEMPLATE, TinyVlmSpec, _spread, _text_kwargs, build_tokenizer

INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# InternVL-hf's template: an image is `<IMG_CONTEXT>\n` before the text, which the processor expands
INTERNVL_TEMPLATE = QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")


def build_tiny_internvl(out_dir: str, spec: TinyVlmSpec | None = None, text_model: str = "qwen2",
                        max_tiles: int = 4) -> str:
    """`spec.image_size` / `spec.patch_size` patches a side per tile, pixel-shuffled 2x2: (8 / 2)^2 = 16
    visual tokens per tile at the defaults; up to `max_tiles` tiles plus a thumbnail per image (128-pixel
    tiles: a 100x150 image is one tile, a 160x90 one two tiles and the thumbnail)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, LlamaConfig, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    spec = spec or TinyVlmSpec(num_kv_heads=2, image_size=128, patch_size=16)
    tok = build_tokenizer(INTERNVL_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in INTERNVL_SPECIALS}
    text_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[text_model]
    text = text_class(**_text_kwargs(spec, len(tok)), pad_token_id=ids["<|endoftext|>"],
                      eos_token_id=ids["<|im_end|>"], bos_token_id=None)
    vision = dict(hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                  image_size=spec.image_size, patch_size=spec.patch_size)
    side = spec.image_size // spec.patch_size
    config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=ids["<IMG_CONTEXT>"],
                            image_seq_length=(side // 2) ** 2, downsample_ratio=0.5, tie_word_embeddings=False)
    config.pad_token_id = ids["<|endoftext|>"]
    torch.manual_seed(spec.seed)
    model = InternVLForConditionalGeneration(config)
    _spread(model, spec.init_std)
    image_processor = GotOcr2ImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size},
                                               crop_to_patches=True, min_patches=1, max_patches=max_tiles)
    tok.chat_template = INTERNVL_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    # InternVLProcessor needs torchvision (its video processor): the tokenizer and the image processor are
    # saved apart; `load_pretrained` makes `InternVLImageTextProcessor` from them (image_seq_length: config)
    tok.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir
