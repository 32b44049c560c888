"""The generation loop shared by the eval modules: chunk, resume, batch, generate, write, summarise."""
from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Callable

import torch
from tqdm import tqdm

from ..core.flops import LMShape
from ..core.recipe import RecipeError
from .answers import AnswerFile, answer_key, check_before_loading, read_meta, require_sidecar, reuse_note
from .args import check_args, check_model_path
from .io import EvalInputError, file_sha256
from .loading import resolve_device
from .prefill import planned_visual_entering, sample_prefill
from .samples import EvalDataset, Item, check_images, collate, make_batches, pad_batch

GPU_LOADER_WORKERS = 4  # LLaVA's model_vqa_loader default
BAD_INPUT_STATUS = 2  # _common.sh tells bad input (fix it) from a crash (rerun to resume) by this


def cli(main: Callable[[], int]) -> int:
    """Run a module's main() from the command line: bad input is one line on stderr, exit status 2."""
    try:
        return main()
    except (EvalInputError, RecipeError) as e:
        print(f"error: {worker_message(e)}", file=sys.stderr)
        return BAD_INPUT_STATUS
    except SystemExit as e:  # e.g. resolve_device's "--device cuda ... use --device cpu"
        if not isinstance(e.code, str):
            raise
        print(f"error: {e.code}", file=sys.stderr)
        return BAD_INPUT_STATUS


def worker_message(error: Exception) -> str:
    """The error's own line: a DataLoader worker re-raises it with the worker's whole traceback as its
    message ("Caught EvalInputError in DataLoader worker process 0. Original Traceback ..."), whose
    last line is `<module>.EvalInputError: <message>`."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(f"{type(error).__name__}: ", 1)[-1]


def get_chunk(questions: list, num_chunks: int, chunk_idx: int, source: str) -> list:
    """LLaVA's `get_chunk`, except that a chunk past the end (fewer questions than chunks) is empty.
    A question file (`source`) without questions is an error: zero answers would score as 0.0."""
    from llava.eval.model_vqa_loader import split_list

    if not questions:
        raise EvalInputError(f"question file {source} holds no questions: point --question-file at the "
                             f"benchmark's question file")
    chunks = split_list(questions, num_chunks)
    return chunks[chunk_idx] if chunk_idx < len(chunks) else []


class PrefillTracer:
    """Keeps the pruning model's `last_trace` of the first forward (the prefill) of each generate()."""

    _UNSET = object()

    def __init__(self, model):
        self.trace = self._UNSET
        self._handle = model.get_model().register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.trace is self._UNSET:
            self.trace = getattr(module, "last_trace", None)

    def reset(self) -> None:
        self.trace = self._UNSET

    def get(self):
        return None if self.trace is self._UNSET else self.trace

    def remove(self) -> None:
        self._handle.remove()


def check_method(args) -> None:
    """The method and its budget, before the question file is read or the model loaded (methods.py)."""
    from ..core.methods import METHODS

    budget = args.recipe is not None or args.reduction_ratio is not None
    if args.method not in METHODS or args.method == "lvprune":
        raise EvalInputError(f"--method {args.method!r}: use fitprune, random, fastv or uniform (lvprune needs its "
                             f"trained modules: use load_pretrained_model(method_options=...) from Python)")
    if args.method in ("random", "uniform") and not budget:
        raise EvalInputError(f"--method {args.method} needs a budget: give --reduction-ratio or --recipe")


def check_llava_checkpoint(args, model_name: str) -> None:
    """The builder's rule (a name or a config.json that says llava), as one line before anything loads."""
    from ..adapters.llava.builder import llava_kind

    path = os.path.expanduser(args.model_path)
    try:
        llava_kind(path, model_name)
    except ValueError as e:
        raise EvalInputError(f"--model-path {e}") from None
    except OSError as e:  # a hub id whose config.json cannot be fetched
        raise EvalInputError(f"--model-path {args.model_path}: cannot read its config.json ({' '.join(str(e).split())})"
                             f": pass a local checkpoint folder, or check the id and the network") from None


def prefill_metadata(sample, row: int, trace, recipe, num_layers: int, num_patches: int, batch_size: int) -> dict:
    """Text and visual tokens of one sample, and the visual tokens entering each layer: from the
    pruning model's trace when it tells (per row, or a batch of one), else from the recipe."""
    from llava.constants import IMAGE_TOKEN_INDEX

    ids = sample.input_ids
    text = int((ids != IMAGE_TOKEN_INDEX).sum())
    per_row = getattr(trace, "visual_entering", None) if trace is not None else None
    if per_row:  # [L + 1][rows]
        entering = [int(layer[row]) for layer in per_row]
        return sample_prefill(text, entering[0], entering, measured=True)
    if trace is not None and batch_size == 1:  # text tokens are never dropped
        entering = [int(n) - text for n in trace.tokens_entering]
        return sample_prefill(text, entering[0], entering, measured=True)
    visual = int((ids == IMAGE_TOKEN_INDEX).sum()) * num_patches
    if per_row is not None:  # the pruning model's trace of a batch that dropped nothing
        return sample_prefill(text, visual, [visual] * (num_layers + 1), measured=True)
    return sample_prefill(text, visual, planned_visual_entering(recipe, num_layers, visual), measured=False)


def run_config(args, module: str, model_name: str) -> dict:
    """The run's settings as known before the model loads (`run` adds what the loaded model tells)."""
    from ..adapters.llava.builder import device_and_dtype

    device, dtype = device_and_dtype(resolve_device(args.device), args.dtype)  # the loader's defaults
    recipe_file = os.path.expanduser(args.recipe) if args.recipe is not None else None
    return {"module": module, "model_path": args.model_path, "model_base": args.model_base, "model_name": model_name,
            "method": args.method, "reduction_ratio": args.reduction_ratio, "recipe_file": args.recipe,
            "recipe_file_sha256": file_sha256(recipe_file) if recipe_file and os.path.isfile(recipe_file) else None,
            "conv_mode": args.conv_mode, "temperature": args.temperature, "top_p": args.top_p,
            "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "num_chunks": args.num_chunks,
            "chunk_idx": args.chunk_idx, "question_file": args.question_file,
            "question_file_name": os.path.basename(args.question_file),
            "question_file_sha256": file_sha256(os.path.expanduser(args.question_file)),
            "image_folder": args.image_folder,
            "single_pred_prompt": args.single_pred_prompt, "all_rounds": args.all_rounds, "lang": args.lang,
            "batch_size": args.batch_size, "device": args.device, "device_type": torch.device(device).type,
            "dtype": str(dtype).replace("torch.", ""), "attn_implementation_requested": args.attn_implementation,
            "compile": getattr(args, "compile", False)}


def already_complete(answers_file: str, num_questions: int, config: dict) -> bool:
    """Whether a finished file from the same settings is there, told before the model loads; a file
    from other settings is an error (what only the loaded model tells is compared once it is loaded)."""
    meta = read_meta(answers_file)
    require_sidecar(answers_file, meta)
    if meta is None:
        return False
    known = check_before_loading(answers_file, meta, config)
    if known and meta.get("complete") and meta.get("num_answers") == num_questions:
        print(f"{answers_file} is complete ({num_questions} answers); nothing to do{reuse_note(meta, config)}")
        return True
    return False


def compile_note(model) -> str | None:
    """A line when --compile compiles nothing on this device (the fast path's per-device "auto")."""
    fast = getattr(model, "fast_path", None)
    if fast is None or fast.prefill_mode == "compile" or fast.mode in ("compile", "graph"):
        return None
    return (f"--compile on {model.device.type}: nothing is compiled here (prefill {fast.prefill_mode}, decode "
            f"{fast.mode}: the fast path compiles on CUDA only, see fast_path.py); the answers are the same, and its "
            f"static KV cache is used")


def run(args, module: str, make_items: Callable[[object], list[Item]], auto_mmtag: bool = False) -> int:
    """`make_items(args)` parses the question file and returns this chunk's items, in order.
    `auto_mmtag`: switch plain (pretrain-only) models to the mmtag template, as LLaVA's loader does."""
    from llava.mm_utils import get_model_name_from_path

    from .loading import timed_load, used_recipe

    check_args(args)
    check_method(args)
    check_model_path(args)
    items = make_items(args)
    check_images(items, args.image_folder)
    answers_file = os.path.expanduser(args.answers_file)
    model_name = get_model_name_from_path(os.path.expanduser(args.model_path))
    if auto_mmtag and "plain" in model_name and "finetune" not in model_name.lower() and "mmtag" not in args.conv_mode:
        args.conv_mode = args.conv_mode + "_mmtag"
        print(f"It seems that this is a plain model, but it is not using a mmtag prompt, "
              f"auto switching to {args.conv_mode}.")
    check_llava_checkpoint(args, model_name)
    config = run_config(args, module, model_name)
    if already_complete(answers_file, len(items), config):
        return 0

    (tokenizer, model, image_processor, _), load_s = timed_load(args, model_name)
    note = compile_note(model)
    if note:
        print(note)
    recipe = used_recipe(model, args)
    config.update(recipe=recipe.to_dict() if recipe is not None else None,
                  recipe_fingerprint=recipe.fingerprint() if recipe is not None else None,
                  pruning=recipe is not None, attn_implementation=getattr(model.config, "_attn_implementation", None),
                  dtype=str(model.dtype).replace("torch.", ""), device=str(model.device), model_load_s=load_s)

    out = AnswerFile(answers_file, config, [answer_key(it.record) for it in items], LMShape.from_config(model.config))
    done = out.open()
    pending = [it for it in items if not _consume(done, answer_key(it.record))]
    if items and not pending:  # the earlier run's attention implementation was known only once the model loaded
        print(f"{answers_file} is complete ({len(items)} answers); nothing to do{reuse_note(out.old_meta, config)}")
    if args.limit is not None:
        pending = pending[: args.limit]
    generate_all(args, pending, out, tokenizer, model, image_processor, recipe, model_name, len(items))
    if out.num_answers < len(items):
        out.stop_at_limit(args.limit)
        print(f"stopped after --limit {args.limit}: {out.num_answers} of {len(items)} answers; rerun to continue")
        return 0
    meta = out.finish()
    p = meta["prefill"]
    if p and p["pruned_tflops_mean"] is not None:
        print(f"{answers_file}: {meta['num_answers']} answers, prefill {p['pruned_tflops_mean']:.4g} TFLOPs/sample "
              f"(dense {p['dense_tflops_mean']:.4g}, reduction {p['reduction']:.1%})")
    return 0


def _consume(done: Counter, key: str) -> bool:
    if done[key] > 0:
        done[key] -= 1
        return True
    return False


def generate_all(args, pending: list[Item], out: AnswerFile, tokenizer, model, image_processor, recipe,
                 model_name: str, total: int) -> None:
    import shortuuid

    device = model.device
    workers = args.num_workers if args.num_workers is not None else (GPU_LOADER_WORKERS if device.type == "cuda" else 0)
    dataset = EvalDataset(pending, tokenizer, image_processor, model.config, args.conv_mode)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=make_batches(pending, args.batch_size),
                                         num_workers=workers, collate_fn=collate)
    tracer = PrefillTracer(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    num_layers = model.config.num_hidden_layers
    tower = model.get_vision_tower() if hasattr(model, "get_vision_tower") else None
    num_patches = tower.num_patches if tower is not None else 0
    gen_kwargs = dict(do_sample=args.temperature > 0, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                      use_cache=True, pad_token_id=pad_id)
    if args.temperature > 0:  # greedy decoding ignores them (LLaVA passes them anyway, with warnings)
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    progress = tqdm(total=total, initial=out.num_answers, desc=os.path.basename(out.path))
    for batch in loader:
        input_ids, mask = pad_batch(batch, pad_id)
        kwargs = dict(gen_kwargs)
        if mask is not None:
            kwargs["attention_mask"] = mask.to(device)
        if batch[0].image is not None:
            kwargs["images"] = torch.stack([s.image for s in batch]).to(device=device, dtype=model.dtype)
            kwargs["image_sizes"] = [s.image_size for s in batch]
        tracer.reset()
        with torch.inference_mode():
            output_ids = model.generate(input_ids.to(device), **kwargs)
        texts = tokenizer.batch_decode(output_ids, skip_special_tokens=True)
        trace = tracer.get()
        for row, (sample, text) in enumerate(zip(batch, texts)):
            item = pending[sample.index]
            prefill = prefill_metadata(sample, row * args.num_beams, trace, recipe, num_layers, num_patches, len(batch))
            metadata = {"prefill": prefill}
            if sample.converted_to_rgb:
                metadata["image_converted_to_rgb"] = True
            record = {**item.record, "text": text.strip(), **item.extra, "answer_id": shortuuid.uuid(),
                      "model_id": model_name, "metadata": metadata}
            out.write(record)
        out.checkpoint()
        progress.update(len(batch))
    progress.close()
    tracer.remove()
