"""Drop-in replacements for LLaVA's serving entry points that load a pruned model (see README.md)."""
