"""lmms-eval `lmms` models that run a pruned transformers-native VLM (llava_fitprune.adapters.hf).

`--model_args pretrained=ID_OR_PATH[,reduction_ratio=0.6 | ,recipe=FILE.json][,method=fitprune]
[,attn_implementation=sdpa][,dtype=auto][,chat_template=...][,compile=True]`, and the method's options (e.g. fastv's);
all checked before the weights load (`args.py`); `compile=True`: the compiled prefill
(adapters/hf/fast_prefill.py). Every answer (`generate_until`) and every scored
continuation (`loglikelihood`) carries its prefill's record in lmms-eval's logged sample
(`token_counts[i]["fitprune"]`: method, recipe fingerprint, visual tokens entering and kept, tokens
entering each layer, prefill TFLOPs pruned and dense); the recipe and method also stand in the
results' `config.model_args`.

A model family is a subclass naming its `model_types` (the checkpoint config's `model_type`) and a
`default_pretrained`, and an entry in `__init__.MODEL_CLASSES`.

Data parallel: `accelerate launch --num_processes N -m lmms_eval ...` as for lmms-eval's own HF models
(`lmms_eval/models/simple/llava_hf.py`): each process loads the model on its own device
(`accelerator.device`) and takes rank and world size from the accelerator; lmms-eval shards the requests
and gathers the samples.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
from accelerate import Accelerator, DistributedType
from loguru import logger as eval_logger
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from . import backend
from .args import ModelArgsError, check_model_args

DATA_PARALLEL_TYPES = (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.MULTI_XPU,
                       DistributedType.MULTI_NPU, DistributedType.MULTI_MLU)
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class FitPruneTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus the prefill's pruning record; lmms-eval logs `to_dict()` in
    each sample's `token_counts`."""

    fitprune: Optional[dict] = None

    def to_dict(self) -> dict:
        return {**super().to_dict(), "fitprune": self.fitprune}


class FitPruneHF(lmms):
    """A pruned transformers VLM as an lmms-eval model. Subclasses fix the model family."""

    model_types: tuple[str, ...] = ()
    default_pretrained: str = ""

    def __init__(self, pretrained: Optional[str] = None, **model_args) -> None:
        """`model_args`: see `args.ModelArgs` (recipe, reduction_ratio, method, device, dtype, batch_size,
        attn_implementation, chat_template, compile, the method's options). All are checked before the weights
        load (`args.check_model_args`: ModelArgsError, one line)."""
        super().__init__()
        args, _ = check_model_args(self.model_types, self.default_pretrained, pretrained, **model_args)
        accelerator = Accelerator()
        device = args.device
        if accelerator.num_processes > 1:
            if accelerator.distributed_type not in DATA_PARALLEL_TYPES:
                raise ModelArgsError(f"{accelerator.distributed_type} is not supported: launch data parallel "
                                     f"(`accelerate launch --num_processes N`), each process holding the whole model")
            device = str(accelerator.device)
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
            eval_logger.info(f"data parallel: process {self._rank} of {self._world_size} on {device}")
        elif device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.accelerator = accelerator
        self.pretrained = args.pretrained
        self._model, self.processor = backend.load(
            args.pretrained, recipe=args.recipe, reduction_ratio=args.reduction_ratio, method=args.method,
            device=device, dtype=args.dtype, attn_implementation=args.attn_implementation, compile=args.compile,
            **args.method_options)
        self._model.eval()
        self._device = torch.device(device)
        self.batch_size_per_gpu = args.batch_size
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row from its last column
        if args.chat_template is not None:  # a processor's own template, or (Qwen without torchvision) its tokenizer's
            self.processor.chat_template = self.tokenizer.chat_template = args.chat_template
        if getattr(self.processor, "chat_template", None) is None and self.tokenizer.chat_template is None:
            raise ModelArgsError(f"{self.pretrained}'s processor has no chat template: pass chat_template=... in "
                                 f"--model_args")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """lmms-eval's constructor from `--model_args`. A bad argument is one line on stderr and exit status 2:
        lmms-eval would print a traceback for an exception and exit 0 (its `cli_evaluate` catches them)."""
        try:
            return super().create_from_arg_string(arg_string, additional_config)
        except ModelArgsError as e:
            print(f"{cls.__name__}: bad --model_args: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # -- prompts ---------------------------------------------------------------------------
    def _prompt(self, context: str, num_images: int, continuation: Optional[str] = None) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": context}]
        messages = [{"role": "user", "content": content}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return prompt if continuation is None else prompt + continuation

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise NotImplementedError(f"{type(self).__name__} takes images; task {task} gave {type(v).__name__}")
        return [v.convert("RGB") for v in visuals]

    def _inputs(self, texts: list[str], images: list[Image.Image]):
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        dtype = self.model.dtype  # pixel values in the weights' dtype, as lmms-eval's llava_hf passes them
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) if torch.is_tensor(v)
                else v for k, v in inputs.items()}

    # -- lmms-eval's request types -----------------------------------------------------------
    def generate_until(self, requests) -> list[GenerationResult]:
        def order(args):  # longest prompts first, as lmms-eval's models do; results come back in input order
            return -len(self.tokenizer.encode(args[0])), args[0]

        collator = utils.Collator([r.args for r in requests], order, grouping=True)
        results = []
        bar = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            visuals = [self._visuals(dv, t, s, d) for dv, t, s, d in zip(doc_to_visual, tasks, splits, doc_ids)]
            texts = [self._prompt(c, len(v)) for c, v in zip(contexts, visuals)]
            inputs = self._inputs(texts, [im for v in visuals for im in v])
            answers = self._generate(inputs, dict(gen_kwargs[0]))
            results.extend(answers)
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)

    def _generate(self, inputs, gen_kwargs: dict) -> list[GenerationResult]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if int(gen_kwargs.get("num_beams", 1) or 1) != 1:
            raise ValueError("num_beams > 1 is not supported: a pruned prefill records one row per sample")
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": gen_kwargs.get("top_p")} \
            if temperature > 0 else {"do_sample": False}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=int(gen_kwargs.get("max_new_tokens",
                                                                                  DEFAULT_MAX_NEW_TOKENS)),
                                      num_beams=1, use_cache=True, pad_token_id=pad, **sampling)
        records = backend.prefill_records(self.model, inputs["input_ids"], inputs["attention_mask"])
        new_tokens = out[:, inputs["input_ids"].shape[1]:]  # [B, new]
        answers = []
        for row, mask, record in zip(new_tokens, inputs["attention_mask"], records):
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            generated = int(row.ne(pad).sum()) if pad != self.tokenizer.eos_token_id else int(row.numel())
            answers.append(GenerationResult(text=text, token_counts=FitPruneTokenCounts(
                input_tokens=int(mask.sum()), output_tokens=generated, fitprune=record)))
        return answers

    def loglikelihood(self, requests) -> list[GenerationResult]:
        """Per request, `GenerationResult(text=(loss, greedy), token_counts=...)`: the continuation's mean
        token loss after the prompt (minus its mean token log-probability: lower is likelier), whether greedy
        decoding gives it, and the prefill's record (as `generate_until`'s, with the continuation's length as
        output_tokens).

        The loss, not the log-probability the base class's docstring names: lmms-eval 0.7.3 has no
        `loglikelihood` task, and its `multiple_choice` tasks pick the choice of least value
        (`lmms_eval/api/task.py`: "we return the actual loss ... we just use the argmin"), as its own llava_hf
        and llava models return `outputs.loss`; a log-probability there picks the least likely choice.
        The pair rides in a GenerationResult: lmms-eval 0.7.3's evaluator keeps a GenerationResult's text as
        it is but turns a bare (float, bool) into its str() (`api/instance.py` unwrap_generation_output),
        which multiple_choice cannot unpack.

        The model sees what `generate_until` would: the prompt alone is prefilled (and pruned, by scores of
        the prompt's text only), then the continuation runs through that prefill's cache. A pruned prefill
        keeps the prompt's last row (text after the image is never dropped), which predicts the
        continuation's first token; the continuation's own rows predict the rest."""
        results = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm(
                [r.args for r in requests], disable=(self.rank != 0), desc="Model Responding"):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            images = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self._prompt(context, len(images))
            inputs = self._inputs([prompt], images)
            full_ids = self._inputs([prompt + continuation], images)["input_ids"]  # [1, N + C]
            n_prompt = inputs["input_ids"].shape[1]
            if not torch.equal(full_ids[:, :n_prompt], inputs["input_ids"]):
                raise ValueError(f"{task} doc {doc_id}: the continuation {continuation!r} changes how the prompt's "
                                 f"end tokenizes, so it cannot be scored after the prompt's own tokens")
            targets = full_ids[:, n_prompt:]  # [1, C]
            loss, greedy = self._score_continuation(inputs, targets)
            record, = backend.prefill_records(self.model, inputs["input_ids"], inputs["attention_mask"])
            results.append(GenerationResult(text=(loss, greedy), token_counts=FitPruneTokenCounts(
                input_tokens=int(inputs["attention_mask"].sum()), output_tokens=targets.shape[1], fitprune=record)))
        return results

    def _score_continuation(self, inputs: dict, targets: torch.Tensor) -> tuple[float, bool]:
        """(mean token loss, greedy). inputs: the prompt's processor outputs (batch 1); targets: [1, C] ids."""
        with torch.inference_mode():
            prefill = self.model(**inputs, use_cache=True)
            if targets.shape[1] == 0:
                return 0.0, True
            logits = prefill.logits[:, -1:]  # [1, 1, vocab]: the prompt's last row
            if targets.shape[1] > 1:  # batch 1, no padding: the positions continue from the cache's length
                step = self.model(input_ids=targets[:, :-1], cache=prefill.cache, use_cache=True)
                logits = torch.cat([logits, step.logits], dim=1)  # [1, C, vocab]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [1, C, vocab]
        loss = -float(logprobs.gather(-1, targets[..., None]).mean())
        return loss, bool((logprobs.argmax(-1) == targets).all())

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{type(self).__name__} answers single-round tasks (generate_until, loglikelihood)")


class FitPruneLlavaHF(FitPruneHF):
    model_types = ("llava",)
    default_pretrained = "llava-hf/llava-1.5-7b-hf"


class FitPruneLlavaNextHF(FitPruneHF):
    model_types = ("llava_next",)
    default_pretrained = "llava-hf/llava-v1.6-vicuna-7b-hf"


class FitPruneLlavaOnevision(FitPruneHF):
    model_types = ("llava_onevision",)
    default_pretrained = "llava-hf/llava-onevision-qwen2-7b-ov-hf"


class FitPruneQwen2_VL(FitPruneHF):
    model_types = ("qwen2_vl",)
    default_pretrained = "Qwen/Qwen2-VL-7B-Instruct"


class FitPruneQwen2_5_VL(FitPruneHF):
    model_types = ("qwen2_5_vl",)
    default_pretrained = "Qwen/Qwen2.5-VL-7B-Instruct"


class FitPruneQwen3VL(FitPruneHF):
    model_types = ("qwen3_vl",)
    default_pretrained = "Qwen/Qwen3-VL-8B-Instruct"


class FitPruneInternVL(FitPruneHF):
    model_types = ("internvl",)
    default_pretrained = "OpenGVLab/InternVL3-8B-hf"
