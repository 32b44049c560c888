"""Tiny random checkpoints of transformers' own VLMs, built offline: llava-hf (LLaVA-1.5),
LLaVA-NeXT (anyres), LLaVA-OneVision (anyres-max), Qwen2-VL and Qwen2.5-VL, each with a processor whose
tokenizer is made on the fly.

Configs come from transformers' own classes; the tokenizer is a `tokenizers` WordLevel model over a
small word list plus the model's special tokens, wrapped in `PreTrainedTokenizerFast`; the image
processors are the PIL ones (no torchvision). The folders load with `from_pretrained` like a hub
checkpoint, so `llava_fitprune.adapters.hf.load_pretrained` takes them by path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_WORDS = (
    "a chat between a curious human and an artificial intelligence assistant the gives helpful detailed polite "
    "answers to questions user system what is colour of shape in image picture left right top bottom red green "
    "blue yellow white black purple orange circle square triangle star how many are there answer with single "
    "word or phrase describe this photo yes no zero one two three four five six seven eight nine text read"
).split() + list("0123456789?.,:!'\n")


@dataclass
class TinyVlmSpec:
    num_layers: int = 4
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 112  # llava: 112 / 14 = 8 -> 64 visual tokens per image (tile)
    patch_size: int = 14
    init_std: float = 0.08  # 2-D weights' std: a little more spread than HF's init, so logits differ
    seed: int = 0


def build_tokenizer(special: list[str], pad: str, eos: str, bos: str | None = None, unk: str = "<unk>"):
    """A WordLevel tokenizer: `special` tokens first (ids 0..), then the word list."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for tok in [unk, *special, *_WORDS]:
        vocab.setdefault(tok, len(vocab))
    raw = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token=unk, pad_token=pad, eos_token=eos, bos_token=bos,
                                  additional_special_tokens=[s for s in special if s not in (pad, eos, bos)],
                                  padding_side="left")  # generation pads on the left
    return tok


def _spread(model: torch.nn.Module, std: float) -> None:
    """2-D weights ~ N(0, std); so do the language model's q/k/v biases (Qwen2), which HF's init zeroes and
    a test would then not see."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in name:
                p.normal_(0.0, std)
            elif "language_model" in name and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.normal_(0.0, std)


def _text_kwargs(spec: TinyVlmSpec, vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads, max_position_embeddings=4096)


LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                  "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def build_tiny_llava_hf(out_dir: str, spec: TinyVlmSpec | None = None, next_anyres: bool = False) -> str:
    """llava-hf LLaVA-1.5 (`LlavaForConditionalGeneration`), or LLaVA-NeXT with `next_anyres`."""
    from transformers import CLIPVisionConfig, LlamaConfig

    spec = spec or TinyVlmSpec()
    tok = build_tokenizer(["<s>", "</s>", "<pad>", "<image>"], pad="<pad>", eos="</s>", bos="<s>")
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size,
                              projection_dim=spec.vision_hidden_size)
    text = LlamaConfig(**_text_kwargs(spec, len(tok)), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    common = dict(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                  vision_feature_select_strategy="default", vision_feature_layer=-2)
    s = spec.image_size
    if next_anyres:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        model_class = LlavaNextForConditionalGeneration
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                                     image_grid_pinpoints=pinpoints)
        processor_class = LlavaNextProcessor
    else:
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        config = LlavaConfig(**common)
        model_class = LlavaForConditionalGeneration
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        processor_class = LlavaProcessor
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(spec.seed)
    model = model_class(config)
    if next_anyres:
        with torch.no_grad():
            model.model.image_newline.normal_(0.0, 1.0)
    _spread(model, spec.init_std)
    processor = processor_class(image_processor=image_processor, tokenizer=tok, patch_size=spec.patch_size,
                                vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                                num_additional_image_tokens=1)  # CLIP's CLS token
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                 "<|im_start|>assistant\n{% endif %}")


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def _build_tiny_qwen(out_dir: str, spec: TinyVlmSpec, config_class, model_class, vision: dict) -> str:
    """A tiny Qwen2-VL-family checkpoint (M-RoPE text model, dynamic resolution): `vision` is the
    family's vision config (its `out_hidden_size` / `hidden_size` key set by the caller)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer(QWEN_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    hd = spec.hidden_size // spec.num_heads
    section = [hd // 8, hd // 8 * 3 // 2, hd // 8 * 3 // 2]  # temporal, height, width (sum = hd / 2)
    section[0] += hd // 2 - sum(section)
    text = dict(**_text_kwargs(spec, len(tok)), rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                   "mrope_section": section},
                pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=None)
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                          video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                          vision_end_token_id=ids["<|vision_end|>"])
    config.pad_token_id = ids["<|endoftext|>"]
    torch.manual_seed(spec.seed)
    model = model_class(config)
    _spread(model, spec.init_std)
    unit = spec.patch_size * 2
    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * unit * unit, max_pixels=64 * unit * unit,
                                               patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2)
    tok.chat_template = QWEN_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    # the Qwen processors need torchvision (their video processor): the tokenizer and the image
    # processor are saved on their own; `load_pretrained` makes the processor from them
    tok.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_qwen2_5_vl(out_dir: str, spec: TinyVlmSpec | None = None) -> str:
    """Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): dynamic resolution, M-RoPE, GQA by default."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = spec or TinyVlmSpec(num_kv_heads=2)
    vision = dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden_size,
                  intermediate_size=2 * spec.vision_hidden_size, num_heads=spec.vision_heads,
                  out_hidden_size=spec.hidden_size, patch_size=spec.patch_size, spatial_merge_size=2,
                  window_size=4 * spec.patch_size, fullatt_block_indexes=[spec.vision_layers - 1])
    return _build_tiny_qwen(out_dir, spec, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision)


def build_tiny_qwen2_vl(out_dir: str, spec: TinyVlmSpec | None = None) -> str:
    """Qwen2-VL (`Qwen2VLForConditionalGeneration`): Qwen2.5-VL's text model and inputs, a vision tower
    without window attention (its `hidden_size` is the LM width it projects to)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    spec = spec or TinyVlmSpec(num_kv_heads=2)
    vision = dict(depth=spec.vision_layers, embed_dim=spec.vision_hidden_size, hidden_size=spec.hidden_size,
                  mlp_ratio=2, num_heads=spec.vision_heads, patch_size=spec.patch_size, spatial_merge_size=2)
    return _build_tiny_qwen(out_dir, spec, Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision)


# transformers' convert_llava_onevision_weights_to_hf.py template (images first, then the text)
ONEVISION_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                      "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
                      "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_llava_onevision(out_dir: str, spec: TinyVlmSpec | None = None, max_tiles: int = 2) -> str:
    """LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): a SigLIP tower, anyres tiling over
    1x1..2x2 tiles capped at `anyres_max_{max_tiles}` (a larger grid is shrunk: the cap is exercised),
    a Qwen2 language model with GQA and q/k/v biases."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, \
        SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
        LlavaOnevisionImageProcessorPil

    spec = spec or TinyVlmSpec(num_kv_heads=2, image_size=56)  # 4 x 4 = 16 tokens a tile
    tok = build_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                          pad="<|endoftext|>", eos="<|im_end|>")
    s = spec.image_size
    vision = SiglipVisionConfig(hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
                                num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                                image_size=s, patch_size=spec.patch_size, vision_use_head=False)
    text = Qwen2Config(**_text_kwargs(spec, len(tok)), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=None)
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"),
                                  vision_aspect_ratio=f"anyres_max_{max_tiles}")
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(spec.seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 1.0)
    _spread(model, spec.init_std)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints)
    tok.chat_template = ONEVISION_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    # LlavaOnevisionProcessor needs torchvision (its video processor): as for Qwen, the tokenizer and the
    # image processor are saved; `load_pretrained` makes the processor from them and the model's config
    tok.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return out_dir
