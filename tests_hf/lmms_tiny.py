"""Tiny random llava-hf checkpoints with a processor, built offline, for the lmms-eval plugin's tests:
a word-level tokenizer made on the fly with the model's special tokens, a PIL CLIP image processor (no
torchvision), a 2-layer Llama and a 1-layer CLIP tower at 28x28 pixels (2x2 patches: 4 image tokens)."""
from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
WORDS = ("USER: ASSISTANT: what is the colour of square circle red green blue yellow how many left right "
         "a an one two three four yes no ? . , \n").split()
IMAGE_SIZE, PATCH = 28, 14
# llava-hf's chat templates take {"type": "image"} items in a user turn and put <image> there.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + [w for w in dict.fromkeys(WORDS) if w not in SPECIAL])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def build_tiny_llava_hf(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """A random LlavaForConditionalGeneration + LlavaProcessor saved to `out_dir`; returns the path."""
    out_dir = os.fspath(out_dir)
    tok = tiny_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    vocab = len(tok)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                                       projection_dim=32),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=vocab, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
