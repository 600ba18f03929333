"""The LLM forward the engine runs on CPU: prefill and decode for Llama-family LLMs (Llama, Mistral, Qwen2) over
preallocated KV rows, with few Python operations per layer.

Why not transformers' forward: for one decode token of SmolLM2-135M it spends more time building masks and
dispatching ~60 small ops per layer than multiplying (25 tok/s fp32 on a 2-core Xeon, vs ~90 for the same weights
here). The weights stay the model's own: q/k/v and gate/up are concatenated once and the model's modules are
re-pointed to views of the concatenation, so transformers' forward keeps working and no memory is duplicated.

Promises:
- `LlamaRunner.unsupported_reason(model)` is None for models this runner computes exactly like transformers
  (RMSNorm, RoPE of a static type, GQA attention without sliding window, gated MLP); otherwise it names why.
- KV rows: `reserve(key, length)` takes a row (seeded with a cached prefix by `seed`), `prefill(chunks)` writes
  prompt positions chunk by chunk (all chunks of a step in one packed forward) and returns the logits of each
  prompt's last position, `decode(keys, tokens)` advances every ready row by one token, `release(key)` frees a
  row, `export(key, n)` copies a row's first n positions for the prefix cache. Rows stay contiguous, so decode
  attends over [rows, :longest] without gathering.
- Decode rows are independent: a row's logits do not depend on which other rows are in the step (quantized
  kernels quantize activations per row; attention is per row).
- Logits are float32 [.., V] with ids past the tokenizer's vocabulary and the image token set to -inf.
- LoRA adapters (`llava.adapters`): `set_adapters(list)` makes them available, `reserve(key, n, adapter=...)`
  binds a row to one; every step adds each row's own adapter product to the q/k/v/o/gate/up/down outputs of that
  row only, so rows of different adapters (and of the bare base) share one batch. Rows without an adapter cost
  nothing extra; steps with any adapter row decode through the per-op path instead of the one-call int4 layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from llava import kernels
from llava.quant import Int4Linear, QuantLinear

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# Prefill forwards of up to `LlamaRunner.kernel_prefill_rows` rows use the quantized kernels (they read the 4-bit
# weights once per call); longer ones multiply by the dense prefill copies. Where the two cross is measured when the
# runner is built (a 2-core Xeon with AMX: ~24 rows against bf16; the same Xeon limited to AVX2: the kernels won at
# every size against float32).
CROSSOVER_ROWS = (8, 16, 32, 64, 128, 256, 512)
# dense prefill copies are kept only where they multiply this much faster than the kernels at the largest size
DENSE_WORTH = 0.8
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
_T_ALIGN = 64
# the runner's fused projections and the model projections each one concatenates (output order)
LORA_KINDS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)), ("gate_up", ("gate_proj", "up_proj")),
              ("down", ("down_proj",)))


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class DenseLinear:
    """nn.Linear weights used as the runner's few-row / many-row products."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def small(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    large = small


def _fuse(modules: list[nn.Module]):
    """One product for several linears sharing an input (q/k/v, gate/up); the modules become views of it."""
    if len(modules) == 1:
        m = modules[0]
        return m if isinstance(m, QuantLinear) else DenseLinear(m.weight, m.bias)
    kinds = {type(m) for m in modules}
    if len(kinds) != 1:
        raise TypeError(f"cannot fuse linears of different kinds: {sorted(k.__name__ for k in kinds)}")
    first = modules[0]
    if isinstance(first, QuantLinear):
        return _fuse_quantized(modules) if _fusable(modules) else _Stacked(modules)
    weight = torch.cat([m.weight.detach() for m in modules])
    biases = [m.bias for m in modules]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else weight.new_zeros(m.out_features) for m, b in zip(modules, biases)])
    _repoint(modules, weight, bias)
    return DenseLinear(weight, bias)


def _repoint(modules, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    start = 0
    for m in modules:
        n = m.out_features
        m.weight.data = weight[start : start + n]
        if m.bias is not None:
            m.bias.data = bias[start : start + n]
        start += n


def _fusable(modules: list[QuantLinear]) -> bool:
    """Stacked parts must each fill whole row blocks of every row-indexed buffer."""
    return all(m.out_features % rows == 0 for m in modules for rows in m.ROWS_PER_ENTRY.values())


def _fuse_quantized(modules: list[QuantLinear]) -> QuantLinear:
    cls = type(modules[0])
    low_rank = ("lr_u", "lr_v")
    names = [name for name in cls.ROWS_PER_ENTRY if name not in low_rank]
    fused_buffers = {name: torch.cat([getattr(m, name) for m in modules]) for name in names}
    biases = [m.bias for m in modules]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(m.out_features) for m, b in zip(modules, biases)])
    part_ends = None
    if any(getattr(m, "lr_u", None) is not None for m in modules):
        # the parts' corrections u_i @ v_i: u stacked by row blocks [NB, r, 16], v stacked [P r, K]
        r = max(m.lr_u.shape[1] for m in modules if m.lr_u is not None)
        us = [F.pad(m.lr_u, (0, 0, 0, r - m.lr_u.shape[1])) if m.lr_u is not None
              else torch.zeros(m.out_features // 16, r, 16) for m in modules]
        vs = [F.pad(m.lr_v, (0, 0, 0, r - m.lr_v.shape[0])) if m.lr_v is not None else torch.zeros(r, m.in_features)
              for m in modules]
        fused_buffers["lr_u"] = torch.cat(us).contiguous()
        fused_buffers["lr_v"] = torch.cat(vs).contiguous()
        part_ends = torch.tensor([m.out_features for m in modules]).cumsum(0)
    fused = cls.__new__(cls)
    QuantLinear.__init__(fused, modules[0].in_features, sum(m.out_features for m in modules), bias,
                         modules[0].compute_dtype)
    for name in low_rank:
        if hasattr(modules[0], name):
            fused.register_buffer(name, None, persistent=False)
    for name, value in fused_buffers.items():
        fused.register_buffer(name, value, persistent=False)
    if hasattr(modules[0], "part_ends"):
        fused.part_ends = part_ends
    if hasattr(modules[0], "_scales_bf16"):
        fused._scales_bf16 = torch.cat([m._scales_bf16 for m in modules])
    if all(m.dense is not None for m in modules):
        fused.dense = torch.cat([m.dense for m in modules])
    start = 0
    for p, m in enumerate(modules):  # the modules now read slices of the fused storage
        n = m.out_features
        for name in names:
            rows = cls.ROWS_PER_ENTRY[name]
            setattr(m, name, fused_buffers[name][start // rows : (start + n) // rows])
        if "lr_u" in fused_buffers:
            r = fused_buffers["lr_v"].shape[0] // len(modules)
            m.lr_u = fused_buffers["lr_u"][start // 16 : (start + n) // 16]
            m.lr_v = fused_buffers["lr_v"][p * r : (p + 1) * r]
        if m.dense is not None and fused.dense is not None:
            m.dense = fused.dense[start : start + n]
        if m.bias is not None:
            m.bias = bias[start : start + n]
        if hasattr(m, "_scales_bf16"):
            m._scales_bf16 = fused._scales_bf16[start : start + n]
        start += n
    return fused


class _Stacked:
    """Linears sharing an input that cannot be stored as one (their row counts do not fill whole blocks)."""

    def __init__(self, parts):
        self.parts = parts

    def small(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.small(x) for p in self.parts], dim=-1)

    def large(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.large(x) for p in self.parts], dim=-1)


def _linear(module: nn.Module):
    return module if isinstance(module, QuantLinear) else DenseLinear(module.weight, module.bias)


@dataclass
class _Layer:
    attn_norm: nn.Module
    qkv: object
    o: object
    mlp_norm: nn.Module
    gate_up: object
    down: object
    attn_norm_w: torch.Tensor  # float32 copies for the fused CPU path
    mlp_norm_w: torch.Tensor


class _LoraStacks:
    """The loaded adapters' matrices per fused projection, side by side: per layer A [R, in] and B [out, R], each
    adapter owning a range of the R columns (zeros where it has no weights). A row's product `x A^T` is masked to
    its own adapter's columns before `B^T`, so one pair of products serves every adapter of the step."""

    def __init__(self, adapters: list, out_sizes: dict[str, int], num_layers: int, dtype: torch.dtype,
                 device: torch.device):
        self.adapters = list(adapters)
        self.slot = {a: i for i, a in enumerate(self.adapters)}
        self.A: dict[str, list] = {}
        self.B: dict[str, list] = {}
        self.spans = {}
        self.col_slot: dict[str, torch.Tensor] = {}
        for kind, projs in LORA_KINDS:
            layout, width, fan_in = [], 0, None
            for s, ad in enumerate(self.adapters):
                for j, proj in enumerate(projs):
                    mats = [a for (_, p), (a, _) in ad.weights.items() if p == proj]
                    if mats:
                        r = max(a.shape[0] for a in mats)
                        layout.append((s, j, proj, width, r))
                        width += r
                        fan_in = mats[0].shape[1]
            if not layout:
                continue
            offsets = [0]
            for proj in projs:
                offsets.append(offsets[-1] + out_sizes[proj])
            a_layers, b_layers = [], []
            for li in range(num_layers):
                a_all = torch.zeros(width, fan_in)
                b_all = torch.zeros(offsets[-1], width)
                found = False
                for s, j, proj, col, _ in layout:
                    w = self.adapters[s].weights.get((li, proj))
                    if w is not None:
                        a, b = w
                        a_all[col : col + a.shape[0]] = a
                        b_all[offsets[j] : offsets[j + 1], col : col + a.shape[0]] = b
                        found = True
                a_layers.append(a_all.to(device, dtype) if found else None)
                b_layers.append(b_all.to(device, dtype) if found else None)
            self.A[kind], self.B[kind] = a_layers, b_layers
            self.col_slot[kind] = torch.tensor([s for s, _, _, _, r in layout for _ in range(r)], device=device)
            # adapter-major layout: each adapter's columns are one range, so a step computes only the span of the
            # adapters its rows use (views, no copies); loaded but idle adapters cost nothing
            spans: dict[int, tuple[int, int]] = {}
            for s, _, _, col, r in layout:
                lo, hi = spans.get(s, (col, col))
                spans[s] = (min(lo, col), max(hi, col + r))
            self.spans[kind] = spans
        self.dtype = dtype

    def masks(self, slots: torch.Tensor, active: set[int]) -> dict[str, tuple[int, int, torch.Tensor]]:
        """Per projection kind: the column span [lo, hi) of the `active` adapters and a [rows, hi - lo] mask, 1
        where the column belongs to the row's adapter (slot -1: none)."""
        out = {}
        for kind, cols in self.col_slot.items():
            ranges = [self.spans[kind][s] for s in active if s in self.spans[kind]]
            if ranges:
                lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
                out[kind] = (lo, hi, (slots[:, None] == cols[None, lo:hi]).to(self.dtype))
        return out

    def add(self, out: torch.Tensor, kind: str, li: int, x: torch.Tensor, masks: dict | None) -> torch.Tensor:
        """`out` (the base projection of `x`, a fresh tensor) plus the rows' adapter products, in place when the
        dtypes agree (3 small ops per projection)."""
        if masks is None or kind not in masks or self.A[kind][li] is None:
            return out
        lo, hi, mask = masks[kind]
        xa = x.to(self.dtype) @ self.A[kind][li][lo:hi].T
        xa.mul_(mask)
        b = self.B[kind][li][:, lo:hi]
        if out.dtype == self.dtype:
            return out.addmm_(xa, b.T)
        return out + (xa @ b.T).to(out.dtype)


@dataclass
class Chunk:
    """Prompt positions [start, start + len(embeds)) of the sequence `key`; `last` marks the prompt's end."""

    key: object
    embeds: torch.Tensor  # [q, hidden]
    start: int
    last: bool


class LlamaRunner:
    """See the module docstring. Not thread-safe: the engine's scheduler thread owns it."""

    @staticmethod
    def unsupported_reason(model) -> str | None:
        try:
            llm = model.model.language_model
        except AttributeError:
            return "not a transformers Llava-style model (model.model.language_model)"
        cfg = llm.config
        if cfg.model_type not in SUPPORTED_TYPES:
            return f"LLM type {cfg.model_type!r} (this runner computes {', '.join(SUPPORTED_TYPES)})"
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False:
            if cfg.sliding_window < cfg.max_position_embeddings:
                return f"sliding-window attention ({cfg.sliding_window})"
        rope = getattr(llm.rotary_emb, "rope_type", "default")
        if rope not in STATIC_ROPE:
            return f"RoPE type {rope!r} depends on the sequence length"
        if getattr(cfg, "hidden_act", "silu") not in ACT2FN:
            return f"activation {cfg.hidden_act!r}"
        weight = model.get_input_embeddings().weight
        if weight.device.type == "meta" or any(p.device != weight.device for p in llm.parameters()):
            return "the LLM's parameters are not all on one device"
        if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
            return "a bitsandbytes/transformers-quantized model"
        return None

    def __init__(self, model, *, vocab_limit: int, image_token_id: int, max_rows: int, context_length: int,
                 kv_dtype: torch.dtype | None = None):
        llm = model.model.language_model
        cfg = llm.config
        self.num_layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.act = ACT2FN[cfg.hidden_act]
        self.embed = llm.embed_tokens
        self.norm = llm.norm
        self.rotary = llm.rotary_emb
        self.device = self.embed.weight.device
        # the dtype of dense weights / of the quantized layers' prefill copies
        self.compute_dtype = next((m.compute_dtype for m in llm.modules() if isinstance(m, QuantLinear)),
                                  self.embed.weight.dtype)
        self._quant_modules = [m for m in llm.modules() if isinstance(m, QuantLinear)]
        self.quantized = bool(self._quant_modules)
        self.released_dense_bytes = 0
        # decode activations: float32 through the quantized kernels, else the weights' dtype
        self.act_dtype = torch.float32 if self.quantized else self.compute_dtype
        self.kv_dtype = kv_dtype or self.compute_dtype
        self.layers = []
        for layer in llm.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                attn_norm=layer.input_layernorm, qkv=_fuse([a.q_proj, a.k_proj, a.v_proj]), o=_linear(a.o_proj),
                mlp_norm=layer.post_attention_layernorm, gate_up=_fuse([m.gate_proj, m.up_proj]),
                down=_linear(m.down_proj), attn_norm_w=layer.input_layernorm.weight.detach().float().contiguous(),
                mlp_norm_w=layer.post_attention_layernorm.weight.detach().float().contiguous(),
            ))
        self.final_norm_w = self.norm.weight.detach().float().contiguous()
        # decode through the fused CPU kernels when they are built and the KV dtype is one they read; int4 models
        # with SiLU run each decoder layer as one kernel call
        self.fused = (self.device.type == "cpu" and kernels.available()
                      and self.kv_dtype in (torch.float32, torch.bfloat16))
        self._q4_layers = self._int4_layers(cfg) if self.fused else None
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        self.intermediate = cfg.intermediate_size
        self.lm_head = _linear(model.get_output_embeddings())
        self.vocab_limit = vocab_limit
        self.image_token_id = image_token_id
        self.max_rows = max_rows
        self.context_length = context_length
        self.kernel_prefill_rows = self._measure_crossover() if self.quantized and self.fused else 0
        # rows and their KV: k/v [layers, rows, kv_heads, positions, head_dim]
        self._k = self._v = None
        self._row_of: dict[object, int] = {}
        self._key_of: list[object] = []
        self._lengths: list[int] = []
        self._adapter_of: list = []  # each row's LoRA adapter (llava.adapters.LoraAdapter) or None
        self._stacks: _LoraStacks | None = None
        hd_q, hd_kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self._lora_out = {"q_proj": hd_q, "k_proj": hd_kv, "v_proj": hd_kv, "o_proj": self.hidden,
                          "gate_proj": self.intermediate, "up_proj": self.intermediate, "down_proj": self.hidden}
        self._ready = 0  # rows [0, ready) decode; rows [ready, len) are still being prefilled
        self._cos = self._sin = None

    def _measure_crossover(self) -> int:
        """The most prefill rows for which the quantized kernels beat the dense copies on this machine (timed on
        the first layer's gate/up product, best of 3); every size when there are no dense copies. When the copies
        are not clearly faster even at the largest size (an AVX2 CPU multiplying float32: the kernels' int8
        products keep up), they are released: their memory is worth more than a few percent of prefill."""
        lin = self.layers[0].gate_up
        if getattr(lin, "dense", None) is None:
            return max(CROSSOVER_ROWS[-1], self.context_length)
        best, won, kernel, dense = 0, True, 0.0, 0.0
        with torch.inference_mode():
            for rows in CROSSOVER_ROWS:
                x = torch.randn(rows, lin.in_features)
                xd = x.to(lin.dense.dtype)
                lin.small(x), lin.large(xd)  # first calls build kernels/primitives
                kernel = min(_seconds(lambda: lin.small(x)) for _ in range(3))
                dense = min(_seconds(lambda: lin.large(xd)) for _ in range(3))
                won = won and kernel <= dense
                best = rows if won else best
        if dense > DENSE_WORTH * kernel:
            self.released_dense_bytes = self._release_dense()
            return max(CROSSOVER_ROWS[-1], self.context_length)
        return best

    def _release_dense(self) -> int:
        freed, seen = 0, set()
        for m in [*self._quant_modules, *(getattr(l, n) for l in self.layers for n in ("qkv", "o", "gate_up", "down"))]:
            for part in getattr(m, "parts", [m]):
                dense = getattr(part, "dense", None)
                if isinstance(part, QuantLinear) and dense is not None:
                    if dense.untyped_storage().data_ptr() not in seen:
                        seen.add(dense.untyped_storage().data_ptr())
                        freed += dense.untyped_storage().nbytes()
                    part.dense = None
        return freed

    def _int4_layers(self, cfg) -> list | None:
        if cfg.hidden_act != "silu":
            return None
        parts = [(l.qkv, l.o, l.gate_up, l.down) for l in self.layers]
        if not all(isinstance(m, Int4Linear) for group in parts for m in group):
            return None
        layers = [kernels.Q4Layer.of(*(m.matrix() for m in group), l.attn_norm_w, l.mlp_norm_w)
                  for group, l in zip(parts, self.layers)]
        array = (kernels.Q4Layer * len(layers))(*layers)
        array._keep = layers
        return array

    # ------------------------------------------------------------------------------------------------ rows

    @property
    def num_rows(self) -> int:
        return len(self._key_of)

    @property
    def num_tokens(self) -> int:
        return sum(self._lengths)

    @property
    def nbytes(self) -> int:
        return 0 if self._k is None else 2 * self._k.numel() * self._k.element_size()

    def has(self, key) -> bool:
        return key in self._row_of

    def length(self, key) -> int:
        return self._lengths[self._row_of[key]]

    # ------------------------------------------------------------------------------------------------ adapters

    supports_adapters = True

    @property
    def adapters(self) -> list:
        return [] if self._stacks is None else list(self._stacks.adapters)

    def set_adapters(self, adapters: list) -> None:
        """Make these LoRA adapters available to rows (replacing the previous set); rows' adapters must be in it."""
        missing = {a.name for a in self._adapter_of if a is not None and a not in adapters}
        if missing:
            raise ValueError(f"adapters {sorted(missing)} are still used by rows")
        dtype = torch.float32 if self.device.type == "cpu" else self.compute_dtype
        self._stacks = (_LoraStacks(adapters, self._lora_out, self.num_layers, dtype, self.device)
                        if adapters else None)

    def _lora_masks(self, rows: list[int], repeats: list[int] | None = None) -> dict | None:
        """The masks of `rows` (each repeated `repeats[i]` times: one per prompt position in prefill); None when
        no adapter is loaded or none of the rows has one (the common case costs nothing)."""
        if self._stacks is None:
            return None
        slot = self._stacks.slot
        slots = [slot[a] if (a := self._adapter_of[r]) is not None else -1 for r in rows]
        active = set(slots) - {-1}
        if not active:
            return None
        t = torch.tensor(slots, device=self.device)
        if repeats is not None:
            t = t.repeat_interleave(torch.tensor(repeats, device=self.device))
        return self._stacks.masks(t, active)

    def _lora(self, out: torch.Tensor, kind: str, li: int, x: torch.Tensor, masks) -> torch.Tensor:
        return out if masks is None else self._stacks.add(out, kind, li, x, masks)

    def reserve(self, key, total_length: int, adapter=None) -> None:
        """A new (not yet ready) row for `key`, with room for `total_length` positions, computing with `adapter`
        (one of `set_adapters`', or None for the base)."""
        if key in self._row_of:
            raise KeyError(f"{key!r} already has a row")
        if adapter is not None and (self._stacks is None or adapter not in self._stacks.slot):
            raise ValueError(f"adapter {adapter.name!r} is not loaded in the runner")
        self._ensure(self.num_rows + 1, total_length)
        self._row_of[key] = self.num_rows
        self._key_of.append(key)
        self._lengths.append(0)
        self._adapter_of.append(adapter)

    def seed(self, key, kv: tuple[torch.Tensor, torch.Tensor], length: int) -> None:
        """Write the first `length` positions of an exported prefix (k, v [layers, kv_heads, n, head_dim])."""
        r = self._row_of[key]
        self._k[:, r, :, :length].copy_(kv[0][:, :, :length])
        self._v[:, r, :, :length].copy_(kv[1][:, :, :length])
        self._lengths[r] = length

    def export(self, key, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the row's first `length` positions: (k, v) [layers, kv_heads, length, head_dim]."""
        r = self._row_of[key]
        n = self._lengths[r] if length is None else length
        return self._k[:, r, :, :n].clone(), self._v[:, r, :, :n].clone()

    def release(self, key) -> None:
        r = self._row_of.pop(key)
        last = self.num_rows - 1
        if r < self._ready:  # keep ready rows contiguous: the last ready row fills the hole
            tail = self._ready - 1
            self._move(tail, r)
            self._ready -= 1
            r = tail
        self._move(last, r)
        self._key_of.pop()
        self._lengths.pop()
        self._adapter_of.pop()
        if not self._key_of:
            self._k = self._v = None  # an idle runner holds no KV memory

    def _move(self, src: int, dst: int) -> None:
        if src == dst:
            return
        n = self._lengths[src]
        self._k[:, dst, :, :n].copy_(self._k[:, src, :, :n])
        self._v[:, dst, :, :n].copy_(self._v[:, src, :, :n])
        self._lengths[dst] = n
        self._adapter_of[dst] = self._adapter_of[src]
        key = self._key_of[src]
        self._key_of[dst] = key
        self._row_of[key] = dst

    def _swap(self, a: int, b: int) -> None:
        n = max(self._lengths[a], self._lengths[b])
        for buf in (self._k, self._v):
            tmp = buf[:, a, :, :n].clone()
            buf[:, a, :, :n].copy_(buf[:, b, :, :n])
            buf[:, b, :, :n].copy_(tmp)
        self._lengths[a], self._lengths[b] = self._lengths[b], self._lengths[a]
        self._adapter_of[a], self._adapter_of[b] = self._adapter_of[b], self._adapter_of[a]
        ka, kb = self._key_of[a], self._key_of[b]
        self._key_of[a], self._key_of[b] = kb, ka
        self._row_of[ka], self._row_of[kb] = b, a

    def _make_ready(self, key) -> None:
        r = self._row_of[key]
        if r < self._ready:
            return
        self._swap(r, self._ready)
        self._ready += 1

    def _ensure(self, rows: int, positions: int) -> None:
        """Grow the KV buffers (amortized: rows double, positions grow by half) to hold rows x positions."""
        positions = min(max(positions, 1), self.context_length)
        if self._k is not None and rows <= self._k.shape[1] and positions <= self._k.shape[3]:
            return
        cur_rows, cur_pos = (0, 0) if self._k is None else (self._k.shape[1], self._k.shape[3])
        new_rows = max(rows, min(self.max_rows, max(1, 2 * cur_rows))) if rows > cur_rows else cur_rows
        new_pos = max(positions, cur_pos + cur_pos // 2) if positions > cur_pos else cur_pos
        new_pos = max(cur_pos, min(self.context_length, -(-new_pos // _T_ALIGN) * _T_ALIGN))
        shape = (self.num_layers, new_rows, self.kv_heads, new_pos, self.head_dim)
        k = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        if self._k is not None and self.num_rows:
            n = max(self._lengths)
            k[:, : self.num_rows, :, :n].copy_(self._k[:, : self.num_rows, :, :n])
            v[:, : self.num_rows, :, :n].copy_(self._v[:, : self.num_rows, :, :n])
        self._k, self._v = k, v

    def _rope_tables(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < upto:
            n = min(self.context_length, max(upto, 2 * (0 if self._cos is None else self._cos.shape[0]), 256))
            pos = torch.arange(n, device=self.device).unsqueeze(0)
            probe = torch.empty(0, dtype=torch.float32, device=self.device)
            cos, sin = self.rotary(probe, pos)
            self._cos, self._sin = cos[0].float(), sin[0].float()
        return self._cos, self._sin

    # --------------------------------------------------------------------------------------------- compute

    def _rms(self, norm: nn.Module, x: torch.Tensor, weight32: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused and x.dtype == torch.float32 and weight32 is not None and x.is_contiguous():
            out = torch.empty_like(x)  # one kernel call (torch's rms_norm is several ops on CPU)
            kernels.library().llava_add_rmsnorm(x.data_ptr(), None, weight32.data_ptr(), out.data_ptr(), x.shape[0],
                                                self.hidden, self.eps)
            return out
        weight = norm.weight if norm.weight.dtype == x.dtype else norm.weight.to(x.dtype)
        return F.rms_norm(x, (self.hidden,), weight, self.eps)

    def _rope(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """qk [S, heads, D] rotated at positions whose tables are cos/sin [S, 1, D] (transformers' rotate_half)."""
        half = self.head_dim // 2
        rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
        return torch.addcmul(qk * cos, rotated, sin)

    def _logits(self, x: torch.Tensor, few: bool) -> torch.Tensor:
        h = self._rms(self.norm, x.contiguous(), self.final_norm_w)
        logits = (self.lm_head.small(h) if few else self.lm_head.large(h)).float()
        logits[:, self.vocab_limit :] = float("-inf")
        logits[:, self.image_token_id] = float("-inf")
        return logits

    @torch.inference_mode()
    def prefill(self, chunks: list[Chunk]) -> dict[object, torch.Tensor]:
        """Run the chunks' positions through the LLM in one packed forward; logits [V] of each finished prompt."""
        if not chunks:
            return {}
        hd, nq, nkv = self.head_dim, self.heads, self.kv_heads
        rows, spans, pos = [], [], []
        offset = 0
        for c in chunks:
            r = self._row_of[c.key]
            q = c.embeds.shape[0]
            if self._lengths[r] != c.start:
                raise ValueError(f"chunk of {c.key!r} starts at {c.start} but its row holds {self._lengths[r]} positions")
            self._ensure(self.num_rows, c.start + q)
            rows.append(r)
            spans.append((offset, q, c.start))
            pos.append(torch.arange(c.start, c.start + q, device=self.device))
            offset += q
        # the residual stream in float32 where the fused kernels run (norms there are one call), else in the
        # weights' dtype; products run in the weights' dtype either way
        act = torch.float32 if self.fused else self.compute_dtype
        x = torch.cat([c.embeds for c in chunks]).to(act)  # [S, hidden]
        # a few rows read the weights once: the quantized kernels beat the dense prefill copies up to ~16-32 rows
        few = self.quantized and self.fused and x.shape[0] <= self.kernel_prefill_rows
        mm = (lambda lin, t: lin.small(t).to(t.dtype)) if few else (lambda lin, t: lin.large(t).to(t.dtype))
        positions = torch.cat(pos)
        cos_t, sin_t = self._rope_tables(int(positions.max()) + 1)
        cos = cos_t[positions].unsqueeze(1).to(act)
        sin = sin_t[positions].unsqueeze(1).to(act)
        masks = [None if start == 0 else
                 torch.ones(q, start + q, dtype=torch.bool, device=self.device).tril(start)
                 for _, q, start in spans]
        lora = self._lora_masks(rows, [q for _, q, _ in spans])
        for li, layer in enumerate(self.layers):
            h = self._rms(layer.attn_norm, x, layer.attn_norm_w)
            qkv = mm(layer.qkv, h)  # [S, (nq + 2 nkv) hd]
            qkv = self._lora(qkv, "qkv", li, h, lora)
            qk = self._rope(qkv[:, : (nq + nkv) * hd].reshape(-1, nq + nkv, hd), cos, sin)
            v = qkv[:, (nq + nkv) * hd :].reshape(-1, nkv, hd)
            outs = []
            for r, (o, q, start), mask in zip(rows, spans, masks):
                k_new = qk[o : o + q, nq:].transpose(0, 1)  # [nkv, q, hd]
                self._k[li, r, :, start : start + q] = k_new
                self._v[li, r, :, start : start + q] = v[o : o + q].transpose(0, 1)
                query = qk[o : o + q, :nq].transpose(0, 1).unsqueeze(0).to(self.kv_dtype)  # [1, nq, q, hd]
                keys = self._k[li, r : r + 1, :, : start + q]
                values = self._v[li, r : r + 1, :, : start + q]
                att = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=mask is None,
                                                     enable_gqa=nq != nkv)
                outs.append(att[0].transpose(0, 1).reshape(q, nq * hd))
            att = torch.cat(outs).to(act)
            o = mm(layer.o, att)
            o = self._lora(o, "o", li, att, lora)
            x = x + o
            h = self._rms(layer.mlp_norm, x, layer.mlp_norm_w)
            gu = mm(layer.gate_up, h)
            gu = self._lora(gu, "gate_up", li, h, lora)
            a = self.act(gu[:, : self.intermediate]) * gu[:, self.intermediate :]
            down = mm(layer.down, a)
            down = self._lora(down, "down", li, a, lora)
            x = x + down
        for r, (_, q, start) in zip(rows, spans):
            self._lengths[r] = start + q
        finished = [(c.key, o + q - 1) for c, (o, q, _) in zip(chunks, spans) if c.last]
        if not finished:
            return {}
        logits = self._logits(x[[i for _, i in finished]], few=few)
        for key, _ in finished:
            self._make_ready(key)
        return {key: logits[j] for j, (key, _) in enumerate(finished)}

    @torch.inference_mode()
    def decode(self, keys: list, tokens: list[int]) -> torch.Tensor:
        """One token for every ready row; `keys` must name all of them. Returns logits [len(keys), V] in keys' order."""
        b = self._ready
        if len(keys) != b:
            raise ValueError(f"decode needs all {b} ready rows, got {len(keys)} keys")
        rows = [self._row_of[k] for k in keys]
        by_row = [0] * b
        for k, r in zip(tokens, rows):
            by_row[r] = k
        lengths = self._lengths[:b]
        longest = max(lengths) + 1
        self._ensure(self.num_rows, longest)
        pos = torch.tensor(lengths, device=self.device)
        cos_t, sin_t = self._rope_tables(longest)
        tokens_t = torch.tensor(by_row, device=self.device)
        lora = self._lora_masks(list(range(b)))
        if self._q4_layers is not None and lora is None:
            logits = self._decode_int4(tokens_t, pos, cos_t[pos].contiguous(), sin_t[pos].contiguous())
        elif self.fused:
            logits = self._decode_fused(tokens_t, pos, cos_t[pos], sin_t[pos], lora)
        else:
            logits = self._decode_torch(tokens_t, pos, cos_t, sin_t, lengths, lora)
        for r in range(b):
            self._lengths[r] += 1
        return logits[torch.tensor(rows, device=self.device)] if rows != list(range(b)) else logits

    def _step_buffers(self, b: int) -> dict[str, torch.Tensor]:
        bufs = self._buffers.get(b)
        if bufs is None:
            hd, nq, nkv, f32 = self.head_dim, self.heads, self.kv_heads, torch.float32
            ws = max((m.scratch(b).numel() for layer in self._q4_layers
                      for m in (layer.qkv, layer.o, layer.gate_up, layer.down)), default=0)
            bufs = self._buffers[b] = {
                "h": torch.empty(b, self.hidden, dtype=f32), "qkv": torch.empty(b, (nq + 2 * nkv) * hd, dtype=f32),
                "att": torch.empty(b, nq * hd, dtype=f32), "gu": torch.empty(b, 2 * self.intermediate, dtype=f32),
                "act": torch.empty(b, self.intermediate, dtype=f32), "ws": torch.empty(ws, dtype=torch.uint8),
                "scores": torch.empty(torch.get_num_threads() * self.context_length * (nq // nkv), dtype=f32),
            }
        return bufs

    def _decode_int4(self, tokens: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """All decoder layers in one `llava_q4_decode_layers` call (see llava/kernels/cpu.c), then the LM head."""
        lib = kernels.library()
        b, hd, nq, nkv, hidden = tokens.shape[0], self.head_dim, self.heads, self.kv_heads, self.hidden
        bufs = self._step_buffers(b)
        x = self.embed(tokens).float().contiguous()  # [B, hidden]: the residual stream, updated in place
        threads = torch.get_num_threads()
        if bufs["scores"].numel() < threads * self.context_length * (nq // nkv):
            bufs["scores"] = torch.empty(threads * self.context_length * (nq // nkv), dtype=torch.float32)
        k_all, v_all = self._k, self._v
        ptr = {name: t.data_ptr() for name, t in bufs.items()}
        lib.llava_q4_decode_layers(
            self._q4_layers, len(self._q4_layers), x.data_ptr(), b, hidden, nq, nkv, hd, self.intermediate, self.eps,
            cos.data_ptr(), sin.data_ptr(), pos.data_ptr(), k_all.data_ptr(), v_all.data_ptr(),
            int(self.kv_dtype == torch.bfloat16), k_all.stride(0), k_all.stride(1), k_all.stride(2),
            self.final_norm_w.data_ptr(), ptr["h"], ptr["qkv"], ptr["att"], ptr["gu"], ptr["act"], ptr["ws"],
            ptr["scores"], self.context_length, kernels.isa(), threads)
        logits = self.lm_head.small(bufs["h"]).float()
        logits[:, self.vocab_limit :] = float("-inf")
        logits[:, self.image_token_id] = float("-inf")
        return logits

    def _decode_fused(self, tokens: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, lora=None) -> torch.Tensor:
        """The decode step as ~9 calls per layer: fused norm(+residual), q/k/v product, RoPE, attention with the KV
        write, o product, norm(+residual), gate/up product, SiLU*up, down product. Activations float32."""
        lib = kernels.library()
        b, hd, nq, nkv, hidden = tokens.shape[0], self.head_dim, self.heads, self.kv_heads, self.hidden
        threads = torch.get_num_threads()
        x = self.embed(tokens).float().contiguous()  # [B, hidden]: the residual stream, updated in place
        h = torch.empty_like(x)
        att = torch.empty((b, nq * hd), dtype=torch.float32)
        pos = pos.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        kv_bf16 = int(self.kv_dtype == torch.bfloat16)
        k_all, v_all = self._k, self._v
        layer_bytes = k_all.stride(0) * k_all.element_size()
        row_stride, head_stride = k_all.stride(1), k_all.stride(2)
        width = (nq + 2 * nkv) * hd
        scale = hd ** -0.5
        delta_ptr = None
        inter = self.intermediate
        for li, layer in enumerate(self.layers):
            lib.llava_add_rmsnorm(x.data_ptr(), delta_ptr, layer.attn_norm_w.data_ptr(), h.data_ptr(), b, hidden,
                                  self.eps)
            qkv = layer.qkv.small(h)
            if qkv.dtype != torch.float32:
                qkv = qkv.float()
            qkv = self._lora(qkv, "qkv", li, h, lora)
            base = qkv.data_ptr()
            lib.llava_rope(base, cos.data_ptr(), sin.data_ptr(), b, width, nq + nkv, hd)
            rc = lib.llava_decode_attention(
                base, width, base + nq * hd * 4, base + (nq + nkv) * hd * 4, width,
                k_all.data_ptr() + li * layer_bytes, v_all.data_ptr() + li * layer_bytes, kv_bf16, row_stride,
                head_stride, pos.data_ptr(), att.data_ptr(), b, nq, nkv, hd, scale, threads)
            if rc != 0:
                raise MemoryError("decode attention could not allocate its scratch")
            o = layer.o.small(att)
            o = o if o.dtype == torch.float32 else o.float()  # kept referenced until the call returns
            o = self._lora(o, "o", li, att, lora)
            lib.llava_add_rmsnorm(x.data_ptr(), o.data_ptr(), layer.mlp_norm_w.data_ptr(), h.data_ptr(), b,
                                  hidden, self.eps)
            gu = layer.gate_up.small(h)
            gu = self._lora(gu, "gate_up", li, h, lora)
            a = self.act(gu[:, :inter]) * gu[:, inter:]
            down = layer.down.small(a)
            delta = down if down.dtype == torch.float32 else down.float()
            delta = self._lora(delta, "down", li, a, lora)
            delta_ptr = delta.data_ptr()
        lib.llava_add_rmsnorm(x.data_ptr(), delta_ptr, self.final_norm_w.data_ptr(), h.data_ptr(), b, hidden, self.eps)
        logits = self.lm_head.small(h).float()
        logits[:, self.vocab_limit :] = float("-inf")
        logits[:, self.image_token_id] = float("-inf")
        return logits

    def _decode_torch(self, tokens, pos, cos_t, sin_t, lengths, lora=None) -> torch.Tensor:
        b = tokens.shape[0]
        longest = max(lengths) + 1
        hd, nq, nkv = self.head_dim, self.heads, self.kv_heads
        cos = cos_t[pos].unsqueeze(1).to(self.act_dtype)
        sin = sin_t[pos].unsqueeze(1).to(self.act_dtype)
        same = min(lengths) == longest - 1
        mask = None if same else (torch.arange(longest, device=self.device) <= pos[:, None]).view(b, 1, 1, longest)
        row_idx = torch.arange(b, device=self.device)
        x = self.embed(tokens).to(self.act_dtype)  # [B, hidden]
        for li, layer in enumerate(self.layers):
            h = self._rms(layer.attn_norm, x)
            qkv = layer.qkv.small(h)
            qkv = self._lora(qkv, "qkv", li, h, lora)
            qk = self._rope(qkv[:, : (nq + nkv) * hd].view(b, nq + nkv, hd), cos, sin)
            k_new = qk[:, nq:].to(self.kv_dtype)
            v_new = qkv[:, (nq + nkv) * hd :].view(b, nkv, hd).to(self.kv_dtype)
            if same:
                self._k[li, :b, :, longest - 1] = k_new
                self._v[li, :b, :, longest - 1] = v_new
            else:
                self._k[li, row_idx, :, pos] = k_new
                self._v[li, row_idx, :, pos] = v_new
            # the query heads of one KV head attend as that head's rows: no K/V expansion for GQA
            query = qk[:, :nq].reshape(b, nkv, nq // nkv, hd).to(self.kv_dtype)
            att = F.scaled_dot_product_attention(query, self._k[li, :b, :, :longest], self._v[li, :b, :, :longest],
                                                 attn_mask=mask)
            att = att.reshape(b, nq * hd).to(self.act_dtype)
            o = layer.o.small(att).to(self.act_dtype)
            o = self._lora(o, "o", li, att, lora)
            x = x + o
            h = self._rms(layer.mlp_norm, x)
            gu = layer.gate_up.small(h)
            gu = self._lora(gu, "gate_up", li, h, lora)
            a = self.act(gu[:, : self.intermediate]) * gu[:, self.intermediate :]
            down = layer.down.small(a).to(self.act_dtype)
            down = self._lora(down, "down", li, a, lora)
            x = x + down
        return self._logits(x, few=True)
