"""Transformer properties for every encoding: causality, padding, jit + grad, dtypes, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import make_model, tiny_config

from cope.encodings import ENCODINGS, sinusoidal_table
from cope.model import GPT2_SMALL, ModelConfig, Transformer, attention_backends, with_attention_impl

V = 13


def tiny(encoding, **overrides):
    return tiny_config(encoding, V, **({"dropout": 0.1} | overrides))


def tokens(b, t):
    return jax.random.randint(jax.random.key(np.random.randint(2**31)), (b, t), 0, V)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_future_tokens_do_not_change_past_logits(encoding):
    model = make_model(tiny(encoding))
    x = tokens(2, 11)
    cut = 6
    y = x.at[:, cut:].set((x[:, cut:] + 1) % V)
    a, b = model(x), model(y)
    np.testing.assert_allclose(a[:, :cut], b[:, :cut], atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(a[:, cut:] - b[:, cut:])).max() > 1e-4


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_right_padding_is_ignored(encoding):
    model = make_model(tiny(encoding))
    x = tokens(2, 10)
    lengths = jnp.array([10, 6], jnp.int32)
    y = x.at[1, 6:].set((x[1, 6:] + 3) % V)
    a, b = model(x, lengths=lengths), model(y, lengths=lengths)
    np.testing.assert_allclose(a[1, :6], b[1, :6], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_jit_grad_runs_and_is_finite(encoding):
    model = make_model(tiny(encoding, post_norm=encoding in ("cope", "none"), mlp="swiglu"))
    model.train()
    x = tokens(2, 9)

    @nnx.jit
    def loss_and_grad(model, x):
        def loss(model):
            logits = model(x[:, :-1])
            return -jnp.mean(
                jax.nn.log_softmax(logits)[jnp.arange(2)[:, None], jnp.arange(8)[None], x[:, 1:]]
            )

        return nnx.value_and_grad(loss)(model)

    value, grads = loss_and_grad(model, x)
    assert np.isfinite(float(value))
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)


@pytest.mark.parametrize(
    "encoding, overrides",
    [("rope", {}), ("cope", {}), ("cope+rope", dict(cope_sep_key=True, cope_nodiv=True))],
)
def test_pallas_attention_model_matches_xla(encoding, overrides):
    """The kernels (interpret mode on CPU: flash, or the fused CoPE kernel) behind the model ==
    the XLA path, logits and parameter gradients."""
    cfg = tiny(encoding, d_model=64, num_heads=2, num_kv_heads=1, **overrides)  # head_dim 32
    xla = make_model(cfg)
    if cfg.spec.cope:  # gates away from 0 so that positions vary
        xla.blocks[0].attn.query.kernel[...] *= 4.0
    pallas = with_attention_impl(xla, "pallas")
    assert attention_backends(pallas.cfg)["train"] == ("cope_flash" if cfg.spec.cope else "flash")
    x = tokens(2, 13)
    lengths = jnp.array([13, 8], jnp.int32)
    np.testing.assert_allclose(
        pallas(x, lengths=lengths), xla(x, lengths=lengths), atol=2e-4, rtol=2e-4
    )

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(x, lengths=lengths))[..., 0])

    got, want = nnx.grad(loss)(pallas), nnx.grad(loss)(xla)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-3)


def test_jit_equals_eager():
    model = make_model(tiny("cope+relative"))
    x = tokens(2, 7)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), model(x), atol=1e-5, rtol=1e-5)


def test_dropout_active_only_in_train_mode():
    model = make_model(tiny("rope", dropout=0.5))
    x = tokens(2, 7)
    np.testing.assert_array_equal(model(x), model(x))
    model.train()
    assert np.abs(np.asarray(model(x) - model(x))).max() > 0


@pytest.mark.parametrize("encoding", ["cope", "rope", "absolute"])
def test_bf16_params_and_compute(encoding):
    model = make_model(tiny(encoding, dtype="bfloat16", param_dtype="bfloat16"))
    logits = model(tokens(2, 8))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 8, V)
    assert np.isfinite(np.asarray(logits)).all()
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.bfloat16 for p in params)


def test_options_shared_cope_sep_key_prenorm_rmsnorm_untied_remat():
    cfg = tiny(
        "cope+rope",
        cope_shared=True,
        cope_sep_key=True,
        post_norm=False,
        norm="rmsnorm",
        tie_embeddings=False,
        remat=True,
        cope_nodiv=True,
    )
    model = make_model(cfg)
    x = tokens(2, 9)
    grads = nnx.jit(lambda m, x: nnx.grad(lambda m: m(x).mean())(m))(model, x)
    assert np.isfinite(np.asarray(grads.lm_head.kernel[...])).all()
    assert model.shared_cope is not None and model.blocks[0].attn.cope is None
    assert model.blocks[0].attn.gate_key is not None


@pytest.mark.parametrize("encoding", ["cope", "cope+relative"])
def test_cope_remat_same_logits_and_grads_smaller_residuals(encoding):
    """cope_remat recomputes CoPE attention in the backward pass: same values, and the saved
    residuals no longer hold the [B, H, T, T] float32 intermediates."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    x = tokens(2, 33)

    def loss(model):
        return model(x, lengths=jnp.array([33, 20])).mean()

    results = {}
    for remat in (False, True):
        model = make_model(tiny(encoding, cope_remat=remat, dropout=0.0), seed=seed)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def pure(params, graphdef=graphdef, rest=rest):
            return loss(nnx.merge(graphdef, params, rest))

        value, vjp = jax.vjp(pure, params)
        residual_bytes = sum(getattr(r, "nbytes", 0) for r in jax.tree.leaves(vjp))
        (grads,) = vjp(jnp.ones_like(value))
        results[remat] = (value, grads, residual_bytes)
    (v0, g0, r0), (v1, g1, r1) = results[False], results[True]
    np.testing.assert_allclose(v1, v0, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert r1 < 0.6 * r0, (r1, r0)


def test_cope_table_starts_at_zero():
    model = Transformer(tiny("cope"), rngs=nnx.Rngs(0))
    assert float(jnp.abs(model.blocks[0].attn.cope.table[...]).max()) == 0.0


def test_gpt2_small_parameter_counts_match_the_paper():
    def count(encoding):
        cfg = ModelConfig(vocab_size=50257, encoding=encoding, **GPT2_SMALL)
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    assert count("absolute") == 124_439_808  # GPT-2 small exactly; the paper's 124.4M
    assert round(count("cope") / 1e6, 1) == 123.7  # the paper's Table 4
    assert round(count("relative") / 1e6, 1) == 123.7


def test_sinusoidal_table():
    table = sinusoidal_table(8, 6)
    np.testing.assert_allclose(table[0], [0, 1, 0, 1, 0, 1], atol=1e-7)
    np.testing.assert_allclose(table[3, 0], np.sin(3.0), rtol=1e-6)


def test_absolute_encoding_refuses_sequences_beyond_its_table():
    model = make_model(tiny("absolute", max_len=8))
    with pytest.raises(ValueError, match="exceeds the absolute position table"):
        model(tokens(1, 9))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("encoding", "alibi", "encoding must be one of"),
        ("d_model", 30, "d_model: must be divisible by num_heads"),
        ("num_kv_heads", 3, "num_kv_heads: must divide num_heads"),
        ("mlp", "tanh", "mlp: must be one of"),
        ("norm", "batchnorm", "norm: must be one of"),
        ("dropout", 1.5, r"dropout: must be in \[0, 1\)"),
        ("num_layers", 0, "num_layers: must be a positive int"),
        ("vocab_size", 2.5, "vocab_size: must be a positive int"),
        ("dtype", "int8", "dtype: must be one of"),
        ("attention_impl", "cuda", "attention_impl: must be one of"),
        ("npos", -1, "npos: must be a positive int or None"),
    ],
)
def test_bad_config_fields_raise_naming_the_field(field, value, message):
    fields = dict(vocab_size=V, encoding="cope") | {field: value}
    with pytest.raises(ValueError, match=f"ModelConfig.{message}"):
        ModelConfig(**fields)


def test_flash_impl_refuses_encodings_with_logit_terms():
    """The flash kernel takes no relative logit term: asked for by name, one line says so."""
    model = make_model(tiny("relative", attention_impl="flash"))
    with pytest.raises(ValueError, match="impl='flash' cannot serve this call: takes no bias"):
        model(tokens(2, 5))


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict(dict(vocab_size=5, hidden=3))
    assert ModelConfig.from_dict(dict(vocab_size=5, encoding="rope")).encoding == "rope"


def test_bad_token_shape_raises():
    with pytest.raises(ValueError, match="tokens must be"):
        make_model(tiny("none"))(jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_packed_row_equals_each_sequence_alone(encoding):
    """segment_ids: a row holding two sequences (and a padding segment) gives each sequence's
    own logits, and the gradient of a loss over the packed row is the sum of the gradients of
    the same loss over the sequences alone."""
    model = make_model(tiny(encoding))
    a, b = tokens(1, 5), tokens(1, 7)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)  # [1, 15]
    segments = jnp.asarray([[0] * 5 + [1] * 7 + [2] * 3], jnp.int32)
    weights = jax.random.normal(jax.random.key(0), (1, 15, V))

    def loss_packed(m):
        return jnp.sum(m(packed, segment_ids=segments)[:, :12] * weights[:, :12])

    def loss_alone(m):
        return jnp.sum(m(a) * weights[:, :5]) + jnp.sum(m(b) * weights[:, 5:12])

    logits = model(packed, segment_ids=segments)
    np.testing.assert_allclose(logits[:, :5], model(a), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[:, 5:12], model(b), atol=1e-5, rtol=1e-5)
    got, want = nnx.grad(loss_packed)(model), nnx.grad(loss_alone)(model)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_segment_ids_errors():
    model = make_model(tiny("cope"))
    with pytest.raises(ValueError, match="segment_ids must have the shape of tokens"):
        model(tokens(2, 5), segment_ids=jnp.zeros((2, 4), jnp.int32))
