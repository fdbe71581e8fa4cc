"""The Hopper attention forward in Triton's Gluon dialect: FlashAttention-3's warp-specialised design.

Same contract and math as the forward of :mod:`seqgen_fast.kernels.attention` (whose ``tl`` kernel
is this kernel's twin: it runs under the CPU interpreter, this one does not), for the calls without
a user mask or dropout, with equal query/key and value head dims up to 128. Per program
(persistent: one per SM, tiles longest first), three partitions share shared memory:

* **producer** (one warp, 24 registers): for each tile makes the per-sequence TMA descriptors of
  Q, K, V (shape = the sequence: tails zero-filled by the copy engine), loads the tile's two
  64-row halves of Q, then streams the key blocks of the tile's band into a ring of ``STAGES``
  K and V buffers, each guarded by a *ready* mbarrier (TMA transaction bytes) and an *empty* one
  (both consumers arrive);
* **two consumer warpgroups** (4 warps each, 240 registers through ``setmaxnreg``), each owning
  64 query rows of the 128-row tile and running the online softmax of the tile's key blocks in
  registers, FlashAttention-3's intra-warpgroup pipeline per block ``j``::

      S_j = Q K_j^T            (async wgmma, issued)
      O  += P_{j-1} V_{j-1}    (async wgmma, issued; P from registers)
      wait_group 1             (S_j done, P V still on the tensor cores)
      softmax of S_j -> P_j    (the exponentials overlap the P V wgmma)
      wait_group 0; O *= 2^(m_{j-1} - m_j)

  so ``O_j = 2^(m_{j-1} - m_j) (O_{j-1} + P_{j-1} V_{j-1})`` and the output is ``O + P_last V_last``
  normalised by the row sum. The two warpgroups are scheduled independently, so one's softmax
  also runs beside the other's matmuls.

Key blocks are split as in the twin: the tile's first block runs masked, then a masked range
(band's left edge), an unmasked one and a masked one (right edge / key tail); blocks outside the
band are never loaded. Both warpgroups visit every key block of the 128-row tile (masking their own
rows), so the ring's *empty* barriers always see two arrivals.

Triton 3.6 and 3.9 both compile it (``tests/test_attention.py`` checks the PTX and ptxas's SASS:
TMA, wgmma with ``wait_group 1`` then the exponentials then ``wait_group 0``, ``setmaxnreg``,
spills); two builtins were renamed between them (``_tma_load``, ``_barrier`` below).
``tests/support/gluon_emulation.py`` runs it on the CPU (partitions as threads, mbarriers and
async wgmma emulated) against the float64 reference.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .attention_tiles import nan_max, query_tile, row_max, tile_scores

TILE_ROWS = 128      # query rows per tile: two consumer warpgroups of WG_ROWS
MAX_HEAD_DIM = 128  # at 256 the consumers spill (the acc alone takes 128 registers of 240)
WG_ROWS = gl.constexpr(TILE_ROWS // 2)
CONSUMER_REGS = gl.constexpr(240)  # 2 x 128 threads x 240 + 128 x 24 registers <= 64 Ki per SM
PRODUCER_REGS = gl.constexpr(24)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # renamed after Triton 3.6
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed after Triton 3.6


@gluon.jit
def _producer(Q, K, V, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, CU_Q, CU_K,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
              seqlen_q, seqlen_k, H, GROUP, n_bh, n_mblocks, win_left, win_right, D: gl.constexpr,
              BLOCK_D: gl.constexpr, BOTTOM_RIGHT: gl.constexpr, IS_VARLEN: gl.constexpr,
              BAND_LEFT: gl.constexpr, BAND_RIGHT: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of every tile's Q halves and K, V blocks, in the consumers' order."""
    kv = 0
    q_phase = 0
    for tile in range(gl.program_id(0), n_bh * n_mblocks, gl.num_programs(0)):
        b, h, q_start, q_len, k_start, k_len, shift, m0, lo, a, bb, hi = query_tile(
            tile, n_bh, n_mblocks, H, CU_Q, CU_K, seqlen_q, seqlen_k, win_left, win_right, BOTTOM_RIGHT, IS_VARLEN,
            BAND_LEFT, BAND_RIGHT, 2 * WG_ROWS, BLOCK_N)
        if (m0 < q_len) & (lo < hi):
            b64 = b.to(gl.int64)
            hk = (h // GROUP).to(gl.int64)
            q_desc = tma.make_tensor_descriptor(
                Q + b64 * stride_qb + h.to(gl.int64) * stride_qh + q_start.to(gl.int64) * stride_qm,
                shape=[q_len, D], strides=[stride_qm, 1], block_shape=[WG_ROWS, BLOCK_D],
                layout=q_smem.type.layout)
            k_desc = tma.make_tensor_descriptor(
                K + b64 * stride_kb + hk * stride_kh + k_start.to(gl.int64) * stride_kn, shape=[k_len, D],
                strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D], layout=k_smem.type.layout)
            v_desc = tma.make_tensor_descriptor(
                V + b64 * stride_vb + hk * stride_vh + k_start.to(gl.int64) * stride_vn, shape=[k_len, D],
                strides=[stride_vn, 1], block_shape=[BLOCK_N, BLOCK_D], layout=v_smem.type.layout)
            for w in gl.static_range(2):
                mbarrier.wait(q_empty.index(w), q_phase ^ 1)
                mbarrier.expect(q_ready.index(w), q_desc.block_type.nbytes)
                _tma_load(q_desc, [m0 + w * WG_ROWS, 0], q_ready.index(w), q_smem.index(w))
            q_phase ^= 1
            for start_n in range(lo, hi, BLOCK_N):
                st = kv % STAGES
                ph = (kv // STAGES) & 1
                mbarrier.wait(k_empty.index(st), ph ^ 1)
                mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
                _tma_load(k_desc, [start_n, 0], k_ready.index(st), k_smem.index(st))
                mbarrier.wait(v_empty.index(st), ph ^ 1)
                mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
                _tma_load(v_desc, [start_n, 0], v_ready.index(st), v_smem.index(st))
                kv += 1


@gluon.jit
def _softmax(qk, start_n, m_i, l_i, offs_m, q_len, k_len, shift, slope, qk_scale, softcap_scale, softcap_mul,
             win_left, win_right, col_layout: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr,
             BAND_LEFT: gl.constexpr, BAND_RIGHT: gl.constexpr, BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
    """(p, 2^(m - m_new), new row sum, new row max) of key block ``start_n``'s products."""
    cols = start_n + gl.arange(0, BLOCK_N, layout=col_layout)
    s, _ = tile_scores(qk, offs_m[:, None], cols[None, :], q_len, k_len, shift, slope, qk, 0, 0, qk_scale,
                       softcap_scale, softcap_mul, win_left, win_right, False, False, SOFTCAP, ALIBI, BAND_LEFT,
                       BAND_RIGHT, MASKED)
    m_new = nan_max(m_i, row_max(s, 1))  # NaN-keeping (see attention_tiles)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far stays at p = 0
    p = gl.exp2(s - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    return p, alpha, l_i * alpha + gl.sum(p, 1), m_new


@gluon.jit
def _consume_range(acc, l_i, m_i, p_op, prev, prev_ph, kv, lo, hi, q_w, k_smem, v_smem, k_ready, k_empty,
                   v_ready, v_empty, offs_m, q_len, k_len, shift, slope, qk_scale, softcap_scale, softcap_mul,
                   win_left, win_right, s_layout: gl.constexpr, o_layout: gl.constexpr, SOFTCAP: gl.constexpr,
                   ALIBI: gl.constexpr, BAND_LEFT: gl.constexpr, BAND_RIGHT: gl.constexpr,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr):
    """Key blocks [lo, hi) through the intra-warpgroup pipeline; ``p_op`` holds the previous
    block's probabilities (ring stage ``prev``), not yet multiplied by its V."""
    zero_s = gl.zeros([WG_ROWS, BLOCK_N], gl.float32, layout=s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    for start_n in range(lo, hi, BLOCK_N):
        st = kv % STAGES
        ph = (kv // STAGES) & 1
        mbarrier.wait(k_ready.index(st), ph)
        qk = warpgroup_mma(q_w, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), prev_ph)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        qk = warpgroup_mma_wait(1, deps=[qk, k_smem.index(st)])[0]  # the scores; P V still runs
        mbarrier.arrive(k_empty.index(st), count=1)
        p, alpha, l_i, m_i = _softmax(qk, start_n, m_i, l_i, offs_m, q_len, k_len, shift, slope, qk_scale,
                                      softcap_scale, softcap_mul, win_left, win_right, col_layout, SOFTCAP, ALIBI,
                                      BAND_LEFT, BAND_RIGHT, BLOCK_N, MASKED)
        # The wait for P V sits behind a branch on a runtime value the compilers cannot fold (the
        # softcap is never negative: a float argument, not a loop bound) whose never-taken side
        # starts with a barrier: ptxas then keeps the wait in its block, after the exponentials. In
        # straight-line code (or with identical sides, whose common first instruction it hoists) it
        # schedules wgmma.wait_group 0 above them, and then only the row max overlaps the wgmma.
        if softcap_mul >= 0.0:
            o_next = warpgroup_mma_wait(0, deps=[acc, p_op, v_smem.index(prev)])[0]
        else:
            _barrier()
            o_next = warpgroup_mma_wait(0, deps=[acc, p_op, v_smem.index(prev)])[0]
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = o_next * gl.convert_layout(alpha, orow_layout)[:, None]
        p_op = gl.convert_layout(p.to(p_op.dtype), p_layout)
        prev = st
        prev_ph = ph
        kv += 1
    return acc, l_i, m_i, p_op, prev, prev_ph, kv


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, O, LSE, CU_Q, CU_K,
              SLOPES, stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_lm, stride_ab, stride_ah,
              seqlen_q, seqlen_k, H, n_bh, n_mblocks, qk_scale, softcap_scale, softcap_mul, win_left, win_right,
              D: gl.constexpr, BLOCK_D: gl.constexpr, BOTTOM_RIGHT: gl.constexpr, IS_VARLEN: gl.constexpr,
              SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, BAND_LEFT: gl.constexpr, BAND_RIGHT: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr):
    """Warpgroup ``WG``'s 64 rows of every tile: the softmax pipeline, then O and lse."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    ocol_layout: gl.constexpr = gl.SliceLayout(0, o_layout)
    q_w = q_smem.index(WG)
    kv = 0
    q_phase = 0
    for tile in range(gl.program_id(0), n_bh * n_mblocks, gl.num_programs(0)):
        b, h, q_start, q_len, k_start, k_len, shift, m0, lo, a, bb, hi = query_tile(
            tile, n_bh, n_mblocks, H, CU_Q, CU_K, seqlen_q, seqlen_k, win_left, win_right, BOTTOM_RIGHT, IS_VARLEN,
            BAND_LEFT, BAND_RIGHT, 2 * WG_ROWS, BLOCK_N)
        if m0 < q_len:  # every row of this warpgroup may be past q_len: it still takes its part of the ring
            b64 = b.to(gl.int64)
            slope = 0.0
            if ALIBI:
                slope = gl.load(SLOPES + b64 * stride_ab + h * stride_ah).to(gl.float32) * 1.4426950408889634
            offs_m = m0 + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=row_layout)
            m_i = gl.full([WG_ROWS], float("-inf"), gl.float32, layout=row_layout)
            l_i = gl.zeros([WG_ROWS], gl.float32, layout=row_layout)
            acc = gl.zeros([WG_ROWS, BLOCK_D], gl.float32, layout=o_layout)
            if lo < hi:
                mbarrier.wait(q_ready.index(WG), q_phase)
                q_phase ^= 1
                st = kv % STAGES
                ph = (kv // STAGES) & 1
                mbarrier.wait(k_ready.index(st), ph)
                qk = warpgroup_mma(q_w, k_smem.index(st).permute((1, 0)),
                                   gl.zeros([WG_ROWS, BLOCK_N], gl.float32, layout=s_layout), use_acc=False,
                                   is_async=True)
                qk = warpgroup_mma_wait(0, deps=[qk, q_w, k_smem.index(st)])[0]
                mbarrier.arrive(k_empty.index(st), count=1)
                p, alpha, l_i, m_i = _softmax(qk, lo, m_i, l_i, offs_m, q_len, k_len, shift, slope, qk_scale,
                                              softcap_scale, softcap_mul, win_left, win_right, col_layout,
                                              SOFTCAP, ALIBI, BAND_LEFT, BAND_RIGHT, BLOCK_N, True)
                p_op = gl.convert_layout(p.to(q_smem.dtype), p_layout)
                kv += 1
                first = lo + BLOCK_N
                bounds = (first, gl.maximum(a, first), gl.maximum(bb, first), gl.maximum(hi, first))
                prev = st
                prev_ph = ph
                for r in gl.static_range(3):  # masked, unmasked, masked ranges
                    acc, l_i, m_i, p_op, prev, prev_ph, kv = _consume_range(
                        acc, l_i, m_i, p_op, prev, prev_ph, kv, bounds[r], bounds[r + 1], q_w, k_smem, v_smem,
                        k_ready, k_empty, v_ready, v_empty, offs_m, q_len, k_len, shift, slope, qk_scale,
                        softcap_scale, softcap_mul, win_left, win_right, s_layout, o_layout, SOFTCAP, ALIBI,
                        BAND_LEFT, BAND_RIGHT, BLOCK_N, STAGES, r != 1)
                mbarrier.arrive(q_empty.index(WG), count=1)  # the last S is done: the next tile's Q may land
                mbarrier.wait(v_ready.index(prev), prev_ph)
                acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=[acc, p_op, v_smem.index(prev)])[0]
                mbarrier.arrive(v_empty.index(prev), count=1)
            empty = l_i == 0.0
            l_safe = gl.where(empty, 1.0, l_i)
            lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
            out = acc / gl.convert_layout(l_safe, orow_layout)[:, None]
            rows = m0 + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=orow_layout)
            cols = gl.arange(0, BLOCK_D, layout=ocol_layout)
            o_base = O + b64 * stride_ob + h.to(gl.int64) * stride_oh + q_start.to(gl.int64) * stride_om
            gl.store(o_base + rows[:, None] * stride_om + cols[None, :], out.to(O.dtype.element_ty),
                     mask=(rows[:, None] < q_len) & (cols[None, :] < D))
            l_base = LSE + b64 * stride_lb + h.to(gl.int64) * stride_lh + q_start.to(gl.int64) * stride_lm
            gl.store(l_base + offs_m * stride_lm, lse, mask=offs_m < q_len)


@gluon.jit
def attn_fwd_ws(Q, K, V, O, LSE, CU_Q, CU_K, SLOPES,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                stride_vn, stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_lm, stride_ab, stride_ah,
                seqlen_q, seqlen_k, H, GROUP, n_bh, n_mblocks, qk_scale, softcap_scale, softcap_mul, win_left,
                win_right, D: gl.constexpr, BLOCK_D: gl.constexpr, BOTTOM_RIGHT: gl.constexpr,
                IS_VARLEN: gl.constexpr, SOFTCAP: gl.constexpr, ALIBI: gl.constexpr, BAND_LEFT: gl.constexpr,
                BAND_RIGHT: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Launch with ``num_warps=4`` (the first consumer warpgroup; the kernel adds the second and
    the producer) on a grid of at most one program per SM. Arguments as the twin's
    ``_attn_fwd`` (unit inner strides)."""
    dtype: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([WG_ROWS, BLOCK_D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_D], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [2, WG_ROWS, BLOCK_D], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_D], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_D], kv_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # released by both consumer warpgroups
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
    gl.warp_specialize([
        (_consumer, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, O, LSE, CU_Q,
                     CU_K, SLOPES, stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_lm, stride_ab,
                     stride_ah, seqlen_q, seqlen_k, H, n_bh, n_mblocks, qk_scale, softcap_scale, softcap_mul,
                     win_left, win_right, D, BLOCK_D, BOTTOM_RIGHT, IS_VARLEN, SOFTCAP, ALIBI, BAND_LEFT,
                     BAND_RIGHT, BLOCK_N, STAGES, 0)),
        (_consumer, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, O, LSE, CU_Q,
                     CU_K, SLOPES, stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_lm, stride_ab,
                     stride_ah, seqlen_q, seqlen_k, H, n_bh, n_mblocks, qk_scale, softcap_scale, softcap_mul,
                     win_left, win_right, D, BLOCK_D, BOTTOM_RIGHT, IS_VARLEN, SOFTCAP, ALIBI, BAND_LEFT,
                     BAND_RIGHT, BLOCK_N, STAGES, 1)),
        (_producer, (Q, K, V, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, CU_Q,
                     CU_K, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                     stride_vn, seqlen_q, seqlen_k, H, GROUP, n_bh, n_mblocks, win_left, win_right, D, BLOCK_D,
                     BOTTOM_RIGHT, IS_VARLEN, BAND_LEFT, BAND_RIGHT, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def reasons(feat_mask: bool, dropout: bool, head_dim: int, head_dim_v: int) -> list[str]:
    """Why this kernel cannot take a forward call (the ``tl`` Hopper kernel then runs it)."""
    why = []
    if feat_mask:
        why.append("an attn_mask (the warp-specialised forward takes bands, softcap and ALiBi, not user masks)")
    if dropout:
        why.append("dropout (the warp-specialised forward has no Philox stream)")
    if head_dim != head_dim_v:
        why.append(f"head dims {head_dim} (q, k) and {head_dim_v} (v) differ")
    if head_dim > MAX_HEAD_DIM:
        why.append(f"head dim {head_dim} > {MAX_HEAD_DIM}")
    return why
