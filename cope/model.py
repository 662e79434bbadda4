"""Decoder-only Transformer (Flax NNX) with a configurable position encoding."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cope import backends as A
from cope import functional as F
from cope.encodings import (
    AbsolutePositions,
    CoPETable,
    RelativeTable,
    SinusoidalPositions,
    parse_encoding,
)

MLPS = ("relu", "gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of `Transformer`, validated at construction (one-line errors).

    Defaults are the paper's synthetic-task model: 4 layers, 256 wide, 4 heads, post-norm, ReLU,
    tied embeddings. `GPT2_SMALL` below is the WikiText shape.
    """

    vocab_size: int
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: = num_heads (multi-head attention)
    mlp_dim: int | None = None  # None: 4 * d_model
    mlp: str = "relu"
    norm: str = "layernorm"
    post_norm: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    use_bias: bool = True
    encoding: str = "cope"
    max_len: int = 512  # absolute/sinusoidal table size; default for npos and the relative cap
    npos: int | None = None  # CoPE table size; None: max_len + 1 (position 0 is reachable)
    cope_shared: bool = False  # one CoPE table for all layers
    cope_nodiv: bool = False  # position term added after 1/sqrt(d) (paper Appendix B)
    cope_sep_key: bool = False  # separate gate-key projection (official --cope-sep-key)
    rel_max_distance: int | None = None  # relative table size; None: max_len
    rope_base: float = 10000.0
    # One attention knob for training, prefill and decoding: "auto" (kernels where they serve
    # the call on a GPU, else XLA), "xla", "pallas" or a backend name (cope.backends.IMPLS).
    attention_impl: str = "auto"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each block in the backward pass (saves CoPE's T² memory)
    # Recompute only CoPE attention in the backward pass: keeps q, k, v and the table instead of
    # ~10 [B, H, T, S] float32 intermediates per layer, for one extra CoPE forward.
    cope_remat: bool = False

    def __post_init__(self):
        def fail(field: str, why: str):
            raise ValueError(f"ModelConfig.{field}: {why}, got {getattr(self, field)!r}")

        for field in ("vocab_size", "num_layers", "d_model", "num_heads", "max_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(field, "must be a positive int")
        for field in ("num_kv_heads", "mlp_dim", "npos", "rel_max_distance"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value <= 0):
                fail(field, "must be a positive int or None")
        if self.d_model % self.num_heads:
            fail("d_model", f"must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.kv_heads:
            fail("num_kv_heads", f"must divide num_heads={self.num_heads}")
        if self.mlp not in MLPS:
            fail("mlp", f"must be one of {MLPS}")
        if self.norm not in NORMS:
            fail("norm", f"must be one of {NORMS}")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "must be in [0, 1)")
        if self.attention_impl not in A.IMPLS:
            fail("attention_impl", f"must be one of {A.IMPLS}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                fail(field, f"must be one of {DTYPES}")
        try:
            spec = parse_encoding(self.encoding)
        except ValueError as e:
            raise ValueError(f"ModelConfig.{e}") from None
        if spec.rope and self.head_dim % 2:
            fail("d_model", f"rope needs an even head_dim, head_dim is {self.head_dim}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a mapping (e.g. a ConfigDict); unknown keys raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known: {sorted(fields)}")
        return cls(**dict(values))

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim or 4 * self.d_model

    @property
    def cope_npos(self) -> int:
        return self.npos or self.max_len + 1

    @property
    def rel_distance(self) -> int:
        return self.rel_max_distance or self.max_len

    @property
    def spec(self):
        return parse_encoding(self.encoding)


SYNTHETIC = dict(num_layers=4, d_model=256, num_heads=4, post_norm=True, mlp="relu")
GPT2_SMALL = dict(
    num_layers=12,
    d_model=768,
    num_heads=12,
    max_len=1024,
    npos=64,
    post_norm=False,
    mlp="gelu",
    tie_embeddings=True,
)


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


class Attention(nnx.Module):
    """Multi-head (grouped-query) self-attention with the configured position encoding."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dense = dict(
            use_bias=cfg.use_bias,
            dtype=_dtype(cfg.dtype),
            param_dtype=_dtype(cfg.param_dtype),
            rngs=rngs,
        )
        d, hd = cfg.d_model, cfg.head_dim
        self.query = nnx.Linear(d, cfg.num_heads * hd, **dense)
        self.key = nnx.Linear(d, cfg.kv_heads * hd, **dense)
        self.value = nnx.Linear(d, cfg.kv_heads * hd, **dense)
        self.out = nnx.Linear(cfg.num_heads * hd, d, **dense)
        spec = cfg.spec
        self.gate_key = nnx.data(
            nnx.Linear(d, cfg.kv_heads * hd, **dense) if (spec.cope and cfg.cope_sep_key) else None
        )
        self.cope = nnx.data(
            CoPETable(cfg.cope_npos, hd, param_dtype=_dtype(cfg.param_dtype))
            if (spec.cope and not cfg.cope_shared)
            else None
        )

        # Set by `attention_intermediates`: sow the reference's logits/probs (and CoPE gates and
        # positions) under nnx.Intermediate "attention".
        self.sow_intermediates = False

    def project(self, x: jax.Array, positions: jax.Array):
        """x [B, T, d] -> q [B, T, H, D], k, v (and gate keys or None) [B, T, K, D].

        RoPE, when on, rotates q and k here, so cached keys are stored already rotated.
        """
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.query(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.key(x).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        v = self.value(x).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        gate_k = None
        if self.gate_key is not None:
            gate_k = self.gate_key(x).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        if cfg.spec.rope:
            q = F.rope(q, positions, base=cfg.rope_base)
            k = F.rope(k, positions, base=cfg.rope_base)
        return q, k, v, gate_k

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,
        lengths: jax.Array | None,
        rel_table: jax.Array | None,
        cope_table: jax.Array | None,
        segment_ids: jax.Array | None = None,
        cache=None,
        softmax: str = "unified_max",
        phi: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """x [B, T, d] -> (out [B, T, d], this layer's updated cache or None).

        Without `cache` the T tokens attend causally among themselves (`lengths` masks right
        padding). With a layer cache (`decoding.LayerCache`: buffers k, v, gate_k, the valid
        `lengths` [B] before and after this call, a static `fresh` flag and `append`), the new
        keys are written at each row's length and the queries attend to the whole buffer: one
        token per row is a decode step (masked by the new lengths alone), several a causal
        chunk; a `fresh` (empty) cache is a prefill, which attends among the new tokens only.
        """
        cfg = self.cfg
        spec = cfg.spec
        b, t, _ = x.shape
        q, k, v, gate_k = self.project(x, positions)
        q_offset = None  # the relative term's query placement: the last query at the last key
        mask = dict(causal=True, lengths=lengths, segment_ids=segment_ids)
        new_cache = None
        if cache is not None:
            new_cache = cache.append(k, v, gate_k)
            if not cache.fresh:  # attend to the whole buffer
                k, v, gate_k = new_cache.k, new_cache.v, new_cache.gate_k
                q_offset = cache.lengths  # [B], the position of each row's first new token
                if t == 1:  # a decode step: the new lengths are the whole mask
                    mask = dict(causal=False, lengths=new_cache.lengths)
                else:
                    mask = dict(causal=True, lengths=new_cache.lengths, q_offset=q_offset)
        bias = None
        if spec.relative:
            bias = F.relative_logits(q, rel_table, k.shape[1], q_offset=q_offset)
        cope = None
        if spec.cope:
            table = self.cope.table[...] if self.cope is not None else cope_table
            cope = F.CoPE(table=table, gate_k=gate_k, nodiv=cfg.cope_nodiv)
        attend = functools.partial(
            A.attend, impl=cfg.attention_impl, softmax=softmax, phi=phi, **mask
        )
        if self.sow_intermediates:
            out, parts = attend(q, k, v, bias=bias, cope=cope, intermediates=True)
            self.sow(nnx.Intermediate, "attention", parts)
        else:
            if cfg.cope_remat and spec.cope:
                attend = jax.checkpoint(attend)
            out = attend(q, k, v, bias=bias, cope=cope)  # [B, T, H, D]
        return self.out(out.reshape(b, t, -1)), new_cache


class MLP(nnx.Module):
    """Position-wise feed-forward network: ReLU, GELU or SwiGLU."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dense = dict(
            use_bias=cfg.use_bias,
            dtype=_dtype(cfg.dtype),
            param_dtype=_dtype(cfg.param_dtype),
            rngs=rngs,
        )
        self.kind = cfg.mlp
        self.up = nnx.Linear(cfg.d_model, cfg.hidden_dim, **dense)
        self.gate = nnx.data(
            nnx.Linear(cfg.d_model, cfg.hidden_dim, **dense) if cfg.mlp == "swiglu" else None
        )
        self.down = nnx.Linear(cfg.hidden_dim, cfg.d_model, **dense)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.up(x)
        if self.kind == "relu":
            h = jax.nn.relu(h)
        elif self.kind == "gelu":
            h = jax.nn.gelu(h)
        else:
            h = jax.nn.silu(self.gate(x)) * h
        return self.down(self.dropout(h))


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    cls = nnx.LayerNorm if cfg.norm == "layernorm" else nnx.RMSNorm
    return cls(cfg.d_model, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs)


class Block(nnx.Module):
    """One decoder layer, pre-norm (x + f(norm x)) or post-norm (norm(x + f(x)))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.post_norm = cfg.post_norm
        self.attn_norm = _norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def residual(self, x: jax.Array, sublayer, norm) -> jax.Array:
        if self.post_norm:
            return norm(x + self.dropout(sublayer(x)))
        return x + self.dropout(sublayer(norm(x)))

    def __call__(self, x, *, cache=None, **attention) -> tuple[jax.Array, Any]:
        """x [B, T, d] -> (x [B, T, d], the attention layer's updated cache or None);
        `attention` holds `Attention.__call__`'s keyword arguments."""
        new_cache = None

        def attn(h: jax.Array) -> jax.Array:
            nonlocal new_cache
            out, new_cache = self.attn(h, cache=cache, **attention)
            return out

        x = self.residual(x, attn, self.attn_norm)
        return self.residual(x, self.mlp, self.mlp_norm), new_cache


class Transformer(nnx.Module):
    """Decoder-only language model: tokens [B, T] -> next-token logits [B, T, V] (float32).

    `lengths [B]` masks right padding out of the keys (padded queries still produce logits,
    which the loss masks). `positions [B, T]` default to 0..T-1.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        spec = cfg.spec
        pdt = _dtype(cfg.param_dtype)
        # The lookup runs in the parameter dtype: its gradient is a scatter-add, which is very
        # slow on GPUs in bf16 (atomics emulated with compare-and-swap, heavy contention).
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=pdt,
            param_dtype=pdt,
            embedding_init=nnx.initializers.normal(cfg.d_model**-0.5),
            rngs=rngs,
        )
        absolute = None
        if spec.absolute == "learned":
            absolute = AbsolutePositions(cfg.max_len, cfg.d_model, param_dtype=pdt, rngs=rngs)
        elif spec.absolute == "sinusoidal":
            absolute = SinusoidalPositions(cfg.max_len, cfg.d_model)
        # Optional submodules are wrapped in nnx.data so that None and a module are both data.
        self.absolute = nnx.data(absolute)
        self.relative = nnx.data(
            RelativeTable(cfg.rel_distance, cfg.head_dim, param_dtype=pdt, rngs=rngs)
            if spec.relative
            else None
        )
        self.shared_cope = nnx.data(
            CoPETable(cfg.cope_npos, cfg.head_dim, param_dtype=pdt)
            if (spec.cope and cfg.cope_shared)
            else None
        )
        self.embed_dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.data(None if cfg.post_norm else _norm(cfg, rngs))
        self.lm_head = nnx.data(
            None
            if cfg.tie_embeddings
            else nnx.Linear(
                cfg.d_model,
                cfg.vocab_size,
                use_bias=False,
                dtype=_dtype(cfg.dtype),
                param_dtype=pdt,
                rngs=rngs,
            )
        )

    def embed_tokens(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """tokens, positions [B, T] -> [B, T, d]: token (+ absolute position) embeddings."""
        x = self.embed(tokens).astype(_dtype(self.cfg.dtype))
        if self.absolute is not None:
            x = x + self.absolute(positions).astype(x.dtype)
        return self.embed_dropout(x)

    def shared_tables(self) -> tuple[jax.Array | None, jax.Array | None]:
        """(relative table, shared CoPE table), each None when unused."""
        rel = self.relative.table[...] if self.relative is not None else None
        cope = self.shared_cope.table[...] if self.shared_cope is not None else None
        return rel, cope

    def head(self, x: jax.Array) -> jax.Array:
        """Final hidden states [B, T, d] -> logits [B, T, V] float32."""
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.lm_head is not None:
            return self.lm_head(x).astype(jnp.float32)
        table = self.embed.embedding[...].astype(x.dtype)  # tied output embedding [V, d]
        return jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        lengths: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache=None,
        logits_at: jax.Array | None = None,
        softmax: str = "unified_max",
        phi: jax.Array | None = None,
    ):
        """tokens [B, T] int -> logits [B, T, V] float32, or (logits, cache) with a cache.

        Args:
          tokens: [B, T] token ids in [0, V). Concrete ids outside raise; traced ones give NaN
            logits for their row (an embedding lookup out of range), never a wrapped id.
          lengths: [B] int. Without a cache, the valid (unpadded) tokens per row: keys past it
            are masked, padded queries still produce logits. With a cache, how many of the T
            new tokens of each row are valid (default T; 0 leaves a row's cache unchanged).
          positions: [B, T] token positions, default 0..T-1 (from 0 in each segment), or each
            row's cache length + t.
          segment_ids: [B, T] int, packed rows: several sequences per row, each a run of equal
            ids; attention stays within a segment and positions restart in each, so a packed
            row gives what each sequence gives alone. Not with a cache.
          cache: a `decoding.KVCache`. The T tokens continue each row of the cache: a fresh
            (empty) cache is filled by a prefill, else they are appended (T = 1: a decode step).
          logits_at: [B] int, return only the logits [B, V] at index logits_at[b] (generation
            reads one position; the LM head on all of them costs B·T·V floats).
          softmax, phi: the split-KV decode kernels' softmax mode and unified max φ (scalar or
            [num_layers], in scaled-logit units; see `decoding.calibrate`).

        Returns:
          logits [B, T, V] (or [B, V] with `logits_at`) float32; with a cache, (logits, the
          updated cache).
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq_len], got shape {tokens.shape}")
        tokens = self._checked_tokens(tokens)
        b, t = tokens.shape
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) cannot be used with a cache")
            if segment_ids.shape != tokens.shape:
                raise ValueError(
                    f"segment_ids must have the shape of tokens {tokens.shape}, "
                    f"got {segment_ids.shape}"
                )
            if positions is None:
                positions = segment_positions(segment_ids)
        if positions is None and cache is not None and not cache.fresh:
            positions = cache.lengths[:, None]  # [B, 1]: each row's next position
            if t > 1:
                positions = positions + jnp.arange(t, dtype=jnp.int32)
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if self.absolute is not None and cache is None and t > self.cfg.max_len:
            raise ValueError(
                f"sequence length {t} exceeds the absolute position table "
                f"(ModelConfig.max_len={self.cfg.max_len}); learned/sinusoidal absolute PE "
                "cannot extrapolate"
            )
        if phi is not None:
            phi = jnp.broadcast_to(jnp.asarray(phi, jnp.float32), (self.cfg.num_layers,))
        x = self.embed_tokens(tokens, positions)
        rel_table, cope_table = self.shared_tables()

        def run_block(block: Block, x: jax.Array, layer_cache, layer_phi):
            return block(
                x,
                cache=layer_cache,
                positions=positions,
                lengths=lengths,
                rel_table=rel_table,
                cope_table=cope_table,
                segment_ids=segment_ids,
                softmax=softmax,
                phi=layer_phi,
            )

        if self.cfg.remat:
            run_block = nnx.remat(run_block)
        layers = [None] * len(self.blocks)
        if cache is not None:
            layers = cache.layers(t if lengths is None else lengths)
        for i, block in enumerate(self.blocks):
            layer_phi = None if phi is None else phi[i]
            x, layers[i] = run_block(block, x, layers[i], layer_phi)
        if logits_at is not None:
            index = jnp.reshape(logits_at, (-1, 1, 1))
            x = jnp.take_along_axis(x, index, axis=1)  # [B, 1, d]
            logits = self.head(x)[:, 0]
        else:
            logits = self.head(x)
        if cache is None:
            return logits
        return logits, cache.with_layers(layers)

    def _checked_tokens(self, tokens: jax.Array) -> jax.Array:
        """Raises on concrete ids outside [0, V); maps traced ones there to V (NaN rows)."""
        vocab = self.cfg.vocab_size
        if not jnp.issubdtype(jnp.asarray(tokens).dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if not isinstance(tokens, jax.core.Tracer):
            ids = np.asarray(tokens)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise ValueError(
                    f"token ids must be in [0, vocab_size={vocab}), "
                    f"got min {ids.min()} max {ids.max()}"
                )
            return jnp.asarray(tokens)
        # jnp.take fills out-of-range rows with NaN but wraps negative ids: send those out too.
        return jnp.where(tokens < 0, vocab, tokens)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int positions that restart at 0 where segment_ids changes along the row."""
    t = segment_ids.shape[1]
    index = jnp.arange(t, dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)  # [B, T] start of each segment
    return index - first


def attention_intermediates(
    model: Transformer, tokens: jax.Array, **kwargs
) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
    """Runs `model(tokens, **kwargs)` and returns (its output, one dict per layer) with the
    attention internals of each layer: float32 [B, H, T, S] `logits` (scaled softmax input,
    -inf where masked), `probs`, and for CoPE `gates` and `positions` p_ij.

    They come from the XLA reference whatever `attention_impl` says (the kernels keep no
    [T, S] tensor), so use analysis-sized batches. Traceable; the model is left as it was.
    """
    model.set_attributes(sow_intermediates=True)
    try:
        out, captured = nnx.capture(model, nnx.Intermediate)(tokens, **kwargs)
    finally:
        model.set_attributes(sow_intermediates=False)
    layers = [None] * len(model.blocks)
    for path, variable in nnx.to_flat_state(captured):
        if path[0] == "blocks" and path[-1] == "attention":
            layers[path[1]] = variable.get_value()[-1]
    return out, layers


def attention_backends(cfg: ModelConfig, *, batch: int = 1, seq_len: int = 128) -> dict:
    """Which backend serves each attention call of a `cfg` model on this device (or the
    abstract device being lowered for): {"train": name, "decode": name}, where a value is
    the one-line error when `cfg.attention_impl` names a backend that cannot serve the call."""
    dtype = jnp.dtype(cfg.dtype)
    h, k, d = cfg.num_heads, cfg.kv_heads, cfg.head_dim

    def shape(*dims):
        return jax.ShapeDtypeStruct(dims, dtype)

    def report(t: int, s: int, **mask) -> str:
        spec = cfg.spec
        bias = jax.ShapeDtypeStruct((batch, h, t, s), jnp.float32) if spec.relative else None
        cope = None
        if spec.cope:
            gate_k = shape(batch, s, k, d) if cfg.cope_sep_key else None
            cope = F.CoPE(table=shape(cfg.cope_npos, d), gate_k=gate_k, nodiv=cfg.cope_nodiv)
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
        try:
            return A.serving_backend(
                shape(batch, t, h, d),
                shape(batch, s, k, d),
                shape(batch, s, k, d),
                lengths=lengths,
                bias=bias,
                cope=cope,
                impl=cfg.attention_impl,
                **mask,
            )
        except ValueError as e:
            return str(e)

    return {
        "train": report(seq_len, seq_len, causal=True),
        "decode": report(1, seq_len, causal=False),
    }


def with_attention_impl(model: Transformer, impl: str) -> Transformer:
    """The same model (parameters shared, mode kept) with another `attention_impl`."""
    cfg = dataclasses.replace(model.cfg, attention_impl=impl)
    twin = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    nnx.update(twin, nnx.state(model))
    twin.set_attributes(deterministic=model.embed_dropout.deterministic)
    return twin
