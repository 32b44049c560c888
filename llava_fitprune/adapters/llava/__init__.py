"""haotian-liu/LLaVA (llava-torch 1.2.2.post1, transformers 4.37.2): the pruning-aware model classes,
the decoder layer that drops tokens, the pruned KV cache, the builder and the tiny offline model."""
