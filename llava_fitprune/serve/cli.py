"""`llava.serve.cli` with a pruned model, on CPU or GPU.

    python -m llava_fitprune.serve.cli --model-path liuhaotian/llava-v1.5-7b --image-file view.jpg --reduction-ratio 0.6

LLaVA's flags, plus --reduction-ratio / --recipe / --method, --dtype and --attn-implementation;
--device defaults to auto (CUDA when available). An empty line ends the chat. With --show-flops each
answer is followed by the prefill's visual tokens per layer and its TFLOPs.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..eval.prefill import TERA
from ..core.flops import LMShape, prefill_report


def infer_conv_mode(model_name: str) -> str:
    """LLaVA's cli rule for picking the template from the model name."""
    name = model_name.lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "llava_v0"


def flops_line(model, input_ids, trace) -> str:
    """One line about the prefill `trace` (the pruning model's PruneTrace of this answer's prefill)."""
    from llava.constants import IMAGE_TOKEN_INDEX

    text = int((input_ids != IMAGE_TOKEN_INDEX).sum())
    if trace is None or not getattr(trace, "visual_entering", None):
        return "[prefill: no visual tokens dropped]"
    visual = [v[0] for v in trace.visual_entering]
    drops = [visual[i] - visual[i + 1] for i in range(len(visual) - 1)]
    rep = prefill_report(LMShape.from_config(model.config), text, visual[0], drops)
    return (f"[prefill: visual tokens per layer {visual[0]} -> {visual[-1]}, "
            f"{rep.pruned_flops / TERA:.3g} TFLOPs (dense {rep.dense_flops / TERA:.3g}, -{rep.reduction:.1%})]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=str, default="facebook/opt-350m")
    p.add_argument("--model-base", type=str, default=None)
    p.add_argument("--image-file", type=str, required=True)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--conv-mode", type=str, default=None)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--debug", action="store_true")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--reduction-ratio", type=float, default=None)
    which.add_argument("--recipe", type=str, default=None)
    p.add_argument("--method", type=str, default="fitprune")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    p.add_argument("--attn-implementation", choices=("eager", "sdpa", "flash_attention_2"), default=None)
    p.add_argument("--show-flops", action="store_true")
    return p


def check_args(args) -> str | None:
    """What is wrong with the flags, as one line, before the model loads; None when nothing is."""
    from llava.conversation import conv_templates

    from ..adapters.llava.model_path import model_path_problem

    for flag, path in (("--model-path", args.model_path), ("--model-base", args.model_base)):
        problem = None if path is None else model_path_problem(path)
        if problem:
            return f"{flag} {path}: {problem}"
    remote = args.image_file.startswith(("http://", "https://"))
    if not remote and not os.path.isfile(args.image_file):
        return f"--image-file {args.image_file}: not found: pass an image file or an http(s) URL"
    if args.conv_mode is not None and args.conv_mode not in conv_templates:
        return f"--conv-mode {args.conv_mode}: unknown conversation template: choose from {', '.join(conv_templates)}"
    if not args.temperature >= 0:
        return f"--temperature {args.temperature}: must be >= 0 (0: greedy)"
    if args.max_new_tokens < 1:
        return f"--max-new-tokens {args.max_new_tokens}: must be >= 1"
    return None


def main(argv: list[str] | None = None) -> int:
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import SeparatorStyle, conv_templates
    from llava.mm_utils import KeywordsStoppingCriteria, get_model_name_from_path, process_images, tokenizer_image_token
    from llava.serve.cli import load_image
    from transformers import TextStreamer

    from ..adapters.llava.builder import load_pretrained_model
    from ..eval.loading import resolve_device
    from ..eval.runner import PrefillTracer

    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    model_name = get_model_name_from_path(args.model_path)
    try:  # the builder checks the pruning flags and the checkpoint's kind before any weight is read
        tokenizer, model, image_processor, _ = load_pretrained_model(
            args.model_path, args.model_base, model_name, args.load_8bit, args.load_4bit,
            device=resolve_device(args.device), recipe=args.recipe, reduction_ratio=args.reduction_ratio,
            method=args.method, torch_dtype=args.dtype, attn_implementation=args.attn_implementation)
    except OSError as e:  # files missing, a hub id without network
        print(f"error: --model-path {args.model_path}: cannot load it ({' '.join(str(e).split())}): pass a local "
              f"checkpoint folder, or check the id and the network", file=sys.stderr)
        return 2
    except (ValueError, NotImplementedError) as e:  # a bad pruning flag (RecipeError is a ValueError), MPT, LoRA
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    tracer = PrefillTracer(model)
    conv_mode = infer_conv_mode(model_name)
    if args.conv_mode is not None and conv_mode != args.conv_mode:
        print(f"[WARNING] the auto inferred conversation mode is {conv_mode}, while `--conv-mode` is "
              f"{args.conv_mode}, using {args.conv_mode}")
        conv_mode = args.conv_mode
    conv = conv_templates[conv_mode].copy()
    roles = ("user", "assistant") if "mpt" in model_name.lower() else conv.roles

    image = load_image(args.image_file)
    image_size = image.size
    image_tensor = process_images([image], image_processor, model.config)
    if isinstance(image_tensor, list):
        image_tensor = [t.to(model.device, dtype=model.dtype) for t in image_tensor]
    else:
        image_tensor = image_tensor.to(model.device, dtype=model.dtype)

    while True:
        try:
            inp = input(f"{roles[0]}: ")
        except EOFError:
            inp = ""
        if not inp:
            print("exit...")
            break
        print(f"{roles[1]}: ", end="")
        if image is not None:  # the first message carries the image
            token = DEFAULT_IMAGE_TOKEN
            if model.config.mm_use_im_start_end:
                token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
            inp = token + "\n" + inp
            image = None
        conv.append_message(conv.roles[0], inp)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        input_ids = input_ids.to(model.device)
        stop_str = conv.sep if conv.sep_style != SeparatorStyle.TWO else conv.sep2
        stopping = KeywordsStoppingCriteria([stop_str], tokenizer, input_ids)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        tracer.reset()
        with torch.inference_mode():
            output_ids = model.generate(
                input_ids, images=image_tensor, image_sizes=[image_size], do_sample=args.temperature > 0,
                temperature=args.temperature, max_new_tokens=args.max_new_tokens, streamer=streamer,
                use_cache=True, stopping_criteria=[stopping])
        outputs = tokenizer.decode(output_ids[0], skip_special_tokens=True).strip()  # new tokens only
        conv.messages[-1][-1] = outputs
        if args.show_flops:
            print(flops_line(model, input_ids, tracer.get()))
        if args.debug:
            print("\n", {"prompt": prompt, "outputs": outputs}, "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
