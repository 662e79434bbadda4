"""Cached decoding == full recomputation for every encoding; prefill, kernel path, EOS, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import make_model, tiny_config

import decoding as D
from cope.encodings import ENCODINGS
from cope.model import attention_backends, with_attention_impl

V = 29
N_NEW = 6

# Every encoding, plus CoPE variants whose cache differs (separate gate keys; shared table).
CASES = [(e, {}) for e in ENCODINGS] + [
    ("cope", dict(cope_sep_key=True)),
    ("cope+rope", dict(cope_sep_key=True, cope_nodiv=True)),
    ("cope", dict(cope_shared=True, post_norm=False, mlp="swiglu")),
]
CASE_IDS = [e + "".join(f"-{k}" for k in o) for e, o in CASES]


def tiny(encoding, **overrides):
    # Untied embeddings: a tied random model mostly repeats its last token, which would make
    # "cached == recomputed" hold trivially.
    return tiny_config(encoding, V, **({"tie_embeddings": False} | overrides))


def prompts(b, t, lengths):
    x = jax.random.randint(jax.random.key(np.random.randint(2**31)), (b, t), 0, V)
    return x, jnp.asarray(lengths, jnp.int32)


def greedy_by_recomputation(model, x, lengths, n):
    """The no-cache loop: re-run the full model on the growing (right-padded) sequences and
    take the argmax at each row's last valid position."""
    b, t = x.shape
    seq = np.zeros((b, t + n), np.int32)
    seq[:, :t] = np.asarray(x)
    cur = np.array(lengths)
    rows = np.arange(b)
    out = []
    for step in range(n):
        logits = model(jnp.asarray(seq[:, : t + step]), lengths=jnp.asarray(cur))
        nxt = np.argmax(np.asarray(logits)[rows, cur - 1], axis=-1)
        seq[rows, cur] = nxt
        cur += 1
        out.append(nxt)
    return np.stack(out, axis=1)  # [B, n]


@pytest.mark.parametrize("encoding,overrides", CASES, ids=CASE_IDS)
def test_prefill_logits_equal_forward(encoding, overrides):
    model = make_model(tiny(encoding, **overrides))
    x, lengths = prompts(3, 7, [7, 1, 4])
    logits, cache = D.prefill(model, x, lengths, max_len=11)
    np.testing.assert_allclose(logits, model(x, lengths=lengths), atol=1e-5, rtol=1e-5)
    assert cache.max_len == 11 and cache.num_layers == 2
    np.testing.assert_array_equal(cache.lengths, lengths)
    assert (cache.gate_k is not None) == bool(overrides.get("cope_sep_key"))


@pytest.mark.parametrize("encoding,overrides", CASES, ids=CASE_IDS)
def test_cached_greedy_equals_recomputation(encoding, overrides):
    model = make_model(tiny(encoding, **overrides))
    x, lengths = prompts(3, 7, [7, 2, 5])
    out = D.generate(model, x, lengths, max_new_tokens=N_NEW)
    expected = greedy_by_recomputation(model, x, lengths, N_NEW)
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(out.lengths, [N_NEW] * 3)
    assert not np.asarray(out.finished).any()


@pytest.mark.parametrize("encoding,overrides", CASES, ids=CASE_IDS)
def test_decode_steps_match_forward_logits(encoding, overrides):
    """Teacher-forced: prefill ragged prompts, then feed each row's true continuation."""
    model = make_model(tiny(encoding, **overrides))
    lengths = np.array([5, 2, 3])
    full, _ = prompts(3, 9, [9, 9, 9])
    expected = model(full)  # [B, 9, V]
    logits, cache = D.prefill(model, full[:, :5], jnp.asarray(lengths), max_len=9)
    rows = np.arange(3)
    for step in range(4):
        pos = lengths + step
        logits, cache = D.decode_step(model, cache, full[rows, pos])
        np.testing.assert_allclose(logits, expected[rows, pos], atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(cache.lengths, lengths + 4)


def test_uncached_baseline_equals_cached():
    model = make_model(tiny("cope+relative"))
    x, lengths = prompts(3, 6, [6, 3, 1])
    sampler = D.top_p(0.8, 1.5)
    a = D.generate(model, x, lengths, max_new_tokens=N_NEW, sampler=sampler, seed=5)
    b = D.generate_uncached(model, x, lengths, max_new_tokens=N_NEW, sampler=sampler, seed=5)
    np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize(
    "encoding, overrides",
    [("rope", {}), ("relative", {}), ("cope", {}), ("cope+rope", dict(cope_sep_key=True))],
)
def test_kernel_path_equals_xla_path(encoding, overrides):
    """attention_impl="pallas" (interpret mode on CPU), both softmax modes, φ default/calibrated/
    far off (forces the online fallback), against the XLA decode path."""
    model = make_model(tiny(encoding, d_model=64, num_layers=2, **overrides))  # head_dim 16
    kernel, model = with_attention_impl(model, "pallas"), with_attention_impl(model, "xla")
    x, lengths = prompts(3, 5, [5, 1, 3])
    phi = D.calibrate(model, x, lengths)
    xla = D.generate(model, x, lengths, max_new_tokens=4)
    for softmax, p in [
        ("online", None),
        ("unified_max", None),
        ("unified_max", phi),
        ("unified_max", 200.0),
    ]:
        out = D.generate(kernel, x, lengths, max_new_tokens=4, softmax=softmax, phi=p)
        np.testing.assert_array_equal(out.tokens, xla.tokens, err_msg=f"{softmax} phi={p}")
    _, cache = D.prefill(model, x, lengths, max_len=6)
    tok = jnp.array([1, 2, 3])
    ref, ref_cache = D.decode_step(model, cache, tok)
    got, got_cache = D.decode_step(kernel, cache, tok, phi=phi)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(ref_cache), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)  # later layers see rounding


def test_auto_uses_kernel_only_without_logit_terms():
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    def decode_backend(cfg):
        return attention_backends(cfg)["decode"]

    for encoding in ("rope", "relative", "cope"):  # no GPU: the reference serves "auto"
        assert decode_backend(tiny(encoding, d_model=64)) == "xla"
    h200 = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h200)):
        assert decode_backend(tiny("rope", d_model=64)) == "split_kv"
        assert decode_backend(tiny("sinusoidal", d_model=64)) == "split_kv"
        assert decode_backend(tiny("rope")) == "xla"  # head_dim 8 < 16
        assert decode_backend(tiny("relative", d_model=64)) == "xla"
        assert decode_backend(tiny("cope+relative", d_model=64)) == "xla"
        assert attention_backends(tiny("rope", d_model=64))["train"] == "flash"
        for encoding in ("cope", "cope+rope"):
            assert attention_backends(tiny(encoding, d_model=64)) == {
                "train": "cope_flash",
                "decode": "cope_split_kv",
            }
        assert attention_backends(tiny("cope+relative", d_model=64))["train"] == "xla"


def test_eos_stops_rows():
    model = make_model(tiny("rope"))
    x, lengths = prompts(4, 6, [6, 2, 4, 5])
    free = np.asarray(D.generate(model, x, lengths, max_new_tokens=8).tokens)
    eos = int(free[0, 2])  # row 0 emits it at step 2 at the latest
    pad = (eos + 1) % V
    out = D.generate(model, x, lengths, max_new_tokens=8, eos_id=eos, pad_id=pad)
    for row in range(4):
        hits = np.flatnonzero(free[row] == eos)
        stop = hits[0] + 1 if hits.size else 8
        np.testing.assert_array_equal(out.tokens[row, :stop], free[row, :stop])
        assert (np.asarray(out.tokens[row, stop:]) == pad).all()
        assert int(out.lengths[row]) == stop
        assert bool(out.finished[row]) == bool(hits.size)
    assert bool(out.finished[0]) and int(out.lengths[0]) <= 3


def test_all_rows_finished_at_first_token():
    model = make_model(tiny("none"))
    x, lengths = prompts(2, 4, [4, 2])
    x = jnp.stack([x[0], x[0]])  # both rows emit the same first token
    first = D.generate(model, x, max_new_tokens=1).tokens[:, 0]
    out = D.generate(model, x, max_new_tokens=5, eos_id=int(first[0]))
    np.testing.assert_array_equal(out.lengths, [1, 1])
    np.testing.assert_array_equal(out.tokens[:, 1:], int(first[0]))


def test_sampling_is_deterministic_per_seed():
    model = make_model(tiny("cope"))
    x, lengths = prompts(3, 5, [5, 3, 4])
    sampler = D.temperature(2.0)
    a = D.generate(model, x, lengths, max_new_tokens=8, sampler=sampler, seed=1)
    b = D.generate(model, x, lengths, max_new_tokens=8, sampler=sampler, seed=1)
    c = D.generate(model, x, lengths, max_new_tokens=8, sampler=sampler, seed=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    cold = D.generate(model, x, lengths, max_new_tokens=8, sampler=D.temperature(1e-6), seed=3)
    greedy = D.generate(model, x, lengths, max_new_tokens=8)
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)


def test_kv_cache_create_is_a_pytree():
    cfg = tiny("cope", cope_sep_key=True)
    cache = D.KVCache.create(cfg, batch=2, max_len=10)
    assert cache.k[0].shape == (2, 10, 2, 8) and len(cache.v) == 2 and len(cache.gate_k) == 2
    assert cache.lengths.dtype == jnp.int32 and not np.asarray(cache.lengths).any()
    doubled = jax.tree.map(lambda a: a + 1, cache)
    assert isinstance(doubled, D.KVCache) and int(doubled.lengths[0]) == 1
    assert D.KVCache.create(tiny("rope"), 1, 4, jnp.bfloat16).gate_k is None
    assert D.KVCache.create(tiny("rope"), 1, 4, jnp.bfloat16).v[1].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="max_len"):
        D.KVCache.create(cfg, batch=2, max_len=0)


def test_calibrate_returns_finite_phi_per_layer():
    model = make_model(tiny("rope", num_layers=3))
    x, lengths = prompts(2, 8, [8, 3])
    phi = D.calibrate(model, x, lengths)
    assert phi.shape == (3,) and np.isfinite(np.asarray(phi)).all()
    q = D.logit_quantiles(model, x, lengths, quantiles=(0.0, 0.9999, 1.0))
    assert q.shape == (3, 3)
    np.testing.assert_allclose(q[:, 1], phi, rtol=1e-6)
    assert (q[:, 0] <= phi).all() and (phi <= q[:, 2]).all()
    # The maximum equals the largest scaled logit over valid pairs, found the slow way.
    from cope import functional as F

    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    h = model.embed_tokens(x, positions)
    block = model.blocks[0]
    qs, ks, _, _ = block.attn.project(h if block.post_norm else block.attn_norm(h), positions)
    g = qs.shape[2] // ks.shape[2]
    logits = jnp.einsum("bthd,bshd->bhts", qs, jnp.repeat(ks, g, axis=2)) * qs.shape[-1] ** -0.5
    mask = F.attention_mask(8, 8, causal=True, lengths=lengths)
    top = np.asarray(jnp.max(jnp.where(mask, logits, -jnp.inf)))
    np.testing.assert_allclose(q[0, 2], top, rtol=1e-5)
    for encoding in ("cope+relative", "absolute"):
        assert np.isfinite(np.asarray(D.calibrate(make_model(tiny(encoding)), x, lengths))).all()


def test_bad_inputs_raise():
    model = make_model(tiny("absolute"))
    x, lengths = prompts(2, 6, [6, 3])
    with pytest.raises(ValueError, match="do not fit a cache"):
        D.prefill(model, x, lengths, max_len=4)
    with pytest.raises(ValueError, match="lengths must be in"):
        D.generate(model, x, jnp.array([7, 3]), max_new_tokens=2)
    with pytest.raises(ValueError, match="lengths must be in"):
        D.prefill(model, x, jnp.array([0, 3]))
    with pytest.raises(ValueError, match="generation past max_len"):
        D.generate(model, x, lengths, max_new_tokens=3, max_len=8)
    with pytest.raises(ValueError, match="absolute position table"):
        D.generate(model, x, lengths, max_new_tokens=19)
    with pytest.raises(ValueError, match="max_new_tokens"):
        D.generate(model, x, lengths, max_new_tokens=0)
    with pytest.raises(ValueError, match="prompts must be"):
        D.generate(model, x[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="token ids"):
        D.generate(model, x.at[0, 0].set(V), lengths, max_new_tokens=2)
    with pytest.raises(ValueError, match="eos_id"):
        D.generate(model, x, lengths, max_new_tokens=2, eos_id=V)
    with pytest.raises(ValueError, match="softmax"):
        D.generate(model, x, lengths, max_new_tokens=2, softmax="max")
    with pytest.raises(ValueError, match="phi"):
        D.generate(model, x, lengths, max_new_tokens=2, phi=jnp.zeros(3))
    with pytest.raises(ValueError, match="sampler"):
        D.generate(model, x, lengths, max_new_tokens=2, sampler="greedy")
    with pytest.raises(ValueError, match="impl='flash' cannot serve this call: takes no bias"):
        D.generate(
            make_model(tiny("relative", attention_impl="flash", d_model=64)),
            x,
            lengths,
            max_new_tokens=2,
        )
    _, cache = D.prefill(model, x, lengths)  # max_len 6: row 0 is full
    with pytest.raises(ValueError, match="past the cache"):
        D.decode_step(model, cache, jnp.array([1, 2]))
    with pytest.raises(ValueError, match="quantile"):
        D.calibrate(model, x, lengths, quantile=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("encoding", ["rope", "relative"])
def test_gpu_kernel_decoding_equals_xla(encoding):
    """Compiled decode kernel (with the relative bias for `relative`) == the XLA decode path."""
    model = make_model(tiny(encoding, d_model=256, num_heads=4, num_kv_heads=2, max_len=300))
    kernel, model = with_attention_impl(model, "pallas"), with_attention_impl(model, "xla")
    x, lengths = prompts(3, 200, [200, 1, 77])
    xla = D.generate(model, x, lengths, max_new_tokens=8)
    for softmax in ("online", "unified_max"):
        out = D.generate(kernel, x, lengths, max_new_tokens=8, softmax=softmax)
        np.testing.assert_array_equal(out.tokens, xla.tokens, err_msg=softmax)
    _, cache = D.prefill(model, x, lengths, max_len=210)
    tok = jnp.array([1, 2, 3])
    ref, _ = D.decode_step(model, cache, tok)
    got, _ = D.decode_step(kernel, cache, tok)
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=2e-3)
