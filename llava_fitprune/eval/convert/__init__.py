"""Answer converters from LLaVA's `scripts/` folder (not shipped in its wheel), re-done as modules:
`python -m llava_fitprune.eval.convert.<name> ...` with the original flags."""
