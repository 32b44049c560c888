"""llava-hf LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`):
the visual tokens are the `image_token_id` placeholders the processor expanded (for NeXT's anyres,
every tile's tokens and the image-newline tokens: as many per sample as its image gives); the
language model is a 5.x `LlamaModel` (or Mistral), served by the generic pruning loop."""
from __future__ import annotations

from .model import FitPruneVLMMixin


class LlavaPruningMixin(FitPruneVLMMixin):
    @property
    def fitprune_visual_token_ids(self) -> tuple[int, ...]:
        return (self.config.image_token_id,)
