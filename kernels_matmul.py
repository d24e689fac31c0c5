"""
A matrix multiply with the element-wise work after it fused in, for Hopper GPUs (H100, H200): the MLP's
gate-and-up projection and SwiGLU,

    linear_swiglu(x, w) = silu(x w_gate^T) * (x w_up^T),   w = [w_gate; w_up] of shape (2N, K)

Apart, the product goes to memory only for an element-wise kernel to read it straight back: at Sudoku's
shape (31,488 rows, 512 -> 2 x 1,536) cuBLAS writes 193 MB that Inductor's SwiGLU kernel reads to write
the 97 MB result. Fused, a program keeps a gate and an up accumulator for the same tile of the result and
stores only silu(gate) * up. Both accumulators are rounded to the input dtype first, where the unfused path
stores the product, then silu(gate) * up is taken in float32, as the compiled model's unfused path takes
it (eager PyTorch rounds silu(gate) to bfloat16 first): the same up to the order of the float32 sums (the
compiled Sudoku step's loss came out the same to every printed digit).

x and the two halves of w come through TMA descriptors built on the host (as in kernels_hopper.py) in a
software-pipelined loop, rows and columns past their ends loading as zeros; the result is stored through
pointers with masks. Where it pays, measured on one H200 in bfloat16:

    the op (triton.testing.do_bench, median)   190 us against 223 for cuBLAS + Inductor's SwiGLU (cuBLAS alone 159)
    the compiled Sudoku training step           39.69 against 40.21 ms with the matmul apart (39.53 against 40.66
                                                in another run), peak memory 4.47 GiB both; by the profile, the
                                                step's 40 fused calls take 7.4 ms of GPU time, 9.1 ms apart

Only calls without gradient take it (kernels.linear_swiglu decides): the backward would need the gate and
up halves that the fusion avoids writing. In a training step those are 40 of the 48 MLP passes (the
recurrence's steps without gradient and the whole Q-continue pass), and every pass of evaluation.

linear_swiglu_fp8 is the same kernel on FP8 operands (HRMConfig.fp8): x and w in float8 e4m3, each row with
a float32 scale that multiplies the float32 sums before they are rounded. 154 us against the bfloat16
kernel's 189 at Sudoku's shape; the compiled Sudoku step 35.02 against 36.66 ms (notes/step_time.md, "FP8").
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels_hopper import _tma_ready


@triton.jit
def _tile_of_program(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program. GROUP_M row blocks walk the column blocks side by side,
    so that the weight tiles they share are read from L2 rather than memory."""
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % group, (pid % per_group) // group


@triton.jit
def _linear_swiglu_fwd(XD, GD, UD, XS, WS, H, M, N, K, stride_h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr, SCALED: tl.constexpr):
    """SCALED: x and w are FP8 and each of their rows carries a float32 scale (XS, and WS for w's 2N rows),
    applied to the float32 sums before they are rounded; else XS and WS are not read."""
    pm, pn = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = XD.load([pm * BLOCK_M, k])
        gate = tl.dot(x, GD.load([pn * BLOCK_N, k]).T, gate)
        up = tl.dot(x, UD.load([pn * BLOCK_N, k]).T, up)
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    if SCALED:
        x_scale = tl.load(XS + rows, mask=rows < M, other=0.0)[:, None]
        gate *= x_scale * tl.load(WS + cols, mask=cols < N, other=0.0)[None, :]
        up *= x_scale * tl.load(WS + N + cols, mask=cols < N, other=0.0)[None, :]
    gate = gate.to(H.dtype.element_ty).to(tl.float32)
    up = up.to(H.dtype.element_ty).to(tl.float32)
    tl.store(H + rows[:, None] * stride_h + cols[None, :], (gate * tl.sigmoid(gate) * up).to(H.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


def _launch(x2, w, h, x_scale, w_scale, BM, BN, BK, num_warps, stages):
    """h (M, N) = silu(x2 w[:N]^T) * (x2 w[N:]^T), with the rows' scales where they are given."""
    M, K = x2.shape
    N = w.shape[0] // 2
    scaled = x_scale is not None
    _linear_swiglu_fwd[(triton.cdiv(M, BM) * triton.cdiv(N, BN),)](
        TensorDescriptor.from_tensor(x2, [BM, BK]), TensorDescriptor.from_tensor(_tma_ready(w[:N]), [BN, BK]),
        TensorDescriptor.from_tensor(_tma_ready(w[N:]), [BN, BK]), x_scale if scaled else h,
        w_scale if scaled else h, h, M, N, K, h.stride(0), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8,
        STAGES=stages, SCALED=scaled, num_warps=num_warps)
    return h


def linear_swiglu(x, w):
    """silu(x w[:N]^T) * (x w[N:]^T) for w of shape (2N, K), in x's dtype; no gradient flows through it."""
    x2 = _tma_ready(x.reshape(-1, x.shape[-1]))
    h = torch.empty((x2.shape[0], w.shape[0] // 2), device=x.device, dtype=x.dtype)
    # the fastest at 31,488 x 512 -> 2 x 1,536 on an H200 among tiles of 64 and 128 rows and columns, 32 and 64
    # deep, 4 and 8 warps, 2 to 4 stages: 128 x 64 of each half, 64 deep, four warps, two stages
    _launch(x2, w, h, None, None, 128, 64, 64, num_warps=4, stages=2)
    return h.view(*x.shape[:-1], h.shape[1])


def linear_swiglu_fp8(x, x_scale, w, w_scale, out_dtype):
    """The same product from FP8 operands, rows (M, K) of x and (2N, K) of w, each row of either scaled by its
    float32 scale (x_scale (M,), w_scale (2N,)); the result (M, N) in out_dtype."""
    h = torch.empty((x.shape[0], w.shape[0] // 2), device=x.device, dtype=out_dtype)
    # the fastest at Sudoku's shape on an H200 among tiles of 64 and 128 rows, columns and depth, 4 and 8 warps,
    # 2 and 3 stages: 128 x 64 of each half, 128 deep, four warps, three stages (154 us against the bfloat16
    # kernel's 189)
    return _launch(_tma_ready(x), _tma_ready(w), h, x_scale, w_scale, 128, 64, 128, num_warps=4, stages=3)
