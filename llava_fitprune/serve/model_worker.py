"""`llava.serve.model_worker` serving a pruned model: LLaVA's worker class and web app, our loader.

    python -m llava_fitprune.serve.model_worker --controller http://localhost:10000 --port 40000 \
        --worker http://localhost:40000 --model-path liuhaotian/llava-v1.5-7b --reduction-ratio 0.6

Only model loading changes: `PrunedModelWorker` runs LLaVA's `ModelWorker.__init__` with
`load_pretrained_model` swapped for ours (pruning flags, any device and dtype). LLaVA's worker hands
images to the model as float16; on a float32/bfloat16 model (CPU) a hook casts the image features
back to the projector's dtype. Needs LLaVA's serving extras: fastapi, uvicorn (and gradio for the UI).
"""
from __future__ import annotations

import argparse
import functools
import sys

import torch

try:
    import llava.serve.model_worker as stock
except ImportError as e:  # fastapi / uvicorn are LLaVA's optional serving dependencies
    raise ImportError(f"LLaVA's model worker needs its serving extras ({e}): pip install fastapi uvicorn") from e

from ..adapters.llava.builder import load_pretrained_model
from ..eval.loading import resolve_device


def accept_half_images(model) -> None:
    """Let LLaVA's float16 image tensors reach a model in another dtype (its projector's input is cast)."""
    if model.dtype == torch.float16:
        return
    projector = model.get_model().mm_projector
    dtype = next(projector.parameters()).dtype
    projector.register_forward_pre_hook(lambda module, args: tuple(a.to(dtype) for a in args))


class PrunedModelWorker(stock.ModelWorker):
    def __init__(self, controller_addr, worker_addr, worker_id, no_register, model_path, model_base, model_name,
                 load_8bit, load_4bit, device, use_flash_attn=False, *, recipe=None, reduction_ratio=None,
                 method="fitprune", torch_dtype=None, attn_implementation=None):
        loader = functools.partial(load_pretrained_model, recipe=recipe, reduction_ratio=reduction_ratio,
                                   method=method, torch_dtype=torch_dtype, attn_implementation=attn_implementation)
        original = stock.load_pretrained_model
        stock.load_pretrained_model = loader  # the name LLaVA's __init__ calls
        try:
            super().__init__(controller_addr, worker_addr, worker_id, no_register, model_path, model_base,
                             model_name, load_8bit, load_4bit, resolve_device(device), use_flash_attn=use_flash_attn)
        finally:
            stock.load_pretrained_model = original
        accept_half_images(self.model)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", type=str, default="localhost")
    p.add_argument("--port", type=int, default=21002)
    p.add_argument("--worker-address", type=str, default="http://localhost:21002")
    p.add_argument("--controller-address", type=str, default="http://localhost:21001")
    p.add_argument("--model-path", type=str, default="facebook/opt-350m")
    p.add_argument("--model-base", type=str, default=None)
    p.add_argument("--model-name", type=str)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--multi-modal", action="store_true", help="detected from the model name (it must contain 'llava')")
    p.add_argument("--limit-model-concurrency", type=int, default=5)
    p.add_argument("--stream-interval", type=int, default=1)
    p.add_argument("--no-register", action="store_true")
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--use-flash-attn", action="store_true")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--reduction-ratio", type=float, default=None)
    which.add_argument("--recipe", type=str, default=None)
    p.add_argument("--method", type=str, default="fitprune")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    p.add_argument("--attn-implementation", choices=("eager", "sdpa", "flash_attention_2"), default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    stock.logger.info(f"args: {args}")
    stock.args = args  # LLaVA's routes read these module globals
    stock.worker = PrunedModelWorker(
        args.controller_address, args.worker_address, stock.worker_id, args.no_register, args.model_path,
        args.model_base, args.model_name, args.load_8bit, args.load_4bit, args.device,
        use_flash_attn=args.use_flash_attn, recipe=args.recipe, reduction_ratio=args.reduction_ratio,
        method=args.method, torch_dtype=args.dtype, attn_implementation=args.attn_implementation)
    uvicorn.run(stock.app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
