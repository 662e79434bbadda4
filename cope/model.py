"""Decoder-only Transformer (Flax NNX) with a configurable position encoding."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

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
    attention_impl: str = "xla"
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
        if self.attention_impl not in F.IMPLS:
            fail("attention_impl", f"must be one of {F.IMPLS}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                fail(field, f"must be one of {DTYPES}")
        try:
            spec = parse_encoding(self.encoding)
        except ValueError as e:
            raise ValueError(f"ModelConfig.{e}") from None
        if spec.rope and self.head_dim % 2:
            fail("d_model", f"rope needs an even head_dim, head_dim is {self.head_dim}")
        if self.attention_impl == "pallas" and spec.needs_bias:
            fail(
                "attention_impl",
                f"'pallas' supports only none/absolute/sinusoidal/rope "
                f"encodings until the fused CoPE kernel exists (encoding={self.encoding!r})",
            )

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

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        gate_k: jax.Array | None,
        *,
        causal: bool,
        lengths: jax.Array | None,
        rel_table: jax.Array | None,
        cope_table: jax.Array | None,
        q_offset: jax.Array | int | None = None,
    ) -> jax.Array:
        """Attention over (possibly cached) keys -> [B, T, H, D]; `q_offset` places the queries
        for the relative term (default: the last query at the last key)."""
        cfg = self.cfg
        spec = cfg.spec
        bias = None
        if spec.relative:
            bias = F.relative_logits(q, rel_table, k.shape[1], q_offset=q_offset)
        if spec.cope:
            table = self.cope.table[...] if self.cope is not None else cope_table
            attend = functools.partial(
                F.cope_attention, causal=causal, nodiv=cfg.cope_nodiv, lengths=lengths
            )
            if cfg.cope_remat:
                attend = jax.checkpoint(attend)
            return attend(q, k, v, table, gate_k=gate_k, bias=bias)
        return F.attention(
            q, k, v, causal=causal, lengths=lengths, bias=bias, impl=cfg.attention_impl
        )

    def __call__(self, x, *, positions, lengths, rel_table, cope_table) -> jax.Array:
        b, t, _ = x.shape
        q, k, v, gate_k = self.project(x, positions)
        out = self.attend(
            q,
            k,
            v,
            gate_k,
            causal=True,
            lengths=lengths,
            rel_table=rel_table,
            cope_table=cope_table,
        )
        return self.out(out.reshape(b, t, -1))


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

    def __call__(self, x, *, positions, lengths, rel_table, cope_table) -> jax.Array:
        attn = lambda h: self.attn(
            h, positions=positions, lengths=lengths, rel_table=rel_table, cope_table=cope_table
        )
        x = self.residual(x, attn, self.attn_norm)
        return self.residual(x, self.mlp, self.mlp_norm)


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
    ) -> jax.Array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq_len], got shape {tokens.shape}")
        b, t = tokens.shape
        if self.absolute is not None and t > self.cfg.max_len:
            raise ValueError(
                f"sequence length {t} exceeds the absolute position table "
                f"(ModelConfig.max_len={self.cfg.max_len}); learned/sinusoidal absolute PE "
                "cannot extrapolate"
            )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed_tokens(tokens, positions)
        rel_table, cope_table = self.shared_tables()

        def run_block(block: Block, x: jax.Array) -> jax.Array:
            return block(
                x, positions=positions, lengths=lengths, rel_table=rel_table, cope_table=cope_table
            )

        if self.cfg.remat:
            run_block = nnx.remat(run_block)
        for block in self.blocks:
            x = run_block(block, x)
        return self.head(x)
