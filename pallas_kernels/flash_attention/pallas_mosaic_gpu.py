"""FlashAttention-3 style forward (Shah et al., 2024, arXiv 2407.08608) on Mosaic GPU (Hopper).

One CTA owns 2·block_q query rows of one (batch, head): two compute warpgroups (block_q rows
each) run QKᵀ and PV on wgmma from shared memory, a third warpgroup streams K/V tiles with TMA
through a `num_stages`-deep ring guarded by arrival/consumption barriers. A schedule barrier
ping-pongs the compute warpgroups so one's softmax overlaps the other's matmuls. Causal grids
launch the heaviest query tiles first. The backward pass reuses the Triton kernels (api.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention.config import MosaicConfig

LOG2E = math.log2(math.e)


def supports(q_shape, k_shape, causal: bool, lengths, config: MosaicConfig) -> bool:
    """Shapes this kernel covers; everything else goes to the Triton kernels."""
    _, q_len, _, head_dim = q_shape
    kv_len = k_shape[1]
    return (
        lengths is None
        and head_dim in (64, 128)
        and q_len % (2 * config.block_q) == 0
        and kv_len % config.block_k == 0
        and (not causal or q_len <= kv_len)
    )


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    out_ref,
    lse_ref,
    scoped,
    *,
    scale: float,
    causal: bool,
    offset: int,
    block_q: int,
    block_k: int,
    num_stages: int,
    group: int,
    num_q_tiles: int,
    kv_len: int,
):
    # q_ref, out_ref: [B, T, H, D] (GMEM); k_ref, v_ref: [B, S, K, D] (GMEM); lse_ref [B, H, T]
    smem, ready, consumed, schedule = scoped
    q_smem2, k_smem, v_smem, lse_smem2 = smem  # [2, bq, D], [stages, bk, D] x2, [2, bq]
    k_ready, v_ready, q_ready = ready
    k_consumed, v_consumed = consumed
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    tile = lax.axis_index("q_seq")
    if causal:  # heaviest tiles first
        tile = num_q_tiles - 1 - tile
    wg = lax.axis_index("wg")
    qk_scale = scale * LOG2E

    def schedule_sync():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    # KV steps the CTA streams (the larger of its two warpgroups' needs).
    if causal:
        cta_steps = pl.cdiv((tile + 1) * (2 * block_q) + offset, jnp.array(block_k, jnp.int32))
        cta_steps = jnp.minimum(cta_steps, kv_len // block_k)
    else:
        cta_steps = kv_len // block_k

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem = q_smem2.at[wg]
        lse_smem = lse_smem2.at[wg]
        row0 = tile * (2 * block_q) + wg * block_q
        if causal:
            steps = jnp.minimum(
                pl.cdiv(row0 + block_q + offset, jnp.array(block_k, jnp.int32)), kv_len // block_k
            )
        else:
            steps = cta_steps
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, block_q), head], q_smem, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        m = plgpu.layout_cast(
            jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
        )
        l = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        @pl.when(steps > 0)
        def _():
            plgpu.barrier_wait(k_ready.at[0])

        pl.when(wg == 1)(schedule_sync)

        def step(kv_step, carry, *, masked: bool):
            acc, m, l = carry
            slot = lax.rem(kv_step, jnp.array(num_stages, kv_step.dtype))

            def qk_matmul(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                schedule_sync()
                return acc_ref[...]

            s = pl.run_scoped(qk_matmul, plgpu.ACC((block_q, block_k), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            s = s * qk_scale  # [block_q, block_k], log2 domain
            if masked:
                rows = plgpu.broadcasted_iota(
                    jnp.int32, (block_q, block_k), 0, layout=plgpu.Layout.WGMMA
                )
                cols = plgpu.broadcasted_iota(
                    jnp.int32, (block_q, block_k), 1, layout=plgpu.Layout.WGMMA
                )
                s = jnp.where(rows + (row0 + offset) >= cols + kv_step * block_k, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + p.sum(axis=1)
            p_lo = p.astype(dtype)
            # The barrier keeps the row sum ahead of the hand-off to the other warpgroup.
            acc, l, m_new, p_lo = lax.optimization_barrier((acc, l, m_new, p_lo))
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(schedule)

            def pv_matmul(acc_ref):
                plgpu.wgmma(acc_ref, p_lo, v_smem.at[slot])
                nxt = kv_step + 1

                @pl.when(nxt < steps)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.array(num_stages, nxt.dtype))])

            acc = pl.run_state(pv_matmul)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l

        carry = (acc, m, l)
        if causal:
            # Steps entirely below the diagonal need no mask.
            full = jnp.minimum(lax.div(row0 + offset + 1, jnp.array(block_k, jnp.int32)), steps)
            carry = lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
            acc, m, l = lax.fori_loop(full, steps, functools.partial(step, masked=True), carry)

            # Release the slots the other warpgroup still needs streamed.
            @pl.loop(steps, cta_steps)
            def _drain(kv_step):
                slot = lax.rem(kv_step, jnp.array(num_stages, kv_step.dtype))
                plgpu.barrier_arrive(k_consumed.at[slot])
                plgpu.barrier_arrive(v_consumed.at[slot])
                schedule_sync()
                schedule_sync()
        else:
            acc, m, l = lax.fori_loop(0, steps, functools.partial(step, masked=False), carry)
        pl.when(wg == 0)(schedule_sync)

        inv_l = 1.0 / l
        q_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
        lse_smem[...] = (m + jnp.log(l) * (1.0 / math.log(2.0))) * (1.0 / LOG2E)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, pl.ds(row0, block_q), head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(row0, block_q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.array(group, head.dtype))

        def fetch(kv_step, slot):
            rows = (batch, pl.ds(kv_step * block_k, block_k), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

        for i in range(num_stages):

            @pl.when(i < cta_steps)
            def _():
                fetch(jnp.int32(i), i)  # noqa: B023 (pl.when runs the body immediately)

        @pl.loop(num_stages, jnp.maximum(cta_steps, num_stages))
        def _stream(kv_step):
            slot = lax.rem(kv_step, jnp.array(num_stages, kv_step.dtype))
            rows = (batch, pl.ds(kv_step * block_k, block_k), kv_head)
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])


def forward(q, k, v, *, scale: float, causal: bool, config: MosaicConfig, interpret=False):
    """q [B, T, H, D], k/v [B, S, K, D] (bf16/fp16) -> out [B, T, H, D], lse [B, H, T] fp32."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    block_q, block_k = config.block_q, config.block_k
    num_stages = max(2, min(config.num_stages, kv_len // block_k))
    num_q_tiles = q_len // (2 * block_q)
    kernel = functools.partial(
        _kernel,
        scale=scale,
        causal=causal,
        offset=kv_len - q_len,
        block_q=block_q,
        block_k=block_k,
        num_stages=num_stages,
        group=heads // kv_heads,
        num_q_tiles=num_q_tiles,
        kv_len=kv_len,
    )

    def entry(q_ref, k_ref, v_ref, out_ref, lse_ref):
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2, block_q, head_dim), q.dtype, transforms=transforms),
            plgpu.SMEM((num_stages, block_k, head_dim), k.dtype, transforms=transforms),
            plgpu.SMEM((num_stages, block_k, head_dim), v.dtype, transforms=transforms),
            plgpu.SMEM((2, block_q), jnp.float32),
        )
        ready = (
            plgpu.Barrier(num_barriers=num_stages),
            plgpu.Barrier(num_barriers=num_stages),
            plgpu.Barrier(num_barriers=2),
        )
        consumed = (plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),) * 2
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, scoped),
            smem,
            ready,
            consumed,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
        ),
        grid=(heads, num_q_tiles, batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="flash_attention_fwd_mgpu",
        interpret=interpret,
    )(q, k, v)
