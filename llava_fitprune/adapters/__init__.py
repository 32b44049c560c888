"""Model glue: one adapter per model family. `llava` is haotian-liu/LLaVA on transformers 4.37.2."""
