"""
Tuned attention paths for Hopper GPUs (H100, H200), at HRM's two sequence lengths: Sudoku's 82 tokens and
the 900 of mazes and ARC grids. The contract and the maths are those of kernels.flash_attention (see the
docstring of kernels.py); kernels.attention uses these paths for CUDA tensors on a compute-capability-9
GPU at head_dim 64 (at 128 their tiles spill registers) unless kernels.set_use_hopper(False). What they
do differently:

- Short sequences (T <= 128). A head's queries fit one tile and its keys one or two, so a program of the
  reference grid does little work and spends its life waiting on memory. A persistent grid walks the
  heads instead, a whole head per step, with the next heads' loads in flight during this head's
  arithmetic; the keys are one tile, or a half and a quarter tile where those hold them (82 keys: 64 + 32
  rather than 128; padding is work). One fused kernel per head does the whole backward.
- Long sequences (T > 128). Tiles come through TMA descriptors (built on the host) in software-pipelined
  loops, so they flow from memory to shared memory to the matrix units without passing through registers.
  That rules out rotating them inside the loop: a separate pass rotates q and k once, the forward and
  backward read them rotated, and the gradients are rotated back as they are stored.
- Loops take the full blocks without masks and the ragged last block apart; whole-D tiles (one dot per
  product) wherever RoPE does not need the halves.

Triton must provide host-side TMA descriptors (triton.tools.tensor_descriptor); where this module does not
import, kernels.py keeps to its own kernels.
"""
import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import (FLASH_HEAD_DIMS, _bth, _block_and_head, _load_pair, _load_rotated, _load_tile, _qk,
                     _rope_tables, _rotate, _rotate_rounded, _store_o_lse, _store_rotated_back, _store_tile,
                     _unit_last_stride)

SHORT_MAX_T = 128  # up to this length the persistent forward and the one-tile backward take the call


# -----------------------------------------------------------------------------
# helpers

@triton.jit
def _load_box(desc, b, t0, h, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows [t0, t0 + ROWS) of head h of sample b, through a TMA descriptor of a (B, T, H, D) tensor: the copy
    engine writes the box into shared memory, and rows past T arrive as zeros, so no masks are needed."""
    return desc.load([b, t0, h, 0]).reshape(ROWS, HEAD_DIM)


@triton.jit
def _whole_to_halves(x, ROWS: tl.constexpr, HALF: tl.constexpr):
    """The two (ROWS, HALF) halves of a (ROWS, 2 * HALF) tile, split along the head dim."""
    return x.reshape(ROWS, 2, HALF).permute(0, 2, 1).split()


@triton.jit
def _load_maybe_masked(ptrs, mask, other, MASKED: tl.constexpr):
    """tl.load, with the mask only where MASKED: the full blocks of a loop skip the predicates."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=other)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _scores(q1, q2, k1, k2, QK_SCALE: tl.constexpr, HALVES: tl.constexpr):
    """Base-2 scores q k^T of whole tiles (q1, k1) or, with HALVES, of tiles held as halves."""
    if HALVES:
        s = _qk(q1, q2, k1, k2)
    else:
        s = tl.dot(q1, tl.trans(k1))
    return s * QK_SCALE


@triton.jit
def _dv_and_ds_transposed(st, v, do, lse, delta, dv):
    """From base-2 scores transposed (keys as rows, queries as columns): dV += P^T dO, and
    dS^T = P^T * (dP^T - delta) in dO's dtype. Padded queries come with lse = +inf, so their P is 0."""
    pt = tl.exp2(st - lse[None, :])
    dv = tl.dot(pt.to(do.dtype), do, dv)
    dst = (pt * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(do.dtype)
    return dv, dst


# -----------------------------------------------------------------------------
# RoPE pass, for T > 128. Replaces the rotation inside the reference kernels, which redo it for every K tile
# in every program and hold the tiles in registers to do it. Rotating q and k once into new tensors lets
# the kernels below stream them straight to shared memory; at T = 900 the pass costs about half of what
# rotating inside the forward did.

@triton.jit
def _rotate_head_rows(X, XR, c, s, rows, T, stride_t, stride_rt, HALF: tl.constexpr):
    """rope(x) for rows `rows` of one head, from X (row stride stride_t) into XR (row stride stride_rt)."""
    x1, x2 = _load_pair(X, X + HALF, rows, T, stride_t, HALF)
    y1, y2 = _rotate(x1, x2, c, s)
    _store_tile(XR, y1, rows, T, stride_rt, HALF)
    _store_tile(XR + HALF, y2, rows, T, stride_rt, HALF)


@triton.jit
def _rope_pass(Q, K, COS, SIN, QR, KR,
               stride_qb, stride_qt, stride_qh,  # q and k: (B, T, H, D) views with the same strides
               stride_cb, stride_ct,  # cos, sin as in kernels._attn_fwd
               T, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """rope(q), rope(k) into QR, KR (contiguous (B, T, H, D)) at BLOCK_T positions of one sample, all heads:
    the table is read once for 2 * H head vectors, and the unrolled head loop keeps all the loads in flight."""
    HALF: tl.constexpr = HEAD_DIM // 2
    num_t = tl.cdiv(T, BLOCK_T)
    b = tl.program_id(0) // num_t
    rows = (tl.program_id(0) % num_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    c, s = _load_pair(COS + b * stride_cb, SIN + b * stride_cb, rows, T, stride_ct, HALF)
    for h in tl.static_range(H):
        x = b * stride_qb + h * stride_qh
        xr = (b * T * H + h) * HEAD_DIM
        _rotate_head_rows(Q + x, QR + xr, c, s, rows, T, stride_qt, H * HEAD_DIM, HALF)
        _rotate_head_rows(K + x, KR + xr, c, s, rows, T, stride_qt, H * HEAD_DIM, HALF)


# -----------------------------------------------------------------------------
# Tiled forward, for T > 128, on q and k from the RoPE pass. Replaces kernels._attn_fwd there: K and V come
# through TMA descriptors in a key loop software-pipelined NUM_STAGES deep, as whole-D tiles, and only the
# ragged last key block pays for a mask; about 15% faster than the same loop with pointer loads at T = 900.

@triton.jit
def _attn_fwd_tiled_step(acc, l, m, q, KD, VD, b, h, start_n, T, QK_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                         HEAD_DIM: tl.constexpr, MASK_TAIL: tl.constexpr):
    """One key block of the online softmax (kernels._attn_fwd's loop body)."""
    k = _load_box(KD, b, start_n, h, BLOCK_N, HEAD_DIM)
    v = _load_box(VD, b, start_n, h, BLOCK_N, HEAD_DIM)
    s = tl.dot(q, tl.trans(k)) * QK_SCALE
    if MASK_TAIL:
        s = tl.where((start_n + tl.arange(0, BLOCK_N) < T)[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l, m_new


@triton.jit
def _attn_fwd_tiled(QD, KD, VD, O, LSE,  # q, k, v through TMA descriptors; O, LSE as in kernels._attn_fwd
                    H, T, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634
    pid_m, bh, b, h = _block_and_head(T, BLOCK_M, H)
    q = _load_box(QD, b, pid_m * BLOCK_M, h, BLOCK_M, HEAD_DIM)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_full = (T // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, n_full, BLOCK_N, num_stages=NUM_STAGES):
        acc, l, m = _attn_fwd_tiled_step(acc, l, m, q, KD, VD, b, h, start_n, T, QK_SCALE, BLOCK_N, HEAD_DIM,
                                         False)
    if n_full < T:
        acc, l, m = _attn_fwd_tiled_step(acc, l, m, q, KD, VD, b, h, n_full, T, QK_SCALE, BLOCK_N, HEAD_DIM, True)
    _store_o_lse(O, LSE, acc / l[:, None], m + tl.log2(l), pid_m * BLOCK_M + tl.arange(0, BLOCK_M), bh, b, h, H,
                 T, HEAD_DIM)


# -----------------------------------------------------------------------------
# Persistent forward, for T <= 128. Replaces kernels._attn_fwd for short sequences, where a program of its
# grid has one or two key tiles of work and is bound by memory latency: here about one program per
# multiprocessor walks the heads, a whole head per step, keeping later heads' loads in flight, and splits
# the keys into a FIRST_KEYS and a LAST_KEYS tile where one power of two would be mostly padding.

@triton.jit
def _softmax_pv(q1, q2, kf1, kf2, vf, kl1, kl2, vl, T, QK_SCALE: tl.constexpr, FIRST_KEYS: tl.constexpr,
                LAST_KEYS: tl.constexpr, HALVES: tl.constexpr):
    """softmax(q k^T) v and the base-2 logsumexp of each row, over all the keys of a head: a first tile of
    FIRST_KEYS keys (kf, vf) and, if LAST_KEYS > 0, a last tile (kl, vl) after it. Keys past T are masked."""
    s = _scores(q1, q2, kf1, kf2, QK_SCALE, HALVES)
    if LAST_KEYS > 0:  # T > FIRST_KEYS: the first tile is all real keys
        s_l = _scores(q1, q2, kl1, kl2, QK_SCALE, HALVES)
        s_l = tl.where((FIRST_KEYS + tl.arange(0, LAST_KEYS) < T)[None, :], s_l, float("-inf"))
        m = tl.maximum(tl.max(s, 1), tl.max(s_l, 1))
        p = tl.exp2(s - m[:, None])
        p_l = tl.exp2(s_l - m[:, None])
        l = tl.sum(p, 1) + tl.sum(p_l, 1)
        acc = tl.dot(p_l.to(vl.dtype), vl, tl.dot(p.to(vf.dtype), vf))
    else:
        s = tl.where((tl.arange(0, FIRST_KEYS) < T)[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        acc = tl.dot(p.to(vf.dtype), vf)
    return acc / l[:, None], m + tl.log2(l)


@triton.jit
def _attn_fwd_persistent(QD, KFD, KLD, VFD, VLD, O, LSE,  # TMA descriptors: q; k and v as first and last tiles
                         n_bh, H, T, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, BLOCK_T: tl.constexpr,
                         FIRST_KEYS: tl.constexpr, LAST_KEYS: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Without RoPE: q, k, v go through TMA descriptors straight to shared memory (KLD, VLD unused when
    LAST_KEYS = 0), and the loop over heads is software-pipelined NUM_STAGES deep."""
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634
    for bh in tl.range(tl.program_id(0), n_bh, tl.num_programs(0), num_stages=NUM_STAGES):
        b = bh // H
        h = bh % H
        q = _load_box(QD, b, 0, h, BLOCK_T, HEAD_DIM)
        k_first = _load_box(KFD, b, 0, h, FIRST_KEYS, HEAD_DIM)
        v_first = _load_box(VFD, b, 0, h, FIRST_KEYS, HEAD_DIM)
        k_last, v_last = k_first, v_first
        if LAST_KEYS > 0:
            k_last = _load_box(KLD, b, FIRST_KEYS, h, LAST_KEYS, HEAD_DIM)
            v_last = _load_box(VLD, b, FIRST_KEYS, h, LAST_KEYS, HEAD_DIM)
        o, lse = _softmax_pv(q, q, k_first, k_first, v_first, k_last, k_last, v_last, T, QK_SCALE, FIRST_KEYS,
                             LAST_KEYS, False)
        _store_o_lse(O, LSE, o, lse, tl.arange(0, BLOCK_T), bh, b, h, H, T, HEAD_DIM)


@triton.jit
def _load_head(Q, K, V, COS, SIN, bh, n_bh, stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh,
               stride_cb, stride_ct, H, T, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
               FIRST_KEYS: tl.constexpr, LAST_KEYS: tl.constexpr, TABLE: tl.constexpr):
    """q (halves, BLOCK_T rows), k (halves) and v of head bh as a first and a last key tile (the first again
    when LAST_KEYS = 0); all zeros past the last head, so prefetching a head that does not exist is
    harmless. With TABLE also the cos, sin of each tile's rows."""
    HALF: tl.constexpr = HEAD_DIM // 2
    b = bh // H
    h = bh % H
    T_live = tl.where(bh < n_bh, T, 0)
    rows_q = tl.arange(0, BLOCK_T)
    rows_f = tl.arange(0, FIRST_KEYS)
    q_head = Q + b * stride_qb + h * stride_qh
    k_head = K + b * stride_qb + h * stride_qh
    v_head = V + b * stride_vb + h * stride_vh
    q1, q2 = _load_pair(q_head, q_head + HALF, rows_q, T_live, stride_qt, HALF)
    kf1, kf2 = _load_pair(k_head, k_head + HALF, rows_f, T_live, stride_qt, HALF)
    vf = _load_tile(v_head, rows_f, T_live, stride_vt, HEAD_DIM)
    kl1, kl2, vl = kf1, kf2, vf
    rows_l = rows_f
    if LAST_KEYS > 0:
        rows_l = FIRST_KEYS + tl.arange(0, LAST_KEYS)
        kl1, kl2 = _load_pair(k_head, k_head + HALF, rows_l, T_live, stride_qt, HALF)
        vl = _load_tile(v_head, rows_l, T_live, stride_vt, HEAD_DIM)
    cq, sq, cf, sf, cl, sl = q1, q2, kf1, kf2, kl1, kl2  # placeholders, unused without TABLE
    if TABLE:
        cos, sin = COS + b * stride_cb, SIN + b * stride_cb
        cq, sq = _load_pair(cos, sin, rows_q, T_live, stride_ct, HALF)
        cf, sf = _load_pair(cos, sin, rows_f, T_live, stride_ct, HALF)
        cl, sl = _load_pair(cos, sin, rows_l, T_live, stride_ct, HALF)
    return q1, q2, kf1, kf2, kl1, kl2, vf, vl, cq, sq, cf, sf, cl, sl


@triton.jit
def _attn_fwd_persistent_rope(Q, K, V, COS, SIN, O, LSE,
                              stride_qb, stride_qt, stride_qh,  # q and k: (B, T, H, D) views with the same strides
                              stride_vb, stride_vt, stride_vh,
                              stride_cb, stride_ct,  # cos, sin as in kernels._attn_fwd
                              n_bh, H, T, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, SHARED_TABLE: tl.constexpr,
                              BLOCK_T: tl.constexpr, FIRST_KEYS: tl.constexpr, LAST_KEYS: tl.constexpr):
    """With RoPE: q and k of a head are rotated once, in registers (queries and keys are the same positions),
    so they come through pointer loads, and the next head's tiles are loaded by hand before this head's
    arithmetic (Triton's loop pipelining does not prefetch loads that feed elementwise work). A shared (T, D)
    table (SHARED_TABLE) is read once, before the loop."""
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634
    step = tl.num_programs(0)
    q1, q2, kf1, kf2, kl1, kl2, vf, vl, cq, sq, cf, sf, cl, sl = _load_head(
        Q, K, V, COS, SIN, tl.program_id(0), n_bh, stride_qb, stride_qt, stride_qh, stride_vb, stride_vt,
        stride_vh, stride_cb, stride_ct, H, T, HEAD_DIM, BLOCK_T, FIRST_KEYS, LAST_KEYS, True)
    for bh in range(tl.program_id(0), n_bh, step):
        nq1, nq2, nkf1, nkf2, nkl1, nkl2, nvf, nvl, ncq, nsq, ncf, nsf, ncl, nsl = _load_head(
            Q, K, V, COS, SIN, bh + step, n_bh, stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh,
            stride_cb, stride_ct, H, T, HEAD_DIM, BLOCK_T, FIRST_KEYS, LAST_KEYS, not SHARED_TABLE)
        q1, q2 = _rotate_rounded(q1, q2, cq, sq)
        kf1, kf2 = _rotate_rounded(kf1, kf2, cf, sf)
        if LAST_KEYS > 0:
            kl1, kl2 = _rotate_rounded(kl1, kl2, cl, sl)
        o, lse = _softmax_pv(q1, q2, kf1, kf2, vf, kl1, kl2, vl, T, QK_SCALE, FIRST_KEYS, LAST_KEYS, True)
        _store_o_lse(O, LSE, o, lse, tl.arange(0, BLOCK_T), bh, bh // H, bh % H, H, T, HEAD_DIM)
        q1, q2, kf1, kf2, kl1, kl2, vf, vl = nq1, nq2, nkf1, nkf2, nkl1, nkl2, nvf, nvl
        if not SHARED_TABLE:
            cq, sq, cf, sf, cl, sl = ncq, nsq, ncf, nsf, ncl, nsl


# -----------------------------------------------------------------------------
# One-tile backward, for T <= 128. Replaces the reference backward (a delta in PyTorch, then a dQ and a
# dK/dV kernel that each rebuild P and rotate q and k) where one tile holds every key: one program per head
# keeps k, v and the dK, dV sums on chip while it walks the query blocks, computes delta itself and writes
# each block's dQ as it goes. One launch, and q and k read and rotated once.

@triton.jit
def _attn_bwd_one_tile(Q, K, V, COS, SIN, O, DO, LSE, DQ, DK, DV,
                       stride_qb, stride_qt, stride_qh,  # q and k: (B, T, H, D) views with the same strides
                       stride_vb, stride_vt, stride_vh,
                       stride_db, stride_dt, stride_dh,  # dO
                       stride_cb, stride_ct,  # cos, sin as in kernels._attn_fwd
                       H, T, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, ROPE_IN: tl.constexpr,
                       ROPE_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """dQ, dK, dV (contiguous (B, T, H, D)) of one head, all T <= BLOCK_T keys in one tile, BLOCK_M queries a
    step. ROPE_IN rotates q and k as they are loaded (the persistent forward saved them unrotated); ROPE_OUT
    rotates the gradients back."""
    HALF: tl.constexpr = HEAD_DIM // 2
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    cos, sin = COS + b * stride_cb, SIN + b * stride_cb
    head = (b * T * H + h) * HEAD_DIM  # this head in the contiguous O, dQ, dK, dV
    keys = tl.arange(0, BLOCK_T)
    k1, k2 = _load_rotated(K + b * stride_qb + h * stride_qh, cos, sin, keys, T, stride_qt, stride_ct, HALF, ROPE_IN)
    v = _load_tile(V + b * stride_vb + h * stride_vh, keys, T, stride_vt, HEAD_DIM)
    dk1 = tl.zeros([BLOCK_T, HALF], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_T, HALF], dtype=tl.float32)
    dv = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, T, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q1, q2 = _load_rotated(Q + b * stride_qb + h * stride_qh, cos, sin, rows, T, stride_qt, stride_ct, HALF,
                               ROPE_IN)
        do = _load_tile(DO + b * stride_db + h * stride_dh, rows, T, stride_dt, HEAD_DIM)
        o = _load_tile(O + head, rows, T, H * HEAD_DIM, HEAD_DIM)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=float("inf"))
        # padded keys masked: their dS feeds dQ, and a padded key's score 0 need not be small next to lse
        st = tl.where((keys < T)[:, None], _scores(k1, k2, q1, q2, QK_SCALE, True), float("-inf"))
        dv, dst = _dv_and_ds_transposed(st, v, do, lse, delta, dv)
        dk1 = tl.dot(dst, q1, dk1)
        dk2 = tl.dot(dst, q2, dk2)
        ds = tl.trans(dst)
        _store_rotated_back(DQ + head, tl.dot(ds, k1) * SCALE, tl.dot(ds, k2) * SCALE, cos, sin, rows, T,
                            H * HEAD_DIM, stride_ct, HALF, ROPE_OUT)
    _store_tile(DV + head, dv, keys, T, H * HEAD_DIM, HEAD_DIM)
    _store_rotated_back(DK + head, dk1 * SCALE, dk2 * SCALE, cos, sin, keys, T, H * HEAD_DIM, stride_ct, HALF,
                        ROPE_OUT)


# -----------------------------------------------------------------------------
# TMA backward, for T > 128, on the rotated q and k the forward saved. Replaces kernels._attn_bwd_dq and
# _attn_bwd_dkdv there: tiles through TMA descriptors in software-pipelined loops, whole-D (split into
# halves only at the store, for the rotation back), the ragged blocks apart, 64-key dK/dV tiles (with 128
# the accumulators spill), and a last key tile just large enough for its keys (900: 14 x 64 + 16).

@triton.jit
def _dq_step(dq, q, do, lse, delta, KD, VD, b, h, start_n, T, QK_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
             HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """One key block's share of dQ; MASKED for the ragged last block."""
    k = _load_box(KD, b, start_n, h, BLOCK_N, HEAD_DIM)
    v = _load_box(VD, b, start_n, h, BLOCK_N, HEAD_DIM)
    s = tl.dot(q, tl.trans(k)) * QK_SCALE - lse[:, None]
    if MASKED:  # a padded key's score 0 need not be small next to lse: exp2 may overflow
        s = tl.where((start_n + tl.arange(0, BLOCK_N) < T)[None, :], s, float("-inf"))
    p = tl.exp2(s)
    ds = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(k.dtype)
    return tl.dot(ds, k, dq)


@triton.jit
def _attn_bwd_dq_tma(QD, KD, VD, DOD, O, LSE, DELTA, DQ, COS, SIN, stride_cb, stride_ct, H, T,
                     HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, ROPE_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    """dQ of BLOCK_M queries (q, k, v, dO through TMA descriptors; O, DQ contiguous (B, T, H, D)). Also
    writes delta = rowsum(dO * O) for the dK/dV kernel launched after it."""
    HALF: tl.constexpr = HEAD_DIM // 2
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634
    pid_m, bh, b, h = _block_and_head(T, BLOCK_M, H)
    head = (b * T * H + h) * HEAD_DIM
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_box(QD, b, start_m, h, BLOCK_M, HEAD_DIM)
    do = _load_box(DOD, b, start_m, h, BLOCK_M, HEAD_DIM)
    o = _load_tile(O + head, rows, T, H * HEAD_DIM, HEAD_DIM)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * T + rows, delta, mask=rows < T)
    lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=float("inf"))  # padded rows: P = 0
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (T // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, n_full, BLOCK_N, num_stages=NUM_STAGES):
        dq = _dq_step(dq, q, do, lse, delta, KD, VD, b, h, start_n, T, QK_SCALE, BLOCK_N, HEAD_DIM, False)
    if n_full < T:
        dq = _dq_step(dq, q, do, lse, delta, KD, VD, b, h, n_full, T, QK_SCALE, BLOCK_N, HEAD_DIM, True)
    dq1, dq2 = _whole_to_halves(dq * SCALE, BLOCK_M, HALF)
    _store_rotated_back(DQ + head, dq1, dq2, COS + b * stride_cb, SIN + b * stride_cb, rows, T, H * HEAD_DIM,
                        stride_ct, HALF, ROPE_OUT)


@triton.jit
def _dkdv_step(dk, dv, k, v, QD, DOD, LSE, DELTA, b, h, bh, start_m, T, QK_SCALE: tl.constexpr,
               BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """One query block's share of dK, dV; MASKED for the ragged last block. Padded keys are not masked:
    they reach only their own rows of dK and dV, which are never stored."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_box(QD, b, start_m, h, BLOCK_M, HEAD_DIM)
    do = _load_box(DOD, b, start_m, h, BLOCK_M, HEAD_DIM)
    lse = _load_maybe_masked(LSE + bh * T + rows, rows < T, float("inf"), MASKED)
    delta = _load_maybe_masked(DELTA + bh * T + rows, rows < T, 0.0, MASKED)
    dv, dst = _dv_and_ds_transposed(tl.dot(k, tl.trans(q)) * QK_SCALE, v, do, lse, delta, dv)
    return tl.dot(dst, q, dk), dv


@triton.jit
def _dkdv_block(QD, KD, VD, DOD, LSE, DELTA, DK, DV, COS, SIN, b, h, bh, start_n, stride_cb, stride_ct, H, T,
                HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, ROPE_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    """dK, dV of BLOCK_N keys from start_n, over all query blocks."""
    HALF: tl.constexpr = HEAD_DIM // 2
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634
    k = _load_box(KD, b, start_n, h, BLOCK_N, HEAD_DIM)
    v = _load_box(VD, b, start_n, h, BLOCK_N, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    m_full = (T // BLOCK_M) * BLOCK_M
    for start_m in tl.range(0, m_full, BLOCK_M, num_stages=NUM_STAGES):
        dk, dv = _dkdv_step(dk, dv, k, v, QD, DOD, LSE, DELTA, b, h, bh, start_m, T, QK_SCALE, BLOCK_M, HEAD_DIM,
                            False)
    if m_full < T:
        dk, dv = _dkdv_step(dk, dv, k, v, QD, DOD, LSE, DELTA, b, h, bh, m_full, T, QK_SCALE, BLOCK_M, HEAD_DIM,
                            True)
    rows = start_n + tl.arange(0, BLOCK_N)
    head = (b * T * H + h) * HEAD_DIM
    # dV first: its registers are free before dK's rotation needs the tables
    _store_tile(DV + head, dv, rows, T, H * HEAD_DIM, HEAD_DIM)
    dk1, dk2 = _whole_to_halves(dk * SCALE, BLOCK_N, HALF)
    _store_rotated_back(DK + head, dk1, dk2, COS + b * stride_cb, SIN + b * stride_cb, rows, T, H * HEAD_DIM,
                        stride_ct, HALF, ROPE_OUT)


@triton.jit
def _attn_bwd_dkdv_tma(QD, KD, VD, KLD, VLD, DOD, LSE, DELTA, DK, DV, COS, SIN, stride_cb, stride_ct, H, T,
                       HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, ROPE_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, LAST_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    """dK, dV of one key block. KD, VD have BLOCK_N-row boxes; KLD, VLD LAST_N-row boxes for the last key
    block, whose tile is LAST_N keys."""
    pid_n, bh, b, h = _block_and_head(T, BLOCK_N, H)
    start_n = pid_n * BLOCK_N
    if pid_n == tl.cdiv(T, BLOCK_N) - 1:
        _dkdv_block(QD, KLD, VLD, DOD, LSE, DELTA, DK, DV, COS, SIN, b, h, bh, start_n, stride_cb, stride_ct, H, T,
                    HEAD_DIM, SCALE, ROPE_OUT, BLOCK_M, LAST_N, NUM_STAGES)
    else:
        _dkdv_block(QD, KD, VD, DOD, LSE, DELTA, DK, DV, COS, SIN, b, h, bh, start_n, stride_cb, stride_ct, H, T,
                    HEAD_DIM, SCALE, ROPE_OUT, BLOCK_M, BLOCK_N, NUM_STAGES)


# -----------------------------------------------------------------------------
# launches and the autograd Function

def _one_tile(T):
    """The power-of-two tile (16 or more) that holds all T rows of a short sequence."""
    return max(16, triton.next_power_of_2(T))


def _key_tiles(T, tile):
    """(FIRST_KEYS, LAST_KEYS): the keys of a short sequence as one tile, or as a half and a quarter tile
    where those hold them (82 keys: 64 + 32), which cuts the score and P v work by a quarter."""
    if tile >= 64 and T <= tile * 3 // 4:
        return tile // 2, tile // 4
    return tile, 0


def _last_key_tile(T, block):
    """The tile of the last of cdiv(T, block) key blocks: the smallest power of two (16 or more) that holds
    its T % block keys where that is at most half a block, else a whole block."""
    tile = max(16, triton.next_power_of_2(T % block))
    return tile if T % block and tile <= block // 2 else block


def _tma_ready(x):
    """x, or a contiguous copy, as a TMA descriptor needs it: unit last stride, other strides 16-byte aligned
    and not 0 (an expanded tensor, like the gradient of a sum), and a 16-byte aligned start. The start is
    checked only outside torch.compile, which cannot trace data_ptr() without a graph break; there the
    inputs are the model's own projections, which are aligned."""
    align = 16 // x.element_size()
    aligned = x.stride(-1) == 1 and all(st > 0 and st % align == 0 for st in x.stride()[:-1])
    if aligned and not torch.compiler.is_compiling():
        aligned = x.data_ptr() % 16 == 0
    return x if aligned else x.clone(memory_format=torch.contiguous_format)


def _rows_desc(x, rows):
    """A TMA descriptor of a (B, T, H, D) tensor whose box is `rows` rows of one head."""
    return TensorDescriptor.from_tensor(x, [1, rows, 1, x.shape[-1]])


def _num_sms(device):
    """Multiprocessors of a CUDA device (1 for CPU tensors under the interpreter); torch.compile traces this
    without a graph break."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rope_pass_launch(q, k, cos, sin):
    """rope(q), rope(k) as two new contiguous tensors (not views of one buffer: see kernels.py)."""
    B, T, H, D = q.shape
    cos, sin, stride_cb, stride_ct = _rope_tables(q, cos, sin)
    q_rot, k_rot = (torch.empty((B, T, H, D), device=q.device, dtype=q.dtype) for _ in range(2))
    _rope_pass[(triton.cdiv(T, 16) * B,)](q, k, cos, sin, q_rot, k_rot, *_bth(q), stride_cb, stride_ct, T, H=H,
                                          HEAD_DIM=D, BLOCK_T=16, num_warps=4)
    return q_rot, k_rot


def _flash_fwd(q, k, v, cos, sin, tiled_config=None, persistent_config=None):
    """o, lse, the q and k the backward needs, and whether those are rotated already. Up to SHORT_MAX_T
    tokens the persistent kernels, beyond (or given tiled_config) the RoPE pass and the tiled kernel.
    The configs, (BLOCK_M, BLOCK_N, num_warps, num_stages) and the persistent kernel's (num_warps,
    programs per multiprocessor[, num_stages]), exist for the tests, which force every path."""
    B, T, H, D = q.shape
    if q.stride() != k.stride():  # the RoPE kernels take one set of strides for q and k
        q, k = q.contiguous(), k.contiguous()
    o = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    if tiled_config is None and T <= SHORT_MAX_T:
        tile = _one_tile(T)
        first, last = _key_tiles(T, tile)
        meta = dict(HEAD_DIM=D, SCALE=1.0 / math.sqrt(D), BLOCK_T=tile, FIRST_KEYS=first, LAST_KEYS=last)
        if cos is not None:
            cos_, sin_, stride_cb, stride_ct = _rope_tables(q, cos, sin)
            # eight warps share the 128-row score tile (with four it spills); two programs per multiprocessor
            num_warps, per_sm = persistent_config or (8, 2)
            _attn_fwd_persistent_rope[(min(B * H, per_sm * _num_sms(q.device)),)](
                q, k, v, cos_, sin_, o, lse, *_bth(q), *_bth(v), stride_cb, stride_ct, B * H, H, T, **meta,
                SHARED_TABLE=stride_cb == 0, num_warps=num_warps)
            return o, lse, q, k, False
        # one 8-warp program per multiprocessor with as many heads in flight (up to 4) as fit in 200 KB of
        # shared memory, where a stage holds a head's q, k and v; a second program per SM would run a second wave
        stage_bytes = (tile + 2 * (first + last)) * D * q.element_size()
        num_warps, per_sm, num_stages = persistent_config or (8, 1, max(1, min(4, 200 * 1024 // stage_bytes)))
        qb, kb, vb = _tma_ready(q), _tma_ready(k), _tma_ready(v)
        _attn_fwd_persistent[(min(B * H, per_sm * _num_sms(q.device)),)](
            _rows_desc(qb, tile), _rows_desc(kb, first), _rows_desc(kb, last or first), _rows_desc(vb, first),
            _rows_desc(vb, last or first), o, lse, B * H, H, T, **meta, NUM_STAGES=num_stages, num_warps=num_warps)
        return o, lse, q, k, False
    # 64 x 64 tiles, 4 warps, 3 stages: the fastest of the configs tried at T = 900
    BLOCK_M, BLOCK_N, num_warps, num_stages = tiled_config or (64, 64, 4, 3)
    rotated = cos is not None
    if rotated:
        q, k = _rope_pass_launch(q, k, cos, sin)
    qb, kb, vb = _tma_ready(q), _tma_ready(k), _tma_ready(v)
    _attn_fwd_tiled[(triton.cdiv(T, BLOCK_M) * B * H,)](
        _rows_desc(qb, BLOCK_M), _rows_desc(kb, BLOCK_N), _rows_desc(vb, BLOCK_N), o, lse, H, T, HEAD_DIM=D,
        SCALE=1.0 / math.sqrt(D), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_STAGES=num_stages, num_warps=num_warps)
    return o, lse, q, k, rotated


def _flash_bwd(do, q, k, v, o, lse, cos, sin, rotated, config=None):
    """dq, dk, dv w.r.t. the pre-RoPE q and k, from q, k as _flash_fwd returned them. config: (dQ config,
    dK/dV config), each (BLOCK_M, BLOCK_N, num_warps, num_stages); a dK/dV BLOCK_N >= T is the one-tile kernel."""
    B, T, H, D = q.shape
    if config is None:
        # one tile: 16 queries a step, so that the 128-key accumulators leave registers for the rest;
        # beyond: 64 x 64 dQ tiles 4 stages deep, 32 queries against 64 keys for dK/dV (no spills)
        config = (None, (16, _one_tile(T), 4, 2)) if T <= SHORT_MAX_T else ((64, 64, 4, 4), (32, 64, 4, 3))
    dq_config, (BLOCK_M, BLOCK_N, num_warps, num_stages) = config
    one_tile = T <= BLOCK_N
    if q.stride() != k.stride():  # the RoPE pass and the one-tile kernel take one set of strides for q and k
        q, k = q.contiguous(), k.contiguous()
    if cos is not None and not rotated and not one_tile:  # the TMA kernels read q and k rotated
        q, k = _rope_pass_launch(q, k, cos, sin)
    cos_, sin_, stride_cb, stride_ct = _rope_tables(q, cos, sin)
    dq, dk, dv = (torch.empty((B, T, H, D), device=q.device, dtype=q.dtype) for _ in range(3))
    meta = dict(HEAD_DIM=D, SCALE=1.0 / math.sqrt(D), ROPE_OUT=cos is not None)
    if one_tile:
        _attn_bwd_one_tile[(B * H,)](
            q, k, v, cos_, sin_, o, do, lse, dq, dk, dv, *_bth(q), *_bth(v), *_bth(do), stride_cb, stride_ct, H, T,
            **meta, ROPE_IN=cos is not None and not rotated, BLOCK_M=BLOCK_M, BLOCK_T=BLOCK_N, num_warps=num_warps,
            num_stages=num_stages)
        return dq, dk, dv
    q, k, v, do = (_tma_ready(x) for x in (q, k, v, do))
    delta = torch.empty_like(lse)
    BLOCK_M_Q, BLOCK_N_Q, num_warps_q, num_stages_q = dq_config
    _attn_bwd_dq_tma[(triton.cdiv(T, BLOCK_M_Q) * B * H,)](
        _rows_desc(q, BLOCK_M_Q), _rows_desc(k, BLOCK_N_Q), _rows_desc(v, BLOCK_N_Q), _rows_desc(do, BLOCK_M_Q), o,
        lse, delta, dq, cos_, sin_, stride_cb, stride_ct, H, T, **meta, BLOCK_M=BLOCK_M_Q, BLOCK_N=BLOCK_N_Q,
        NUM_STAGES=num_stages_q, num_warps=num_warps_q)
    LAST_N = _last_key_tile(T, BLOCK_N)
    _attn_bwd_dkdv_tma[(triton.cdiv(T, BLOCK_N) * B * H,)](
        _rows_desc(q, BLOCK_M), _rows_desc(k, BLOCK_N), _rows_desc(v, BLOCK_N), _rows_desc(k, LAST_N),
        _rows_desc(v, LAST_N), _rows_desc(do, BLOCK_M), lse, delta, dk, dv, cos_, sin_, stride_cb, stride_ct, H, T,
        **meta, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, LAST_N=LAST_N, NUM_STAGES=num_stages, num_warps=num_warps)
    return dq, dk, dv


class HopperFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin):
        q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
        o, lse, q_saved, k_saved, rotated = _flash_fwd(q, k, v, cos, sin)
        ctx.save_for_backward(q_saved, k_saved, v, o, lse, cos, sin)
        ctx.rotated = rotated
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cos, sin = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(_unit_last_stride(do), q, k, v, o, lse, cos, sin, ctx.rotated)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, cos=None, sin=None):
    """The tuned attention, whatever the device (CPU tensors need TRITON_INTERPRET=1); same contract as
    kernels.flash_attention."""
    assert q.shape == k.shape == v.shape and q.shape[-1] in FLASH_HEAD_DIMS
    return HopperFlashAttention.apply(q, k, v, cos, sin)
