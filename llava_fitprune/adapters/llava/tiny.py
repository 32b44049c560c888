"""Build a tiny, random LLaVA-1.5 checkpoint offline: CLIP vision tower, projector, Llama decoder, tokenizer.

The checkpoint has the layout of a real one (config.json with `mm_vision_tower`, safetensors,
a SentencePiece `tokenizer.model`), so `llava_fitprune.load_pretrained_model` and LLaVA's own
builder load it by path. The vision tower is stored inside the checkpoint folder and referenced
relatively (`mm_vision_tower: "vision_tower"`); our loader resolves it against the checkpoint.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass

import torch

VISION_SUBDIR = "vision_tower"

_CORPUS_WORDS = (
    "a chat between a curious human and an artificial intelligence assistant the assistant gives helpful "
    "detailed and polite answers to the human questions user assistant system what is the colour of the "
    "shape in image picture left right top bottom red green blue yellow white black purple orange circle "
    "square triangle star how many are there answer with a single word or phrase describe this photo "
    "yes no zero one two three four five six seven eight nine text digit written number read"
).split()


@dataclass
class TinyLlavaSpec:
    num_layers: int = 4
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 128
    image_size: int = 336
    patch_size: int = 14  # 336 / 14 = 24 -> 576 visual tokens, as LLaVA-1.5
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vocab_size: int = 512
    projector: str = "mlp2x_gelu"
    image_aspect_ratio: str = "pad"
    seed: int = 0
    vision_intermediate_size: int | None = None  # None: 2 * vision_hidden_size
    tokenizer_extra_text: str = ""  # extra lines for the SentencePiece corpus (e.g. a task's phrasing)
    tokenizer_extra_repeat: int = 1  # how many times those lines enter the corpus (their merge weight)
    init_std: float | None = 0.08  # std of the decoder's and projector's 2-D weights; None keeps HF's init
    backbone: str = "llama"  # "llama" (LLaVA-1.5, LLaVA-NeXT Vicuna) or "mistral" (LLaVA-NeXT Mistral)
    anyres: bool = False  # LLaVA-NeXT: anyres tiling, spatial_unpad merge, image_newline tokens
    rope_theta: float = 10000.0  # the decoder's rotary base (Llama-2 / Vicuna: 10000)

    @property
    def num_visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def train_tokenizer(out_dir: str, vocab_size: int = 512, extra_text: str = "", extra_repeat: int = 1) -> None:
    """Train a byte-fallback SentencePiece BPE model and save it as a slow LlamaTokenizer."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    rng = torch.Generator().manual_seed(1234)
    lines = []
    for _ in range(3000):
        idx = torch.randint(len(_CORPUS_WORDS), (12,), generator=rng).tolist()
        lines.append(" ".join(_CORPUS_WORDS[i] for i in idx))
    lines += ["USER: <image>\nWhat is this? ASSISTANT: a picture.</s>", "0 1 2 3 4 5 6 7 8 9 ? . , : \n"]
    if extra_text:
        lines += extra_text.splitlines() * extra_repeat
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, normalization_rule_name="identity", minloglevel=2,
    )
    os.makedirs(out_dir, exist_ok=True)
    spm_path = os.path.join(out_dir, "tokenizer.model")
    with open(spm_path, "wb") as f:
        f.write(model.getvalue())
    tok = LlamaTokenizer(vocab_file=spm_path, legacy=True)
    tok.pad_token = tok.unk_token
    tok.model_max_length = 2048
    tok.save_pretrained(out_dir)


def build_vision_tower(out_dir: str, spec: TinyLlavaSpec) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(spec.seed + 1)
    cfg = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size or 2 * spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden_size,
    )
    CLIPVisionModel(cfg).save_pretrained(out_dir)
    CLIPImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
    ).save_pretrained(out_dir)


def build_tiny_llava(out_dir: str, spec: TinyLlavaSpec | None = None) -> str:
    """Write a tiny random LLaVA-1.5 checkpoint to `out_dir` (its name should contain 'llava')."""
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from llava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM

    spec = spec or TinyLlavaSpec()
    if spec.backbone not in ("llama", "mistral"):
        raise ValueError(f"backbone must be 'llama' or 'mistral', got {spec.backbone!r}")
    config_class, model_class = {"llama": (LlavaConfig, LlavaLlamaForCausalLM),
                                 "mistral": (LlavaMistralConfig, LlavaMistralForCausalLM)}[spec.backbone]
    os.makedirs(out_dir, exist_ok=True)
    train_tokenizer(out_dir, spec.vocab_size, spec.tokenizer_extra_text, spec.tokenizer_extra_repeat)
    build_vision_tower(os.path.join(out_dir, VISION_SUBDIR), spec)

    config = config_class(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads, max_position_embeddings=2048,
        rope_theta=spec.rope_theta,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        mm_vision_tower=VISION_SUBDIR, mm_hidden_size=spec.vision_hidden_size, mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_projector_type=spec.projector, mm_use_im_start_end=False,
        mm_use_im_patch_token=False, image_aspect_ratio="anyres" if spec.anyres else spec.image_aspect_ratio,
        mm_patch_merge_type="spatial_unpad" if spec.anyres else "flat",
        tokenizer_padding_side="right", tokenizer_model_max_length=2048, use_cache=True,
    )
    if spec.anyres:  # tiles of 1x2, 2x1 and 2x2 base images, as LLaVA-NeXT's pinpoints at a smaller scale
        s = spec.image_size
        config.image_grid_pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    if spec.backbone == "mistral":
        config.sliding_window = None
    cwd = os.getcwd()
    try:  # LLaVA resolves mm_vision_tower against the working directory
        os.chdir(out_dir)
        torch.manual_seed(spec.seed)
        model = model_class(config)
        if spec.anyres:
            with torch.no_grad():
                model.get_model().image_newline.normal_(0.0, 1.0)
    finally:
        os.chdir(cwd)
    if spec.init_std is not None:
        with torch.no_grad():  # random weights with a little more spread than HF's init, so logits differ
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, spec.init_std)
    model.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "tiny_spec.json"), "w") as f:
        json.dump(asdict(spec), f, indent=1)
    return out_dir
