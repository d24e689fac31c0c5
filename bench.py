"""
Benchmark of kernels.py on HRM's shapes, forward and backward, against PyTorch:

- attention (RoPE + non-causal attention): the Triton kernel vs attention_reference (RoPE + SDPA) eager and
  torch.compile'd, and the Triton kernel without RoPE vs SDPA alone under each of its backends (flash,
  efficient, cudnn);
- add + RMSNorm: the Triton kernel vs add_rms_norm_reference eager and torch.compile'd, next to the HBM
  bandwidth of a large device-to-device copy measured in the same run;
- one whole compiled HRM training step (model, loss, backward, optimizers) with the kernels on and off.

Also, before timing: bfloat16 errors of the kernels against float64 references (check), a torch.compile
check of a block using both kernels (fullgraph, graph breaks, match with eager), and optionally a sweep of
block configs (sweep). Each op is timed twice: the median of triton.testing.do_bench (wall time of the
call, L2 flushed before every run), and its GPU time (the kernels' durations summed by the profiler). At
these sizes an eager autograd backward costs more CPU time than GPU time, so the do_bench backward mostly
measures the CPU; the GPU time is what the op costs inside a model whose CPU runs ahead (rates and
speed-ups use it). The backward time is (forward + backward) - forward. Run on a GPU:

    python bench.py                      # everything
    python bench.py --sweep=True --train_step=False
    ncu --clock-control none --kernel-name regex:_attn_fwd --launch-skip 2 --launch-count 2 \
        --section WarpStateStats python bench.py --probe=True --check=False --bench_ops=False \
        --compile_check=False --train_step=False
"""
import math
import os
import time

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config
sudoku = (384, 82)          # (batch, seq): 81 cells + 1 puzzle-embedding token
maze = (96, 900)            # (batch, seq): 30 x 30 mazes and ARC grids
n_head = 8
head_dim = 64
hidden = 512                # add_rms_norm rows are (batch * seq, hidden)
eps = 1e-5
dtype = 'bfloat16'
device = 'cuda'             # 'cpu' runs the checks under Triton's interpreter (a dry run; timings meaningless)
check = True                # bf16 errors of the kernels vs float64 references
sweep = False               # time alternative block configs of each kernel
bench_ops = True            # the op-level table
compile_check = True        # torch.compile a block using both kernels: fullgraph, graph breaks, match
train_step = True           # time a compiled HRM training step with the kernels on and off
train_batch = 384
train_steps = 20            # timed steps (after 3 warm-up steps, which compile)
probe = False               # only launch the Sudoku-shape attention forward: 3x with RoPE, 1x without (for ncu)
warmup = 25                 # do_bench warm-up, ms
rep = 100                   # do_bench repetitions, ms
exec(open('configurator.py').read())
# -----------------------------------------------------------------------------

if device == 'cpu':
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
import triton  # noqa: E402

import kernels  # noqa: E402
from model import HRM, HRMConfig, RotaryEmbedding  # noqa: E402

dt = getattr(torch, dtype)
torch.manual_seed(0)
rows = []  # the final table: dicts with op, shape, impl, fwd, bwd (ms) and rates


def timed(fn, rep=rep):
    """Median time of fn in ms (on the CPU dry run: one call, wall clock)."""
    if device == 'cpu':
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def rel_err(out, ref):
    return float('nan') if not torch.isfinite(out).all() else \
        ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def rope(B, T, per_sample, D=head_dim):
    """cos, sin as the model computes them; per_sample gives (B, T, D) tables at random positions."""
    pos = torch.randint(0, 4096, (B, T), device=device) if per_sample else torch.arange(T, device=device)
    return RotaryEmbedding(D, 4096, 10000.0).to(device)(pos)


def qkv_leaves(B, T, H=n_head, D=head_dim):
    """q, k, v: strided leaf views into one (B, T, 3, H, D) tensor, the model's layout."""
    qkv = torch.randn(B, T, 3, H, D, device=device, dtype=dt)
    return [t.requires_grad_() for t in qkv.unbind(2)]


# -----------------------------------------------------------------------------
# correctness in bfloat16

def check_attention(B, T, H, D, per_sample):
    q, k, v = qkv_leaves(B, T, H, D)
    cos, sin = rope(B, T, per_sample, D)
    do = torch.randn(B, T, H, D, device=device, dtype=dt)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = kernels.attention_reference(q64, k64, v64, cos.double(), sin.double())
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    line = []
    for name, fn in (("triton", kernels.flash_attention), ("pytorch", kernels.attention_reference)):
        out = fn(q, k, v, cos, sin)
        grads = torch.autograd.grad(out, (q, k, v), do)
        errs = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
        line.append(f"{name} " + " ".join(f"{e:.2e}" for e in errs))
    print(f"attention B={B} T={T} H={H} D={D} {'(B,T,D)' if per_sample else '(T,D)'} tables; "
          f"rel. err. out dq dk dv: {' | '.join(line)}")


def check_norm(M, N):
    x, y = (torch.randn(M, N, device=device, dtype=dt, requires_grad=True) for _ in range(2))
    do = torch.randn(M, N, device=device, dtype=dt)
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    ref = kernels.add_rms_norm_reference(x64, y64, eps)
    ref_grads = torch.autograd.grad(ref, (x64, y64), do.double())
    line = []
    for name, fn in (("triton", kernels.add_rms_norm_triton), ("pytorch", kernels.add_rms_norm_reference)):
        out = fn(x, y, eps)
        grads = torch.autograd.grad(out, (x, y), do)
        errs = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
        line.append(f"{name} " + " ".join(f"{e:.2e}" for e in errs))
    print(f"add_rms_norm ({M}, {N}); rel. err. out dx dy: {' | '.join(line)}")


if probe:
    q, k, v = qkv_leaves(*sudoku)
    cos, sin = rope(*sudoku, False)
    with torch.no_grad():
        for _ in range(3):
            kernels.flash_attention(q, k, v, cos, sin)
        kernels.flash_attention(q, k, v)

if check:
    print(f"== bf16 checks against float64 references ({dtype})")
    small = device == 'cpu'
    for B, T, H, D, per_sample in [(8, 82, 8, 64, False), (8, 82, 8, 64, True), (2, 900, 8, 64, False),
                                   (2, 901, 4, 128, True), (16, 81, 8, 64, False), (4, 127, 8, 128, False)]:
        if small:
            B, H = 1, 1
        check_attention(B, T, H, D, per_sample)
    for M in (384 * 82, 1000):
        check_norm(M if not small else 64, hidden)


# -----------------------------------------------------------------------------
# GPU time (kernel durations summed by the profiler), and the config sweep (kernel launches only)

def gpu_time(fn, iters=20):
    """Mean summed duration of the GPU kernels that fn launches, in ms; L2 flushed between calls."""
    from torch.profiler import ProfilerActivity, profile
    from torch.autograd import DeviceType
    cache = triton.runtime.driver.active.get_empty_cache_for_benchmark()
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            cache.zero_()
            fn()
        torch.cuda.synchronize()
    total = sum(e.time_range.elapsed_us() for e in prof.events()
                if e.device_type == DeviceType.CUDA and "FillFunctor<int>" not in e.name)
    return total / iters / 1e3


def launch_time(fn):
    """GPU time of fn's kernels on CUDA (the launches' CPU cost would dominate do_bench for the shortest
    kernels), wall time on the CPU dry run; ms."""
    return gpu_time(fn) if device == 'cuda' else timed(fn)


def sweep_attention(B, T):
    q, k, v = (t.detach() for t in qkv_leaves(B, T))
    cos, sin = rope(B, T, False)
    do = torch.randn_like(q)
    o, lse, q_s, k_s, rotated = kernels._flash_fwd(q, k, v, cos, sin)
    flops = 4 * B * n_head * T * T * head_dim
    sweeps = []  # (name, configs, launch(config), default config, FLOP)
    if T <= kernels.SHORT_MAX_T:
        for rope_name, c, s, short_cfgs, default, form in (
                ("RoPE", cos, sin, [(8, 1), (8, 2), (8, 3), (4, 2)], kernels.attn_short_rope_config(T, head_dim),
                 "programs per SM"),
                ("no RoPE", None, None, [(8, 1, 4), (8, 1, 3), (8, 2, 3), (4, 1, 4), (4, 2, 2)],
                 kernels.attn_short_config(T, head_dim), "programs per SM, stages")):
            sweeps.append((f"fwd {rope_name}, persistent (num_warps, {form})", short_cfgs,
                           lambda cfg, c=c, s=s: kernels._flash_fwd(q, k, v, c, s, short_config=cfg), default, flops))
            sweeps.append((f"fwd {rope_name}, tiled (RoPE pass first)" if c is not None else "fwd no RoPE, tiled",
                           [(64, 128, 4, 1), (128, 128, 8, 1), (32, 128, 4, 1)],
                           lambda cfg, c=c, s=s: kernels._flash_fwd(q, k, v, c, s, cfg), (64, 128, 4, 1), flops))
        sweeps.append(("bwd", [(None, c) for c in [(32, 128, 4, 1), (16, 128, 4, 2), (32, 128, 8, 1), (64, 128, 8, 1)]],
                       lambda c: kernels._flash_bwd(do, q_s, k_s, v, o, lse, cos, sin, rotated, c),
                       kernels.attn_bwd_config(T, head_dim), 2.5 * flops))
    else:
        sweeps.append(("fwd", [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 128, 4, 3)],
                       lambda c: kernels._flash_fwd(q, k, v, cos, sin, c), kernels.attn_fwd_config(T, head_dim), flops))
        sweeps.append(("bwd (dQ config, dK/dV config)",
                       [((64, 64, 4, 4), (32, 64, 4, 3)), ((64, 64, 4, 3), (32, 64, 4, 4)),
                        ((64, 64, 4, 5), (32, 64, 4, 2)), ((64, 32, 4, 4), (16, 64, 4, 3)),
                        ((128, 64, 8, 4), (32, 32, 4, 3)), ((64, 64, 8, 4), (64, 64, 4, 3)),
                        ((64, 64, 4, 4), (32, 64, 8, 3)), ((64, 64, 4, 4), (32, 128, 4, 3))],
                       lambda c: kernels._flash_bwd(do, q_s, k_s, v, o, lse, cos, sin, rotated, c),
                       kernels.attn_bwd_config(T, head_dim), 2.5 * flops))
    for name, cfgs, fn, default, fl in sweeps:
        res = []
        for cfg in cfgs:
            try:
                res.append((launch_time(lambda: fn(cfg)), cfg))
            except Exception as e:  # out of shared memory or registers: not a candidate
                print(f"  {name} {cfg}: {type(e).__name__}")
        res.sort(key=lambda r: r[0])
        t_def = launch_time(lambda: fn(default))
        print(f"attention {name} B={B} T={T}: default {default} {t_def * 1e3:.1f} us; best: " +
              ", ".join(f"{c} {t * 1e3:.1f} us ({fl / t / 1e9:.0f} TF/s)" for t, c in res[:6]))
    # what RoPE costs: the same launches without it, and the separate RoPE pass alone
    t_f = launch_time(lambda: kernels._flash_fwd(q, k, v, None, None))
    t_b = launch_time(lambda: kernels._flash_bwd(do, q, k, v, o, lse, None, None, False))
    t_r = launch_time(lambda: kernels._rope_qk_launch(q, k, cos, sin))
    gb = 4 * q.numel() * q.element_size() / 1e9
    print(f"attention B={B} T={T} default configs: fwd without RoPE {t_f * 1e3:.1f} us, bwd without RoPE "
          f"{t_b * 1e3:.1f} us; RoPE pass on q and k alone {t_r * 1e3:.1f} us ({gb / t_r * 1e3:.0f} GB/s)")


def report_resources():
    """Registers, spills and shared memory of every compiled variant of the kernels (from Triton's cache)."""
    for fn in (kernels._attn_fwd, kernels._attn_fwd_short, kernels._attn_fwd_short_rope, kernels._attn_bwd_fused,
               kernels._attn_bwd_dq, kernels._attn_bwd_dkdv, kernels._rope_qk, kernels._add_rms_norm_fwd,
               kernels._add_rms_norm_bwd):
        for caches in fn.device_caches.values():
            for key, k in caches[0].items():
                md = k.metadata
                print(f"  {md.name}: warps {md.num_warps} stages {md.num_stages} shared {md.shared} B "
                      f"regs {k.n_regs} spills {k.n_spills} | {str(key)[-200:]}")


if sweep:
    print("== config sweep (GPU time of the launches)")
    for B, T in (sudoku, maze):
        sweep_attention(B, T)
    if device == 'cuda':
        try:
            report_resources()
        except Exception as e:
            print(f"resource report unavailable: {type(e).__name__}: {e}")


# -----------------------------------------------------------------------------
# op-level timings: do_bench (wall time of the call, CPU launch overhead included when it exceeds the GPU
# work) and GPU time (gpu_time above: what the call costs when the CPU runs ahead)

def time_fwd_bwd(f, inputs, dout):
    fwd_bwd = lambda: torch.autograd.grad(f(), inputs, dout)
    t_fwd, t_all = timed(f), timed(fwd_bwd)
    if device != 'cuda':
        return t_fwd, t_all - t_fwd, float('nan'), float('nan')
    g_fwd, g_all = gpu_time(f), gpu_time(fwd_bwd)
    return t_fwd, t_all - t_fwd, g_fwd, g_all - g_fwd


def bench_attention(B, T):
    q, k, v = qkv_leaves(B, T)
    cos, sin = rope(B, T, False)
    do = torch.randn(B, T, n_head, head_dim, device=device, dtype=dt)
    shape = f"B={B} T={T} H={n_head} D={head_dim}"
    flops = 4 * B * n_head * T * T * head_dim  # two matmuls of 2*T*T*D per (batch, head); backward: 2.5x
    impls = [("triton (RoPE inside)", lambda: kernels.flash_attention(q, k, v, cos, sin), None),
             ("reference eager (RoPE + SDPA)", lambda: kernels.attention_reference(q, k, v, cos, sin), None)]
    if device == 'cuda':
        ref_compiled = torch.compile(kernels.attention_reference, dynamic=False)
        impls.append(("reference compiled", lambda: ref_compiled(q, k, v, cos, sin), None))
    impls.append(("triton (no RoPE)", lambda: kernels.flash_attention(q, k, v), None))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        impls.append((f"SDPA {name} (no RoPE)", sdpa, backend))
    for name, f, backend in impls:
        try:
            if backend is None:
                times = time_fwd_bwd(f, (q, k, v), do)
            else:
                with sdpa_kernel([backend]):
                    times = time_fwd_bwd(f, (q, k, v), do.transpose(1, 2))
        except Exception as e:
            print(f"attention {shape} {name}: failed, {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        add_row("attention", shape, name, times, lambda t, bwd: f"{flops * (2.5 if bwd else 1) / t / 1e9:.0f} TF/s")
    if device == 'cuda':  # HRM's recurrence calls attention mostly without gradient
        with torch.no_grad():
            line = [f"{name} {gpu_time(f) * 1e3:.1f} us" for name, f, backend in impls if backend is None]
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                line.append(f"SDPA cudnn (no RoPE) {gpu_time(sdpa) * 1e3:.1f} us")
        print(f"attention {shape} forward under no_grad, GPU time: " + ", ".join(line))


def bench_norm(M, hbm):
    x, y = (torch.randn(M, hidden, device=device, dtype=dt, requires_grad=True) for _ in range(2))
    do = torch.randn(M, hidden, device=device, dtype=dt)
    gb = (3 * M * hidden * x.element_size() + 4 * M) / 1e9  # read 2 tensors, write 1 (+ rstd): both ways
    impls = [("triton", lambda: kernels.add_rms_norm_triton(x, y, eps)),
             ("reference eager", lambda: kernels.add_rms_norm_reference(x, y, eps))]
    if device == 'cuda':
        ref_compiled = torch.compile(kernels.add_rms_norm_reference, dynamic=False)
        impls.append(("reference compiled", lambda: ref_compiled(x, y, eps)))
    for name, f in impls:
        add_row("add_rms_norm", f"({M}, {hidden})", name, time_fwd_bwd(f, (x, y), do),
                lambda t, bwd: f"{gb / t * 1e3:.0f} GB/s" + (f" {gb / t * 1e5 / hbm:.0f}%" if hbm else ""))


def add_row(op, shape, impl, times, rate):
    t_fwd, t_bwd, g_fwd, g_bwd = times
    print(f"{op} {shape} {impl}: do_bench fwd {t_fwd * 1e3:.1f} us, bwd {t_bwd * 1e3:.1f} us; "
          f"GPU fwd {g_fwd * 1e3:.1f} us, bwd {g_bwd * 1e3:.1f} us")
    rows.append(dict(op=op, shape=shape, impl=impl, fwd=t_fwd, bwd=t_bwd, gfwd=g_fwd, gbwd=g_bwd,
                     rate_fwd=rate(g_fwd, False), rate_bwd=rate(g_bwd, True)))


def copy_bandwidth():
    src = torch.empty(2 ** 30 // 2, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / t / 1e6  # GB/s, bytes read + written


def matmul_rate():
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192 ** 3 / timed(lambda: a @ b) / 1e9  # TFLOP/s


if bench_ops:
    hbm = None
    if device == 'cuda':
        print(f"== op timings on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}")
        hbm, mm = copy_bandwidth(), matmul_rate()
        print(f"ceilings: device-to-device copy {hbm:.0f} GB/s (read + write); bf16 8192^3 matmul {mm:.0f} TFLOP/s")
    for B, T in (sudoku, maze):
        bench_attention(B, T)
    for B, T in (sudoku, maze):
        bench_norm(B * T, hbm)


# -----------------------------------------------------------------------------
# torch.compile with the kernels inside

def compile_check_block():
    B, T, H, D = 8, sudoku[1], n_head, head_dim
    C = H * D
    x = torch.randn(B, T, C, device=device, dtype=dt, requires_grad=True)
    w_qkv = (torch.randn(3 * C, C, device=device, dtype=dt) / math.sqrt(C)).requires_grad_()
    cos, sin = rope(B, T, True)

    def block(x, w_qkv, cos, sin):
        q, k, v = F.linear(x, w_qkv).view(B, T, 3, H, D).unbind(2)
        return kernels.add_rms_norm(x, kernels.attention(q, k, v, cos, sin).reshape(B, T, C), eps)

    kernels.set_use_flash(True)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(block)(x, w_qkv, cos, sin)
    print(f"torch._dynamo.explain: {explain.graph_count} graph(s), {explain.graph_break_count} graph break(s)"
          + "".join(f"\n  break: {r.reason}" for r in explain.break_reasons))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    do = torch.randn(B, T, C, device=device, dtype=dt)
    outs = {}
    for name, f in (("compiled", compiled), ("eager", block)):
        out = f(x, w_qkv, cos, sin)
        outs[name] = [out] + list(torch.autograd.grad(out, (x, w_qkv), do))
    with torch.no_grad():  # most of HRM's calls: the recurrence runs without gradient
        outs["compiled no_grad"] = [compiled(x, w_qkv, cos, sin)]
    kernels.set_use_flash(False)
    out = block(x, w_qkv, cos, sin)
    outs["pytorch"] = [out] + list(torch.autograd.grad(out, (x, w_qkv), do))
    kernels.set_use_flash(None)
    for a, b in (("compiled", "eager"), ("compiled", "pytorch"), ("compiled no_grad", "eager")):
        print(f"fullgraph compile OK; rel. diff {a} vs {b} (out, dx, dw): " +
              " ".join(f"{rel_err(p, r):.2e}" for p, r in zip(outs[a], outs[b])))


if compile_check and device == 'cuda':
    print("== torch.compile with both kernels (set_use_flash(True))")
    try:
        compile_check_block()
    except Exception as e:
        print(f"compile check FAILED: {type(e).__name__}: {str(e)[:2000]}")


# -----------------------------------------------------------------------------
# the table: the first (Triton) row of each (op, shape) is the base of the others' speed-up column

if rows:
    print("\nfwd/bwd: do_bench median of the call (wall, includes CPU launch overhead where that exceeds the GPU "
          "work) | GPU kernel time from the profiler; rates and speed-ups from the GPU times; speed-up = this row's "
          "time / the triton row's with RoPE, or without for rows without RoPE (> 1: triton faster)")
    print(f"{'op':<13} {'shape':<22} {'impl':<30} {'fwd ms':>7} {'bwd ms':>7} | {'GPU fwd':>7} {'GPU bwd':>7} "
          f"{'fwd rate':>14} {'bwd rate':>14} {'triton speed-up':>16}")
    for r in rows:
        # like for like: rows without RoPE against the triton row without RoPE, the others against the first
        base = next(b for b in rows if b["op"] == r["op"] and b["shape"] == r["shape"] and b["impl"].startswith(
            "triton") and ("no RoPE" in b["impl"]) == ("no RoPE" in r["impl"]))
        speedup = f"x{r['gfwd'] / base['gfwd']:.2f} / x{r['gbwd'] / base['gbwd']:.2f}" if base is not r else ""
        print(f"{r['op']:<13} {r['shape']:<22} {r['impl']:<30} {r['fwd']:>7.4f} {r['bwd']:>7.4f} | "
              f"{r['gfwd']:>7.4f} {r['gbwd']:>7.4f} {r['rate_fwd']:>14} {r['rate_bwd']:>14} {speedup:>16}")


# -----------------------------------------------------------------------------
# one whole HRM training step, compiled, with the kernels on and off

def hrm_step_time(use_flash):
    kernels.set_use_flash(use_flash)
    torch._dynamo.reset()
    torch.manual_seed(0)
    B = train_batch
    config = HRMConfig(vocab_size=11, seq_len=81, puzzle_emb_ndim=hidden, num_puzzle_identifiers=1000,
                       batch_size=B, H_cycles=2, L_cycles=2, H_layers=4, L_layers=4, hidden_size=hidden,
                       expansion=4.0, num_heads=n_head, forward_dtype=dtype)
    model = HRM(config).to(device)
    model.train()
    optimizers = [o for o in model.configure_optimizers(1e-4, 1.0, (0.9, 0.95), 1e-4, 1.0) if o is not None]
    cmodel = torch.compile(model)
    batch = dict(inputs=torch.randint(1, 11, (B, 81), device=device, dtype=torch.int32),
                 labels=torch.randint(1, 11, (B, 81), device=device, dtype=torch.int32),
                 puzzle_identifiers=torch.randint(0, 1000, (B,), device=device, dtype=torch.int32))
    carry = model.initial_carry(batch)
    counters = torch._dynamo.utils.counters
    counters.clear()
    times = []
    t_start = time.perf_counter()
    for i in range(3 + train_steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        carry, loss, metrics, _ = cmodel(carry, batch)
        (loss / B).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        if i == 2:
            t_compile = time.perf_counter() - t_start
    kernels.set_use_flash(None)
    timed_steps = sorted(times[3:])
    breaks = sum(counters["graph_break"].values())
    return timed_steps[len(timed_steps) // 2], t_compile, loss.item(), breaks, dict(counters["graph_break"])


if train_step and device == 'cuda':
    print("== compiled HRM training step (Sudoku model: hidden 512, 8 heads, 4+4 layers, 2x2 cycles, "
          f"batch {train_batch}, seq 81+1, {dtype})")
    step = {}
    for use_flash in (True, False):
        try:
            step[use_flash], t_compile, loss, breaks, reasons = hrm_step_time(use_flash)
            print(f"set_use_flash({use_flash}): median step {step[use_flash]:.1f} ms over {train_steps} steps "
                  f"(warm-up incl. compile {t_compile:.0f} s), last loss {loss:.4f}, {breaks} graph break(s) "
                  f"{reasons if breaks else ''}")
        except Exception as e:
            print(f"set_use_flash({use_flash}): FAILED {type(e).__name__}: {str(e)[:2000]}")
    if len(step) == 2:
        print(f"HRM train step, compiled, B={train_batch}: kernels on {step[True]:.1f} ms, "
              f"off {step[False]:.1f} ms, speed-up x{step[False] / step[True]:.2f}")
