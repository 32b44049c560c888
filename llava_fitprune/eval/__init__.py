"""LLaVA-1.5's evaluation workflow with pruning.

Generation (`python -m llava_fitprune.eval.model_vqa_loader`, `model_vqa`, `model_vqa_science`,
`model_vqa_mmbench`) takes LLaVA's flags plus `--reduction-ratio/--recipe/--method` and device flags,
resumes interrupted runs and writes `<answers>.meta.json` (recipe, prefill TFLOPs, tokens per layer).
`merge` joins chunks, `score` and `convert.*` compute local scores and submission files, `report`
tables everything. The shell entry points are `scripts/v1_5/eval/*.sh`.
"""
