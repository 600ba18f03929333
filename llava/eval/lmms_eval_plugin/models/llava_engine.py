"""`llava_engine`: an lmms-eval model answering through `llava.engine` (continuous batching, image-feature cache,
prefix reuse) and scoring continuations with the model's own logits.

model_args: pretrained (default "default": any path `llava.loading.load_model` takes), model_base, dtype ("auto"),
quantization ("auto": the worker's choice), conv_mode (an original conversation name; default: the checkpoint's
template), device (lmms-eval's --device; default cpu), max_new_tokens (default 128, a task's generation_kwargs
win), max_batch_size (engine rows, default 16).

- generate_until: every request of the call is submitted at once (a bounded window in flight), so they decode
  together; `until` strings become stop strings (the template's own are always kept), temperature 0 / do_sample
  false is greedy. A context without `<image>` gets one per visual first, as lmms-eval's llava models do.
- loglikelihood: (context, continuation) -> (the continuation's loss, whether greedy decoding would produce exactly
  its tokens), from one forward of the rendered user turn + generation prompt + continuation tokens; requests sharing
  a context run as one batch. The loss is the mean negative log-likelihood per continuation token, as lmms-eval's
  own llava models return (their `outputs.loss`) and as its multiple_choice scoring expects (it takes the argmin),
  not the log-probability lmms' base-class docstring describes. (With lmms-eval 0.7.3 each pair is wrapped in its
  GenerationResult: its evaluator would otherwise turn the pair into a string.)
"""

from __future__ import annotations

from collections import deque

import torch
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from tqdm import tqdm

from llava.engine import Engine, GenerationRequest
from llava.eval.vqa import IN_FLIGHT, template_for
from llava.loading import load_model
from llava.sampling import SamplingParams
from llava.templates import render, stop_token_ids

IMAGE = "<image>"


class LlavaEngine(lmms):
    def __init__(self, pretrained: str = "default", model_base: str | None = None, dtype: str = "auto",
                 quantization: str = "auto", conv_mode: str | None = None, max_new_tokens: int = 128,
                 max_batch_size: int = 16, batch_size: int | str = 1, device: str | None = None, loaded=None,
                 **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"llava_engine: unknown model_args {sorted(kwargs)}")
        self.lm = loaded or load_model(pretrained, model_base=model_base, dtype=dtype, device=device or "cpu",
                                       quantization=None if quantization == "none" else quantization)
        self.template = template_for(conv_mode) if conv_mode else self.lm.template
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1  # the engine batches anyway
        self.chat_template = None
        self.engine = Engine(self.lm.model, self.lm.tokenizer, max_batch_size=int(max_batch_size),
                             eos_token_ids=stop_token_ids(self.template, self.lm.tokenizer),
                             context_length=self.lm.context_length).start()

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def clean(self) -> None:
        self.engine.shutdown()
        super().clean()

    # ---------------------------------------------------------------------------------------------- inputs

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        visuals = [v for v in (visuals if isinstance(visuals, list) else [visuals]) if v is not None]
        if any(isinstance(v, str) for v in visuals):
            raise ValueError("llava_engine takes images (PIL); this task gives video paths")
        return self.lm.process_images([v.convert("RGB") for v in visuals])

    def _ids(self, context: str, images: list, continuation: str | None = None) -> tuple[list[int], int]:
        """(ids of the user turn + generation prompt [+ continuation], length of the part before the
        continuation)."""
        if images and IMAGE not in context:
            context = "\n".join([IMAGE] * len(images)) + "\n" + context
        ids = render([{"role": "user", "content": context}], self.template, self.lm.tokenizer,
                     image_token_counts=[im.num_tokens for im in images], add_generation_prompt=True).input_ids
        if continuation is None:
            return ids, len(ids)
        return ids + self._continuation_ids(continuation), len(ids)

    def _continuation_ids(self, text: str) -> list[int]:
        return self.lm.tokenizer(text, add_special_tokens=False).input_ids

    def _sampling(self, gen_kwargs: dict) -> SamplingParams:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        greedy = not gen_kwargs.get("do_sample", False) or not gen_kwargs.get("temperature")
        return SamplingParams(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            temperature=0.0 if greedy else float(gen_kwargs["temperature"]),
            top_p=float(gen_kwargs.get("top_p") or 1.0) if not greedy else 1.0,
            stop=tuple(dict.fromkeys([*self.template.stop_strings, *until])))

    # ---------------------------------------------------------------------------------------------- requests

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str] = []
        pending: deque = deque()
        with tqdm(total=len(requests), disable=self.rank != 0, desc="llava_engine generate") as bar:
            for req in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                images = self._visuals(doc_to_visual, doc_id, task, split)
                ids, _ = self._ids(context, images)
                pending.append(self.engine.submit(GenerationRequest(ids, images, self._sampling(gen_kwargs))))
                if len(pending) >= IN_FLIGHT:
                    out.append(pending.popleft().result().text.strip())
                    bar.update()
            while pending:
                out.append(pending.popleft().result().text.strip())
                bar.update()
        return out

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict = {}  # (context, doc) -> request indices: a question's choices share one batch
        for i, req in enumerate(requests):
            context, _, _, doc_id, task, split = req.args
            groups.setdefault((context, doc_id, task, split), []).append(i)
        for indices in tqdm(groups.values(), disable=self.rank != 0, desc="llava_engine loglikelihood"):
            context, _, doc_to_visual, doc_id, task, split = requests[indices[0]].args
            images = self._visuals(doc_to_visual, doc_id, task, split)
            rows = []
            for i in indices:
                target = requests[i].args[1]
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                rows.append(self._ids(context, images, continuation))
            for i, score in zip(indices, self._score(rows, images)):
                results[i] = score
        if isinstance(unwrap_generation_output((0.0, True))[0], str):
            # lmms-eval 0.7.3's evaluator passes every reply through unwrap_generation_output, which turns a
            # (float, bool) pair into its string; its GenerationResult hands `text` through as it is
            return [GenerationResult(text=r) for r in results]
        return results

    def _score(self, rows: list[tuple[list[int], int]], images: list) -> list[tuple[float, bool]]:
        """One right-padded forward over rows that share their images; per row the continuation's mean negative
        log-likelihood and whether each of its tokens is the argmax."""
        width = max(len(ids) for ids, _ in rows)
        pad = self.lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (r, _) in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        kwargs = {}
        if images:
            pixels = torch.stack([im.pixel_values for im in images]).to(self.lm.dtype)
            kwargs["pixel_values"] = pixels.repeat(len(rows), *([1] * (pixels.dim() - 1)))
            if pixels.dim() == 5:  # anyres (views per image): LlavaNext also takes each image's size
                kwargs["image_sizes"] = torch.tensor([im.image_size for im in images] * len(rows))
        logits = self.lm.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for b, (r, start) in enumerate(rows):
            target = torch.tensor(r[start:])
            lp = logprobs[b, start - 1: len(r) - 1]
            out.append((-float(lp.gather(1, target[:, None]).mean()), bool((lp.argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("llava_engine: multi-round generation is not supported")
