"""GPT-Neo and GPT-NeoX as one model, driven by `Config`.

The model knows nothing of files, Hugging Face tensor names or quantization. Shapes in comments:
B batch, T new tokens, S cached + new tokens, H heads, D head dim, C model dim, V vocabulary.

The fused qkv projection is laid out per head, [H, 3, D] along its output (GPT-NeoX's layout);
checkpoint.py fuses GPT-Neo's separate q/k/v into it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neolm.config import Config
from neolm.ops import Linear


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _gelu_in_place(x):
    return torch.ops.aten.gelu_(x)


def _gelu_tanh_in_place(x):
    return torch.ops.aten.gelu_(x, approximate="tanh")


_GLOBAL_HOOKS = torch.nn.modules.module._global_forward_hooks  # torch's hooks on every module (one dict)


def _watched(module: nn.Module) -> bool:
    """Whether a forward hook sees `module`'s output: then nothing writes into that output afterwards (the in-place
    steps below save memory in inference, but a hook must keep what it saw, as in any PyTorch model)."""
    return bool(module._forward_hooks or _GLOBAL_HOOKS)


# name -> (the activation, the same in place: for inference, where no fresh (B, T, d_ff) tensor is needed);
# module-level functions, so that a model pickles
_ACTIVATIONS = {
    "gelu": (F.gelu, _gelu_in_place),
    "gelu_new": (_gelu_tanh, _gelu_tanh_in_place),
    "gelu_fast": (_gelu_tanh, _gelu_tanh_in_place),
    "gelu_pytorch_tanh": (_gelu_tanh, _gelu_tanh_in_place),
    "relu": (F.relu, torch.relu_),
}


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` tokens.

    k, v: (L, B, H, max_len, D) in `dtype`: a float dtype, or int8 codes with a scale per key and per value
    (k_scale, v_scale: (L, B, H, max_len) fp32; see quantize_kv). `length` counts the filled slots. `valid`
    (B, max_len), when set, is False at left-padding slots, which no query may attend to.
    """

    def __init__(self, config: Config, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.k_scale = self.v_scale = None
        if dtype == torch.int8:
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
        self.valid: torch.Tensor | None = None
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int) -> tuple:
        """Layer i's part, as Attention takes it: (k, v, k_scale, v_scale), the scales None for float caches."""
        scales = (None, None) if self.k_scale is None else (self.k_scale[i], self.v_scale[i])
        return self.k[i], self.v[i], *scales

    def rows(self, index: torch.Tensor, extra: int = 0) -> KVCache:
        """A new cache of batch rows `index` (their filled slots and `valid`), with room for `extra` more tokens."""
        out = KVCache.__new__(KVCache)
        end = self.length

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            taken = t.new_zeros(t.shape[0], len(index), t.shape[2], end + extra, *t.shape[4:])  # (L, n, H, S[, D])
            taken[:, :, :, :end] = t[:, index, :, :end]
            return taken

        out.k, out.v, out.k_scale, out.v_scale = map(take, (self.k, self.v, self.k_scale, self.v_scale))
        out.valid = None
        if self.valid is not None:
            out.valid = torch.ones(len(index), end + extra, dtype=torch.bool, device=self.valid.device)
            out.valid[:, :end] = self.valid[index, :end]
        out.length = end
        return out

    def slots(self, row: int, start: int, end: int) -> KVCache:
        """A new cache of one row: row `row`'s slots start .. end-1, as its slots 0 .. (filled, no padding)."""
        out = KVCache.__new__(KVCache)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, row : row + 1, :, start:end].clone()

        out.k, out.v, out.k_scale, out.v_scale = map(take, (self.k, self.v, self.k_scale, self.v_scale))
        out.valid, out.length = None, end - start
        return out

    def hide_padding(self, filled: torch.Tensor | None) -> None:
        """Left padding: `valid` False where filled (B, W), which covers the first W slots, is False (None: no
        padding, nothing hidden)."""
        if filled is not None:
            self.valid = torch.ones(filled.shape[0], self.max_len, dtype=torch.bool, device=filled.device)
            self.valid[:, : filled.shape[1]] = filled

    def reorder(self, index: torch.Tensor, start: int = 0) -> None:
        """Row i takes row index[i]'s filled slots from `start` on (beam search: each beam follows the one it
        continues)."""
        for t in (self.k, self.v, self.k_scale, self.v_scale):
            if t is not None:
                t[:, :, :, start : self.length] = t[:, index, :, start : self.length]
        if self.valid is not None:
            self.valid = self.valid[index]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None)

    def take_prefix(self, other: KVCache, n: int) -> None:
        """Hold `other`'s first n slots (of every row; same shape and dtype but for the length) as its own first n."""
        mine, theirs = (self.k, self.v, self.k_scale, self.v_scale), (other.k, other.v, other.k_scale, other.v_scale)
        for dst, src in zip(mine, theirs):
            if dst is not None:
                dst[:, :, :, :n] = src[:, :, :, :n]
        self.length = n

    @staticmethod
    def aligned(parts: list[tuple[KVCache, torch.Tensor]], room: int, spare: KVCache | None = None) -> KVCache:
        """One cache of rows `index` of each (cache, index), their filled slots right-aligned to one current
        slot, with room for `room` more tokens: each part's slots before the first that any of its rows uses
        are dropped, and `valid` hides every slot before each row's own. Rows keep their tokens in contiguous
        slots, so a local window (slot distance) stays a distance in positions.

        `spare`: a cache no longer used (none of `parts`), whose memory the new one takes where it is large
        enough: fresh memory is slow to fault in (~1 GB/s on a VM, against ~10 GB/s for a copy), so a batch that
        rebuilds its cache as sequences join swaps between two buffers. Fresh buffers get a quarter more than
        asked for, untouched until a larger cache needs it."""
        spans = []
        for cache, index in parts:
            first = 0
            if cache.valid is not None:  # the first slot any of these rows uses
                first = int(cache.valid[index, : cache.length].any(0).int().argmax())
            spans.append((first, cache.length))
        length = max(end - first for first, end in spans)
        rows = sum(len(index) for _, index in parts)
        base = parts[0][0]
        out = KVCache.__new__(KVCache)

        def empty(t: torch.Tensor | None, old: torch.Tensor | None) -> torch.Tensor | None:  # written before read
            if t is None:
                return None
            shape = (t.shape[0], rows, t.shape[2], length + room, *t.shape[4:])
            numel = math.prod(shape)
            if old is not None and old.dtype == t.dtype and old.untyped_storage().nbytes() >= numel * t.itemsize:
                return t.new_empty(0).set_(old.untyped_storage(), 0, shape)
            return t.new_empty(numel + numel // 4)[:numel].view(shape)

        olds = (spare.k, spare.v, spare.k_scale, spare.v_scale) if spare is not None else (None,) * 4
        out.k, out.v, out.k_scale, out.v_scale = map(empty, (base.k, base.v, base.k_scale, base.v_scale), olds)
        out.valid = torch.ones(rows, length + room, dtype=torch.bool, device=base.k.device)
        out.length = length
        row = 0
        for (cache, index), (first, end) in zip(parts, spans):
            to = length - (end - first)  # where this part's first slot lands
            rows_out = slice(row, row + len(index))
            for dst, src in zip(
                (out.k, out.v, out.k_scale, out.v_scale), (cache.k, cache.v, cache.k_scale, cache.v_scale)
            ):
                if dst is None:
                    continue
                dst[:, rows_out, :, :to] = 0  # hidden slots, read but weighed 0: any finite number
                for j, r in enumerate(index.tolist()):  # row by row: plain slices, no gathered copy
                    dst[:, row + j, :, to:length] = src[:, r, :, first:end]
            out.valid[rows_out, :to] = False
            if cache.valid is not None:
                out.valid[rows_out, to:length] = cache.valid[index, first:end]
            row += len(index)
        return out


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x (..., D) -> int8 codes (..., D) and fp32 scales (...), x ~ codes * scale: scale = max |x| / 127,
    codes = x / scale rounded to nearest even (0 where a row is all 0). The native decode step's put_kv does
    the same, number for number."""
    x = x.float()
    scale = x.abs().amax(dim=-1) * (1 / 127)
    codes = (x / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).round()
    return codes.to(torch.int8), scale


def update_cache(kv: tuple, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Write k, v (B, H, T, D) at slot `start` of a layer's cache (KVCache.layer); return its keys and values so
    far (B, H, S, D): in the cache's dtype, or an int8 cache's dequantized to fp32. start as a 0-d tensor (a
    step a CUDA graph replays, neolm.cuda_graphs): one token written there, and the whole cache returned (the
    caller's mask hides the slots past it)."""
    cache_k, cache_v, scale_k, scale_v = kv
    if isinstance(start, torch.Tensor):
        slot = start.view(1)
        if scale_k is None:
            cache_k.index_copy_(2, slot, k.to(cache_k.dtype))
            cache_v.index_copy_(2, slot, v.to(cache_v.dtype))
            return cache_k, cache_v
        for cache, scale, x in ((cache_k, scale_k, k), (cache_v, scale_v, v)):
            codes, row_scale = quantize_kv(x)
            cache.index_copy_(2, slot, codes)
            scale.index_copy_(2, slot, row_scale)
        return cache_k * scale_k[..., None], cache_v * scale_v[..., None]
    end = start + k.shape[2]
    if scale_k is None:
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        return cache_k[:, :, :end], cache_v[:, :, :end]
    cache_k[:, :, start:end], scale_k[:, :, start:end] = quantize_kv(k)
    cache_v[:, :, start:end], scale_v[:, :, start:end] = quantize_kv(v)
    return cache_k[:, :, :end] * scale_k[:, :, :end, None], cache_v[:, :, :end] * scale_v[:, :, :end, None]


def rotary_table(n_positions: int, dims: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n_positions, 2 * ceil(dims / 2)) of every position, in fp32 (rotate-half layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, device=device, dtype=torch.float32) / dims))
    freqs = torch.arange(n_positions, device=device, dtype=torch.float32)[:, None] * inv_freq  # (P, dims/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (P, dims)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding on the first cos.shape[-1] dims of x (B, ..., T, D); cos, sin broadcast
    against x[..., :dims]."""
    dims = cos.shape[-1]
    rot, rest = x[..., :dims], x[..., dims:]
    half1, half2 = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat((-half2, half1), dim=-1) * sin
    return torch.cat((rotated, rest), dim=-1)


class Attention(nn.Module):
    # fn(q (B, H, T, D), k, v (B, H, S, D), mask, scale) -> (B, T, H, D), or None to decline the call: a faster
    # kernel for the attention of prompts (neolm.native.attention sets it); None: scaled_dot_product_attention
    attend = None
    # fn(x (2, B, H, T, D), cos, sin (B, 1, T, dims)) -> whether it rotated q and k (x) in place, with apply_rotary's
    # numbers: a faster kernel for inference (neolm.native.attention sets it); None, or False back: apply_rotary
    rotate = None

    def __init__(self, config: Config, window: int | None = None):
        super().__init__()
        self.window = window  # None: global attention; w: each query sees the last w keys
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.scale = config.attn_scale
        self.qkv = Linear(config.d_model, 3 * config.d_model, bias=config.qkv_bias)
        self.proj = Linear(config.d_model, config.d_model, bias=config.out_bias)

    def heads(self, x, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, T, D) of x (B, T, C): GPT-NeoX's per-head [q k v] layout, q and k rotated."""
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head, 3, self.head_dim).permute(3, 0, 2, 1, 4)  # (3, B, H, T, D)
        rotated = rope is None or (self.rotate is not None and not _watched(self.qkv) and self.rotate(qkv[:2], *rope))
        (q, k), v = qkv[:2] if rotated else apply_rotary(qkv[:2], *rope), qkv[2]  # q and k rotated together
        return q, k, v

    def forward(self, x, rope, mask, kv: tuple | None, start: int):
        B, T, C = x.shape
        q, k, v = self.heads(x, rope)
        if kv is not None:  # write this step into the cache, attend over everything so far
            k, v = update_cache(kv, k, v, start)  # (B, H, S, D)
            if kv[2] is not None:  # an int8 cache: attention in fp32 over its dequantized numbers (as the native step)
                q = q.float()
            elif k.dtype != q.dtype:  # a cache in another float dtype (GPT.kv_dtype): its numbers, in q's dtype
                k, v = k.to(q.dtype), v.to(q.dtype)
        if mask is None and self.window is not None and T == 1:  # decoding: a local layer's last w keys
            k, v = k[:, :, -self.window :], v[:, :, -self.window :]
        y = self.attend(q, k, v, mask, self.scale) if self.attend is not None else None  # (B, T, H, D)
        if y is None and isinstance(mask, str):  # "causal": no padding, no window, no cache offset
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale).transpose(1, 2)
        elif y is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale).transpose(1, 2)
        return self.proj(y.reshape(B, T, C).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.fc = Linear(config.d_model, config.d_ff)
        self.act, self.act_ = _ACTIVATIONS[config.activation]
        self.proj = Linear(config.d_ff, config.d_model)

    def forward(self, x):
        h = self.fc(x)  # (B, T, d_ff)
        return self.proj(self.act(h) if h.requires_grad or _watched(self.fc) else self.act_(h))


class Block(nn.Module):
    def __init__(self, config: Config, window: int | None):
        super().__init__()
        self.window = window
        self.parallel = config.parallel_residual
        self.ln1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = Attention(config, window)
        self.ln2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, kv, start):
        a = self.attn(self.ln1(x), rope, mask, kv, start)
        if self.parallel:  # GPT-NeoX: x + attn(ln1 x) + mlp(ln2 x)
            m = self.mlp(self.ln2(x))
            if m.requires_grad or _watched(self.mlp):
                return m + a + x
            return m.add_(a).add_(x)  # (in place: no new activations)
        x = x + a
        m = self.mlp(self.ln2(x))
        return x + m if m.requires_grad or _watched(self.mlp) else m.add_(x)


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device, where models are built to receive a
    checkpoint's tensors (checkpoint.build_model): there torch's normal_ runs through its reference
    implementations, whose first use imports torch._dynamo, 1.1-1.4 s of every process's first load."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class GPT(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.wte = Embedding(config.vocab_size, config.d_model)
        self.wpe = Embedding(config.n_positions, config.d_model) if config.pos_embedding == "learned" else None
        self.blocks = nn.ModuleList(Block(config, w) for w in config.layer_windows)
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward (training memory)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # rotary cos/sin table, made on first use
        # fn(x (B, 1, C), positions (B, 1), cache, key_valid) -> every block's output for one token per sequence,
        # or None to decline the call; it writes into x and the cache (neolm.native.decode sets it)
        self.decode_step = None
        self.kv_dtype: torch.dtype | None = None  # the dtype of KV caches made for it (None: the model's dtype)
        self.tie_weights()

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype generation and scoring give this model's KV caches: kv_dtype, else the model's."""
        return self.kv_dtype or self.ln_f.weight.dtype

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def init_weights(self, std: float = 0.02) -> None:
        """Fresh random weights (GPT-2 style): N(0, std) matrices and embeddings, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.tie_weights()

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        key_valid: torch.Tensor | None = None,
        last_only: bool = False,
        head: bool = True,
        layers: int | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for tokens idx (B, T), or (B, 1, V) with last_only; head=False: the final hidden
        states (after ln_f) instead, (B, T, C), for callers that project only some positions. layers: run only the
        first `layers` blocks, then ln_f and the head (an early exit; a cache needs only those layers).

        With a cache, idx continues the cached sequence at slot cache.length and the cache advances.
        positions (B, T): position ids, default the slot numbers. key_valid (B, S): False marks padding
        keys (default: the cache's `valid`, else all valid).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {start + T} requested")
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        if key_valid is None and cache is not None:
            key_valid = cache.valid
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        if self.decode_step is not None and T == 1 and cache is not None:
            y = self.decode_step(x, positions, cache, key_valid, layers)
            if y is not None:
                cache.length = start + 1
                return self.lm_head(self.ln_f(y)) if head else self.ln_f(y)
        rope = self.rope_at(positions, x.dtype)
        masks = self._masks(T, start, key_valid, idx.device)
        for i, block in enumerate(self.blocks if layers is None else self.blocks[:layers]):
            kv = cache.layer(i) if cache is not None else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, masks[block.window], kv, start, use_reentrant=False)
            else:
                x = block(x, rope, masks[block.window], kv, start)
        if cache is not None:
            cache.length = start + T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.ln_f(x)) if head else self.ln_f(x)

    def rope_at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary cos, sin (B, 1, T, dims) of positions (B, T) in `dtype`; None for learned positions."""
        if not self.config.rotary_dims:
            return None
        cos, sin = self._rotary_table(positions.device)
        return cos[positions][:, None].to(dtype), sin[positions][:, None].to(dtype)

    def _rotary_table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp32 cos/sin table of every position, computed once per device."""
        if self._rope is None or self._rope[0].device != device:
            c = self.config
            self._rope = rotary_table(c.n_positions, c.rotary_dims, c.rotary_base, device)
        return self._rope

    def _masks(self, T: int, start: int, key_valid: torch.Tensor | None, device) -> dict:
        """Attention mask per window kind for queries at slots start .. start+T-1 (`visible`'s rules), or the
        cheaper forms where no mask is needed: "causal", or None for one new token without padding."""
        windows = set(self.config.layer_windows)
        if key_valid is None and start == 0 and windows == {None}:
            return {None: "causal"}
        if key_valid is None and T == 1:  # one new token sees every cached key (local layers slice theirs)
            return dict.fromkeys(windows)
        q = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
        return visible(windows, q, torch.arange(start + T, device=device)[None, :], key_valid)


def visible(windows, q: torch.Tensor, j: torch.Tensor, key_valid: torch.Tensor | None) -> dict:
    """Per window kind (None: global), True where query slot q (T, 1) may see key slot j (1, S): (T, S), or
    (B, 1, T, S) with key_valid (B, >= S). A query sees j <= q, and for a window w also j > q - w; padding keys
    are hidden, except each query's own slot, so that a padding row stays finite."""
    masks = {}
    for w in set(windows):
        m = j <= q if w is None else (j <= q) & (j > q - w)  # (T, S)
        if key_valid is not None:
            m = (m & key_valid[:, None, None, : j.shape[1]]) | (j == q)  # (B, 1, T, S)
        masks[w] = m
    return masks


def slot_masks(windows, max_len: int, slot: torch.Tensor, key_valid: torch.Tensor | None) -> dict:
    """`visible`'s masks for one new token per row at cache slot `slot` (a 0-d tensor) over the whole cache of
    `max_len` slots (a step a CUDA graph replays, which cannot slice by a number that changes per step)."""
    return visible(windows, slot.view(1, 1), torch.arange(max_len, device=slot.device)[None, :], key_valid)


def chunk_end(width: int, done: int, cols: int) -> int:
    """Where a chunk of `cols` of `width` columns that starts at column `done` ends: at done + cols, or at the end
    when fewer than twice `cols` are left (a short last chunk would run other kernels than one whole forward,
    few-row products, and might round differently)."""
    return width if width - done < 2 * cols else done + cols


def prefill(model: GPT, idx: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None,
            chunk: int | None = None, last_only: bool = False, head: bool = True) -> torch.Tensor:  # fmt: skip
    """model(idx, positions, cache, last_only=, head=) a chunk of `chunk` columns of idx (B, T) at a time (None:
    all at once; chunk_end's rule): a long prompt then needs one chunk's activations at a time, not the whole
    prompt's. The outputs are the chunks' together (with last_only: the last position's)."""
    T = idx.shape[1]
    if chunk is None or T < 2 * chunk:
        return model(idx, positions, cache, last_only=last_only, head=head)
    outputs, done = [], 0
    while done < T:
        end = chunk_end(T, done, chunk)
        part = None if positions is None else positions[:, done:end]
        if end < T and last_only:  # only the cache
            model(idx[:, done:end], part, cache, last_only=True, head=False)
        else:
            outputs.append(model(idx[:, done:end], part, cache, last_only=last_only, head=head))
        done = end
    return torch.cat(outputs, 1)  # (B, T or 1, V or C)
