"""lmms-eval `lmms` models that run a pruned transformers-native VLM (llava_fitprune.adapters.hf).

`--model_args pretrained=ID_OR_PATH[,reduction_ratio=0.6 | ,recipe=FILE.json][,method=fitprune]
[,attn_implementation=sdpa][,dtype=bfloat16][,chat_template=...][,compile=True]`; other keys go to the method
(e.g. fastv's options). Every generated answer carries its prefill's record in lmms-eval's logged sample
(`token_counts[0]["fitprune"]`: method, recipe fingerprint, visual tokens entering and kept, tokens
entering each layer, prefill TFLOPs pruned and dense); `compile=True`: the compiled prefill
(adapters/hf/fast_prefill.py); the recipe and
method also stand in the results' `config.model_args`.

Data parallel: `accelerate launch --num_processes N -m lmms_eval ...` as for lmms-eval's own HF models
(`lmms_eval/models/simple/llava_hf.py`): each process loads the model on its own device
(`accelerator.device`) and takes rank and world size from the accelerator; lmms-eval shards the requests
and gathers the samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from accelerate import Accelerator, DistributedType
from loguru import logger as eval_logger
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm
from transformers import AutoConfig

from . import backend

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


def _torch_dtype(dtype: Any) -> Optional[torch.dtype]:
    if dtype in (None, "auto") or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype: use float32, float16, bfloat16 or auto")
    return getattr(torch, str(dtype))


class FitPruneHF(lmms):
    """A pruned transformers VLM as an lmms-eval model. Subclasses fix the model family."""

    model_types: tuple[str, ...] = ()
    default_pretrained: str = ""

    def __init__(self, pretrained: Optional[str] = None, recipe: Optional[str] = None,
                 reduction_ratio: Optional[float] = None, method: str = "fitprune", device: Optional[str] = None,
                 dtype: Any = "auto", batch_size: Any = 1, attn_implementation: Optional[str] = None,
                 chat_template: Optional[str] = None, max_batch_size: Any = None, compile: Any = False,
                 **method_options) -> None:
        # max_batch_size: lmms-eval passes it with --batch_size auto, which is refused below
        super().__init__()
        if recipe is not None and reduction_ratio is not None:
            raise ValueError("give recipe= or reduction_ratio=, not both")
        if not isinstance(compile, bool):  # lmms-eval turns True / False (any case) into a bool
            raise ValueError(f"compile={compile!r}: give compile=True or compile=False")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a positive integer ('auto' is not supported)")
        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            if accelerator.distributed_type not in DATA_PARALLEL_TYPES:
                raise ValueError(f"{accelerator.distributed_type} is not supported: launch data parallel "
                                 f"(`accelerate launch --num_processes N`), each process holding the whole model")
            device = str(accelerator.device)
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
            eval_logger.info(f"data parallel: process {self._rank} of {self._world_size} on {device}")
        elif device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.accelerator = accelerator
        self.pretrained = pretrained or self.default_pretrained
        model_type = AutoConfig.from_pretrained(self.pretrained).model_type  # before loading the weights
        if model_type not in self.model_types:
            raise ValueError(f"{self.pretrained} is a {model_type!r} checkpoint, this lmms-eval model runs "
                             f"{self.model_types}: choose --model by the checkpoint's family")
        self._model, self.processor = backend.load(
            self.pretrained, recipe=recipe, reduction_ratio=reduction_ratio, method=method, device=device,
            dtype=_torch_dtype(dtype), attn_implementation=attn_implementation, compile=compile, **method_options)
        self._model.eval()
        self._device = torch.device(device)
        self.batch_size_per_gpu = int(batch_size)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row from its last column
        if chat_template is not None:  # a processor's own template, or (Qwen without torchvision) its tokenizer's
            self.processor.chat_template = self.tokenizer.chat_template = chat_template
        if getattr(self.processor, "chat_template", None) is None and self.tokenizer.chat_template is None:
            raise ValueError(f"{self.pretrained}'s processor has no chat template: pass chat_template=... in "
                             f"--model_args")

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
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

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

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities after the prompt, and whether greedy decoding
        gives it. The pruning scores read the text after the image, which here includes the continuation."""
        results = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm(
                [r.args for r in requests], disable=(self.rank != 0), desc="Model Responding"):
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            images = self._visuals(doc_to_visual, task, split, doc_id)
            prompt_ids = self._inputs([self._prompt(context, len(images))], images)["input_ids"]
            inputs = self._inputs([self._prompt(context, len(images), continuation)], images)
            n_prompt = prompt_ids.shape[1]
            with torch.inference_mode():
                logits = self.model(**inputs).logits  # [1, N, vocab]
            targets = inputs["input_ids"][:, n_prompt:]  # [1, C]
            logprobs = torch.log_softmax(logits[:, n_prompt - 1:-1].float(), dim=-1)  # [1, C, vocab]
            total = float(logprobs.gather(-1, targets[..., None]).sum())
            results.append((total, bool((logprobs.argmax(-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{type(self).__name__} answers single-round tasks (generate_until, loglikelihood)")


class FitPruneLlavaHF(FitPruneHF):
    model_types = ("llava",)
    default_pretrained = "llava-hf/llava-1.5-7b-hf"


class FitPruneLlavaNextHF(FitPruneHF):
    model_types = ("llava_next",)
    default_pretrained = "llava-hf/llava-v1.6-vicuna-7b-hf"


class FitPruneQwen2_5_VL(FitPruneHF):
    model_types = ("qwen2_5_vl",)
    default_pretrained = "Qwen/Qwen2.5-VL-7B-Instruct"
