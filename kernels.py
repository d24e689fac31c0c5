"""
The two operations of HRM's transformer blocks that get a kernel of their own, each in Triton beside its
PyTorch reference:

    attention(q, k, v, cos, sin)   softmax(rope(q) rope(k)^T / sqrt(D)) v for every (batch, head), non-causal
    add_rms_norm(x, y, eps)        rms_norm(x + y): the residual add and weightless RMSNorm of a post-norm block

the backward of one more, where a gradient flows (its forward stays PyTorch, which Inductor fuses):

    swiglu(gate_up)                silu(gate) * up, gate and up the two halves of the last dimension

and a fourth entry point whose kernel lives in kernels_matmul.py, for Hopper GPUs only:

    linear_swiglu(x, w)            silu(x w_gate^T) * (x w_up^T): the MLP's matmul with SwiGLU fused after it

With HRMConfig.fp8, where no gradient flows, the MLP's input goes to that matmul in FP8 (e4m3, a scale per
row, as quantize_rows_fp8 makes it), written by the norm that makes the input:

    add_rms_norm_fp8(x, y, eps)    add_rms_norm's output, and the same in FP8 with its row scales
    linear_swiglu_fp8(x_fp8, w, dtype)   linear_swiglu from those, w rounded to FP8 the same way

model.py calls only these. Each picks a backend (bottom of this file): the Triton kernels for CUDA tensors
when triton imports, PyTorch otherwise; set_use_flash(True / False / None) forces the kernels, forces
PyTorch, or goes back to that automatic choice. On a Hopper GPU the attention
runs the tuned paths of kernels_hopper.py, which compute the same thing faster at HRM's shapes;
set_use_hopper(False) keeps to the kernels of this file. linear_swiglu fuses only where no gradient flows;
set_use_fused_matmuls(False) (or set_use_hopper(False)) keeps its matmul apart. Each distinct choice is
logged once on the logger "hrm.attn".

Attention forward. Per (batch, head), q, k, v are (T, D) and scale = 1 / sqrt(D):

    S = rope(q) rope(k)^T * scale,   P = softmax(S) row by row,   O = P v

S and P never reach memory. A program owns BLOCK_M query rows and walks the keys BLOCK_N at a time,
keeping for each row a running max m, a running sum l of exp(S - m) and an unnormalised output acc:

    m_new = max(m, rowmax(S_tile)),   alpha = exp(m - m_new),   p = exp(S_tile - m_new)
    l = l * alpha + rowsum(p),        acc = acc * alpha + p v_tile,   m = m_new

and at the end O = acc / l (the online softmax of FlashAttention). The scores are kept in base 2
(S * log2(e), so that exp is exp2, the hardware's instruction) and the program also stores
lse = m + log2(l), the base-2 logsumexp of each row: P = exp2(S * log2(e) - lse) rebuilds any tile of P,
which is all the backward needs besides q, k, v, O.

Attention backward. With dO the gradient of O:

    dV = P^T dO,   dP = dO v^T,   dS = P * (dP - delta) with delta = rowsum(dO * O) = rowsum(P * dP)
    dQ = dS rope(k) * scale,   dK = dS^T rope(q) * scale      (w.r.t. the rotated q and k)

delta is one PyTorch expression. Then two kernels rebuild P tile by tile: one program per block of
queries walks the keys and accumulates dQ; one per block of keys walks the queries and accumulates dK
and dV. Every gradient row is summed by the one program that stores it: no atomics, no races.

RoPE, rotate-half layout. A head vector x = [x1, x2] (its halves) at position t becomes

    rope(x) = [x1 c - x2 s, x2 c + x1 s],   c = cos(t f), s = sin(t f), f the D/2 frequencies.

The tables cos, sin are (T, D), shared by the batch, or (B, T, D), per sample, and repeat c, s in both
halves, so kernels read only their first halves. Tiles of q and k are held as their two halves, and
q k^T = q1 k1^T + q2 k2^T. As in apply_rotary, the rotation is done in float32 and rounded to the input
dtype. It is a rotation, so the gradient w.r.t. x is its transpose applied to the gradient g w.r.t.
rope(x): [g1 c + g2 s, g2 c - g1 s]; the kernels rotate dq and dk back as they store them. Each program
rotates its own block of q (or k) once, and every tile of the other it loads.

add + RMSNorm. h = x + y (rounded to the input dtype, as the reference), rstd = 1 / sqrt(mean(h^2) + eps),
out = h * rstd; for add_rms_norm_fp8 also q = out / s in FP8 with s = max|out| / 448 per row (a program
holds whole rows, so the maximum costs no extra pass). With g = out the backward is
dh = rstd * (dg - g * mean(dg * g)): it reads the saved output and rstd (4 bytes a row), not h, and x and y
get the same gradient dh.

SwiGLU's backward. With g, u the gate and up halves, s = sigmoid(g) and dh the gradient of silu(g) * u:
dg = dh * u * s * (1 + g * (1 - s)), du = dh * g * s, both halves of a tile from one load of g, u and dh.

torch.compile traces the autograd Functions and the kernel launches without graph breaks. The scale and
eps are constexpr (Inductor would pass a Python float as float64, which changes the arithmetic), and every
tensor a kernel writes is a fresh tensor, never a view of a shared buffer: torch.compile copies such a
view before a kernel writes into it. Offsets are 32-bit: a tensor must have fewer than 2**31 elements.
The backwards are not differentiable again (no double backward; HRM's training never needs one).
Everything Triton is defined only when triton imports, so this module imports without it.
"""
import logging
import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

log = logging.getLogger("hrm.attn")


# -----------------------------------------------------------------------------
# attention: the PyTorch reference

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x: (B, T, H, D); cos, sin: (T, D) or (B, T, D), float32, halves repeated (rotate-half layout)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x32 = x.to(cos.dtype)
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def attention_reference(q, k, v, cos=None, sin=None):
    """q, k, v: (B, T, H, D) -> (B, T, H, D). RoPE in float32, then PyTorch's SDPA."""
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# attention in Triton: tiles of one head, RoPE on halves

FLASH_HEAD_DIMS = (64, 128)
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # on CUDA; float32 runs only under the CPU interpreter (tests)

if triton is not None:

    @triton.jit
    def _load_tile(X, rows, T, stride_t, COLS: tl.constexpr):
        """The first COLS columns of rows `rows` of a matrix at X (row stride stride_t, unit column stride);
        rows >= T read as zeros."""
        return tl.load(X + rows[:, None] * stride_t + tl.arange(0, COLS)[None, :], mask=(rows < T)[:, None],
                       other=0.0)

    @triton.jit
    def _store_tile(X, x, rows, T, stride_t, COLS: tl.constexpr):
        tl.store(X + rows[:, None] * stride_t + tl.arange(0, COLS)[None, :], x.to(X.dtype.element_ty),
                 mask=(rows < T)[:, None])

    @triton.jit
    def _load_pair(A, B, rows, T, stride_t, COLS: tl.constexpr):
        """Two tiles with the same rows: the halves of q or k at X and X + D/2, or the tables at COS and SIN."""
        return _load_tile(A, rows, T, stride_t, COLS), _load_tile(B, rows, T, stride_t, COLS)

    @triton.jit
    def _rotate(x1, x2, c, s):
        """RoPE on a tile held as halves, in float32: [x1 c - x2 s, x2 c + x1 s]."""
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        return x1 * c - x2 * s, x2 * c + x1 * s

    @triton.jit
    def _rotate_rounded(x1, x2, c, s):
        """_rotate, rounded back to the tile's dtype as apply_rotary rounds."""
        r1, r2 = _rotate(x1, x2, c, s)
        return r1.to(x1.dtype), r2.to(x2.dtype)

    @triton.jit
    def _load_rotated(X, COS, SIN, rows, T, stride_t, stride_ct, HALF: tl.constexpr, ROPE: tl.constexpr):
        """A q or k tile as its halves, with ROPE rotated (and rounded)."""
        x1, x2 = _load_pair(X, X + HALF, rows, T, stride_t, HALF)
        if ROPE:
            c, s = _load_pair(COS, SIN, rows, T, stride_ct, HALF)
            x1, x2 = _rotate_rounded(x1, x2, c, s)
        return x1, x2

    @triton.jit
    def _store_rotated_back(DX, g1, g2, COS, SIN, rows, T, stride_t, stride_ct, HALF: tl.constexpr,
                            ROPE: tl.constexpr):
        """Store a float32 gradient w.r.t. rope(x), held as halves, as the gradient w.r.t. x: with ROPE
        rotated by the transpose, [g1 c + g2 s, g2 c - g1 s]."""
        if ROPE:
            c, s = _load_pair(COS, SIN, rows, T, stride_ct, HALF)
            g1, g2 = g1 * c + g2 * s, g2 * c - g1 * s
        _store_tile(DX, g1, rows, T, stride_t, HALF)
        _store_tile(DX + HALF, g2, rows, T, stride_t, HALF)

    @triton.jit
    def _store_o_lse(O, LSE, o, lse, rows, bh, b, h, H, T, HEAD_DIM: tl.constexpr):
        """Rows `rows` of head (b, h) of the output, a contiguous (B, T, H, D), and their logsumexp (B, H, T)."""
        tl.store(LSE + bh * T + rows, lse, mask=rows < T)
        _store_tile(O + (b * T * H + h) * HEAD_DIM, o, rows, T, H * HEAD_DIM, HEAD_DIM)

    @triton.jit
    def _qk(a1, a2, b1, b2):
        """a b^T in float32 for tiles held as halves: a1 b1^T + a2 b2^T."""
        return tl.dot(a2, tl.trans(b2), tl.dot(a1, tl.trans(b1)))

    @triton.jit
    def _block_and_head(T, BLOCK: tl.constexpr, H):
        """(block, batch * head, batch, head) of this program, on a 1D grid with a head's blocks adjacent,
        so that programs running together share that head's tiles in L2."""
        num_blocks = tl.cdiv(T, BLOCK)
        bh = tl.program_id(0) // num_blocks
        return tl.program_id(0) % num_blocks, bh, bh // H, bh % H

    # -------------------------------------------------------------------------
    # attention forward: one program per (block of BLOCK_M queries, batch * head)

    @triton.jit
    def _attn_fwd(Q, K, V, COS, SIN, O, LSE,
                  stride_qb, stride_qt, stride_qh,  # q, k, v: (B, T, H, D) views, unit stride along D
                  stride_kb, stride_kt, stride_kh,
                  stride_vb, stride_vt, stride_vh,
                  stride_cb, stride_ct,  # cos, sin: batch (0 for a shared (T, D) table) and row strides
                  H, T, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, ROPE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """O (B, T, H, D) and its base-2 logsumexp LSE (B, H, T), both contiguous."""
        HALF: tl.constexpr = HEAD_DIM // 2
        QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634  # log2(e): exp2(s) == exp(q.k * scale)
        pid_m, bh, b, h = _block_and_head(T, BLOCK_M, H)
        cos, sin = COS + b * stride_cb, SIN + b * stride_cb
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        q1, q2 = _load_rotated(Q + b * stride_qb + h * stride_qh, cos, sin, rows, T, stride_qt, stride_ct, HALF, ROPE)
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start_n in range(0, T, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k1, k2 = _load_rotated(K + b * stride_kb + h * stride_kh, cos, sin, cols, T, stride_kt, stride_ct,
                                   HALF, ROPE)
            v = _load_tile(V + b * stride_vb + h * stride_vh, cols, T, stride_vt, HEAD_DIM)
            s = tl.where((cols < T)[None, :], _qk(q1, q2, k1, k2) * QK_SCALE, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)  # 0 on the first tile, where m = -inf
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m = m_new
        # every row, padded ones too, saw at least one real key (T >= 1), so l > 0
        _store_o_lse(O, LSE, acc / l[:, None], m + tl.log2(l), rows, bh, b, h, H, T, HEAD_DIM)

    # -------------------------------------------------------------------------
    # attention backward: dQ by query blocks, dK and dV by key blocks; P rebuilt from q, k and lse

    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, COS, SIN, LSE, DELTA, DQ,
                     stride_qb, stride_qt, stride_qh,  # q, k, v, dO: (B, T, H, D) views, unit stride along D
                     stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh,
                     stride_db, stride_dt, stride_dh,
                     stride_cb, stride_ct,  # cos, sin as in _attn_fwd
                     H, T, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, ROPE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dQ (B, T, H, D, contiguous) of BLOCK_M queries: sum over the key tiles of dS k * scale.
        LSE and DELTA are (B, H, T)."""
        HALF: tl.constexpr = HEAD_DIM // 2
        QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634
        pid_m, bh, b, h = _block_and_head(T, BLOCK_M, H)
        cos, sin = COS + b * stride_cb, SIN + b * stride_cb
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        q1, q2 = _load_rotated(Q + b * stride_qb + h * stride_qh, cos, sin, rows, T, stride_qt, stride_ct, HALF, ROPE)
        do = _load_tile(DO + b * stride_db + h * stride_dh, rows, T, stride_dt, HEAD_DIM)
        lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=0.0)
        delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
        dq1 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
        dq2 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
        for start_n in range(0, T, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k1, k2 = _load_rotated(K + b * stride_kb + h * stride_kh, cos, sin, cols, T, stride_kt, stride_ct,
                                   HALF, ROPE)
            v = _load_tile(V + b * stride_vb + h * stride_vh, cols, T, stride_vt, HEAD_DIM)
            # padded keys masked: their score 0 need not be small next to lse, and exp2 would overflow
            s = tl.where((cols < T)[None, :], _qk(q1, q2, k1, k2) * QK_SCALE - lse[:, None], float("-inf"))
            p = tl.exp2(s)
            ds = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(k1.dtype)
            dq1 = tl.dot(ds, k1, dq1)
            dq2 = tl.dot(ds, k2, dq2)
        _store_rotated_back(DQ + (b * T * H + h) * HEAD_DIM, dq1 * SCALE, dq2 * SCALE, cos, sin, rows, T,
                            H * HEAD_DIM, stride_ct, HALF, ROPE)

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, COS, SIN, LSE, DELTA, DK, DV,
                       stride_qb, stride_qt, stride_qh,  # as in _attn_bwd_dq
                       stride_kb, stride_kt, stride_kh,
                       stride_vb, stride_vt, stride_vh,
                       stride_db, stride_dt, stride_dh,
                       stride_cb, stride_ct,
                       H, T, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, ROPE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dK, dV (B, T, H, D, contiguous) of BLOCK_N keys: sums over the query tiles of dS^T q * scale and
        P^T dO. The tiles are transposed (keys as rows), so the sums are plain dots."""
        HALF: tl.constexpr = HEAD_DIM // 2
        QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634
        pid_n, bh, b, h = _block_and_head(T, BLOCK_N, H)
        cos, sin = COS + b * stride_cb, SIN + b * stride_cb
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k1, k2 = _load_rotated(K + b * stride_kb + h * stride_kh, cos, sin, cols, T, stride_kt, stride_ct, HALF, ROPE)
        v = _load_tile(V + b * stride_vb + h * stride_vh, cols, T, stride_vt, HEAD_DIM)
        dk1 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
        dk2 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for start_m in range(0, T, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q1, q2 = _load_rotated(Q + b * stride_qb + h * stride_qh, cos, sin, rows, T, stride_qt, stride_ct,
                                   HALF, ROPE)
            do = _load_tile(DO + b * stride_db + h * stride_dh, rows, T, stride_dt, HEAD_DIM)
            lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=0.0)
            delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
            # P^T outside the T x T square is 0: padded rows stay finite and add nothing
            inside = (cols < T)[:, None] & (rows < T)[None, :]
            pt = tl.exp2(tl.where(inside, _qk(k1, k2, q1, q2) * QK_SCALE - lse[None, :], float("-inf")))
            dv = tl.dot(pt.to(do.dtype), do, dv)
            dst = (pt * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(q1.dtype)
            dk1 = tl.dot(dst, q1, dk1)
            dk2 = tl.dot(dst, q2, dk2)
        _store_tile(DV + (b * T * H + h) * HEAD_DIM, dv, cols, T, H * HEAD_DIM, HEAD_DIM)
        _store_rotated_back(DK + (b * T * H + h) * HEAD_DIM, dk1 * SCALE, dk2 * SCALE, cos, sin, cols, T,
                            H * HEAD_DIM, stride_ct, HALF, ROPE)


def _unit_last_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _bth(x):
    """Batch, time and head strides of a (B, T, H, D) tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def _rope_tables(q, cos, sin):
    """(cos, sin, batch stride, row stride) as the kernels read them; without RoPE, q stands in for the
    pointers, which are never read."""
    if cos is None:
        return q, q, 0, 0
    cos, sin = _unit_last_stride(cos.float()), _unit_last_stride(sin.float())
    assert cos.shape == sin.shape and cos.stride() == sin.stride()
    return cos, sin, cos.stride(0) if cos.dim() == 3 else 0, cos.stride(-2)


def _launch_meta(q, cos):
    """Block size and launch parameters of the attention kernels."""
    D = q.shape[-1]
    # 64 x 64 tiles; at head_dim 128 eight warps hold the larger accumulators without spilling
    return 64, dict(HEAD_DIM=D, SCALE=1.0 / math.sqrt(D), ROPE=cos is not None, BLOCK_M=64, BLOCK_N=64,
                    num_warps=4 if D <= 64 else 8, num_stages=2)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin):
        q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
        B, T, H, D = q.shape
        o = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype)
        lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
        block, meta = _launch_meta(q, cos)
        cos_, sin_, stride_cb, stride_ct = _rope_tables(q, cos, sin)
        _attn_fwd[(triton.cdiv(T, block) * B * H,)](
            q, k, v, cos_, sin_, o, lse, *_bth(q), *_bth(k), *_bth(v), stride_cb, stride_ct, H, T, **meta)
        ctx.save_for_backward(q, k, v, o, lse, cos, sin)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cos, sin = ctx.saved_tensors
        do = _unit_last_stride(do)
        B, T, H, D = q.shape
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # rowsum(dO * O), (B, H, T)
        # three tensors, not views of one buffer (see the module's docstring on torch.compile)
        dq, dk, dv = (torch.empty((B, T, H, D), device=q.device, dtype=q.dtype) for _ in range(3))
        block, meta = _launch_meta(q, cos)
        cos, sin, stride_cb, stride_ct = _rope_tables(q, cos, sin)
        args = (*_bth(q), *_bth(k), *_bth(v), *_bth(do), stride_cb, stride_ct, H, T)
        grid = (triton.cdiv(T, block) * B * H,)
        _attn_bwd_dq[grid](q, k, v, do, cos, sin, lse, delta, dq, *args, **meta)
        _attn_bwd_dkdv[grid](q, k, v, do, cos, sin, lse, delta, dk, dv, *args, **meta)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, cos=None, sin=None):
    """The Triton attention of this file, whatever the device (CPU tensors need TRITON_INTERPRET=1). Same
    contract as attention_reference; head_dim must be in FLASH_HEAD_DIMS."""
    assert q.shape == k.shape == v.shape and q.shape[-1] in FLASH_HEAD_DIMS
    return FlashAttention.apply(q, k, v, cos, sin)


# -----------------------------------------------------------------------------
# add + RMSNorm: the PyTorch reference, then BLOCK_ROWS rows per program, a whole row in registers

def add_rms_norm_reference(x, y, eps):
    """rms_norm(x + y) without a weight; the sum is rounded to the input dtype first, statistics in float32."""
    h = (x + y).float()
    return (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


FP8_MAX = 448.0  # the largest float8 e4m3


def quantize_rows_fp8(x):
    """x (..., K) as float8 e4m3 rows (rows, K) and a float32 scale per row (rows,), x ~ q * scale: each row
    scaled so that its largest magnitude is FP8_MAX, its own scale, so that one loud row costs no other row its
    small entries (three mantissa bits: each entry within 2^-4 of itself)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    scale = rows.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    return (rows / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def add_rms_norm_fp8_reference(x, y, eps):
    """add_rms_norm_reference's output, and that output as quantize_rows_fp8 gives it."""
    out = add_rms_norm_reference(x, y, eps)
    return out, quantize_rows_fp8(out)


if triton is not None:
    _FP8_MAX = tl.constexpr(FP8_MAX)

    @triton.jit
    def _add_rms_norm_fwd(X, Y, OUT, RSTD, Q, Q_SCALE, n_rows, N, stride_x, stride_y, stride_o,
                          EPS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr):
        """FP8: also each output row in FP8 (contiguous Q) with its scale (quantize_rows_fp8), else Q unused."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
        h = (x + y).to(tl.float32)  # the sum is rounded to the input dtype first, as in the reference
        rstd = tl.rsqrt(tl.sum(h * h, 1) / N + EPS)
        out = (h * rstd[:, None]).to(OUT.dtype.element_ty)
        tl.store(OUT + rows[:, None] * stride_o + cols[None, :], out, mask=mask)
        tl.store(RSTD + rows, rstd, mask=rows < n_rows)
        if FP8:
            out = out.to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(out), 1), 1e-12) / _FP8_MAX
            # div_rn: rounded as PyTorch's division is (Triton's `/` on float32 is approximate)
            q = tl.clamp(tl.math.div_rn(out, scale[:, None]), -_FP8_MAX, _FP8_MAX)
            # rounded to FP8's three mantissa bits here (to nearest, ties to even), so that the conversion only
            # rounds FP8's subnormals (below 2^-6): Triton's interpreter rounds without carrying into the
            # exponent (127.4 -> 64)
            bits = q.to(tl.uint32, bitcast=True)
            q = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
            tl.store(Q + rows[:, None] * N + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
            tl.store(Q_SCALE + rows, scale, mask=rows < n_rows)

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


def _as_rows(x):
    return _unit_last_stride(x.reshape(-1, x.shape[-1]))


def _add_rms_norm_launch(x2, y2, eps, fp8):
    """out, rstd and, with fp8, the FP8 rows and their scales (else None, None) of rows x2 + y2."""
    M, N = x2.shape
    out = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    rstd = torch.empty(M, device=x2.device, dtype=torch.float32)
    q = torch.empty((M, N), device=x2.device, dtype=torch.float8_e4m3fn) if fp8 else None
    q_scale = torch.empty(M, device=x2.device, dtype=torch.float32) if fp8 else None
    # 8 rows and 4 warps a program: at copy speed for 512-wide rows, as were several neighbouring choices
    _add_rms_norm_fwd[(triton.cdiv(M, 8),)](x2, y2, out, rstd, q if fp8 else out, q_scale if fp8 else rstd, M, N,
                                            x2.stride(0), y2.stride(0), out.stride(0), EPS=eps, BLOCK_ROWS=8,
                                            BLOCK_N=triton.next_power_of_2(N), FP8=fp8, num_warps=4)
    return out, rstd, q, q_scale


class AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, eps):
        out, rstd, _, _ = _add_rms_norm_launch(_as_rows(x), _as_rows(y), eps, fp8=False)
        ctx.save_for_backward(out, rstd)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        out, rstd = ctx.saved_tensors
        M, N = out.shape
        dout2 = _as_rows(dout)
        dh = torch.empty((M, N), device=out.device, dtype=out.dtype)
        _add_rms_norm_bwd[(triton.cdiv(M, 8),)](dout2, out, rstd, dh, M, N, dout2.stride(0), out.stride(0),
                                                dh.stride(0), BLOCK_ROWS=8, BLOCK_N=triton.next_power_of_2(N),
                                                num_warps=4)
        # x and y get the same gradient; autograd does not write into a gradient it was handed
        return dh.view(dout.shape), dh.view(dout.shape), None


def add_rms_norm_triton(x, y, eps):
    """The Triton add + RMSNorm, whatever the device (CPU tensors need TRITON_INTERPRET=1)."""
    assert x.shape == y.shape and x.dtype == y.dtype
    return AddRMSNorm.apply(x, y, float(eps))


# -----------------------------------------------------------------------------
# SwiGLU: the PyTorch reference, then the backward's kernel. Inductor's kernel for the backward (writing the
# concatenated [dg, du] that the gate-and-up matmul's backward takes) ran at about half of copy speed in the
# compiled Sudoku step; here a program computes both halves of a tile from one load of g, u and dh

def swiglu_reference(gate_up):
    """silu(gate) * up, gate and up the two halves of the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def linear_swiglu_fp8_reference(x_fp8, w_fp8, out_dtype):
    """silu(x w_gate^T) * (x w_up^T) from FP8 rows and their scales ((q, scale) as quantize_rows_fp8 gives
    them, x's and w's), multiplied in float32 as FP8 tensor cores do; the gate and up rounded to out_dtype,
    then silu(gate) * up in float32, as kernels_matmul's kernel takes them."""
    (x, x_scale), (w, w_scale) = x_fp8, w_fp8
    product = F.linear(x.float() * x_scale[:, None], w.float() * w_scale[:, None])
    gate, up = product.to(out_dtype).float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(out_dtype)


if triton is not None:

    @triton.jit
    def _swiglu_bwd(GU, DH, DGU, n_rows, N, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """[dg, du] (n_rows, 2N) from gate_up (n_rows, 2N) and dh (n_rows, N), all contiguous; float32 inside."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
        gate_at = rows[:, None] * (2 * N) + cols[None, :]
        g = tl.load(GU + gate_at, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + gate_at + N, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(DGU + gate_at, (dh * u * s * (1 + g * (1 - s))).to(DGU.dtype.element_ty), mask=mask)
        tl.store(DGU + gate_at + N, (dh * g * s).to(DGU.dtype.element_ty), mask=mask)


class SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return swiglu_reference(gate_up)

    @staticmethod
    def backward(ctx, dh):
        (gate_up,) = ctx.saved_tensors
        gu = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
        dh2 = dh.reshape(-1, dh.shape[-1]).contiguous()
        M, N = dh2.shape
        dgu = torch.empty_like(gu)
        # 4 rows of 512 columns a program, 4 warps: 122 us at Sudoku's 31,488 x 1,536 on an H200 (4 TB/s; blocks
        # of 2 x 1024 to 32 x 128 took 120 to 125), against 209 for Inductor's kernel
        _swiglu_bwd[(triton.cdiv(M, 4), triton.cdiv(N, 512))](gu, dh2, dgu, M, N, BLOCK_ROWS=4, BLOCK_N=512,
                                                             num_warps=4)
        return dgu.view(gate_up.shape)


# -----------------------------------------------------------------------------
# backend selection and the entry points used by model.py

if triton is not None:
    try:  # last, so that kernels_hopper can import this module's helpers
        import kernels_hopper
        _hopper_missing = ""
    except ImportError as e:  # e.g. a Triton without host-side TMA descriptors
        kernels_hopper, _hopper_missing = None, f"kernels_hopper does not import: {e}"
    try:
        import kernels_matmul
        _matmul_missing = ""
    except ImportError as e:
        kernels_matmul, _matmul_missing = None, f"kernels_matmul does not import: {e}"
else:
    kernels_hopper, _hopper_missing = None, "triton is not installed"
    kernels_matmul, _matmul_missing = None, "triton is not installed"

_use_flash = None  # None: automatic; True / False: forced by set_use_flash
_use_hopper = True  # set_use_hopper
_use_fused_matmuls = True  # set_use_fused_matmuls
_logged = set()


def set_use_flash(flag):
    """For every entry point of this module: True forces the Triton kernels wherever they support the call
    (CPU tensors then need TRITON_INTERPRET=1), False forces PyTorch, None (default) uses Triton for CUDA
    tensors when triton imports. A compiled model reads the flag when it is traced."""
    global _use_flash
    assert flag in (True, False, None)
    _use_flash = flag


def set_use_hopper(flag):
    """Where attention runs Triton: True (default) takes kernels_hopper's tuned paths for CUDA tensors on
    a Hopper GPU, False keeps to the reference kernels of this file everywhere. Read at trace time too."""
    global _use_hopper
    assert flag in (True, False)
    _use_hopper = flag


def set_use_fused_matmuls(flag):
    """True (default): linear_swiglu takes kernels_matmul's fused kernel where it runs (Hopper GPUs, no
    gradient); False: the matmul and the element-wise work apart. Read at trace time too."""
    global _use_fused_matmuls
    assert flag in (True, False)
    _use_fused_matmuls = flag


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
    every call from a model is. (torch._dynamo is imported here, not with this module: it takes over a second,
    and a run without torch.compile never needs it.)"""
    if not torch.compiler.is_compiling():
        _log_once(msg)
        return
    from torch._dynamo.comptime import comptime
    comptime(_log_traced_choice, lambda: _log_once(msg))


def _interpreter_dtype(x, dtype=None):
    """Why a call off CUDA (Triton's interpreter) computing in dtype (x's by default) cannot take the kernels,
    or '': it computes bfloat16 wrongly."""
    return "bfloat16 off CUDA: Triton's interpreter computes it wrongly" if not x.is_cuda and \
        (dtype or x.dtype) == torch.bfloat16 else ""


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


def _why_not_hopper(q):
    """'' where kernels_hopper's tuned paths take this call, else why not. They were tuned on H100 and H200
    (compute capability 9: TMA, shared-memory budgets) at head_dim 64; at 128 their tiles spill registers."""
    if not _use_hopper:
        return "tuned paths off by set_use_hopper(False)"
    if kernels_hopper is None:
        return _hopper_missing
    if not q.is_cuda or torch.cuda.get_device_properties(q.device).major != 9:
        return "tuned paths need a Hopper GPU"
    if q.shape[-1] != 64:
        return "tuned paths are for head_dim 64"
    return ""


def _why_not_fused(x, n_out, dtype=None):
    """'' where kernels_matmul could take the product of x (..., K) with a weight of n_out rows, computing in
    dtype (x's, or the result's where x is FP8), else why not. Its kernel was written and measured for Hopper
    GPUs (TMA descriptors); it stores with 32-bit offsets."""
    dtype = dtype or x.dtype
    if not _use_fused_matmuls:
        return "fused matmuls off by set_use_fused_matmuls(False)"
    if not _use_hopper:
        return "Hopper paths off by set_use_hopper(False)"
    if kernels_matmul is None:
        return _matmul_missing
    if x.is_cuda and torch.cuda.get_device_properties(x.device).major != 9:
        return "fused matmuls need a Hopper GPU"
    if x.is_cuda and dtype not in FLASH_DTYPES:
        return f"dtype {dtype} on CUDA, not one of {FLASH_DTYPES}"
    if x.shape[-1] * x.element_size() % 16 or n_out % 8:
        return f"rows of {x.shape[-1]} {x.dtype} or {n_out} outputs not a multiple of 16 bytes or of 8 (TMA)"
    if x.numel() // max(1, x.shape[-1]) * n_out >= 2 ** 31:
        return f"a result of {x.numel() // max(1, x.shape[-1]):,} x {n_out} elements, past 32-bit offsets"
    return _interpreter_dtype(x, dtype)


def attention(q, k, v, cos=None, sin=None):
    D = q.shape[-1]
    unsupported = ""
    if D not in FLASH_HEAD_DIMS:
        unsupported = f"head_dim {D} not in {FLASH_HEAD_DIMS}"
    elif q.is_cuda and q.dtype not in FLASH_DTYPES:
        unsupported = f"dtype {q.dtype} on CUDA, not one of {FLASH_DTYPES}"
    else:
        unsupported = _interpreter_dtype(q)
    use, reason = _pick(q, unsupported)
    if not use:
        _log_choice(f"attention: PyTorch SDPA ({reason})")
        return attention_reference(q, k, v, cos, sin)
    why_not = _why_not_hopper(q)
    if not why_not:
        _log_choice(f"attention: triton flash kernel, tuned Hopper paths ({reason})")
        return kernels_hopper.flash_attention(q, k, v, cos, sin)
    _log_choice(f"attention: triton flash kernel, reference kernels ({reason}; {why_not})")
    return flash_attention(q, k, v, cos, sin)


def add_rms_norm(x, y, eps):
    use, reason = _pick(x, _interpreter_dtype(x))
    _log_choice(f"add_rms_norm: {'triton kernel' if use else 'PyTorch'} ({reason})")
    if use:
        return add_rms_norm_triton(x, y, eps)
    return add_rms_norm_reference(x, y, eps)


def add_rms_norm_fp8(x, y, eps):
    """add_rms_norm where no gradient flows, returning its output also as quantize_rows_fp8 gives it:
    (out, (q, scale)), for the FP8 product that follows (linear_swiglu_fp8). The kernel writes both at once."""
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        raise ValueError("add_rms_norm_fp8 has no backward: call it where no gradient flows")
    use, reason = _pick(x, _interpreter_dtype(x))
    _log_choice(f"add_rms_norm_fp8: {'triton kernel' if use else 'PyTorch'} ({reason})")
    if not use:
        return add_rms_norm_fp8_reference(x, y, eps)
    out, _, q, scale = _add_rms_norm_launch(_as_rows(x), _as_rows(y), float(eps), fp8=True)
    return out.view(x.shape), (q, scale)


def swiglu(gate_up):
    """swiglu_reference, with SwiGLUTriton's backward where a gradient flows and the kernels take the call."""
    if not (torch.is_grad_enabled() and gate_up.requires_grad):
        return swiglu_reference(gate_up)
    unsupported = _interpreter_dtype(gate_up)
    if gate_up.numel() >= 2 ** 31:
        unsupported = f"{gate_up.numel():,} elements, past 32-bit offsets"
    use, reason = _pick(gate_up, unsupported)
    _log_choice(f"swiglu: {'PyTorch forward, triton backward' if use else 'PyTorch'} ({reason})")
    if use:
        return SwiGLUTriton.apply(gate_up)
    return swiglu_reference(gate_up)


def linear_swiglu(x, w):
    """swiglu(x w^T) for w = [w_gate; w_up] of shape (2N, K): kernels_matmul's fused kernel where no gradient
    flows (the recurrence's steps without gradient, the Q-continue pass, evaluation), else F.linear and PyTorch."""
    use, reason = _pick(x, _why_not_fused(x, w.shape[0] // 2))
    if use and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        use, reason = False, "a gradient flows: the backward needs the gate and up, which the fused kernel never stores"
    _log_choice(f"linear_swiglu: {'fused triton kernel' if use else 'F.linear, then swiglu'} ({reason})")
    if use:
        return kernels_matmul.linear_swiglu(x, w)
    return swiglu(F.linear(x, w))


def linear_swiglu_fp8(x_fp8, w, out_dtype):
    """swiglu(x w^T) in out_dtype from x as FP8 rows with their scales ((q, scale) of M rows, as
    add_rms_norm_fp8 returns them) and w = [w_gate; w_up] (2N, K), quantized here the same way: (M, N).
    No gradient. kernels_matmul's FP8 kernel where it runs, else the same product on the dequantized operands."""
    q, scale = x_fp8
    w_fp8 = quantize_rows_fp8(w)
    use, reason = _pick(q, _why_not_fused(q, w.shape[0] // 2, out_dtype))
    _log_choice(f"linear_swiglu_fp8: {'fused triton kernel' if use else 'PyTorch, dequantized'} ({reason})")
    if use:
        return kernels_matmul.linear_swiglu_fp8(q, scale, *w_fp8, out_dtype)
    return linear_swiglu_fp8_reference(x_fp8, w_fp8, out_dtype)
