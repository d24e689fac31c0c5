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
- Up to 128 tokens (Sudoku's 82) one tile holds all the queries of a head and one or two tiles all its
  keys (82 keys: 64 + 32, not 128), and a program that does one head is bound by memory latency. So a
  persistent kernel walks the heads, a whole head per step, with later heads' loads in flight while it
  computes this one: without RoPE through TMA descriptors and a software-pipelined loop (the tiles go
  from memory to shared memory to the matrix units), with RoPE by loading the next head by hand (its
  q and k pass through registers to be rotated once per head; the fused backward rotates them too).
- Longer sequences: one program per (block of BLOCK_M queries, batch*head), its K/V tiles loaded by
  TMA in a software-pipelined loop (15% faster than pointer loads at T = 900). Rotating inside it would
  rotate every K tile again in every program, and K would have to pass through registers instead of
  streaming from memory to the matrix units: a separate kernel rotates q and k once, and the backward
  reuses them (measured in notes/kernels.md).
- Attention backward: P is recomputed tile by tile from the rotated q, k and the logsumexp. One kernel
  walks the key blocks for each query block and accumulates dQ (and first writes delta = rowsum(dO * O));
  a second walks the query blocks for each key block and accumulates dK, dV. Both load their tiles by
  TMA in software-pipelined loops, whole-D (a head's tile split into halves only at the store, where
  RoPE needs them); their loops take the full blocks without masks and the ragged last one apart, and
  the last key block of the dK/dV kernel gets a tile just large enough for it. 64-key dK/dV tiles keep
  the kernel clear of spills (128-key accumulators took all 255 registers). When one tile holds every
  key (T <= 128) a single fused kernel does it all: it computes delta itself and writes dQ as it goes.
  Gradients are rotated back (the transpose of the RoPE rotation) as they are stored, so they are
  w.r.t. the pre-RoPE q and k.
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
    from triton.tools.tensor_descriptor import TensorDescriptor
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
    def _rotate_rounded(x1, x2, c, s):
        """RoPE on a q or k tile held as halves, rounded back to its dtype as the reference does."""
        r1, r2 = _rotate(x1, x2, c, s, False)
        return r1.to(x1.dtype), r2.to(x2.dtype)

    @triton.jit
    def _load_qk(base, cos_ptr, sin_ptr, rows, mask, stride_t, stride_ct, offs_h,
                 HALF: tl.constexpr, ROPE: tl.constexpr):
        """A q or k tile as halves; with ROPE rotated, then rounded back to its dtype as the reference does."""
        x1, x2 = _load_halves(base, rows, mask, stride_t, offs_h, HALF)
        if ROPE:
            c, s = _load_table(cos_ptr, sin_ptr, rows, mask, stride_ct, offs_h)
            x1, x2 = _rotate_rounded(x1, x2, c, s)
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
    def _load_box(desc, b, t0, h, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Rows [t0, t0 + ROWS) of head h of sample b, through a TMA descriptor of a (B, T, H, D) tensor:
        the copy engine writes the box into shared memory, and rows past T arrive as zeros
        (out-of-bounds boxes are padded), so no masks and no address arithmetic."""
        return desc.load([b, t0, h, 0]).reshape(ROWS, HEAD_DIM)

    @triton.jit
    def _store_rows(O, LSE, bh, b, h, rows, acc, lse, T, stride_ob, stride_ot, stride_oh, HEAD_DIM: tl.constexpr):
        """Output rows `rows` of head bh = (batch b, head h) and their logsumexp; padded rows (>= T) are
        not stored."""
        tl.store(LSE + bh * T + rows, lse, mask=rows < T)
        o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + tl.arange(0, HEAD_DIM)[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(rows < T)[:, None])

    @triton.jit
    def _attn_fwd_step(acc, l_i, m_i, q, KD, VD, b, h, start_n, T, QK_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                       HEAD_DIM: tl.constexpr, MASK_TAIL: tl.constexpr):
        """One key block of the online softmax. K and V come through TMA descriptors (rows past T as
        zeros), straight from memory into shared memory, where the matrix units read them; only the last,
        partial block pays for the mask."""
        k = _load_box(KD, b, start_n, h, BLOCK_N, HEAD_DIM)
        v = _load_box(VD, b, start_n, h, BLOCK_N, HEAD_DIM)
        s = tl.dot(q, tl.trans(k)) * QK_SCALE  # base 2: exp2(s) == exp(q.k / sqrt(D))
        if MASK_TAIL:
            s = tl.where((start_n + tl.arange(0, BLOCK_N) < T)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, l_i, m_new

    @triton.jit
    def _block_and_head(T, BLOCK: tl.constexpr, H):
        """This program's block of BLOCK rows, (batch * head) index, batch and head, on a 1D grid with the
        blocks fastest: the programs of one head run together and share its K/V in L2."""
        num_blocks = tl.cdiv(T, BLOCK)
        pid_bh = tl.program_id(0) // num_blocks
        return tl.program_id(0) % num_blocks, pid_bh, pid_bh // H, pid_bh % H

    @triton.jit
    def _attn_fwd(QD, KD, VD, O, LSE, stride_ob, stride_ot, stride_oh, H, T, HEAD_DIM: tl.constexpr,
                  SM_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
        """Output and base-2 logsumexp for BLOCK_M queries of one (batch, head): an online softmax over key
        tiles, on q and k as given (the caller rotated them beforehand, or there is no RoPE), all three
        through TMA descriptors of their (B, T, H, D) tensors; the key loop is software-pipelined
        NUM_STAGES deep."""
        QK_SCALE: tl.constexpr = SM_SCALE * 1.4426950408889634  # log2(e)
        pid_m, pid_bh, b, h = _block_and_head(T, BLOCK_M, H)
        q = _load_box(QD, b, pid_m * BLOCK_M, h, BLOCK_M, HEAD_DIM)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        n_full = (T // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, n_full, BLOCK_N, num_stages=NUM_STAGES):
            acc, l_i, m_i = _attn_fwd_step(acc, l_i, m_i, q, KD, VD, b, h, start_n, T, QK_SCALE, BLOCK_N,
                                           HEAD_DIM, False)
        if n_full < T:
            acc, l_i, m_i = _attn_fwd_step(acc, l_i, m_i, q, KD, VD, b, h, n_full, T, QK_SCALE, BLOCK_N,
                                           HEAD_DIM, True)
        # every row sees at least one real key (non-causal, T >= 1), so l_i > 0 even for padded rows
        _store_rows(O, LSE, pid_bh, b, h, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), acc / l_i[:, None],
                    m_i + tl.log2(l_i), T, stride_ob, stride_ot, stride_oh, HEAD_DIM)

    @triton.jit
    def _scores(q1, q2, k1, k2, QK_SCALE: tl.constexpr, HALVES: tl.constexpr):
        """q k^T in base 2 (exp2(s) == exp(q.k / sqrt(D))), from whole tiles or, with HALVES, halves."""
        s = tl.dot(q1, tl.trans(k1))
        if HALVES:
            s = tl.dot(q2, tl.trans(k2), s)
        return s * QK_SCALE

    @triton.jit
    def _softmax_pv(q1, q2, ka1, ka2, va, kc1, kc2, vc, T, QK_SCALE: tl.constexpr, KEY_A: tl.constexpr,
                    KEY_C: tl.constexpr, HALVES: tl.constexpr):
        """softmax(q k^T) v and the base-2 logsumexp of each row, over all the keys of a head: a KEY_A tile
        (ka, va) and, if KEY_C > 0, a KEY_C tile (kc, vc) after it. Keys past T are masked."""
        s = _scores(q1, q2, ka1, ka2, QK_SCALE, HALVES)
        if KEY_C > 0:  # T > KEY_A: the first tile is all real keys
            s_c = _scores(q1, q2, kc1, kc2, QK_SCALE, HALVES)
            s_c = tl.where((KEY_A + tl.arange(0, KEY_C) < T)[None, :], s_c, float("-inf"))
            m = tl.maximum(tl.max(s, 1), tl.max(s_c, 1))
            p = tl.exp2(s - m[:, None])
            p_c = tl.exp2(s_c - m[:, None])
            l = tl.sum(p, 1) + tl.sum(p_c, 1)
            acc = tl.dot(p_c.to(vc.dtype), vc, tl.dot(p.to(va.dtype), va))
        else:
            s = tl.where((tl.arange(0, KEY_A) < T)[None, :], s, float("-inf"))
            m = tl.max(s, 1)
            p = tl.exp2(s - m[:, None])
            l = tl.sum(p, 1)
            acc = tl.dot(p.to(va.dtype), va)
        # padded query rows see the real keys too, so l > 0 everywhere
        return acc / l[:, None], m + tl.log2(l)

    @triton.jit
    def _attn_fwd_short(QD, KAD, KCD, VAD, VCD, O, LSE, stride_ob, stride_ot, stride_oh, n_bh, H, T,
                        HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, BLOCK_T: tl.constexpr,
                        KEY_A: tl.constexpr, KEY_C: tl.constexpr, NUM_STAGES: tl.constexpr):
        """Forward without RoPE for T <= BLOCK_T: a persistent grid walks the B * H heads, a whole head
        per step. All the queries of a head are one BLOCK_T tile; its keys and values a KEY_A tile and,
        where one power of two would be mostly padding, a KEY_C tile (82 tokens: 64 + 32 keys, not 128).
        q, k, v come through TMA descriptors (KCD, VCD unused when KEY_C = 0) straight into shared
        memory, where the matrix units read them, and the loop is software-pipelined NUM_STAGES deep, so
        that later heads' loads are in flight during this head's arithmetic."""
        QK_SCALE: tl.constexpr = SM_SCALE * 1.4426950408889634
        for bh in tl.range(tl.program_id(0), n_bh, tl.num_programs(0), num_stages=NUM_STAGES):
            b = bh // H
            h = bh % H
            q = _load_box(QD, b, 0, h, BLOCK_T, HEAD_DIM)
            k_a = _load_box(KAD, b, 0, h, KEY_A, HEAD_DIM)
            v_a = _load_box(VAD, b, 0, h, KEY_A, HEAD_DIM)
            k_c, v_c = k_a, v_a
            if KEY_C > 0:
                k_c = _load_box(KCD, b, KEY_A, h, KEY_C, HEAD_DIM)
                v_c = _load_box(VCD, b, KEY_A, h, KEY_C, HEAD_DIM)
            acc, lse = _softmax_pv(q, q, k_a, k_a, v_a, k_c, k_c, v_c, T, QK_SCALE, KEY_A, KEY_C, False)
            _store_rows(O, LSE, bh, b, h, tl.arange(0, BLOCK_T), acc, lse, T, stride_ob, stride_ot, stride_oh,
                        HEAD_DIM)

    @triton.jit
    def _load_rope_head(Q, K, V, COS, SIN, bh, n_bh, stride_qb, stride_qt, stride_qh, stride_vb, stride_vt,
                        stride_vh, stride_cb, stride_ct, H, T, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                        KEY_A: tl.constexpr, KEY_C: tl.constexpr, TABLE: tl.constexpr):
        """q (as halves, BLOCK_T rows), k (as halves) and v in a KEY_A and a KEY_C tile (the KEY_A ones
        again when KEY_C = 0), of head bh = (batch, head); all zeros past the last head, so the prefetch
        of a head that does not exist is harmless. With TABLE also the cos, sin of each tile's rows."""
        HALF: tl.constexpr = HEAD_DIM // 2
        b = bh // H
        h = bh % H
        T_live = tl.where(bh < n_bh, T, 0)
        offs_h = tl.arange(0, HALF)
        offs_d = tl.arange(0, HEAD_DIM)
        rows_q = tl.arange(0, BLOCK_T)
        q1, q2 = _load_halves(Q + b * stride_qb + h * stride_qh, rows_q, rows_q < T_live, stride_qt, offs_h, HALF)
        k_base = K + b * stride_qb + h * stride_qh
        v_base = V + b * stride_vb + h * stride_vh
        rows_a = tl.arange(0, KEY_A)
        ka1, ka2 = _load_halves(k_base, rows_a, rows_a < T_live, stride_qt, offs_h, HALF)
        va = tl.load(v_base + rows_a[:, None] * stride_vt + offs_d[None, :], mask=(rows_a < T_live)[:, None],
                     other=0.0)
        kc1, kc2, vc = ka1, ka2, va
        rows_c = rows_a
        if KEY_C > 0:
            rows_c = KEY_A + tl.arange(0, KEY_C)
            kc1, kc2 = _load_halves(k_base, rows_c, rows_c < T_live, stride_qt, offs_h, HALF)
            vc = tl.load(v_base + rows_c[:, None] * stride_vt + offs_d[None, :], mask=(rows_c < T_live)[:, None],
                         other=0.0)
        cq, sq, ca, sa, cc, sc = q1, q2, ka1, ka2, kc1, kc2  # placeholders: unused without TABLE
        if TABLE:
            cos_b = COS + b * stride_cb
            sin_b = SIN + b * stride_cb
            cq, sq = _load_table(cos_b, sin_b, rows_q, rows_q < T_live, stride_ct, offs_h)
            ca, sa = _load_table(cos_b, sin_b, rows_a, rows_a < T_live, stride_ct, offs_h)
            cc, sc = _load_table(cos_b, sin_b, rows_c, rows_c < T_live, stride_ct, offs_h)
        return q1, q2, ka1, ka2, kc1, kc2, va, vc, cq, sq, ca, sa, cc, sc

    @triton.jit
    def _attn_fwd_short_rope(Q, K, V, COS, SIN, O, LSE,
                             stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh,
                             stride_ob, stride_ot, stride_oh, stride_cb, stride_ct, n_bh, H, T,
                             HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, SHARED_TABLE: tl.constexpr,
                             BLOCK_T: tl.constexpr, KEY_A: tl.constexpr, KEY_C: tl.constexpr):
        """_attn_fwd_short's walk and tiles with RoPE: q and k of each head are rotated once, in registers
        (queries and keys are the same positions). Here the next head's q, k, v are loaded by hand before
        this head's arithmetic (TMA and a pipelined loop measured slower: the tiles pass through
        registers for the rotation anyway). SHARED_TABLE (a (T, D) table, the same for every sample): its
        tiles are read once, before the loop."""
        QK_SCALE: tl.constexpr = SM_SCALE * 1.4426950408889634
        step = tl.num_programs(0)
        strides = (stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh, stride_cb, stride_ct)
        q1, q2, ka1, ka2, kc1, kc2, va, vc, cq, sq, ca, sa, cc, sc = _load_rope_head(
            Q, K, V, COS, SIN, tl.program_id(0), n_bh, *strides, H, T, HEAD_DIM, BLOCK_T, KEY_A, KEY_C, True)
        for bh in range(tl.program_id(0), n_bh, step):
            nq1, nq2, nka1, nka2, nkc1, nkc2, nva, nvc, ncq, nsq, nca, nsa, ncc, nsc = _load_rope_head(
                Q, K, V, COS, SIN, bh + step, n_bh, *strides, H, T, HEAD_DIM, BLOCK_T, KEY_A, KEY_C,
                not SHARED_TABLE)
            q1, q2 = _rotate_rounded(q1, q2, cq, sq)
            ka1, ka2 = _rotate_rounded(ka1, ka2, ca, sa)
            if KEY_C > 0:
                kc1, kc2 = _rotate_rounded(kc1, kc2, cc, sc)
            acc, lse = _softmax_pv(q1, q2, ka1, ka2, va, kc1, kc2, vc, T, QK_SCALE, KEY_A, KEY_C, True)
            _store_rows(O, LSE, bh, bh // H, bh % H, tl.arange(0, BLOCK_T), acc, lse, T, stride_ob, stride_ot,
                        stride_oh, HEAD_DIM)
            q1, q2, ka1, ka2, kc1, kc2, va, vc = nq1, nq2, nka1, nka2, nkc1, nkc2, nva, nvc
            if not SHARED_TABLE:
                cq, sq, ca, sa, cc, sc = ncq, nsq, nca, nsa, ncc, nsc

    @triton.jit
    def _load_rows(ptrs, mask, other, MASKED: tl.constexpr):
        """tl.load, with the row mask only where MASKED: the full blocks of a loop skip the predicates."""
        if MASKED:
            x = tl.load(ptrs, mask=mask, other=other)
        else:
            x = tl.load(ptrs)
        return x

    @triton.jit
    def _whole_to_halves(x, ROWS: tl.constexpr, HALF: tl.constexpr):
        """The two (ROWS, HALF) halves of a (ROWS, 2 * HALF) tile, split along the head dim."""
        return x.reshape(ROWS, 2, HALF).permute(0, 2, 1).split()

    @triton.jit
    def _dv_and_dst(st, v, do, lse, delta, dv):
        """From base-2 scores transposed (keys as rows, a block of queries as columns): dV += P^T dO, and
        dS^T = P^T * (dP^T - delta) in the input dtype. Padded queries come with lse = +inf, so their P is
        exactly 0."""
        pt = tl.exp2(st - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dst = (pt * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(do.dtype)
        return dv, dst

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
            # padded keys masked: their dS feeds dQ, and a padded key scores 0, which need not be small next
            # to lse, so exp2 may overflow
            st = tl.where(mask_n[:, None], _scores(k1, k2, q1, q2, QK_SCALE, True), float("-inf"))
            dv, dst = _dv_and_dst(st, v, do, lse, delta, dv)
            dk1 = tl.dot(dst, q1, dk1)
            dk2 = tl.dot(dst, q2, dk2)
            ds = tl.trans(dst)
            _store_grad(DQ + b * stride_gb + h * stride_gh, tl.dot(ds, k1) * SM_SCALE, tl.dot(ds, k2) * SM_SCALE,
                        cos_ptr, sin_ptr, rows, mask_m, stride_gt, stride_ct, offs_h, HALF, ROPE_OUT)
        dv_ptrs = DV + b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gt + offs_d[None, :]
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])
        _store_grad(DK + b * stride_gb + h * stride_gh, dk1 * SM_SCALE, dk2 * SM_SCALE, cos_ptr, sin_ptr, offs_n,
                    mask_n, stride_gt, stride_ct, offs_h, HALF, ROPE_OUT)

    @triton.jit
    def _dq_block(dq, q, do, lse, delta, KD, VD, b, h, start_n, T, QK_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
        """One key block's share of dQ, K and V through TMA descriptors (rows past T as zeros); MASKED for
        the ragged last block."""
        k = _load_box(KD, b, start_n, h, BLOCK_N, HEAD_DIM)
        v = _load_box(VD, b, start_n, h, BLOCK_N, HEAD_DIM)
        s = tl.dot(q, tl.trans(k)) * QK_SCALE - lse[:, None]
        if MASKED:  # a padded key scores 0, which need not be small next to lse: exp2 may overflow
            s = tl.where((start_n + tl.arange(0, BLOCK_N) < T)[None, :], s, float("-inf"))
        p = tl.exp2(s)
        ds = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(k.dtype)
        return tl.dot(ds, k, dq)

    @triton.jit
    def _attn_bwd_dq(QD, KD, VD, DOD, O, LSE, DELTA, DQ, COS, SIN, stride_ob, stride_ot, stride_oh,
                     stride_gb, stride_gt, stride_gh, stride_cb, stride_ct, H, T, HEAD_DIM: tl.constexpr,
                     SM_SCALE: tl.constexpr, ROPE_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     NUM_STAGES: tl.constexpr):
        """dQ for one block of BLOCK_M queries, over all key blocks, from the rotated q and k, all tiles
        through TMA descriptors, the key loop software-pipelined NUM_STAGES deep. Also writes delta =
        rowsum(dO * O), which the dK/dV kernel launched after it reads. ROPE_OUT rotates dQ back to the
        pre-RoPE frame."""
        HALF: tl.constexpr = HEAD_DIM // 2
        QK_SCALE: tl.constexpr = SM_SCALE * 1.4426950408889634
        pid_m, pid_bh, b, h = _block_and_head(T, BLOCK_M, H)
        start_m = pid_m * BLOCK_M
        rows = start_m + tl.arange(0, BLOCK_M)
        mask_m = rows < T
        q = _load_box(QD, b, start_m, h, BLOCK_M, HEAD_DIM)
        do = _load_box(DOD, b, start_m, h, BLOCK_M, HEAD_DIM)
        o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + tl.arange(0, HEAD_DIM)[None, :],
                    mask=mask_m[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + pid_bh * T + rows, delta, mask=mask_m)
        # padded rows get lse = +inf, so their P (and everything downstream) is exactly 0
        lse = tl.load(LSE + pid_bh * T + rows, mask=mask_m, other=float("inf"))
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        n_full = (T // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, n_full, BLOCK_N, num_stages=NUM_STAGES):
            dq = _dq_block(dq, q, do, lse, delta, KD, VD, b, h, start_n, T, QK_SCALE, BLOCK_N, HEAD_DIM, False)
        if n_full < T:
            dq = _dq_block(dq, q, do, lse, delta, KD, VD, b, h, n_full, T, QK_SCALE, BLOCK_N, HEAD_DIM, True)
        dq1, dq2 = _whole_to_halves(dq * SM_SCALE, BLOCK_M, HALF)
        _store_grad(DQ + b * stride_gb + h * stride_gh, dq1, dq2, COS + b * stride_cb, SIN + b * stride_cb, rows,
                    mask_m, stride_gt, stride_ct, tl.arange(0, HALF), HALF, ROPE_OUT)

    @triton.jit
    def _dkdv_block(dk, dv, k, v, QD, DOD, LSE, DELTA, b, h, pid_bh, start_m, T, QK_SCALE: tl.constexpr,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
        """One query block's share of dK, dV, q and dO through TMA descriptors (rows past T as zeros);
        MASKED for the ragged last block. Padded keys are not masked: they reach only their own rows of dK
        and dV, which are never stored."""
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_box(QD, b, start_m, h, BLOCK_M, HEAD_DIM)
        do = _load_box(DOD, b, start_m, h, BLOCK_M, HEAD_DIM)
        lse = _load_rows(LSE + pid_bh * T + rows, rows < T, float("inf"), MASKED)
        delta = _load_rows(DELTA + pid_bh * T + rows, rows < T, 0.0, MASKED)
        dv, dst = _dv_and_dst(tl.dot(k, tl.trans(q)) * QK_SCALE, v, do, lse, delta, dv)
        return tl.dot(dst, q, dk), dv

    @triton.jit
    def _dkdv_keys(QD, KD, VD, DOD, LSE, DELTA, DK, DV, COS, SIN, b, h, pid_bh, start_n,
                   stride_gb, stride_gt, stride_gh, stride_cb, stride_ct, T, HEAD_DIM: tl.constexpr,
                   SM_SCALE: tl.constexpr, ROPE_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_STAGES: tl.constexpr):
        """dK, dV of BLOCK_N keys from start_n of one (batch, head), over all query blocks (a loop
        software-pipelined NUM_STAGES deep)."""
        HALF: tl.constexpr = HEAD_DIM // 2
        QK_SCALE: tl.constexpr = SM_SCALE * 1.4426950408889634
        k = _load_box(KD, b, start_n, h, BLOCK_N, HEAD_DIM)
        v = _load_box(VD, b, start_n, h, BLOCK_N, HEAD_DIM)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        m_full = (T // BLOCK_M) * BLOCK_M
        for start_m in tl.range(0, m_full, BLOCK_M, num_stages=NUM_STAGES):
            dk, dv = _dkdv_block(dk, dv, k, v, QD, DOD, LSE, DELTA, b, h, pid_bh, start_m, T, QK_SCALE, BLOCK_M,
                                 HEAD_DIM, False)
        if m_full < T:
            dk, dv = _dkdv_block(dk, dv, k, v, QD, DOD, LSE, DELTA, b, h, pid_bh, m_full, T, QK_SCALE, BLOCK_M,
                                 HEAD_DIM, True)
        rows = start_n + tl.arange(0, BLOCK_N)
        # dV first: its registers are free before dK's rotation needs the tables (measured a little faster)
        dv_ptrs = DV + b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + tl.arange(0, HEAD_DIM)[None, :]
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=(rows < T)[:, None])
        dk1, dk2 = _whole_to_halves(dk * SM_SCALE, BLOCK_N, HALF)
        _store_grad(DK + b * stride_gb + h * stride_gh, dk1, dk2, COS + b * stride_cb, SIN + b * stride_cb, rows,
                    rows < T, stride_gt, stride_ct, tl.arange(0, HALF), HALF, ROPE_OUT)

    @triton.jit
    def _attn_bwd_dkdv(QD, KD, VD, KLD, VLD, DOD, LSE, DELTA, DK, DV, COS, SIN, stride_gb, stride_gt, stride_gh,
                       stride_cb, stride_ct, H, T, HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr,
                       ROPE_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAST_N: tl.constexpr,
                       NUM_STAGES: tl.constexpr):
        """dK, dV for one key block from the rotated q and k (and the delta of _attn_bwd_dq), all tiles
        through TMA descriptors: KD, VD with BLOCK_N-row boxes, KLD, VLD with LAST_N-row boxes for the last
        key block, whose tile is LAST_N keys: a BLOCK_N tile would be mostly padding when T % BLOCK_N is
        small (900 keys: 14 blocks of 64 and one of 16, not 15 of 64)."""
        pid_n, pid_bh, b, h = _block_and_head(T, BLOCK_N, H)
        start_n = pid_n * BLOCK_N
        if pid_n == tl.cdiv(T, BLOCK_N) - 1:
            _dkdv_keys(QD, KLD, VLD, DOD, LSE, DELTA, DK, DV, COS, SIN, b, h, pid_bh, start_n, stride_gb, stride_gt,
                       stride_gh, stride_cb, stride_ct, T, HEAD_DIM, SM_SCALE, ROPE_OUT, BLOCK_M, LAST_N, NUM_STAGES)
        else:
            _dkdv_keys(QD, KD, VD, DOD, LSE, DELTA, DK, DV, COS, SIN, b, h, pid_bh, start_n, stride_gb, stride_gt,
                       stride_gh, stride_cb, stride_ct, T, HEAD_DIM, SM_SCALE, ROPE_OUT, BLOCK_M, BLOCK_N, NUM_STAGES)

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


def _one_tile(T):
    """The power-of-two tile (16 or more) that holds all T rows of a short sequence."""
    return max(16, triton.next_power_of_2(T))


def _rows_desc(x, rows):
    """A TMA descriptor of a (B, T, H, D) tensor whose box is `rows` rows of one head."""
    return TensorDescriptor.from_tensor(x, [1, rows, 1, x.shape[-1]])


def attn_fwd_config(T, D):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the tiled forward, _attn_fwd. Picked from the sweeps in
    notes/kernels.md (H100, D = 64, T = 900; with TMA loads in run 17)."""
    return 64, 64, 4, 3


def attn_short_config(T, D):
    """(num_warps, programs per multiprocessor, num_stages) of _attn_fwd_short, without RoPE (sweeps:
    notes/kernels.md, runs 12-16): one 8-warp program per multiprocessor, with as many heads in flight
    (stages, up to 4) as fit in 200 KB of shared memory, where a stage holds a head's q, k and v (40 KB
    at T = 82, D = 64)."""
    BLOCK_T = _one_tile(T)
    KEY_A, KEY_C = _short_key_tiles(T, BLOCK_T)
    stage_bytes = (BLOCK_T + 2 * (KEY_A + KEY_C)) * D * 2
    return 8, 1, max(1, min(4, 200 * 1024 // stage_bytes))


def attn_short_rope_config(T, D):
    """(num_warps, programs per multiprocessor) of _attn_fwd_short_rope (runs 5-9, 14 and 16): eight warps
    share the score tile; with four the 128-row tiles spill."""
    return 8, 2


def _short_key_tiles(T, BLOCK_T):
    """(KEY_A, KEY_C): the keys of a short sequence as one BLOCK_T tile, or as a half and a quarter tile
    where those hold them (82 tokens: 64 + 32, which cuts the score and P V work by a quarter)."""
    if BLOCK_T >= 64 and T <= BLOCK_T * 3 // 4:
        return BLOCK_T // 2, BLOCK_T // 4
    return BLOCK_T, 0


def _tma_ready(x):
    """x, or a contiguous copy, as a TMA descriptor needs it: unit last stride, other strides 16-byte
    aligned and not 0 (an expanded tensor, like the gradient of a sum), and a 16-byte aligned start. The
    start is checked only outside torch.compile, which cannot trace data_ptr() or storage_offset()
    without a graph break; there the inputs are the model's own projections, which are aligned."""
    align = 16 // x.element_size()
    aligned = x.stride(-1) == 1 and all(st > 0 and st % align == 0 for st in x.stride()[:-1])
    if aligned and not torch.compiler.is_compiling():
        aligned = x.data_ptr() % 16 == 0
    return x if aligned else x.clone(memory_format=torch.contiguous_format)


def attn_bwd_config(T, D):
    """(dQ config, dK/dV config), each (BLOCK_M, BLOCK_N, num_warps, num_stages) with BLOCK_M queries and
    BLOCK_N keys and num_stages the depth of the pipelined loop. A dK/dV BLOCK_N >= T is the single fused
    launch, which needs no dQ config. The two kernels of the long case were swept separately, with TMA
    loads (notes/kernels.md, v8: runs 19 and 21)."""
    if T <= 128:
        return None, (16, _one_tile(T), 4, 2)
    return (64, 64, 4, 4), (32, 64, 4, 3)


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
    Up to SHORT_MAX_T tokens (unless a tiled config is given) a persistent kernel takes whole heads:
    _attn_fwd_short_rope, which rotates q and k itself (short_config: attn_short_rope_config's form), or
    without RoPE _attn_fwd_short (attn_short_config's form). With several key tiles every program would
    rotate every K tile again, so there a separate pass rotates q and k once and _attn_fwd gets them
    ready."""
    B, T, H, D = q.shape
    if q.stride() != k.stride():  # the kernels take one set of strides for q and k
        q, k = q.contiguous(), k.contiguous()
    o = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    if config is None and T <= SHORT_MAX_T:
        BLOCK_T = _one_tile(T)
        KEY_A, KEY_C = _short_key_tiles(T, BLOCK_T)
        meta = dict(HEAD_DIM=D, SM_SCALE=1.0 / math.sqrt(D), BLOCK_T=BLOCK_T, KEY_A=KEY_A, KEY_C=KEY_C)
        if cos is not None:
            cos_, sin_, stride_cb, stride_ct = _rope_tables(q, cos, sin)
            num_warps, per_sm = short_config or attn_short_rope_config(T, D)
            _attn_fwd_short_rope[(min(B * H, per_sm * _num_sms(q.device)),)](
                q, k, v, cos_, sin_, o, lse, *_bth(q), *_bth(v), *_bth(o), stride_cb, stride_ct, B * H, H, T,
                **meta, SHARED_TABLE=stride_cb == 0, num_warps=num_warps)
            return o, lse, q, k, False
        num_warps, per_sm, num_stages = short_config or attn_short_config(T, D)
        q_box, k_box, v_box = _tma_ready(q), _tma_ready(k), _tma_ready(v)
        _attn_fwd_short[(min(B * H, per_sm * _num_sms(q.device)),)](
            _rows_desc(q_box, BLOCK_T), _rows_desc(k_box, KEY_A), _rows_desc(k_box, KEY_C or KEY_A),
            _rows_desc(v_box, KEY_A), _rows_desc(v_box, KEY_C or KEY_A), o, lse, *_bth(o), B * H, H, T, **meta,
            NUM_STAGES=num_stages, num_warps=num_warps)
        return o, lse, q, k, False
    BLOCK_M, BLOCK_N, num_warps, num_stages = config or attn_fwd_config(T, D)
    rotated = cos is not None
    if rotated:
        q, k = _rope_qk_launch(q, k, cos, sin)
    q_box, k_box, v_box = _tma_ready(q), _tma_ready(k), _tma_ready(v)
    _attn_fwd[(triton.cdiv(T, BLOCK_M) * B * H,)](
        _rows_desc(q_box, BLOCK_M), _rows_desc(k_box, BLOCK_N), _rows_desc(v_box, BLOCK_N), o, lse, *_bth(o), H,
        T, HEAD_DIM=D, SM_SCALE=1.0 / math.sqrt(D), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_STAGES=num_stages,
        num_warps=num_warps)
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
    BLOCK_M, BLOCK_N, num_warps, num_stages = dkdv_config
    one_block = T <= BLOCK_N
    if q.stride() != k.stride():  # the RoPE pass and the fused kernel take one set of strides for q and k
        q, k = q.contiguous(), k.contiguous()
    if cos is not None and not rotated and not one_block:  # the two-kernel backward reads q and k rotated
        q, k = _rope_qk_launch(q, k, cos, sin)
    cos_, sin_, stride_cb, stride_ct = _rope_tables(q, cos, sin)
    # three tensors, not views of one buffer: see _rope_qk_launch
    dq, dk, dv = (torch.empty((B, T, H, D), device=q.device, dtype=q.dtype) for _ in range(3))
    meta = dict(HEAD_DIM=D, SM_SCALE=1.0 / math.sqrt(D), ROPE_OUT=cos is not None)
    if one_block:
        if do.stride() != o.stride():  # the fused kernel takes one set of strides for o and do
            do = do.contiguous()
        _attn_bwd_fused[(B * H,)](
            q, k, v, cos_, sin_, o, do, lse, dq, dk, dv, *_bth(q), *_bth(v), *_bth(o), *_bth(dq), stride_cb,
            stride_ct, H, T, **meta, ROPE_IN=cos is not None and not rotated, BLOCK_M=BLOCK_M, BLOCK_T=BLOCK_N,
            num_warps=num_warps, num_stages=num_stages)
        return dq, dk, dv
    q, k, v, do = (_tma_ready(x) for x in (q, k, v, do))
    delta = torch.empty_like(lse)
    BLOCK_M_Q, BLOCK_N_Q, num_warps_q, num_stages_q = dq_config
    _attn_bwd_dq[(triton.cdiv(T, BLOCK_M_Q) * B * H,)](
        _rows_desc(q, BLOCK_M_Q), _rows_desc(k, BLOCK_N_Q), _rows_desc(v, BLOCK_N_Q), _rows_desc(do, BLOCK_M_Q), o,
        lse, delta, dq, cos_, sin_, *_bth(o), *_bth(dq), stride_cb, stride_ct, H, T, **meta, BLOCK_M=BLOCK_M_Q,
        BLOCK_N=BLOCK_N_Q, NUM_STAGES=num_stages_q, num_warps=num_warps_q)
    LAST_N = _last_block(T, BLOCK_N)
    _attn_bwd_dkdv[(triton.cdiv(T, BLOCK_N) * B * H,)](
        _rows_desc(q, BLOCK_M), _rows_desc(k, BLOCK_N), _rows_desc(v, BLOCK_N), _rows_desc(k, LAST_N),
        _rows_desc(v, LAST_N), _rows_desc(do, BLOCK_M), lse, delta, dk, dv, cos_, sin_, *_bth(dq), stride_cb,
        stride_ct, H, T, **meta, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, LAST_N=LAST_N, NUM_STAGES=num_stages,
        num_warps=num_warps)
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
