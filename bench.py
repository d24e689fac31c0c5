"""
Benchmark of the kernels on HRM's shapes, for the backends side by side:

    hopper     kernels_hopper's tuned attention and kernels_matmul's fused SwiGLU (kernels.py's choices on a
               Hopper GPU at head_dim 64)
    unfused    the tuned attention, the SwiGLU apart from its matmul (kernels.set_use_fused_matmuls(False));
               timed only when step_backends names it
    reference  the Triton kernels of kernels.py (kernels.set_use_hopper(False), no fused matmuls)
    pytorch    RoPE + SDPA, add + RMSNorm and SwiGLU's backward in PyTorch, fused by Inductor
               (kernels.set_use_flash(False))

In the order it runs:

1. step: one whole compiled HRM training step per backend (the model's forward with its Q-continue pass,
   the backward, both optimizers, the carry kept from step to step), the backends taking turns over
   several timed windows in one process; the median ms/step of each, and on a GPU its peak memory. The
   figure that says whether a kernel earns its place: op-level gains matter only as far as they show here.
2. check: bfloat16 errors of each path against float64 references, forward and backward.
3. ops: GPU time of attention (Sudoku B=384 T=82, Maze B=96 T=900; H=8, D=64) and add + RMSNorm,
   forward and backward: the kernels' durations summed by the profiler, L2 flushed between calls. At
   these sizes an eager call costs more CPU time than GPU time; the GPU time is what the op costs in a
   compiled model whose CPU runs ahead.

    python bench.py                                            # Sudoku step, checks, ops
    python bench.py --step=maze --check=False --ops=False      # the step at the Maze shape
    python bench.py --fp8=True --check=False --ops=False       # and the step with HRMConfig.fp8
    python bench.py --batch_size=96 --check=False --ops=False  # one GPU's share of an 8-GPU batch of 768
    python bench.py --compile_mode=reduce-overhead --check=False --ops=False   # the step in CUDA graphs
    python bench.py --compile_mode=max-autotune-no-cudagraphs --step_backends=hopper --check=False --ops=False
    python bench.py --step_backends=hopper,unfused --check=False --ops=False  # what the fused SwiGLU saves
    python bench.py --act_continue=False --grad_L_steps=2 --mixer=mlp --check=False --ops=False  # sudoku_fast's step
    python bench.py --profile=True --step_backends=hopper --check=False --ops=False   # where the step's time goes,
                                                               # and where the host waits for the GPU
    python bench.py --device=cpu --dtype=float16               # dry run: interpreter, tiny shapes
"""
import logging
import os
import time

import torch

from dataset import DataError, check_ranges, exit_cleanly

exit_cleanly('bench.py')  # a bad setting is one line, not a traceback
# -----------------------------------------------------------------------------
# config
_not_config = set(globals())
device = 'cuda'             # 'cpu' runs everything under Triton's interpreter at tiny shapes (timings meaningless)
dtype = 'bfloat16'          # 'bfloat16' or 'float16'
step = 'sudoku'             # the whole training step at the 'sudoku' shape, 'maze', 'both' or 'none'
batch_size = 0              # the step's batch; 0 = the shape's (Sudoku 384, Maze 96). 96 at the Sudoku shape is
                            # one GPU's share of the paper's 8-GPU batch of 768
windows = 5                 # timed windows per backend, the backends taking turns
steps_per_window = 10
fp8 = False                 # also time the step with HRMConfig.fp8 (the MLPs' no-grad gate-and-up in FP8)
step_backends = 'hopper,reference,pytorch'  # whose training step is timed, 'unfused' too if named (the first
                                            # is also FP8's and profiled)
compile_mode = 'default'    # torch.compile's mode for the step: 'default', 'reduce-overhead' (CUDA graphs),
                            # 'max-autotune-no-cudagraphs' (Triton matmul templates timed against cuBLAS, the
                            # element-wise neighbours fused into them; compiles for minutes) or 'max-autotune' (both)
act_continue = True         # the model of the timed step, as in train.py: the paper's by default
grad_L_steps = 1
mixer = 'attention'         # 'mlp': a SwiGLU across positions, no attention (and no position encoding)
profile = False             # after timing, profile a few steps of the first variant: GPU time by kernel
check = True
ops = True
config_keys = [k for k in globals() if k not in _not_config and not k.startswith('_')]
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune-no-cudagraphs', 'max-autotune')
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
check_ranges(globals(), [('device', device in ('cuda', 'cpu'), "'cuda' or 'cpu'"),
                         ('dtype', dtype in ('bfloat16', 'float16') and (device == 'cuda' or dtype == 'float16'),
                          "'bfloat16' or 'float16' (on the CPU 'float16': Triton's interpreter gets bfloat16 wrong)"),
                         ('step', step in ('sudoku', 'maze', 'both', 'none'), "'sudoku', 'maze', 'both' or 'none'"),
                         ('batch_size', batch_size >= 0, '>= 0'),
                         ('windows', windows >= 1, '>= 1'), ('steps_per_window', steps_per_window >= 1, '>= 1'),
                         ('compile_mode', compile_mode in COMPILE_MODES, ' or '.join(map(repr, COMPILE_MODES))),
                         ('step_backends', set(step_backends.split(',')) <= {'hopper', 'unfused', 'reference',
                                                                              'pytorch'},
                          "a comma-separated list of 'hopper', 'unfused', 'reference' and 'pytorch'"),
                         ('grad_L_steps', grad_L_steps in (1, 2), "1 or 2 (the step's L_cycles is 2)"),
                         ('mixer', mixer in ('attention', 'mlp'), "'attention' or 'mlp'"),
                         ('profile', not profile or step != 'none', "False with step='none' (no step to profile)"),
                         ('fp8', not fp8 or device == 'cpu' or step_backends.split(',')[0] == 'hopper',
                          "False unless step_backends begins with 'hopper' (FP8 runs with the first one, and its "
                          "kernel is a tuned path: with the others a GPU would multiply it dequantized, in float32)")])
if device == 'cuda' and not torch.cuda.is_available():
    raise DataError("device='cuda', but torch sees no CUDA GPU; --device=cpu runs a dry run under Triton's interpreter")
# -----------------------------------------------------------------------------

if device == 'cpu':
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
try:
    import triton  # noqa: E402
except ImportError:
    raise DataError("triton is not installed (pip install triton): the benchmarks time its kernels") from None

import kernels  # noqa: E402
from model import HRM, Carry, HRMConfig, RotaryEmbedding, check_fp8  # noqa: E402

logging.basicConfig(format="%(name)s: %(message)s")
logging.getLogger("hrm.attn").setLevel(logging.INFO)  # each backend's choices, as they are traced
torch._dynamo.config.recompile_limit = 32  # three backends' graphs of the same model code
if fp8:
    check_fp8(device, dtype)
dt = getattr(torch, dtype)
tiny = device == 'cpu'
if tiny:
    windows, steps_per_window = 1, 1
compile_backend = "eager" if tiny else "inductor"  # on the CPU: trace only
n_head, head_dim, hidden = (2, 64, 128) if tiny else (8, 64, 512)
SHAPES = {"sudoku": (384, 82), "maze": (96, 900)} if not tiny else {"sudoku": (2, 20), "maze": (1, 150)}
# the tuned paths run on a Hopper GPU (and under the interpreter); elsewhere the table has no row for them
has_hopper = kernels.kernels_hopper is not None and (tiny or torch.cuda.get_device_capability()[0] == 9)
# set_use_flash, set_use_hopper, set_use_fused_matmuls
BACKENDS = {"hopper": (True, True, True), "unfused": (True, True, False), "reference": (True, False, False),
            "pytorch": (False, True, True)}
if not has_hopper:
    del BACKENDS["hopper"], BACKENDS["unfused"]
# the training step's variants: each backend asked for, and with fp8 the first one's step with HRMConfig.fp8
# (the model takes the tuned paths on a Hopper GPU only: on the CPU its hopper step would be the reference one)
STEP_VARIANTS = {name: (name, False) for name in step_backends.split(',') if name in BACKENDS
                 and not (tiny and name in ('hopper', 'unfused'))}
if step != 'none' and not STEP_VARIANTS:
    raise DataError(f"step_backends={step_backends!r}: the tuned paths run on a Hopper GPU only; add 'reference' "
                    f"or 'pytorch'")
if fp8 and STEP_VARIANTS:
    STEP_VARIANTS["fp8"] = (next(iter(STEP_VARIANTS)), True)


def use_backend(name):
    kernels.set_use_flash(BACKENDS[name][0])
    kernels.set_use_hopper(BACKENDS[name][1])
    kernels.set_use_fused_matmuls(BACKENDS[name][2])


def sync():
    if device == 'cuda':
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# 1. the whole compiled training step

def step_shape(shape):
    """The timed step's (batch, tokens): the shape's, the batch as batch_size says."""
    B, T = SHAPES[shape]
    return batch_size or B, T


def make_train_step(name, shape):
    """A function that runs one training step of its own model, optimizers and carry as variant `name`."""
    B, T = step_shape(shape)
    backend, with_fp8 = STEP_VARIANTS[name]
    use_backend(backend)
    torch.manual_seed(0)
    vocab = 11 if shape == "sudoku" else 6
    config = HRMConfig(vocab_size=vocab, seq_len=T - 1, puzzle_emb_ndim=hidden, num_puzzle_identifiers=1000,
                       batch_size=B, H_cycles=2, L_cycles=2, H_layers=1 if tiny else 4, L_layers=1 if tiny else 4,
                       hidden_size=hidden, expansion=4.0, num_heads=n_head, forward_dtype=dtype, fp8=with_fp8,
                       act_continue=act_continue, grad_L_steps=grad_L_steps, mixer=mixer,
                       pos_encodings='rope' if mixer == 'attention' else 'none')
    model = HRM(config).to(device).train()
    optimizers = [o for o in model.configure_optimizers(1e-4, 1.0, (0.9, 0.95), 1e-4, 1.0) if o is not None]
    # dynamo cannot trace kernels under the interpreter
    compiled = model if tiny else torch.compile(model, mode=None if compile_mode == 'default' else compile_mode)
    cuda_graphs = compile_mode in ('reduce-overhead', 'max-autotune')
    batch = dict(inputs=torch.randint(1, vocab, (B, T - 1), device=device, dtype=torch.int32),
                 labels=torch.randint(1, vocab, (B, T - 1), device=device, dtype=torch.int32),
                 puzzle_identifiers=torch.randint(0, 1000, (B,), device=device, dtype=torch.int32))
    state = dict(carry=model.initial_carry(batch))

    def train_step():
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        state["carry"], loss, _, _ = compiled(state["carry"], batch)
        (loss / B).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda_graphs:  # the graphs' next run, this variant's or another's, overwrites what they output: copies
            state["carry"] = Carry.from_state_dict({k: v.clone() for k, v in state["carry"].state_dict().items()})
            loss = loss.detach().clone()
        return loss

    return train_step


def time_train_steps(shape):
    B, T = step_shape(shape)
    recipe = "" if (act_continue, grad_L_steps, mixer) == (True, 1, 'attention') else \
        f", act_continue={act_continue} grad_L_steps={grad_L_steps} mixer={mixer}"
    print(f"== {'' if tiny else 'compiled '}HRM training step, {shape} shape (hidden {hidden}, {n_head} heads, "
          f"batch {B}, {T - 1} tokens + the puzzle token, {dtype}{recipe})")
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    steps = {}
    for name in STEP_VARIANTS:
        t0 = time.perf_counter()
        held_before = torch.cuda.memory_allocated() if device == 'cuda' else 0  # the other variants' models
        steps[name] = make_train_step(name, shape)
        for _ in range(1 if tiny else 3):  # compile, warm up
            loss = steps[name]()
        sync()
        peak = ""
        if device == 'cuda':  # the peak of one step above what the variants before it hold: its own process's peak
            torch.cuda.reset_peak_memory_stats()
            loss = steps[name]()
            sync()
            peak = f", peak memory {(torch.cuda.max_memory_allocated() - held_before) / 2**30:.2f} GiB"
        print(f"{name}: warm-up incl. compile {time.perf_counter() - t0:.0f} s, loss {loss.item():.4f}{peak}")
    graphs = counters["stats"]["unique_graphs"]
    times = {name: [] for name in STEP_VARIANTS}
    for _ in range(windows):
        for name in STEP_VARIANTS:  # the flags are read at trace time, and dynamo guards on them: no recompile
            use_backend(STEP_VARIANTS[name][0])
            sync()
            t0 = time.perf_counter()
            for _ in range(steps_per_window):
                steps[name]()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3 / steps_per_window)
    kernels.set_use_flash(None)
    kernels.set_use_hopper(True)
    kernels.set_use_fused_matmuls(True)
    if counters["stats"]["unique_graphs"] != graphs:
        print("WARNING: recompiled while timing; the figures include compilation")
    breaks = sum(counters["graph_break"].values())
    print(f"graph breaks: {breaks} {dict(counters['graph_break']) if breaks else ''}")
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    for name, t in times.items():
        print(f"{shape} step, {name:<9}: median {median[name]:7.2f} ms over {len(t)} windows of "
              f"{steps_per_window} steps (min {min(t):.2f}, max {max(t):.2f})" +
              (f"; {median['pytorch'] / median[name]:.3f}x the pytorch step" if 'pytorch' in median else ""))
    if {'hopper', 'reference'} <= median.keys():
        print(f"{shape} step: the tuned paths take {median['hopper'] - median['reference']:+.2f} ms "
              f"({median['reference'] / median['hopper']:.3f}x) against the reference kernels")
    if {'hopper', 'unfused'} <= median.keys():
        print(f"{shape} step: the fused SwiGLU takes {median['hopper'] - median['unfused']:+.2f} ms "
              f"({median['unfused'] / median['hopper']:.3f}x) against its matmul apart")
    if fp8:
        exact = STEP_VARIANTS['fp8'][0]
        print(f"{shape} step: fp8=True takes {median['fp8'] - median[exact]:+.2f} ms "
              f"({median[exact] / median['fp8']:.3f}x) against the {exact} step")
    if profile:
        first = next(iter(STEP_VARIANTS))
        use_backend(STEP_VARIANTS[first][0])
        profile_step(steps[first], f"{shape} step, {first}", median[first])


def profile_step(train_step, label, timed_ms, n=5, top=15):
    """Kernel time per step of n profiled steps, the kernels that take most, and how long the GPU sits idle
    in a step timed at timed_ms without the profiler (on the CPU dry run: the operators' own CPU time)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == 'cuda' else [])
    sync()
    with profile(activities=activities) as prof:
        for _ in range(n):
            train_step()
        sync()
    kind = 'device' if device == 'cuda' else 'cpu'
    # a record_function range (a compiled region, an optimizer step) also spans its kernels on the GPU: not counted
    rows = sorted(((getattr(e, f'self_{kind}_time_total') / n / 1e3, e.count // n, e.key) for e in prof.key_averages()
                   if (device != 'cuda' or e.device_type.name == 'CUDA') and not getattr(e, 'is_user_annotation', False)),
                  reverse=True)
    busy = sum(ms for ms, _, _ in rows)
    print(f"{label}: {busy:.2f} ms per step in {kind.upper()} kernels" +
          (f", the GPU idle for {timed_ms - busy:.2f} ms of the {timed_ms:.2f} timed" if device == 'cuda' else
           " (the CPU dry run)") + f"; the {top} longest, per step:")
    for ms, calls, name in rows[:top]:
        print(f"  {ms:7.3f} ms {100 * ms / busy:5.1f}% {calls:5d} calls  {name[:100]}")
    if device == 'cuda':
        # where the host waits for the GPU, the GPU's queue runs dry and its next kernels wait for their launches
        syncs = {e.key: e.count for e in prof.key_averages()
                 if e.key in ('cudaStreamSynchronize', 'cudaEventSynchronize', 'cudaDeviceSynchronize')}
        syncs['cudaDeviceSynchronize'] = max(syncs.get('cudaDeviceSynchronize', 0) - 1, 0)  # less the one after them
        print("host syncs per step: " + (", ".join(f"{calls / n:g} {name}" for name, calls in syncs.items() if calls)
                                         or "none"))


if step != 'none':
    for shape in (("sudoku", "maze") if step == 'both' else (step,)):
        time_train_steps(shape)


# -----------------------------------------------------------------------------
# 2. bfloat16 errors against float64 references

ATTENTION = {"hopper": kernels.kernels_hopper and kernels.kernels_hopper.flash_attention,
             "reference": kernels.flash_attention, "pytorch": kernels.attention_reference}
if not has_hopper:
    del ATTENTION["hopper"]


def rel_err(out, ref):
    if not torch.isfinite(out).all():
        return float('nan')
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def rope(B, T, per_sample):
    """cos, sin as the model computes them; per_sample gives (B, T, D) tables at random positions."""
    pos = torch.randint(0, 4096, (B, T), device=device) if per_sample else torch.arange(T, device=device)
    return RotaryEmbedding(head_dim, 4096, 10000.0).to(device)(pos)


def qkv_leaves(B, T, H=n_head, D=head_dim):
    """q, k, v: strided leaf views into one (B, T, 3, H, D) tensor, the model's layout."""
    qkv = torch.randn(B, T, 3, H, D, device=device, dtype=dt)
    return [t.requires_grad_() for t in qkv.unbind(2)]


def errors(fn, inputs, args, dout):
    """Relative errors of fn's output and input gradients against fn's float64 reference (PyTorch's ops)."""
    out = fn(*inputs, *args)
    grads = torch.autograd.grad(out, inputs, dout)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    args64 = [a.double() if torch.is_tensor(a) else a for a in args]
    ref_fn = kernels.add_rms_norm_reference if len(inputs) == 2 else kernels.attention_reference
    ref = ref_fn(*inputs64, *args64)
    ref_grads = torch.autograd.grad(ref, inputs64, dout.double())
    return " ".join(f"{rel_err(a, b):.2e}" for a, b in zip([out, *grads], [ref, *ref_grads]))


if check:
    print(f"== {dtype} errors against float64 references: out, then the gradients")
    for B, T, per_sample in [(8, 82, False), (8, 82, True), (2, 900, True), (4, 127, False)]:
        B = 1 if tiny else B
        q, k, v = qkv_leaves(B, T)
        args = rope(B, T, per_sample)
        do = torch.randn_like(q)
        print(f"attention B={B} T={T} {'(B, T, D)' if per_sample else '(T, D)'} tables: " +
              " | ".join(f"{name} {errors(fn, (q, k, v), args, do)}" for name, fn in ATTENTION.items() if fn))
    for M in (64,) if tiny else (384 * 82, 96 * 900):
        x, y = (torch.randn(M, hidden, device=device, dtype=dt, requires_grad=True) for _ in range(2))
        do = torch.randn_like(x)
        print(f"add_rms_norm ({M}, {hidden}): triton {errors(kernels.add_rms_norm_triton, (x, y), (1e-5,), do)} | "
              f"pytorch {errors(kernels.add_rms_norm_reference, (x, y), (1e-5,), do)}")


# -----------------------------------------------------------------------------
# 3. op-level GPU times

def gpu_time(fn, iters=20):
    """Mean summed duration of the GPU kernels that fn launches, in ms, L2 flushed between calls; on the
    CPU dry run the wall time of one call after a first one."""
    if device != 'cuda':
        fn()  # the first call traces and compiles
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cache = triton.runtime.driver.active.get_empty_cache_for_benchmark()
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            cache.zero_()
            fn()
        torch.cuda.synchronize()
    return sum(e.time_range.elapsed_us() for e in prof.events()
               if e.device_type == DeviceType.CUDA and "FillFunctor" not in e.name) / iters / 1e3


def time_op(op, shape, impls, inputs, dout, rate):
    """Forward and backward GPU times of each implementation; speed-ups against the last (PyTorch)."""
    times = {}
    for name, f in impls.items():
        t_fwd = gpu_time(f)
        times[name] = (t_fwd, gpu_time(lambda: torch.autograd.grad(f(), inputs, dout)) - t_fwd)
    base = times[list(impls)[-1]]
    for name, (t_fwd, t_bwd) in times.items():
        print(f"{op:<12} {shape:<18} {name:<28} fwd {t_fwd * 1e3:8.1f} us {rate(t_fwd, 1):>11}   "
              f"bwd {t_bwd * 1e3:8.1f} us {rate(t_bwd, 2.5):>11}   "
              f"speed-up x{base[0] / t_fwd:.2f} / x{base[1] / t_bwd:.2f}")


if ops:
    print(f"== GPU time on {torch.cuda.get_device_name() if device == 'cuda' else 'the CPU (dry run)'}, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    ref_compiled = torch.compile(kernels.attention_reference, backend=compile_backend, dynamic=False)
    norm_compiled = torch.compile(kernels.add_rms_norm_reference, backend=compile_backend, dynamic=False)
    for shape, (B, T) in SHAPES.items():
        q, k, v = qkv_leaves(B, T)
        cos, sin = rope(B, T, False)
        do = torch.randn_like(q)
        flops = 4 * B * n_head * T * T * head_dim  # two matmuls of 2 T^2 D per head; the backward 2.5x that
        impls = {f"{name} (RoPE inside)": lambda fn=fn: fn(q, k, v, cos, sin)
                 for name, fn in list(ATTENTION.items())[:2] if fn}
        impls["pytorch compiled (RoPE+SDPA)"] = lambda: ref_compiled(q, k, v, cos, sin)
        time_op("attention", f"B={B} T={T}", impls, (q, k, v), do,
                lambda t, factor: f"{flops * factor / t / 1e9:.0f} TF/s")
        x, y = (torch.randn(B * T, hidden, device=device, dtype=dt, requires_grad=True) for _ in range(2))
        gb = 3 * x.numel() * x.element_size() / 1e9  # two tensors in, one out: forward and backward alike
        time_op("add_rms_norm", f"({B * T}, {hidden})",
                {"triton": lambda: kernels.add_rms_norm_triton(x, y, 1e-5),
                 "pytorch compiled": lambda: norm_compiled(x, y, 1e-5)},
                (x, y), torch.randn_like(x), lambda t, factor: f"{gb / t * 1e3:.0f} GB/s")
