"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): a SigLIP tower, anyres-max tiling and a
Qwen2 language model (`Qwen2Model`: q/k/v biases, GQA, 1-D RoPE), served by the generic pruning loop.

The visual tokens are the `<image>` (and `<video>`) placeholders the processor expanded: per image the
base tile, the unpadded grid of the other tiles (bilinearly shrunk when it exceeds `anyres_max_N` tiles)
and a newline token per grid row, so each sample has its own count and gets the recipe scaled to it
(`Recipe.drops_for`). A Qwen2 with sliding-window layers (`use_sliding_window`) is refused by
`set_pruning`, as for every family.

`OnevisionImageTextProcessor` stands in for `LlavaOnevisionProcessor` where that cannot be built
(transformers needs torchvision for its video processor): images and text only, transformers' own
placeholder expansion (it is that class, without the video processor).
"""
from __future__ import annotations

from transformers import LlavaOnevisionProcessor

from .model import FitPruneVLMMixin


class OnevisionPruningMixin(FitPruneVLMMixin):
    @property
    def fitprune_visual_token_ids(self) -> tuple[int, ...]:
        return (self.config.image_token_id, self.config.video_token_id)


class OnevisionImageTextProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` for images and text: its sub-processors are the image processor and the
    tokenizer (ProcessorMixin reads them from this signature), so no video processor is needed."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, vision_aspect_ratio="anyres_max_9",
                 **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         chat_template=chat_template, vision_aspect_ratio=vision_aspect_ratio, **kwargs)


def load_image_text_processor(pretrained: str, config, chat_template=None):
    """The images-and-text processor of a LLaVA-OneVision checkpoint without torchvision. Its settings are
    the model's (`config`): tokens per tile (SigLIP: (image_size / patch_size)^2, no CLS), the feature
    strategy and `vision_aspect_ratio`; the chat template is `chat_template` (the one the checkpoint's
    processor saved), else the tokenizer's."""
    from transformers import AutoTokenizer
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
        LlavaOnevisionImageProcessorPil

    vision = config.vision_config
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    return OnevisionImageTextProcessor(
        LlavaOnevisionImageProcessorPil.from_pretrained(pretrained), tokenizer,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=chat_template or tokenizer.chat_template)
