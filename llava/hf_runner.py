"""The engine's fallback LLM forward: transformers' own, for models `LlamaRunner` does not compute (other LLM
families, bitsandbytes-quantized models, CUDA setups left to transformers' kernels).

Same interface as `llava.runner.LlamaRunner` (reserve / seed / prefill / decode / export / release). A prompt is
prefilled into a cache of its own, chunk after chunk; when it is complete its row joins the running batch (a
left-padded `BatchKV`), which every decode step advances by one token.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from llava.kvcache import BatchKV, SequenceKV, new_cache
from llava.requests import UnsupportedModelError
from llava.runner import Chunk


class TransformersRunner:
    def __init__(self, model, *, vocab_limit: int, image_token_id: int):
        text_config = model.config.get_text_config(decoder=True)
        probe = DynamicCache(config=model.config)
        if any(type(layer) is not DynamicLayer for layer in probe.layers):
            kinds = sorted({type(layer).__name__ for layer in probe.layers})
            raise UnsupportedModelError(
                f"the engine batches plain full-attention KV caches; this model's cache has layers {kinds}"
            )
        self.num_layers = text_config.num_hidden_layers
        self._llm = model.model.language_model
        self._lm_head = model.get_output_embeddings()
        self.device = model.get_input_embeddings().weight.device
        self.vocab_limit = vocab_limit
        self.image_token_id = image_token_id
        self._pending: dict[object, Cache] = {}
        self._batch = BatchKV(self.num_layers, self.device)
        self._batch_keys: list[object] = []

    # ------------------------------------------------------------------------------------------------ rows

    @property
    def num_rows(self) -> int:
        return len(self._pending) + len(self._batch_keys)

    @property
    def num_tokens(self) -> int:
        return self._batch.num_tokens + sum(c.get_seq_length() for c in self._pending.values())

    @property
    def nbytes(self) -> int:
        pending = sum(layer.nbytes for c in self._pending.values() for layer in c.layers)
        return self._batch.nbytes + pending

    def has(self, key) -> bool:
        return key in self._pending or key in self._batch_keys

    def length(self, key) -> int:
        if key in self._pending:
            return self._pending[key].get_seq_length()
        return self._batch.lengths()[self._batch_keys.index(key)]

    # LoRA adapters per request need the engine's own runner (llava.runner.LlamaRunner)
    supports_adapters = False

    def reserve(self, key, total_length: int, adapter=None) -> None:
        if adapter is not None:
            raise UnsupportedModelError("LoRA adapters per request need the llama runner")
        if self.has(key):
            raise KeyError(f"{key!r} already has a row")
        self._pending[key] = new_cache(self.num_layers)

    def seed(self, key, kv: SequenceKV, length: int) -> None:
        self._pending[key] = new_cache(self.num_layers, kv, length)

    def export(self, key, length: int | None = None) -> SequenceKV:
        if key in self._pending:
            layers = self._pending[key].layers
            n = layers[0].keys.shape[-2] if length is None else length
            return [(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone()) for layer in layers]
        row = self._batch_keys.index(key)
        pad = self._batch.pads[row]
        n = self._batch.width - pad if length is None else length
        return [(layer.keys[row : row + 1, :, pad : pad + n].clone(), layer.values[row : row + 1, :, pad : pad + n].clone())
                for layer in self._batch.cache.layers]

    def release(self, key) -> None:
        if self._pending.pop(key, None) is not None:
            return
        row = self._batch_keys.index(key)
        keep = [i for i in range(len(self._batch_keys)) if i != row]
        self._batch.keep_rows(keep)
        self._batch_keys.pop(row)

    # --------------------------------------------------------------------------------------------- compute

    def _forward(self, embeds, cache, attention_mask, position_ids) -> torch.Tensor:
        """The LLM on embeds [B, q, hidden]; float32 logits [B, V] of each row's last position."""
        out = self._llm(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True,
        )
        logits = self._lm_head(out.last_hidden_state[:, -1]).float()
        logits[:, self.vocab_limit :] = float("-inf")
        logits[:, self.image_token_id] = float("-inf")
        return logits

    @torch.inference_mode()
    def prefill(self, chunks: list[Chunk]) -> dict[object, torch.Tensor]:
        finished = {}
        for c in chunks:
            cache = self._pending[c.key]
            if cache.get_seq_length() != c.start:
                raise ValueError(f"chunk of {c.key!r} starts at {c.start} but its cache holds {cache.get_seq_length()}")
            q = c.embeds.shape[0]
            position_ids = torch.arange(c.start, c.start + q, device=self.device).unsqueeze(0)
            logits = self._forward(c.embeds.unsqueeze(0), cache, None, position_ids)
            if c.last:
                finished[c.key] = logits[0]
                # views into the prefill cache: add_rows copies them into the batch buffers
                self._batch.add_rows([[(layer.keys, layer.values) for layer in cache.layers]])
                self._batch_keys.append(c.key)
                del self._pending[c.key]
        return finished

    @torch.inference_mode()
    def decode(self, keys: list, tokens: list[int]) -> torch.Tensor:
        if sorted(map(id, keys)) != sorted(map(id, self._batch_keys)):
            raise ValueError(f"decode needs all {len(self._batch_keys)} running rows, got {len(keys)} keys")
        token_of = {id(k): t for k, t in zip(keys, tokens)}
        last = torch.tensor([[token_of[id(k)]] for k in self._batch_keys], device=self.device)  # [B, 1]
        mask, position_ids = self._batch.step_inputs()
        embeds = self._llm.get_input_embeddings()(last)
        logits = self._forward(embeds, self._batch.cache, mask, position_ids)  # [B, V]
        self._batch.after_step()
        order = [self._batch_keys.index(k) for k in keys]
        return logits if order == list(range(len(order))) else logits[torch.tensor(order, device=self.device)]
