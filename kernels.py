"""
The two operations of HRM's transformer blocks that are worth a kernel of their own:

- attention(q, k, v, cos, sin): non-causal multi-head attention with rotary position embedding
  applied to q and k.
- add_rms_norm(x, y, eps): rms_norm(x + y), the residual add and weightless RMSNorm of a post-norm block.

Each has a plain PyTorch reference here (attention_reference, add_rms_norm_reference); model.py calls only
the two entry points at the bottom, which pick a backend: hand-written Triton kernels on CUDA tensors when
triton imports, PyTorch otherwise. set_use_flash(True / False / None) forces the kernels, forces PyTorch,
or goes back to the automatic choice, for both operations; each distinct choice is logged once on the
logger "hrm.attn".

The Triton path, after Triton's tutorials (layer norm, fused attention) and FlashAttention-2:

- Attention forward: an online softmax over K/V tiles with a running max and sum in float32, so no T x T
  matrix ever reaches memory. It writes the output and the base-2 logsumexp of each row (B, H, T), all
  the backward needs to rebuild P. RoPE is in float32, rounded to the input dtype, as the reference.
- Up to 128 tokens (Sudoku's 82) one tile holds all the queries and keys of a head, and a program that
  does one such tile is bound by memory latency. So a persistent kernel walks the heads, a whole head
  per step, and loads the next head's q, k, v while it computes this one; it rotates each head's q and k
  once (the fused backward rotates them too).
- Longer sequences: one program per (block of BLOCK_M queries, batch*head). Rotating inside it would
  rotate every K tile again in every program, and K would have to pass through registers instead of
  streaming from memory to the matrix units: a separate kernel rotates q and k once, and the backward
  reuses them (measured in notes/kernels.md).
- Attention backward: P is recomputed tile by tile from the rotated q, k and the logsumexp. One kernel
  walks the key blocks for each query block and accumulates dQ (and first writes delta = rowsum(dO * O));
  a second walks the query blocks for each key block and accumulates dK, dV. Their loops take the full
  blocks without masks and the ragged last one apart, and the last key block of the dK/dV kernel gets a
  tile just large enough for it. When one tile holds every key (T <= 128) a single fused kernel does it
  all: it computes delta itself and writes dQ as it goes. Gradients are rotated back (the transpose of
  the RoPE rotation) as they are stored, so they are w.r.t. the pre-RoPE q and k.
- RoPE uses the rotate-half layout: x = [x1, x2] (halves of the head dim) maps to
  [x1 c - x2 s, x2 c + x1 s]. Since the tables' halves are equal, kernels read only cos[..., :D/2] and
  sin[..., :D/2] and keep every q/k tile as two half tiles; a q.k^T product is the sum of two dots.
- add_rms_norm: BLOCK_ROWS rows per program, a whole row in registers. The backward needs no saved
  input: with g = h * rstd the output, dh = rstd * (dg - g * mean(dg * g)), so it reads the saved output
  and the per-row rstd (4 bytes a row).
- torch.compile traces the autograd Functions and the kernel launches without graph breaks. Scales and
  eps are constexpr (Inductor would pass a Python float as float64, which changes the arithmetic). Every
  tensor a kernel writes is a fresh tensor, never a view of a shared buffer: torch.compile copies such a
  view before a kernel writes into it (1.5 ms of a 46 ms Sudoku training step, when dq, dk, dv were views).

Offsets are 32-bit: a tensor must have fewer than 2**31 elements.

Everything Triton is defined only when triton imports, so this module imports without it.
"""
import logging
import math

import torch
import torch.nn.functional as F
from torch._dynamo.comptime import comptime

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

log = logging.getLogger("hrm.attn")


# -----------------------------------------------------------------------------
# PyTorch references

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x: (B, T, H, D); cos, sin: (T, D) or (B, T, D), float32, halves duplicated (rotate-half layout)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x32 = x.to(cos.dtype)
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def attention_reference(q, k, v, cos=None, sin=None):
    """q, k, v: (B, T, H, D) -> (B, T, H, D). RoPE in float32, then PyTorch's SDPA."""
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return y.transpose(1, 2)


def add_rms_norm_reference(x, y, eps):
    """rms_norm(x + y) without a weight; the sum is rounded to the input dtype first, statistics in float32."""
    h = (x + y).float()
    return (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


# -----------------------------------------------------------------------------
# Triton kernels

FLASH_HEAD_DIMS = (64, 128)
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # on CUDA; float32 runs only under the CPU interpreter (tests)

if triton is not None:

    @triton.jit
    def _load_halves(base, rows, mask, stride_t, offs_h, HALF: tl.constexpr):
        """A (rows, D) tile of a (T, D) matrix with unit column stride, as its two (rows, D/2) halves."""
        ptrs = base + rows[:, None] * stride_t + offs_h[None, :]
        return (tl.load(ptrs, mask=mask[:, None], other=0.0),
                tl.load(ptrs + HALF, mask=mask[:, None], other=0.0))

    @triton.jit
    def _store_halves(base, x1, x2, rows, mask, stride_t, offs_h, HALF: tl.constexpr):
        ptrs = base + rows[:, None] * stride_t + offs_h[None, :]
        tl.store(ptrs, x1.to(base.dtype.element_ty), mask=mask[:, None])
        tl.store(ptrs + HALF, x2.to(base.dtype.element_ty), mask=mask[:, None])

    @triton.jit
    def _load_table(cos_ptr, sin_ptr, rows, mask, stride_ct, offs_h):
        """cos, sin at positions `rows`, first halves only: the rotate-half tables repeat them."""
        tab = rows[:, None] * stride_ct + offs_h[None, :]
        return (tl.load(cos_ptr + tab, mask=mask[:, None], other=0.0),
                tl.load(sin_ptr + tab, mask=mask[:, None], other=0.0))

    @triton.jit
    def _rotate(x1, x2, c, s, INVERSE: tl.constexpr):
        """RoPE on a tile held as halves [x1, x2], in float32: [x1 c - x2 s, x2 c + x1 s].
        INVERSE applies the transpose, which takes a gradient back to the pre-RoPE frame."""
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        if INVERSE:
            y1 = x1 * c + x2 * s
            y2 = x2 * c - x1 * s
        else:
            y1 = x1 * c - x2 * s
            y2 = x2 * c + x1 * s
        return y1, y2

    @triton.jit
    def _load_qk(base, cos_ptr, sin_ptr, rows, mask, stride_t, stride_ct, offs_h,
                 HALF: tl.constexpr, ROPE: tl.constexpr):
        """A q or k tile as halves; with ROPE rotated, then rounded back to its dtype as the reference does."""
        x1, x2 = _load_halves(base, rows, mask, stride_t, offs_h, HALF)
        if ROPE:
            c, s = _load_table(cos_ptr, sin_ptr, rows, mask, stride_ct, offs_h)
            r1, r2 = _rotate(x1, x2, c, s, False)
            x1 = r1.to(x1.dtype)
            x2 = r2.to(x2.dtype)
        return x1, x2

    @triton.jit
    def _store_grad(base, g1, g2, cos_ptr, sin_ptr, rows, mask, stride_t, stride_ct, offs_h,
                    HALF: tl.constexpr, ROPE: tl.constexpr):
        """Store a float32 gradient held as halves; with ROPE first rotated back to the pre-RoPE frame."""
        if ROPE:
            c, s = _load_table(cos_ptr, sin_ptr, rows, mask, stride_ct, offs_h)
            g1, g2 = _rotate(g1, g2, c, s, True)
        _store_halves(base, g1, g2, rows, mask, stride_t, offs_h, HALF)

    @triton.jit
    def _rope_qk(Q, K, COS, SIN, QR, KR, stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
                 stride_cb, stride_ct, T, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
        """RoPE on q and k for BLOCK_T positions of one sequence, all heads: the tables are read once for
        2 * H head vectors, and the unrolled head loop lets all the loads be in flight together.
        Writes q_rot and k_rot into QR and KR (B, T, H, D), which share their strides."""
        HALF: tl.constexpr = HEAD_DIM // 2
        num_t = tl.cdiv(T, BLOCK_T)
        b = tl.program_id(0) // num_t
        rows = (tl.program_id(0) % num_t) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = rows < T
        offs_h = tl.arange(0, HALF)
        c, s = _load_table(COS + b * stride_cb, SIN + b * stride_cb, rows, mask, stride_ct, offs_h)
        for h in tl.static_range(H):
            x1, x2 = _load_halves(Q + b * stride_qb + h * stride_qh, rows, mask, stride_qt, offs_h, HALF)
            y1, y2 = _rotate(x1, x2, c, s, False)
            _store_halves(QR + b * stride_ob + h * stride_oh, y1, y2, rows, mask, stride_ot, offs_h, HALF)
            x1, x2 = _load_halves(K + b * stride_qb + h * stride_qh, rows, mask, stride_qt, offs_h, HALF)
            y1, y2 = _rotate(x1, x2, c, s, False)
            _store_halves(KR + b * stride_ob + h * stride_oh, y1, y2, rows, mask, stride_ot, offs_h, HALF)

    @triton.jit
    def _attn_fwd_inner(acc, l_i, m_i, q1, q2, k_base, v_base, start, stop, T, stride_qt, stride_vt,
                        offs_n, offs_h, offs_d, QK_SCALE: tl.constexpr, HALF: tl.constexpr,
                        BLOCK_N: tl.constexpr, MASK_TAIL: tl.constexpr):
        """Online softmax over key blocks [start, stop). Only the last, partial block pays for the mask.
        K comes in rotated already, so its tiles go from memory to the matrix units untouched, which lets
        Triton pipeline the loads (num_stages)."""
        for start_n in range(start, stop, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < T
            k1, k2 = _load_halves(k_base, cols, mask_n, stride_qt, offs_h, HALF)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            s = tl.dot(q1, tl.trans(k1))
            s = tl.dot(q2, tl.trans(k2), s) * QK_SCALE  # base 2: exp2(s) == exp(q.k / sqrt(D))
            if MASK_TAIL:
                s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _softmax_pv(q1, q2, k1, k2, v, mask_n, QK_SCALE: tl.constexpr):
        """softmax(q k^T) v over one key tile (q, k as halves), and the base-2 logsumexp of each row."""
        s = tl.dot(q1, tl.trans(k1))
        s = tl.dot(q2, tl.trans(k2), s) * QK_SCALE
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v)
        return acc / l[:, None], m + tl.log2(l)

    @triton.jit
    def _block_and_head(T, BLOCK: tl.constexpr, H):
        """This program's block of BLOCK rows, (batch * head) index, batch and head, on a 1D grid with the
        blocks fastest: the programs of one head run together and share its K/V in L2."""
        num_blocks = tl.cdiv(T, BLOCK)
        pid_bh = tl.program_id(0) // num_blocks
        return tl.program_id(0) % num_blocks, pid_bh, pid_bh // H, pid_bh % H

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE,
                  stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                  H, T, HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Output and base-2 logsumexp for BLOCK_M queries of one (batch, head): an online softmax over key
        tiles, on q and k as given (the caller rotated them beforehand, or there is no RoPE)."""
        HALF: tl.constexpr = HEAD_DIM // 2
        QK_SCALE: tl.constexpr = SM_SCALE * 1.4426950408889634  # log2(e)
        pid_m, pid_bh, b, h = _block_and_head(T, BLOCK_M, H)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_h = tl.arange(0, HALF)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_m = offs_m < T
        k_base = K + b * stride_qb + h * stride_qh
        v_base = V + b * stride_vb + h * stride_vh

        q1, q2 = _load_halves(Q + b * stride_qb + h * stride_qh, offs_m, mask_m, stride_qt, offs_h, HALF)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        n_full = (T // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q1, q2, k_base, v_base, 0, n_full, T, stride_qt,
                                        stride_vt, offs_n, offs_h, offs_d, QK_SCALE, HALF, BLOCK_N, False)
        if n_full < T:
            acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q1, q2, k_base, v_base, n_full, T, T, stride_qt,
                                            stride_vt, offs_n, offs_h, offs_d, QK_SCALE, HALF, BLOCK_N, True)
        # every row sees at least one real key (non-causal, T >= 1), so l_i > 0 even for padded rows
        tl.store(LSE + pid_bh * T + offs_m, m_i + tl.log2(l_i), mask=mask_m)
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
        tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=mask_m[:, None])

    @triton.jit
    def _load_head(Q, K, V, COS, SIN, bh, n_bh, stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh,
                   stride_cb, stride_ct, H, T, offs_t, offs_h, offs_d, HALF: tl.constexpr, TABLE: tl.constexpr):
        """q, k (as halves), v of head bh = (batch, head), all T rows; all zeros past the last head, so the
        prefetch of a head that does not exist is harmless. With TABLE also its cos and sin."""
        b = bh // H
        h = bh % H
        mask = offs_t < tl.where(bh < n_bh, T, 0)
        q1, q2 = _load_halves(Q + b * stride_qb + h * stride_qh, offs_t, mask, stride_qt, offs_h, HALF)
        k1, k2 = _load_halves(K + b * stride_qb + h * stride_qh, offs_t, mask, stride_qt, offs_h, HALF)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_t[:, None] * stride_vt + offs_d[None, :],
                    mask=mask[:, None], other=0.0)
        c, s = q1, q2  # placeholders: unused without TABLE
        if TABLE:
            c, s = _load_table(COS + b * stride_cb, SIN + b * stride_cb, offs_t, mask, stride_ct, offs_h)
        return q1, q2, k1, k2, v, c, s

    @triton.jit
    def _attn_fwd_short(Q, K, V, COS, SIN, O, LSE,
                        stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh,
                        stride_ob, stride_ot, stride_oh, stride_cb, stride_ct, n_bh, H, T,
                        HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, ROPE: tl.constexpr,
                        SHARED_TABLE: tl.constexpr, BLOCK_T: tl.constexpr):
        """Forward for T <= BLOCK_T (one tile holds every query and every key of a head): a persistent grid
        walks the B * H heads, a whole head per step, and loads the next head's q, k, v before this head's
        arithmetic, so that their memory latency hides behind it. With ROPE each head's q and k are rotated
        once, with one table (queries and keys are the same positions); SHARED_TABLE (a (T, D) table, the
        same for every sample): read once, before the loop."""
        HALF: tl.constexpr = HEAD_DIM // 2
        QK_SCALE: tl.constexpr = SM_SCALE * 1.4426950408889634
        offs_t = tl.arange(0, BLOCK_T)
        offs_h = tl.arange(0, HALF)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_t = offs_t < T
        step = tl.num_programs(0)
        q1, q2, k1, k2, v, c, s = _load_head(Q, K, V, COS, SIN, tl.program_id(0), n_bh, stride_qb, stride_qt,
                                             stride_qh, stride_vb, stride_vt, stride_vh, stride_cb, stride_ct, H, T,
                                             offs_t, offs_h, offs_d, HALF, ROPE)
        for bh in range(tl.program_id(0), n_bh, step):
            nq1, nq2, nk1, nk2, nv, nc, ns = _load_head(Q, K, V, COS, SIN, bh + step, n_bh, stride_qb, stride_qt,
                                                        stride_qh, stride_vb, stride_vt, stride_vh, stride_cb,
                                                        stride_ct, H, T, offs_t, offs_h, offs_d, HALF,
                                                        ROPE and not SHARED_TABLE)
            if ROPE:
                r1, r2 = _rotate(q1, q2, c, s, False)
                q1, q2 = r1.to(q1.dtype), r2.to(q2.dtype)
                r1, r2 = _rotate(k1, k2, c, s, False)
                k1, k2 = r1.to(k1.dtype), r2.to(k2.dtype)
            acc, lse = _softmax_pv(q1, q2, k1, k2, v, mask_t, QK_SCALE)
            tl.store(LSE + bh * T + offs_t, lse, mask=mask_t)
            o_ptrs = O + (bh // H) * stride_ob + (bh % H) * stride_oh + offs_t[:, None] * stride_ot + offs_d[None, :]
            tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_t[:, None])
            q1, q2, k1, k2, v = nq1, nq2, nk1, nk2, nv
            if ROPE and not SHARED_TABLE:
                c, s = nc, ns

    @triton.jit
    def _load_rows(ptrs, mask, other, MASKED: tl.constexpr):
        """tl.load, with the row mask only where MASKED: the full blocks of a loop skip the predicates."""
        if MASKED:
            x = tl.load(ptrs, mask=mask, other=other)
        else:
            x = tl.load(ptrs)
        return x

    @triton.jit
    def _dkdv_step(dk1, dk2, dv, k1, k2, v, q1, q2, do, lse, delta, mask_n, QK_SCALE: tl.constexpr,
                   MASK_KEYS: tl.constexpr):
        """One query block's share of dK, dV, with transposed scores (keys as rows). Returns the updated
        accumulators and dS^T. Padded queries come with lse = +inf, so their P is exactly 0. MASK_KEYS zeroes
        P for padded keys too: needed where dS feeds dQ (a padded key scores 0, which need not be small next
        to lse, so exp2 may overflow), not where only dK, dV rows of padded keys, never stored, see them."""
        st = tl.dot(k1, tl.trans(q1))
        st = tl.dot(k2, tl.trans(q2), st) * QK_SCALE - lse[None, :]
        if MASK_KEYS:
            st = tl.where(mask_n[:, None], st, float("-inf"))
        pt = tl.exp2(st)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))
        dst = (pt * (dpt - delta[None, :])).to(q1.dtype)
        dk1 = tl.dot(dst, q1, dk1)
        dk2 = tl.dot(dst, q2, dk2)
        return dk1, dk2, dv, dst

    @triton.jit
    def _attn_bwd_fused(Q, K, V, COS, SIN, O, DO, LSE, DQ, DK, DV,
                        stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh,
                        stride_ob, stride_ot, stride_oh, stride_gb, stride_gt, stride_gh, stride_cb, stride_ct, H, T,
                        HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, ROPE_IN: tl.constexpr,
                        ROPE_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
        """The whole backward of one (batch, head) for T <= BLOCK_T: all keys in one tile, BLOCK_M queries a
        step. Each step sees every key of its queries, so it computes delta = rowsum(dO * O) itself and
        writes their dQ; dK, dV accumulate over the steps. ROPE_IN rotates q and k as they are loaded (the
        persistent forward saved them unrotated); ROPE_OUT rotates the gradients back to the pre-RoPE frame."""
        HALF: tl.constexpr = HEAD_DIM // 2
        QK_SCALE: tl.constexpr = SM_SCALE * 1.4426950408889634
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        offs_n = tl.arange(0, BLOCK_T)
        offs_m = tl.arange(0, BLOCK_M)
        offs_h = tl.arange(0, HALF)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_n = offs_n < T
        cos_ptr = COS + b * stride_cb
        sin_ptr = SIN + b * stride_cb

        k1, k2 = _load_qk(K + b * stride_qb + h * stride_qh, cos_ptr, sin_ptr, offs_n, mask_n, stride_qt,
                          stride_ct, offs_h, HALF, ROPE_IN)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0)
        dk1 = tl.zeros([BLOCK_T, HALF], dtype=tl.float32)
        dk2 = tl.zeros([BLOCK_T, HALF], dtype=tl.float32)
        dv = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
        for start_m in range(0, T, BLOCK_M):
            rows = start_m + offs_m
            mask_m = rows < T
            q1, q2 = _load_qk(Q + b * stride_qb + h * stride_qh, cos_ptr, sin_ptr, rows, mask_m, stride_qt,
                              stride_ct, offs_h, HALF, ROPE_IN)
            row = b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :]
            do = tl.load(DO + row, mask=mask_m[:, None], other=0.0)
            o = tl.load(O + row, mask=mask_m[:, None], other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            lse = tl.load(LSE + bh * T + rows, mask=mask_m, other=float("inf"))
            dk1, dk2, dv, dst = _dkdv_step(dk1, dk2, dv, k1, k2, v, q1, q2, do, lse, delta, mask_n, QK_SCALE, True)
            ds = tl.trans(dst)
            _store_grad(DQ + b * stride_gb + h * stride_gh, tl.dot(ds, k1) * SM_SCALE, tl.dot(ds, k2) * SM_SCALE,
                        cos_ptr, sin_ptr, rows, mask_m, stride_gt, stride_ct, offs_h, HALF, ROPE_OUT)
        dv_ptrs = DV + b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gt + offs_d[None, :]
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])
        _store_grad(DK + b * stride_gb + h * stride_gh, dk1 * SM_SCALE, dk2 * SM_SCALE, cos_ptr, sin_ptr, offs_n,
                    mask_n, stride_gt, stride_ct, offs_h, HALF, ROPE_OUT)

    @triton.jit
    def _dq_step(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, cols, T, stride_qt, stride_vt, offs_h, offs_d,
                 QK_SCALE: tl.constexpr, HALF: tl.constexpr, MASKED: tl.constexpr):
        """One key block's share of dQ; MASKED for the ragged last block."""
        mask_n = cols < T
        k_ptrs = k_base + cols[:, None] * stride_qt + offs_h[None, :]
        k1 = _load_rows(k_ptrs, mask_n[:, None], 0.0, MASKED)
        k2 = _load_rows(k_ptrs + HALF, mask_n[:, None], 0.0, MASKED)
        v = _load_rows(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask_n[:, None], 0.0, MASKED)
        s = tl.dot(q1, tl.trans(k1))
        s = tl.dot(q2, tl.trans(k2), s) * QK_SCALE - lse[:, None]
        if MASKED:  # a padded key scores 0, which need not be small next to lse: exp2 may overflow
            s = tl.where(mask_n[None, :], s, float("-inf"))
        p = tl.exp2(s)
        dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = tl.dot(ds, k1, dq1)
        dq2 = tl.dot(ds, k2, dq2)
        return dq1, dq2

    @triton.jit
    def _attn_bwd_dq(Q, K, V, COS, SIN, O, DO, LSE, DELTA, DQ,
                     stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                     stride_gb, stride_gt, stride_gh, stride_cb, stride_ct, H, T,
                     HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, ROPE_OUT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dQ for one block of BLOCK_M queries, over all key blocks, from the rotated q and k. Also writes
        delta = rowsum(dO * O), which the dK/dV kernel launched after it reads. ROPE_OUT rotates dQ back to
        the pre-RoPE frame."""
        HALF: tl.constexpr = HEAD_DIM // 2
        QK_SCALE: tl.constexpr = SM_SCALE * 1.4426950408889634
        pid_m, pid_bh, b, h = _block_and_head(T, BLOCK_M, H)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_h = tl.arange(0, HALF)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_m = offs_m < T

        q1, q2 = _load_halves(Q + b * stride_qb + h * stride_qh, offs_m, mask_m, stride_qt, offs_h, HALF)
        row = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
        do = tl.load(DO + row, mask=mask_m[:, None], other=0.0)
        o = tl.load(O + row, mask=mask_m[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + pid_bh * T + offs_m, delta, mask=mask_m)
        # padded rows get lse = +inf, so their P (and everything downstream) is exactly 0
        lse = tl.load(LSE + pid_bh * T + offs_m, mask=mask_m, other=float("inf"))

        k_base = K + b * stride_qb + h * stride_qh
        v_base = V + b * stride_vb + h * stride_vh
        dq1 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
        dq2 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
        n_full = (T // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            dq1, dq2 = _dq_step(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, start_n + offs_n, T, stride_qt,
                                stride_vt, offs_h, offs_d, QK_SCALE, HALF, False)
        if n_full < T:
            dq1, dq2 = _dq_step(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, n_full + offs_n, T, stride_qt,
                                stride_vt, offs_h, offs_d, QK_SCALE, HALF, True)
        _store_grad(DQ + b * stride_gb + h * stride_gh, dq1 * SM_SCALE, dq2 * SM_SCALE, COS + b * stride_cb,
                    SIN + b * stride_cb, offs_m, mask_m, stride_gt, stride_ct, offs_h, HALF, ROPE_OUT)

    @triton.jit
    def _dkdv_queries(dk1, dk2, dv, k1, k2, v, q_base, do_base, lse_base, delta_base, rows, T, stride_qt, stride_ot,
                      offs_h, offs_d, QK_SCALE: tl.constexpr, HALF: tl.constexpr, MASKED: tl.constexpr):
        """_dkdv_step on the query block `rows`, loaded from memory; MASKED for the ragged last block."""
        mask_m = rows < T
        q_ptrs = q_base + rows[:, None] * stride_qt + offs_h[None, :]
        q1 = _load_rows(q_ptrs, mask_m[:, None], 0.0, MASKED)
        q2 = _load_rows(q_ptrs + HALF, mask_m[:, None], 0.0, MASKED)
        do = _load_rows(do_base + rows[:, None] * stride_ot + offs_d[None, :], mask_m[:, None], 0.0, MASKED)
        lse = _load_rows(lse_base + rows, mask_m, float("inf"), MASKED)
        delta = _load_rows(delta_base + rows, mask_m, 0.0, MASKED)
        # no key mask (None): padded keys only reach their own dK, dV rows, which are never stored
        dk1, dk2, dv, _ = _dkdv_step(dk1, dk2, dv, k1, k2, v, q1, q2, do, lse, delta, None, QK_SCALE, False)
        return dk1, dk2, dv

    @triton.jit
    def _dkdv_keys(Q, K, V, COS, SIN, DO, LSE, DELTA, DK, DV, b, h, pid_bh, start_n,
                   stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                   stride_gb, stride_gt, stride_gh, stride_cb, stride_ct, T, HEAD_DIM: tl.constexpr,
                   SM_SCALE: tl.constexpr, ROPE_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dK, dV of BLOCK_N keys from start_n of one (batch, head), over all query blocks."""
        HALF: tl.constexpr = HEAD_DIM // 2
        QK_SCALE: tl.constexpr = SM_SCALE * 1.4426950408889634
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_h = tl.arange(0, HALF)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_n = offs_n < T
        k1, k2 = _load_halves(K + b * stride_qb + h * stride_qh, offs_n, mask_n, stride_qt, offs_h, HALF)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                    mask=mask_n[:, None], other=0.0)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_ob + h * stride_oh
        dk1 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
        dk2 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        m_full = (T // BLOCK_M) * BLOCK_M
        for start_m in range(0, m_full, BLOCK_M):
            dk1, dk2, dv = _dkdv_queries(dk1, dk2, dv, k1, k2, v, q_base, do_base, LSE + pid_bh * T,
                                         DELTA + pid_bh * T, start_m + offs_m, T, stride_qt, stride_ot, offs_h,
                                         offs_d, QK_SCALE, HALF, False)
        if m_full < T:
            dk1, dk2, dv = _dkdv_queries(dk1, dk2, dv, k1, k2, v, q_base, do_base, LSE + pid_bh * T,
                                         DELTA + pid_bh * T, m_full + offs_m, T, stride_qt, stride_ot, offs_h,
                                         offs_d, QK_SCALE, HALF, True)
        # dV first: its registers are free before dK's rotation needs the tables (measured a little faster)
        dv_ptrs = DV + b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gt + offs_d[None, :]
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])
        _store_grad(DK + b * stride_gb + h * stride_gh, dk1 * SM_SCALE, dk2 * SM_SCALE, COS + b * stride_cb,
                    SIN + b * stride_cb, offs_n, mask_n, stride_gt, stride_ct, offs_h, HALF, ROPE_OUT)

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, COS, SIN, DO, LSE, DELTA, DK, DV,
                       stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh,
                       stride_ob, stride_ot, stride_oh, stride_gb, stride_gt, stride_gh, stride_cb, stride_ct, H, T,
                       HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, ROPE_OUT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAST_N: tl.constexpr):
        """dK, dV for one key block from the rotated q and k (and the delta of _attn_bwd_dq). The last key
        block has a tile of LAST_N keys: a BLOCK_N tile would be mostly padding when T % BLOCK_N is small
        (900 keys: 7 blocks of 128 and one of 16, not 8 of 128)."""
        pid_n, pid_bh, b, h = _block_and_head(T, BLOCK_N, H)
        strides = (stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh, stride_ob, stride_ot,
                   stride_oh, stride_gb, stride_gt, stride_gh, stride_cb, stride_ct)
        if pid_n == tl.cdiv(T, BLOCK_N) - 1:
            _dkdv_keys(Q, K, V, COS, SIN, DO, LSE, DELTA, DK, DV, b, h, pid_bh, pid_n * BLOCK_N, *strides, T,
                       HEAD_DIM, SM_SCALE, ROPE_OUT, BLOCK_M, LAST_N)
        else:
            _dkdv_keys(Q, K, V, COS, SIN, DO, LSE, DELTA, DK, DV, b, h, pid_bh, pid_n * BLOCK_N, *strides, T,
                       HEAD_DIM, SM_SCALE, ROPE_OUT, BLOCK_M, BLOCK_N)

    @triton.jit
    def _add_rms_norm_fwd(X, Y, OUT, RSTD, n_rows, N, stride_x, stride_y, stride_o,
                          EPS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
        h = (x + y).to(tl.float32)  # the sum is rounded to the input dtype first, as in the reference
        rstd = tl.rsqrt(tl.sum(h * h, 1) / N + EPS)
        tl.store(OUT + rows[:, None] * stride_o + cols[None, :], (h * rstd[:, None]).to(OUT.dtype.element_ty),
                 mask=mask)
        tl.store(RSTD + rows, rstd, mask=rows < n_rows)

    @triton.jit
    def _add_rms_norm_bwd(DOUT, OUT, RSTD, DH, n_rows, N, stride_do, stride_o, stride_dh,
                          BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """dh = rstd * (dg - g * mean(dg * g)) with g the saved output: no need to keep x + y."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
        dg = tl.load(DOUT + rows[:, None] * stride_do + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(OUT + rows[:, None] * stride_o + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
        dh = rstd[:, None] * (dg - g * (tl.sum(dg * g, 1) / N)[:, None])
        tl.store(DH + rows[:, None] * stride_dh + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)


# -----------------------------------------------------------------------------
# launch wrappers and autograd Functions

def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _bth(x):
    """Batch, time and head strides of a (B, T, H, D) tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def _rope_tables(q, cos, sin):
    """(cos, sin, batch stride, row stride); without RoPE, q stands in for the unused pointers."""
    if cos is None:
        return q, q, 0, 0
    cos = _last_dim_contiguous(cos.float())
    sin = _last_dim_contiguous(sin.float())
    assert cos.shape == sin.shape and cos.stride() == sin.stride()
    return cos, sin, cos.stride(0) if cos.dim() == 3 else 0, cos.stride(-2)  # a (T, D) table: batch stride 0


SHORT_MAX_T = 128  # up to this length the persistent one-tile forward (_attn_fwd_short) takes the call


def attn_fwd_config(T, D):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the tiled forward, _attn_fwd. Picked from the sweeps in
    notes/kernels.md (H100, D = 64, T = 900)."""
    return 64, 64, 4, 3


def attn_short_config(T, D):
    """(num_warps, programs per multiprocessor) of _attn_fwd_short (sweeps: notes/kernels.md, runs 5-9).
    Eight warps share the 128 x 128 score tile; 4 spill."""
    return 8, 2


def attn_bwd_config(T, D):
    """(dQ config, dK/dV config), each (BLOCK_M, BLOCK_N, num_warps, num_stages) with BLOCK_M queries and
    BLOCK_N keys. A dK/dV BLOCK_N >= T is the single fused launch, which needs no dQ config. The two
    kernels of the long case were swept separately (notes/kernels.md, runs 6 and 10)."""
    if T <= 128:
        return None, (16, max(16, triton.next_power_of_2(T)), 4, 2)
    return (64, 32, 4, 3), (32, 128, 4, 3)


def _num_sms(device):
    """Multiprocessors of a CUDA device (1 for CPU tensors under the interpreter). PyTorch caches the
    device properties, and torch.compile traces this call without a graph break."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rope_qk_launch(q, k, cos, sin):
    """q and k rotated, as two new (B, T, H, D) tensors. Two tensors rather than views of one buffer:
    torch.compile would copy a view that a kernel writes into (functionalization), a whole extra pass."""
    B, T, H, D = q.shape
    cos, sin, stride_cb, stride_ct = _rope_tables(q, cos, sin)
    q_rot, k_rot = (torch.empty((B, T, H, D), device=q.device, dtype=q.dtype) for _ in range(2))
    BLOCK_T = 16
    _rope_qk[(triton.cdiv(T, BLOCK_T) * B,)](q, k, cos, sin, q_rot, k_rot, *_bth(q), *_bth(q_rot), stride_cb,
                                             stride_ct, T, H=H, HEAD_DIM=D, BLOCK_T=BLOCK_T, num_warps=4)
    return q_rot, k_rot


def _flash_fwd(q, k, v, cos, sin, config=None, short_config=None):
    """Returns o, lse and the q, k the backward needs: as given, or already rotated (then rotated=True).
    Up to SHORT_MAX_T tokens (unless a tiled config is given) the persistent kernel takes whole heads and
    rotates q and k itself. With several key tiles every program would rotate every K tile again, so there
    a separate pass rotates q and k once and _attn_fwd gets them ready."""
    B, T, H, D = q.shape
    if q.stride() != k.stride():  # the kernels take one set of strides for q and k
        q, k = q.contiguous(), k.contiguous()
    o = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    if config is None and T <= SHORT_MAX_T:
        num_warps, per_sm = short_config or attn_short_config(T, D)
        cos_, sin_, stride_cb, stride_ct = _rope_tables(q, cos, sin)
        _attn_fwd_short[(min(B * H, per_sm * _num_sms(q.device)),)](
            q, k, v, cos_, sin_, o, lse, *_bth(q), *_bth(v), *_bth(o), stride_cb, stride_ct, B * H, H, T,
            HEAD_DIM=D, SM_SCALE=1.0 / math.sqrt(D), ROPE=cos is not None, SHARED_TABLE=stride_cb == 0,
            BLOCK_T=max(16, triton.next_power_of_2(T)), num_warps=num_warps)
        return o, lse, q, k, False
    BLOCK_M, BLOCK_N, num_warps, num_stages = config or attn_fwd_config(T, D)
    rotated = cos is not None
    if rotated:
        q, k = _rope_qk_launch(q, k, cos, sin)
    _attn_fwd[(triton.cdiv(T, BLOCK_M) * B * H,)](
        q, k, v, o, lse, *_bth(q), *_bth(v), *_bth(o), H, T, HEAD_DIM=D, SM_SCALE=1.0 / math.sqrt(D),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages)
    return o, lse, q, k, rotated


def _last_block(T, block):
    """The tile of the last of cdiv(T, block) blocks: the smallest power of two (16 or more) that holds its
    T % block rows where that is at most half a block, else a whole block."""
    tile = max(16, triton.next_power_of_2(T % block))
    return tile if T % block and tile <= block // 2 else block


def _flash_bwd(do, q, k, v, o, lse, cos, sin, rotated, config=None):
    """dq, dk, dv (w.r.t. the pre-RoPE q, k); q, k as _flash_fwd returned them."""
    B, T, H, D = q.shape
    dq_config, dkdv_config = config or attn_bwd_config(T, D)
    if q.stride() != k.stride():
        q, k = q.contiguous(), k.contiguous()
    if do.stride() != o.stride():  # the kernels take one set of strides for o and do
        do = do.contiguous()
    BLOCK_M, BLOCK_N, num_warps, num_stages = dkdv_config
    one_block = T <= BLOCK_N
    if cos is not None and not rotated and not one_block:  # the two-kernel backward reads q and k rotated
        q, k = _rope_qk_launch(q, k, cos, sin)
    cos_, sin_, stride_cb, stride_ct = _rope_tables(q, cos, sin)
    # three tensors, not views of one buffer: see _rope_qk_launch
    dq, dk, dv = (torch.empty((B, T, H, D), device=q.device, dtype=q.dtype) for _ in range(3))
    args = (*_bth(q), *_bth(v), *_bth(o), *_bth(dq), stride_cb, stride_ct, H, T)
    meta = dict(HEAD_DIM=D, SM_SCALE=1.0 / math.sqrt(D), ROPE_OUT=cos is not None)
    if one_block:
        _attn_bwd_fused[(B * H,)](
            q, k, v, cos_, sin_, o, do, lse, dq, dk, dv, *args, **meta, ROPE_IN=cos is not None and not rotated,
            BLOCK_M=BLOCK_M, BLOCK_T=BLOCK_N, num_warps=num_warps, num_stages=num_stages)
        return dq, dk, dv
    delta = torch.empty_like(lse)
    _attn_bwd_dq[(triton.cdiv(T, dq_config[0]) * B * H,)](
        q, k, v, cos_, sin_, o, do, lse, delta, dq, *args, **meta, BLOCK_M=dq_config[0], BLOCK_N=dq_config[1],
        num_warps=dq_config[2], num_stages=dq_config[3])
    _attn_bwd_dkdv[(triton.cdiv(T, BLOCK_N) * B * H,)](
        q, k, v, cos_, sin_, do, lse, delta, dk, dv, *args, **meta, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        LAST_N=_last_block(T, BLOCK_N), num_warps=num_warps, num_stages=num_stages)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin):
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        o, lse, q_saved, k_saved, rotated = _flash_fwd(q, k, v, cos, sin)
        ctx.save_for_backward(q_saved, k_saved, v, o, lse, cos, sin)
        ctx.rotated = rotated
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cos, sin = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, cos, sin, ctx.rotated)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, cos=None, sin=None):
    """The Triton attention, whatever the device (CPU tensors need TRITON_INTERPRET=1). Same contract as
    attention_reference; head_dim must be in FLASH_HEAD_DIMS."""
    assert q.shape == k.shape == v.shape and q.shape[-1] in FLASH_HEAD_DIMS
    return FlashAttention.apply(q, k, v, cos, sin)


def norm_config(N):
    """(BLOCK_ROWS, num_warps). At N = 512 on an H100 this runs at 93-100% of the copy bandwidth, forward
    and backward; the sweep's six best choices were within 2.5% of each other (notes/kernels.md)."""
    return 8, 4


def _add_rms_norm_fwd_launch(x, y, eps, config=None):
    """x, y: (M, N) with unit column stride -> out (M, N), rstd (M,) float32."""
    M, N = x.shape
    BLOCK_ROWS, num_warps = config or norm_config(N)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    _add_rms_norm_fwd[(triton.cdiv(M, BLOCK_ROWS),)](
        x, y, out, rstd, M, N, x.stride(0), y.stride(0), out.stride(0),
        EPS=eps, BLOCK_ROWS=BLOCK_ROWS, BLOCK_N=triton.next_power_of_2(N), num_warps=num_warps)
    return out, rstd


def _add_rms_norm_bwd_launch(dout, out, rstd, config=None):
    M, N = out.shape
    BLOCK_ROWS, num_warps = config or norm_config(N)
    dh = torch.empty((M, N), device=out.device, dtype=out.dtype)
    _add_rms_norm_bwd[(triton.cdiv(M, BLOCK_ROWS),)](
        dout, out, rstd, dh, M, N, dout.stride(0), out.stride(0), dh.stride(0),
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_N=triton.next_power_of_2(N), num_warps=num_warps)
    return dh


def _as_rows(x):
    return _last_dim_contiguous(x.reshape(-1, x.shape[-1]))


class AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, eps):
        out, rstd = _add_rms_norm_fwd_launch(_as_rows(x), _as_rows(y), eps)
        ctx.save_for_backward(out, rstd)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        out, rstd = ctx.saved_tensors
        dh = _add_rms_norm_bwd_launch(_as_rows(dout), out, rstd).view(dout.shape)
        # x and y get the same gradient; autograd does not write into a gradient it was handed
        return dh, dh, None


def add_rms_norm_triton(x, y, eps):
    """The Triton add + RMSNorm, whatever the device (CPU tensors need TRITON_INTERPRET=1)."""
    assert x.shape == y.shape and x.dtype == y.dtype
    return AddRMSNorm.apply(x, y, float(eps))


# -----------------------------------------------------------------------------
# backend selection and the entry points used by model.py

_use_flash = None  # None: automatic; True / False: forced by set_use_flash
_logged = set()


def set_use_flash(flag):
    """For both attention and add_rms_norm: True forces the Triton kernels wherever they support the call
    (CPU tensors then need TRITON_INTERPRET=1), False forces PyTorch, None (default) uses Triton for CUDA
    tensors when triton imports. A compiled model reads the flag when it is traced."""
    global _use_flash
    assert flag in (True, False, None)
    _use_flash = flag


def _log_once(msg):
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def _log_traced_choice(ctx):
    # comptime calls this at trace time with the traced frame, _log_choice's; it may not close over msg
    _log_once(ctx.get_local("msg").as_python_constant())


def _log_choice(msg):
    """Log each distinct backend choice once. Inside torch.compile the message is logged while the graph is
    traced (torch._dynamo's comptime): a logging call in the graph would break it, and one deferred until
    after the graph (reorderable_logging_functions) is dropped when it is made from an inlined function, as
    every call from a model is."""
    comptime(_log_traced_choice, lambda: _log_once(msg))


def _pick(x, unsupported):
    """(use_triton, reason) for a call on tensor x; unsupported is why the kernel cannot take this call, or ''."""
    if _use_flash is False:
        return False, "forced off by set_use_flash(False)"
    if triton is None:
        return False, "triton is not installed"
    if unsupported:
        return False, unsupported
    if _use_flash is True:
        return True, "forced on by set_use_flash(True)"
    if not x.is_cuda:
        return False, f"tensors are on {x.device.type}, not CUDA"
    return True, "CUDA tensors and triton available"


def attention(q, k, v, cos=None, sin=None):
    D = q.shape[-1]
    unsupported = ""
    if D not in FLASH_HEAD_DIMS:
        unsupported = f"head_dim {D} not in {FLASH_HEAD_DIMS}"
    elif q.is_cuda and q.dtype not in FLASH_DTYPES:
        unsupported = f"dtype {q.dtype} on CUDA, not one of {FLASH_DTYPES}"
    use, reason = _pick(q, unsupported)
    _log_choice(f"attention: {'triton flash kernel' if use else 'PyTorch SDPA'} ({reason})")
    if use:
        return flash_attention(q, k, v, cos, sin)
    return attention_reference(q, k, v, cos, sin)


def add_rms_norm(x, y, eps):
    use, reason = _pick(x, "")
    _log_choice(f"add_rms_norm: {'triton kernel' if use else 'PyTorch'} ({reason})")
    if use:
        return add_rms_norm_triton(x, y, eps)
    return add_rms_norm_reference(x, y, eps)
