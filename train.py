"""
Train an HRM on a dataset written by a prepare_*.py script (or by the original code's dataset builders), or
a forecasting HRM on a time series from prepare_timeseries.py.

One process (GPU, CPU or MPS):
$ python train.py config/sudoku.py
Several GPUs on one node, or several nodes (each node runs the same command with its --node_rank):
$ torchrun --standalone --nproc_per_node=8 train.py config/sudoku.py
$ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=1234 train.py config/sudoku.py

The ACT carry persists from step to step: each step runs one segment on every sequence of the batch, and
only the sequences that halted take a fresh example from the next batch, as in the original. Evaluation
reports the model's metrics and, where the dataset names its task, the task's own (prepare_<task>.py's
evaluate: a maze's path validity, ARC's voted answers, a forecast's errors in real units beside baselines).
"""
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from dataset import (IGNORE_LABEL_ID, DataError, PuzzleData, SeriesData, TrainBatches, WindowBatches, Windows,
                     check_ranges, dataset_dir, eval_batches, exit_cleanly, identifiers_digest,
                     remove_stale_temp_files, task_of, write_atomically, write_text_atomically)
from model import (Carry, WeightEMA, build_model, check_device, check_fp8, load_checkpoint,
                   load_reference_checkpoint)

last_saved = None  # (step, path) of the run's checkpoint, written or resumed from: where a Ctrl-C leaves it


def interrupted():
    """What the line a Ctrl-C ends the run with adds: where it can continue from (the first process only)."""
    if os.environ.get('RANK', '0') != '0':
        return None
    return f"; its checkpoint {last_saved[1]} (step {last_saved[0]:,}) continues with --init_from=resume" \
        if last_saved else ""


exit_cleanly('train.py', interrupted)  # bad input (data, checkpoint, config) or a Ctrl-C: one line, no traceback
run_start = time.time()  # max_minutes counts from here
FIT_STEPS = 25  # a budgeted run times its steps 5..25 (after compilation) and an evaluation to fit its schedule

# -----------------------------------------------------------------------------
# default config values: the HRM paper's Sudoku-Extreme-1k recipe (see config/*.py for others)
_not_config = set(globals())
# I/O
out_dir = 'out-sudoku'
eval_interval = 2000        # steps between evaluations (and checkpoints)
log_interval = 100          # steps between log lines
eval_only = False           # evaluate the loaded weights (init_from 'resume' or 'reference') once and exit
always_save_checkpoint = True  # save at every evaluation, not only at the end
init_from = 'scratch'       # 'scratch', 'resume' (from out_dir), or 'reference' (the original's checkpoint)
reference_checkpoint = ''   # with init_from='reference': path of a checkpoint saved by github.com/sapientinc/HRM
wandb_log = False           # wandb is imported only when this is on
wandb_project = 'hrm'
wandb_run_name = 'hrm'
# data
dataset = 'sudoku-extreme-1k-aug-1000'  # data/<dataset>/{train,test} (or a dataset folder's path)
global_batch_size = 384     # sequences per step, summed over processes
epochs = 20000              # passes over the training groups; sets the number of steps
max_steps = 0               # if > 0, stop here instead (the lr schedule still spans `epochs`)
max_minutes = 0.0           # if > 0, the whole run's wall-clock budget, start to final evaluation: the lr schedule
                            # is fitted to the steps that fit, measured on the first FIT_STEPS steps (resumed with
                            # 0, the run keeps the schedule its budget fitted, without the clock, unless --epochs)
eval_max_examples = 0       # if > 0, evaluate on the first this-many examples of each evaluation split only
eval_halt_max_steps = 0     # if > 0, evaluation runs (halt_adaptive: at most) this many ACT segments
eval_votes = 1              # Sudoku: if > 1, the final evaluation also solves each test puzzle under eval_votes - 1
                            # random symmetries and scores the answer most copies give (voted_exact_accuracy)
# model
H_cycles = 2
L_cycles = 2
H_layers = 4
L_layers = 4
hidden_size = 512
num_heads = 8
expansion = 4.0
pos_encodings = 'rope'      # 'rope', 'learned' or 'none'
mixer = 'attention'         # token mixing: 'attention', or 'mlp' across the positions (TRM's for Sudoku)
grad_L_steps = 1            # L steps of the last H cycle that backpropagate (1: the paper's 1-step gradient)
fp8 = False                 # the MLPs' gate-and-up matmul in FP8 where no gradient flows (recurrence, Q-continue, eval)
puzzle_emb_ndim = 512       # 0 = no puzzle embedding
halt_max_steps = 16
halt_exploration_prob = 0.1
act_continue = True         # False: no bootstrapped Q-continue pass, halting learnt from Q-halt alone (TRM)
halt_adaptive = False       # evaluation too halts each sequence where its Q head says, as training does
loss_type = 'stablemax'     # 'stablemax' or 'softmax'
# time series (a dataset from prepare_timeseries.py): windows of input_len steps, forecast horizon steps ahead
input_len = 96
horizon = 96
ts_layout = 'patch'         # a token is a 'time' step, a 'patch' of one variable, or a whole 'variable'
ts_head = 'oneshot'         # 'oneshot' (the whole horizon) or 'autoregressive' (the next step, fed back)
patch_len = 16              # ts_layout='patch': steps per patch
ts_loss = 'mse'             # 'mse' or 'mae'
halt_tolerance = 0.1        # Q-halt learns whether a window's forecast MSE (normalised scale) is under this
# optimizers: Adam-atan2 on the weights, SignSGD on the sparse puzzle embedding
optimizer = 'adam_atan2'    # or 'adamw'
learning_rate = 1e-4
lr_min_ratio = 1.0          # cosine decay to lr_min_ratio * lr after warmup (1.0: constant)
warmup_steps = 2000
weight_decay = 1.0
beta1 = 0.9
beta2 = 0.95
puzzle_emb_lr = 1e-4
puzzle_emb_weight_decay = 1.0
grad_clip = 0.0             # clip the gradient norm at this value; 0 = off (the original does not clip)
ema_decay = 0.0             # if > 0, evaluate (and save) an exponential moving average of the weights (TRM: 0.999)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:0', 'mps'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # compute dtype: float32, bfloat16, float16
compile = torch.cuda.is_available()  # torch.compile the model
seed = 0
backend = 'nccl' if torch.cuda.is_available() else 'gloo'  # torch.distributed backend under torchrun
config_keys = [k for k in globals() if k not in _not_config and not k.startswith('_')]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------
# a resumed run continues with the config it was trained with, changed only by this command's overrides
FIXED_KEYS = ('H_cycles', 'L_cycles', 'H_layers', 'L_layers', 'hidden_size', 'num_heads', 'expansion', 'pos_encodings',
              'mixer', 'puzzle_emb_ndim', 'loss_type', 'dataset', 'global_batch_size', 'optimizer', 'input_len',
              'horizon', 'ts_layout', 'ts_head', 'patch_len', 'ts_loss')  # what a resume cannot change
# read only for one kind of dataset: set for the other, they are refused rather than ignored
SERIES_KEYS = ('input_len', 'horizon', 'ts_layout', 'ts_head', 'patch_len', 'ts_loss', 'halt_tolerance')
PUZZLE_KEYS = ('loss_type', 'puzzle_emb_ndim', 'puzzle_emb_lr', 'puzzle_emb_weight_decay')
# taken from this machine and command, never from the checkpoint (the run's folder may have been moved or copied)
MACHINE_KEYS = ('device', 'dtype', 'compile', 'backend', 'out_dir')
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
checkpoint, changed_settings = None, []
if init_from == 'resume':
    checkpoint = load_checkpoint(ckpt_path)
    for k in config_keys:
        saved = checkpoint['config'].get(k, globals()[k])
        same_folder = k == 'dataset' and k in config_overrides and \
            os.path.abspath(dataset_dir(config_overrides[k])) == os.path.abspath(dataset_dir(saved))  # data/x is x
        if k in config_overrides and config_overrides[k] != saved and not same_folder:
            if k in FIXED_KEYS:
                raise DataError(f"{k}={config_overrides[k]!r}, but the run in {ckpt_path} has {saved!r}; a resumed "
                                f"run keeps it (train from scratch in another out_dir to change it)")
            if k not in MACHINE_KEYS + ('init_from', 'eval_only'):
                changed_settings.append(f"{k} {saved!r} -> {config_overrides[k]!r}")
        if k not in config_overrides and k not in MACHINE_KEYS:
            globals()[k] = saved
elif not eval_only and os.path.exists(ckpt_path):
    raise DataError(f"{ckpt_path} exists: continue it with --init_from=resume, or train in another out_dir (a new "
                    f"run would overwrite it)")
config = {k: globals()[k] for k in config_keys}

# the loop's values are checked here, the model's and optimizers' where HRMConfig and configure_optimizers read them
_rules = [('global_batch_size', global_batch_size > 0, '> 0'), ('epochs', epochs > 0, '> 0'),
          ('eval_interval', eval_interval > 0, '> 0'), ('log_interval', log_interval > 0, '> 0'),
          ('max_steps', max_steps >= 0, '>= 0 (0 = the whole schedule)'),
          ('eval_max_examples', eval_max_examples >= 0, '>= 0'),
          ('eval_halt_max_steps', eval_halt_max_steps >= 0, '>= 0 (0 = halt_max_steps)'),
          ('eval_votes', eval_votes >= 1, '>= 1 (1 = no voting)'),
          ('seed', seed >= 0, '>= 0'), ('warmup_steps', warmup_steps >= 0, '>= 0'),
          ('lr_min_ratio', 0 <= lr_min_ratio <= 1, 'in [0, 1]'), ('grad_clip', grad_clip >= 0, '>= 0'),
          ('max_minutes', max_minutes >= 0, '>= 0 (0 = no budget)'), ('ema_decay', 0 <= ema_decay < 1, 'in [0, 1)'),
          ('init_from', init_from in ('scratch', 'resume', 'reference'), "'scratch', 'resume' or 'reference'"),
          ('reference_checkpoint', init_from != 'reference' or reference_checkpoint,
           "a path with init_from='reference'"),
          ('eval_only', not eval_only or init_from != 'scratch',
           "False with init_from='scratch' (untrained weights): --init_from=resume evaluates out_dir's checkpoint"),
          ('dtype', dtype in ('float32', 'bfloat16', 'float16'), "'float32', 'bfloat16' or 'float16'"),
          ('backend', backend in ('nccl', 'gloo'), "'nccl' or 'gloo'"),
          ('out_dir', out_dir and not os.path.isfile(out_dir), "a folder's path (it names a file, or nothing)"),
          ('wandb_log', not wandb_log or importlib.util.find_spec('wandb'), "False without wandb (pip install wandb)")]
check_ranges(globals(), _rules)
check_device(device)
# what a budget reserves for the final evaluation, in evaluations: one, and with eval_votes as many again for each
# copy of the test set (an upper bound: model.solve streams, so copies that halt early take less)
FINAL_EVALUATIONS = 1 + eval_votes if eval_votes > 1 else 1
if fp8:
    check_fp8(device, dtype)

ddp = int(os.environ.get('RANK', -1)) != -1  # started by torchrun?
if ddp:
    dist.init_process_group(backend=backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device.startswith('cuda'):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
master_process = rank == 0
if master_process:  # kernels.py logs the backend each operation picks (Triton or PyTorch) on "hrm.attn"
    logging.basicConfig(format='%(name)s: %(message)s')
    logging.getLogger('hrm.attn').setLevel(logging.INFO)
if global_batch_size % world_size:
    raise DataError(f"global_batch_size={global_batch_size} is not divisible by the {world_size} processes")
batch_size = global_batch_size // world_size  # per process
device_type = 'cuda' if 'cuda' in device else device.split(':')[0]
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

# -----------------------------------------------------------------------------
# data, model, optimizers, and the state to resume from

data_dir = dataset_dir(dataset)
is_series = os.path.isfile(os.path.join(data_dir, 'dataset.json'))  # a time series: windows cut from one series
if is_series:
    series = SeriesData(data_dir)
    meta, train_data = series.meta, Windows(series, 'train', input_len, horizon)
    train_batches = WindowBatches(train_data, global_batch_size, rank, world_size, seed)
    eval_sets = {split: Windows(series, split, input_len, horizon) for split in ('val', 'test')}
    model_args = dict(num_features=series.num_features, input_len=input_len, horizon=horizon, layout=ts_layout,
                      head=ts_head, patch_len=patch_len, loss_type=ts_loss, halt_tolerance=halt_tolerance)
    examples_per_epoch = train_data.num_examples
    described = f"{train_data.num_examples:,} training windows of {input_len} -> {horizon} steps"
else:  # puzzles: examples in train/ and test/
    train_data = PuzzleData(os.path.join(data_dir, 'train'))
    test_data = PuzzleData(os.path.join(data_dir, 'test'))
    identifiers = identifiers_digest(data_dir)  # which puzzle each puzzle embedding is for
    meta = train_data.meta
    train_batches = TrainBatches(train_data, global_batch_size, rank, world_size, seed)
    eval_sets = {'test': test_data}
    model_args = dict(vocab_size=meta['vocab_size'], seq_len=meta['seq_len'], batch_size=batch_size,
                      num_puzzle_identifiers=meta['num_puzzle_identifiers'], puzzle_emb_ndim=puzzle_emb_ndim,
                      loss_type=loss_type)
    examples_per_epoch = train_data.num_groups * meta['mean_puzzle_examples']
    described = f"{train_data.num_examples:,} training examples in {train_data.num_groups:,} groups"
ignored = [k for k in (PUZZLE_KEYS if is_series else SERIES_KEYS) if k in config_overrides]
if ignored:
    raise DataError(f"{ignored[0]}={config_overrides[ignored[0]]!r} is for {'puzzle' if is_series else 'time-series'} "
                    f"datasets, and {data_dir} is {'a time series' if is_series else 'a puzzle dataset'}")
task = task_of(meta.get('task'), meta.get('seq_len'), meta.get('vocab_size'))
task_evaluate = task_vote = None  # the task's own metrics, from prepare_<task>.py
if task:
    if importlib.util.find_spec(f"prepare_{task}") is None:
        raise DataError(f"{data_dir} was built for task {task!r}, but there is no prepare_{task}.py")
    task_module = importlib.import_module(f"prepare_{task}")
    task_evaluate, task_vote = getattr(task_module, 'evaluate', None), getattr(task_module, 'evaluate_votes', None)
    if hasattr(task_module, 'check_dataset'):  # what its evaluation needs, found now rather than at the first one
        task_module.check_dataset(data_dir)
if eval_votes > 1 and task_vote is None:
    raise DataError(f"eval_votes={eval_votes}: voting over symmetries is for Sudoku, and {data_dir} is "
                    f"{'a ' + task if task else 'an unnamed'} dataset")
total_steps = max(1, int(epochs * examples_per_epoch / global_batch_size))  # lr schedule
stop_step = min(total_steps, max_steps) if max_steps > 0 else total_steps
model_args.update(H_cycles=H_cycles, L_cycles=L_cycles, H_layers=H_layers, L_layers=L_layers, hidden_size=hidden_size,
                  num_heads=num_heads, expansion=expansion, pos_encodings=pos_encodings, mixer=mixer,
                  grad_L_steps=grad_L_steps, fp8=fp8, halt_max_steps=halt_max_steps,
                  halt_exploration_prob=halt_exploration_prob, act_continue=act_continue, halt_adaptive=halt_adaptive,
                  forward_dtype=dtype)
iter_num, eval_seconds = 0, 0.0
decay_anchor = (warmup_steps, 0.0)  # (step, progress): the decay's progress runs linearly from here to 1 at total_steps
budget = None  # a resumed budgeted run's checkpoint['budget']: its schedule, minutes used and evaluation's seconds
torch.manual_seed(seed)  # the same initial weights in every process
if init_from == 'reference':
    if is_series:
        raise DataError(f"init_from='reference' loads the original's puzzle HRM, but {data_dir} is a time series")
    model = load_reference_checkpoint(reference_checkpoint, model_args)
else:
    try:
        model = build_model(model_args)
    except DataError as e:  # the config names its own field; name the option that set it
        field, equals, rest = str(e).partition('=')
        renamed = {'layout': 'ts_layout', 'head': 'ts_head', 'loss_type': 'ts_loss'} if is_series else {}
        raise DataError(f"{renamed.get(field, field)}{equals}{rest}") from None
if checkpoint is not None:
    for k, v in checkpoint['model_args'].items():  # the dataset may have been rebuilt since
        if k not in ('batch_size', 'forward_dtype', 'halt_max_steps', 'halt_exploration_prob', 'act_continue',
                     'halt_adaptive', 'grad_L_steps', 'fp8', 'halt_tolerance') and model_args.get(k) != v:
            raise DataError(f"{ckpt_path} was trained with {k}={v!r}, but now it is {model_args.get(k)!r} "
                            f"(was {data_dir} rebuilt?)")
    if not is_series and checkpoint.get('identifiers') and checkpoint['identifiers'] != identifiers:
        raise DataError(f"{data_dir} was rebuilt since {ckpt_path} was trained: its identifiers.json names other "
                        f"puzzles, so the trained puzzle embeddings would serve puzzles they never saw; rebuild it "
                        f"as it was (the same options and seed)" + ("" if eval_only else " or train from scratch in "
                                                                    "another out_dir"))
    changed = is_series and checkpoint.get('series') and series.changes_since(checkpoint['series'])
    if changed:  # its windows, their split and their scale would no longer be the run's
        raise DataError(f"{data_dir} was rebuilt since {ckpt_path} was trained: {changed}; " +
                        ("sample.py --dataset=... forecasts another series with the model" if eval_only else
                         "train from scratch in another out_dir"))
    model.load_state_dict(checkpoint['model'])
    iter_num = checkpoint['iter_num']
    last_saved = None if eval_only else (iter_num, ckpt_path)
    budget = checkpoint.get('budget')
    # a budgeted run's schedule goes on; with max_minutes its clock too, and with --max_minutes=0 the schedule
    # the budget last fitted runs to its end (the one epochs gives would make the lr jump; --epochs asks for it)
    if budget and not eval_only and (max_minutes > 0 or 'epochs' not in config_overrides):
        if max_minutes > 0 and 60 * (max_minutes - budget['minutes']) <= budget['eval_seconds'] * FINAL_EVALUATIONS:
            raise DataError(f"{ckpt_path}: the run has used {budget['minutes']:.1f} of its max_minutes={max_minutes}: "
                            f"nothing to train; raise max_minutes, or evaluate with --eval_only=True")
        total_steps, decay_anchor = budget['total_steps'], tuple(budget.get('decay_anchor', decay_anchor))
        stop_step = total_steps
        if max_minutes > 0:
            eval_seconds = budget['eval_seconds']
            run_start -= 60 * budget['minutes']
            stop_step = max(iter_num + FIT_STEPS + 1, total_steps)  # past the fit, which refits to the minutes now
        stop_step = min(stop_step, max_steps) if max_steps > 0 else stop_step
    else:
        budget = None  # from here on the schedule that epochs gives
    if iter_num >= stop_step and not eval_only:
        raise DataError(f"{ckpt_path} is at step {iter_num:,}, the end of this run ({stop_step:,} steps): nothing to "
                        f"train; raise max_steps or epochs, or evaluate with --eval_only=True")
model.to(device)
raw_model = model
dense_optimizer, sparse_optimizer = model.configure_optimizers(
    learning_rate, weight_decay, (beta1, beta2), puzzle_emb_lr, puzzle_emb_weight_decay, optimizer)
optimizers = [(dense_optimizer, learning_rate)] + ([(sparse_optimizer, puzzle_emb_lr)] if sparse_optimizer else [])
ema = WeightEMA(raw_model, ema_decay) if ema_decay > 0 else None
torch.manual_seed(seed + rank)  # halting exploration differs between processes
carry = None
if checkpoint is not None:
    for opt, key in ((dense_optimizer, 'optimizer'), (sparse_optimizer, 'sparse_optimizer')):
        if opt is not None:  # the moments from the checkpoint; betas and weight decay as this command sets them
            settings = [{k: v for k, v in group.items() if k != 'params'} for group in opt.param_groups]
            opt.load_state_dict(checkpoint[key])
            for group, setting in zip(opt.param_groups, settings):
                group.update(setting)
    train_batches.load_state_dict(checkpoint['loader'])
    if ema is not None:
        if checkpoint.get('ema') is None:
            raise DataError(f"ema_decay={ema_decay}, but the run in {ckpt_path} kept no average of its weights")
        ema.load_state_dict(checkpoint['ema'])
    carry = Carry.from_state_dict(checkpoint['carry'], slice(rank * batch_size, (rank + 1) * batch_size), device)
    if checkpoint['world_size'] == world_size:
        torch.set_rng_state(checkpoint['rng'][rank]['cpu'])
        if device_type == 'cuda' and checkpoint['rng'][rank]['cuda'] is not None:
            torch.cuda.set_rng_state(checkpoint['rng'][rank]['cuda'])
    elif master_process:
        print(f"resuming on {world_size} processes from {checkpoint['world_size']}: exploration is reseeded")
    if master_process:
        # a config file's settings count as given too: repeating the first command's file undoes what was
        # given beside it then, so say what this command changes
        print(f"resuming from {ckpt_path} at step {iter_num:,}" +
              (f", with settings changed by this command: {', '.join(changed_settings)}" if changed_settings else
               ", with the run's settings unchanged"))
    checkpoint = None
if compile:
    model = torch.compile(model)
if ddp:
    # the puzzle embedding's buffers are per-process (its optimizer syncs them): never broadcast them
    model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None,
                broadcast_buffers=False)
if master_process:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"out_dir={out_dir!r}: cannot be made a folder ({e.strerror})") from None
    remove_stale_temp_files(out_dir, ('ckpt.pt', 'eval_log.jsonl', 'submission.json'))
    print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters; {described}; {stop_step:,} steps of "
          f"{global_batch_size} on {world_size} process(es), {device}, {dtype}")
    if stop_step < warmup_steps and max_minutes <= 0 and not eval_only:  # (a budget says so once it is fitted)
        print(f"note: the run ends at step {stop_step:,}, inside its warmup of {warmup_steps:,} steps: the lr never "
              f"reaches its peak (lower --warmup_steps)")
    if device_type == 'cpu' and raw_model.get_num_params() > 5e6:
        print(f"note: training a {raw_model.get_num_params() / 1e6:.0f}M-parameter model on the CPU takes hours "
              f"per thousand steps; is a GPU visible to torch?")


def decay_progress(step):
    """How far the decay is at `step`, 0 to 1: linear from decay_anchor (the warmup's end, or the step where
    a budgeted run last refitted its schedule) to total_steps."""
    anchor_step, anchor_progress = decay_anchor
    return min(1.0, anchor_progress + (1 - anchor_progress) * (step - anchor_step) / max(1, total_steps - anchor_step))


def get_lr_scale(step):
    """Linear warmup, then cosine decay from 1 to lr_min_ratio at total_steps (constant when it is 1)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return lr_min_ratio + (1 - lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * decay_progress(step)))


def gather(tensor):
    """Concatenate a tensor of every process along dim 0, in rank order."""
    if world_size == 1:
        return tensor
    out = tensor.new_empty((world_size * tensor.shape[0],) + tuple(tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor.contiguous())
    return out


def finish_run():
    """End the process once its work is done. Under torchrun every process first waits at a barrier until all
    are past their last collective. Gloo's processes then end at once, without Python's and C++'s teardown:
    that teardown, with or without destroying the group first, aborted a process now and then on busy CPUs
    ('terminate called without an active exception', a gloo thread still running), failing a finished run."""
    if wandb_log and master_process:
        wandb.finish()
    if ddp:
        dist.barrier()
        if backend == 'gloo':
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        dist.destroy_process_group()
    raise SystemExit


def to_device(batch):
    return {k: torch.from_numpy(v).pin_memory().to(device, non_blocking=True) if device_type == 'cuda'
            else torch.from_numpy(v).to(device) for k, v in batch.items()}


def save_checkpoint():
    """Everything a resumed run needs to continue exactly: weights, both optimizers, the step, the data
    position, the ACT carry of the whole batch and every process's RNG; written to a temporary file, then
    renamed, so that an interrupted save leaves the previous checkpoint intact."""
    global last_saved
    if world_size > 1:  # every process must hold the same weights and puzzle embedding; check before saving
        fingerprint = torch.stack([t.double().sum() for t in raw_model.state_dict().values() if t.is_floating_point()])
        fingerprints = gather(fingerprint[None])
        if not (fingerprints == fingerprints[0]).all():
            raise RuntimeError(f"step {iter_num}: the processes' weights differ; not saving")
    saved_carry = {k: gather(v).cpu() for k, v in carry.state_dict().items()}
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if device_type == 'cuda' else None)
    rngs = [rng]
    if world_size > 1:
        rngs = [None] * world_size
        dist.all_gather_object(rngs, rng)
    if master_process:
        checkpoint = dict(model=raw_model.state_dict(), model_args=model_args, config=config, iter_num=iter_num,
                          task=task, series=series.record() if is_series else None,
                          identifiers=None if is_series else identifiers,
                          optimizer=dense_optimizer.state_dict(),
                          sparse_optimizer=sparse_optimizer.state_dict() if sparse_optimizer else None,
                          loader=train_batches.state_dict(), carry=saved_carry, rng=rngs, world_size=world_size,
                          ema=ema.state_dict() if ema else None,
                          budget=dict(total_steps=total_steps, minutes=minutes(), eval_seconds=eval_seconds,
                                      decay_anchor=decay_anchor)
                          if max_minutes > 0 else budget)  # (without a clock now, the schedule it had, unchanged)
        write_atomically(ckpt_path, lambda tmp: torch.save(checkpoint, tmp))
        last_saved = (iter_num, ckpt_path)


@contextlib.contextmanager
def evaluation_mode():
    """The model in eval mode, running as many ACT segments as evaluation does (it can think longer than
    trained), and back to training after."""
    raw_model.eval()
    raw_model.config.halt_max_steps = eval_halt_max_steps or halt_max_steps
    try:
        yield
    finally:
        raw_model.train()
        raw_model.config.halt_max_steps = halt_max_steps


@torch.no_grad()
def evaluate(warm_up=False):
    """Inside evaluation_mode: run every batch of each evaluation split from a fresh carry until all its
    sequences halt. Returns the model's metrics, averaged over the examples of all processes, and the task's
    own metrics from the predictions; those of a split other than test are named with the split first
    (val_mse). With warm_up, only the first batch of each split runs, to compile the evaluation graph, and
    nothing is returned."""
    model_in_eval = model.module if ddp else model
    result = {}
    for split, data in eval_sets.items():
        num_eval = num_eval_examples(data)
        if warm_up:
            batch = next(eval_batches(data, num_eval, global_batch_size, rank, world_size))
            raw_model.run_to_halt(model_in_eval, to_device(batch))
            continue
        sums, predictions, q_halt = None, [], []
        for batch in tqdm(eval_batches(data, num_eval, global_batch_size, rank, world_size), desc=f'eval {split}',
                          total=math.ceil(num_eval / global_batch_size), disable=not master_process, leave=False):
            metrics, outputs = raw_model.run_to_halt(model_in_eval, to_device(batch))
            values = torch.stack([metrics[k].float() for k in sorted(metrics)])
            sums = values if sums is None else sums + values
            if task_evaluate is not None:
                predictions.append(gather(raw_model.predictions(outputs)).cpu())
                q_halt.append(gather(torch.sigmoid(outputs['q_halt_logits'])).cpu())
        if world_size > 1:
            dist.all_reduce(sums)
        sums = dict(zip(sorted(metrics), sums.tolist()))
        # averages over the examples with an answer; where none has one (an ARC evaluation set without
        # solutions) there is nothing to average, and zeros would read as scores
        metrics = {k: v / sums['count'] for k, v in sums.items() if k != 'count' and sums['count'] > 0}
        if task_evaluate is not None and master_process:
            # the batches give row start + i to position i of the gathered global batch: rows past the end are padding
            predictions, q_halt = torch.cat(predictions)[:num_eval].numpy(), torch.cat(q_halt)[:num_eval].numpy()
            metrics.update(task_evaluate(data, predictions, q_halt, out_dir))
        result.update({k if split == 'test' else f'{split}_{k}': v for k, v in metrics.items()})
    return result


def num_eval_examples(data):
    return data.num_examples if eval_max_examples <= 0 else min(eval_max_examples, data.num_examples)


@torch.no_grad()
def solve_everywhere(tokens):
    """Sequences of tokens (M, seq_len) through model.solve, each process solving its share: the predicted
    tokens (M, seq_len) and final Q-halt probabilities (M,) of all of them, gathered, as numpy arrays."""
    # a short last share is filled with PAD sequences, and a share is at least a batch: a smaller one would run
    # a batch shape that evaluation did not compile (tens of seconds on a GPU, outside the budget's reserve)
    share = max(-(-len(tokens) // world_size), batch_size)
    mine = np.full((share, tokens.shape[1]), meta['pad_id'], np.int32)
    part = tokens[rank * share:(rank + 1) * share]
    mine[:len(part)] = part
    inputs = torch.from_numpy(mine).to(device)
    blank_ids = torch.full_like(inputs[:, 0], meta['blank_identifier_id'])  # Sudoku's one puzzle identifier
    # unscored labels: the evaluation's compiled graph, which has labels, runs the copies too
    predictions, q_halt, _ = raw_model.solve(model.module if ddp else model, inputs, blank_ids, batch_size,
                                             labels=torch.full_like(inputs, IGNORE_LABEL_ID))
    return gather(predictions)[:len(tokens)].cpu().numpy(), gather(q_halt)[:len(tokens)].cpu().numpy()


def evaluate_votes(warm_up=False):
    """eval_votes: the task's score of answers voted over symmetric copies of the test examples
    (prepare_<task>.py's evaluate_votes), the copies streaming through model.solve. With warm_up, one batch
    only, before a budget is timed: anything model.solve would compile beyond evaluate's graph compiles then."""
    data = eval_sets['test']
    if warm_up:
        solve_everywhere(data.inputs[:global_batch_size])
        return {}
    return task_vote(data, solve_everywhere, eval_votes, num_eval_examples(data))


def minutes():
    return (time.time() - run_start) / 60


def log_eval(step, final=False):
    """Evaluate (with the average of the weights, if one is kept), the final time with eval_votes' vote too;
    print and log. Returns the seconds the evaluation took, the vote's not counted."""
    started = time.time()
    if ema is not None:
        ema.swap()
    with evaluation_mode():
        metrics = evaluate()
        seconds = time.time() - started
        if final and eval_votes > 1:
            metrics.update(evaluate_votes())
    if ema is not None:
        ema.swap()
    if master_process:
        val = {k[4:]: v for k, v in metrics.items() if k.startswith('val_')}  # a series' validation part
        test = {k: v for k, v in metrics.items() if not k.startswith('val_')}
        shown = lambda part: ", ".join(f"{k} {v:.4f}" for k, v in part.items()) or "nothing to score (no answers)"
        tqdm.write(f"step {step} ({minutes():.1f} min): eval " + (f"val {shown(val)}; test {shown(test)}" if val
                                                                   else shown(test)))
        with open(os.path.join(out_dir, 'eval_log.jsonl'), 'a') as f:
            f.write(json.dumps(dict(step=step, minutes=round(minutes(), 3), **metrics)) + '\n')
        if wandb_log:
            wandb.log({f'eval/{k}': v for k, v in metrics.items()}, step=step)
    return seconds


def final_eval_seconds():
    """The final evaluation's expected seconds: FINAL_EVALUATIONS evaluations' worth."""
    return eval_seconds * FINAL_EVALUATIONS


def fit_schedule(step_seconds):
    """The step a budgeted run ends at: the steps that fit in what is left of max_minutes, each evaluation
    (every eval_interval steps) taking eval_seconds, the final one final_eval_seconds. The same on every
    process."""
    left = 60 * max_minutes - (time.time() - run_start) - final_eval_seconds()
    steps = int(max(0.0, left) / (step_seconds + eval_seconds / eval_interval))
    if world_size > 1:  # the processes' clocks differ a little: take the first's
        steps = int(gather(torch.tensor([steps], device=device))[0])
    return iter_num + steps


def trim_eval_log(step):
    """The log holds this run's evaluations up to its checkpoint: drop the lines after `step` (a run killed
    between logging an evaluation and saving its checkpoint, or an earlier run that saved none) and a line
    cut short, so a resumed run does not repeat them."""
    path = os.path.join(out_dir, 'eval_log.jsonl')
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if re.fullmatch(r'\{"step": (\d+), .*\}\n', line, re.S)
                     and int(line[9:line.index(',')]) <= step]
        write_text_atomically(path, ''.join(lines))


if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

if eval_only:
    log_eval(iter_num, final=True)
    finish_run()

# -----------------------------------------------------------------------------
# the training loop

if master_process:
    trim_eval_log(iter_num)
raw_model.train()
log_sums, first_bad_step = None, torch.full((), -1, device=device)
progress = tqdm(total=stop_step, initial=iter_num, disable=not master_process, desc='train')
t0, t0_step = time.time(), iter_num
start_step = iter_num
fit_step = start_step + FIT_STEPS if max_minutes > 0 else None  # a budget is (re)fitted here, after compilation
while iter_num < stop_step:
    batch = to_device(next(train_batches))
    if carry is None:
        carry = raw_model.initial_carry(batch)
    carry, loss, metrics, _ = model(carry, batch)
    (loss / batch_size).backward()  # DDP averages over processes: the mean over the global batch
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    lr_scale = get_lr_scale(iter_num + 1)
    for opt, base_lr in optimizers:
        for group in opt.param_groups:
            group['lr'] = base_lr * lr_scale
        opt.step()
        opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()
    iter_num += 1
    progress.update()
    if iter_num == start_step + 5:
        fit_started = time.time()  # the first steps compile: a budget is fitted to the steps after them
    # stop on a non-finite loss without a sync every step: remember the first bad step on the device
    first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), iter_num, first_bad_step)
    values = torch.stack([metrics[k].float() for k in sorted(metrics)])
    log_sums = values if log_sums is None else log_sums + values

    last = iter_num == stop_step
    evaluating = iter_num % eval_interval == 0 or last or iter_num == fit_step
    if iter_num % log_interval == 0 or evaluating:
        if world_size > 1:
            dist.all_reduce(log_sums)
            dist.all_reduce(first_bad_step, op=dist.ReduceOp.MAX)
        if first_bad_step.item() >= 0:
            progress.close()
            raise SystemExit(f"non-finite loss at step {first_bad_step.item()}: stopping; the last good "
                             f"checkpoint (if any) is {ckpt_path}")
        sums = dict(zip(sorted(metrics), log_sums.tolist()))
        steps_logged = iter_num - t0_step
        # losses are over every sequence of every step, the other metrics over the sequences that halted
        stats = {k: v / (global_batch_size * steps_logged if k.endswith('loss') else max(sums['count'], 1))
                 for k, v in sums.items() if k != 'count'}
        dt = (time.time() - t0) / steps_logged if iter_num != fit_step else \
            (time.time() - fit_started) / (FIT_STEPS - 5)  # the fit times the steps after compilation
        # a budgeted run also ends where the steps to its next check would not fit (at the fit, the fit decides),
        # with a step and a tenth of an evaluation to spare: the next ones may take a little longer than the last
        if max_minutes > 0 and not last and iter_num != fit_step:
            to_check = min(log_interval - iter_num % log_interval, stop_step - iter_num)
            needed = 1.1 * final_eval_seconds() + dt * (to_check + 1)
            out_of_time = torch.tensor(time.time() - run_start + needed > 60 * max_minutes, device=device)
            if world_size > 1:  # every process follows the first's clock, or their collectives would part
                dist.broadcast(out_of_time, 0)
            if out_of_time.item():
                stop_step, last, evaluating = iter_num, True, True
        if master_process:
            tqdm.write(f"step {iter_num} ({minutes():.1f} min): " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items())
                       + f", lr {lr_scale * learning_rate:.2e}, {dt * 1000:.1f} ms/step, "
                       f"{global_batch_size / dt:,.0f} examples/s")
            if wandb_log:
                wandb.log({f'train/{k}': v for k, v in stats.items()} | {'train/lr': lr_scale * learning_rate},
                          step=iter_num)
        log_sums, t0, t0_step = None, time.time(), iter_num
    if evaluating:
        if iter_num == fit_step:  # the fit times a warm evaluation: compiling it is not every evaluation's cost
            with evaluation_mode():
                evaluate(warm_up=True)
                if eval_votes > 1:
                    evaluate_votes(warm_up=True)
        eval_seconds = log_eval(iter_num, final=last)
        if fit_step and start_step + 5 <= iter_num < fit_step:
            fit_started += eval_seconds  # the fit times steps, not evaluations
        if max_minutes > 0 and not last:  # fit (after each evaluation, refit) the schedule to the budget left
            if iter_num > warmup_steps:  # the decay goes on from where it is, so the lr never jumps
                decay_anchor = (iter_num, decay_progress(iter_num))
            total_steps = max(iter_num + 1, fit_schedule(dt))
            stop_step = min(total_steps, max_steps) if max_steps > 0 else total_steps
            progress.total = stop_step
            if master_process and iter_num == fit_step:
                voting = f" (the final one, voting, up to {final_eval_seconds():.0f} s)" if eval_votes > 1 else ""
                schedule = "where the lr schedule ends" if stop_step >= warmup_steps else \
                    f"inside its warmup of {warmup_steps:,} steps: the lr never reaches its peak (lower --warmup_steps)"
                tqdm.write(f"max_minutes={max_minutes}: at {dt * 1000:.1f} ms/step and {eval_seconds:.1f} s per "
                           f"evaluation{voting} the run ends at step {stop_step:,}, {schedule}")
        if always_save_checkpoint or last:
            save_checkpoint()
        t0 = time.time()  # evaluation time is not training time
progress.close()
finish_run()
