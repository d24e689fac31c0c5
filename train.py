"""
Train an HRM on a puzzle dataset written by prepare_sudoku.py (the original implementation's layout).

One process (GPU, CPU or MPS):
$ python train.py config/sudoku.py
Several GPUs on one node, or several nodes (each node runs the same command with its --node_rank):
$ torchrun --standalone --nproc_per_node=8 train.py config/sudoku.py
$ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=1234 train.py config/sudoku.py

The ACT carry persists from step to step: each step runs one segment on every sequence of the batch, and
only the sequences that halted take a fresh example from the next batch, as in the original.
"""
import json
import logging
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import HRM, HRMConfig, IGNORE_LABEL_ID, Carry, load_reference_checkpoint

# -----------------------------------------------------------------------------
# default config values: the HRM paper's Sudoku-Extreme-1k recipe (see config/*.py for others)
# I/O
out_dir = 'out-sudoku'
eval_interval = 2000        # steps between evaluations (and checkpoints)
log_interval = 100          # steps between log lines
eval_only = False           # evaluate once and exit
always_save_checkpoint = True  # save at every evaluation, not only at the end
init_from = 'scratch'       # 'scratch', 'resume' (from out_dir), or 'reference' (the original's checkpoint)
reference_checkpoint = ''   # with init_from='reference': path of a checkpoint saved by github.com/sapientinc/HRM
wandb_log = False           # wandb is imported only when this is on
wandb_project = 'hrm'
wandb_run_name = 'sudoku'
# data
dataset = 'sudoku-extreme-1k-aug-1000'  # data/<dataset>/{train,test}
global_batch_size = 384     # sequences per step, summed over processes
epochs = 20000              # passes over the training puzzles; sets the number of steps
max_steps = 0               # if > 0, stop here instead (the lr schedule still spans `epochs`)
eval_max_examples = 0       # if > 0, evaluate on the first this-many test examples only
# model
H_cycles = 2
L_cycles = 2
H_layers = 4
L_layers = 4
hidden_size = 512
num_heads = 8
expansion = 4.0
pos_encodings = 'rope'
puzzle_emb_ndim = 512       # 0 = no puzzle embedding
halt_max_steps = 16
halt_exploration_prob = 0.1
loss_type = 'stablemax'
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
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:0', 'mps'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # compute dtype of the model
compile = torch.cuda.is_available()  # torch.compile the model
seed = 0
backend = 'nccl' if torch.cuda.is_available() else 'gloo'  # torch.distributed backend under torchrun
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

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
    raise SystemExit(f"global_batch_size={global_batch_size} is not divisible by the {world_size} processes")
batch_size = global_batch_size // world_size  # per process
device_type = 'cuda' if 'cuda' in device else device.split(':')[0]
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


# -----------------------------------------------------------------------------
# data: the layout of prepare_*.py (and of the original's dataset builders)

class PuzzleData:
    """One split: examples (inputs, labels), puzzles (consecutive runs of examples, each with a puzzle
    identifier) and groups (consecutive runs of puzzles: an original puzzle and its augmentations)."""

    def __init__(self, path):
        meta_path = os.path.join(path, 'dataset.json')
        if not os.path.exists(meta_path):
            raise SystemExit(f"no dataset at {path} (missing dataset.json): run prepare_sudoku.py first")
        with open(meta_path) as f:
            self.meta = json.load(f)
        parts = {k: [] for k in ('inputs', 'labels', 'puzzle_identifiers', 'puzzle_indices', 'group_indices')}
        examples = puzzles = 0
        for set_name in self.meta['sets']:  # several sets are laid end to end, offsets shifted
            arrays = {k: np.load(os.path.join(path, f'{set_name}__{k}.npy')) for k in parts}
            parts['inputs'].append(arrays['inputs'])
            parts['labels'].append(arrays['labels'])
            parts['puzzle_identifiers'].append(arrays['puzzle_identifiers'])
            parts['puzzle_indices'].append(arrays['puzzle_indices'][:-1] + examples)
            parts['group_indices'].append(arrays['group_indices'][:-1] + puzzles)
            examples += len(arrays['inputs'])
            puzzles += len(arrays['puzzle_identifiers'])
        parts['puzzle_indices'].append(np.array([examples]))
        parts['group_indices'].append(np.array([puzzles]))
        for k, v in parts.items():
            setattr(self, k, np.concatenate(v))
        self.labels = self.labels.astype(np.int32)
        if self.meta.get('ignore_label_id') is not None:
            self.labels[self.labels == self.meta['ignore_label_id']] = IGNORE_LABEL_ID
        self.num_groups = len(self.group_indices) - 1

    def batch(self, rows, puzzles, pad_to):
        """Tensors for the examples `rows` of puzzles `puzzles`, padded to pad_to sequences that score nothing."""
        pad = pad_to - len(rows)
        inputs = np.pad(self.inputs[rows].astype(np.int32), ((0, pad), (0, 0)), constant_values=self.meta['pad_id'])
        labels = np.pad(self.labels[rows], ((0, pad), (0, 0)), constant_values=IGNORE_LABEL_ID)
        ids = np.pad(self.puzzle_identifiers[puzzles].astype(np.int32), (0, pad),
                     constant_values=self.meta['blank_identifier_id'])
        return dict(inputs=torch.from_numpy(inputs), labels=torch.from_numpy(labels),
                    puzzle_identifiers=torch.from_numpy(ids))


class TrainBatches:
    """An endless stream of training batches. Each epoch visits every group once in a random order and takes
    one random puzzle of the group (one augmentation of each original puzzle); the examples of a puzzle go
    into one batch, cut only where the batch is full. Epochs follow each other without a gap. Every process
    builds the same global batch and keeps its slice. The position (epoch, group) is all the state there is:
    each epoch's randomness comes from (seed, epoch), so a resumed run sees the same batches."""

    def __init__(self, data, global_batch_size, rank, world_size, seed):
        self.data, self.global_batch_size, self.seed = data, global_batch_size, seed
        self.local = slice(rank * global_batch_size // world_size, (rank + 1) * global_batch_size // world_size)
        self.epoch, self.position, self.plan = 0, 0, None

    def state_dict(self):
        return dict(epoch=self.epoch, position=self.position)

    def load_state_dict(self, state):
        self.epoch, self.position, self.plan = state['epoch'], state['position'], None

    def _plan(self):
        if self.plan is None or self.plan[0] != self.epoch:
            d = self.data
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(d.num_groups)
            first, count = d.group_indices[order], d.group_indices[order + 1] - d.group_indices[order]
            puzzles = first + (rng.random(d.num_groups) * count).astype(np.int64)
            self.plan = (self.epoch, puzzles)
        return self.plan[1]

    def __next__(self):
        d, need, rows, puzzles = self.data, self.global_batch_size, [], []
        while need > 0:
            plan = self._plan()[self.position:self.position + need]  # every puzzle has >= 1 example
            sizes = d.puzzle_indices[plan + 1] - d.puzzle_indices[plan]
            whole = int(np.searchsorted(np.cumsum(sizes), need, side='right'))  # puzzles that fit entirely
            take = sizes[:whole]
            offsets = np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take)
            rows.append(np.repeat(d.puzzle_indices[plan[:whole]], take) + offsets)
            puzzles.append(np.repeat(plan[:whole], take))
            need -= int(take.sum())
            self.position += whole
            if need > 0 and whole < len(plan):  # fill the batch with part of the next puzzle, then move on
                rng = np.random.default_rng([self.seed, self.epoch, self.position])
                rows.append(d.puzzle_indices[plan[whole]] + np.sort(rng.choice(sizes[whole], need, replace=False)))
                puzzles.append(np.full(need, plan[whole]))
                need, self.position = 0, self.position + 1
            if self.position == d.num_groups:
                self.epoch, self.position = self.epoch + 1, 0
        rows, puzzles = np.concatenate(rows), np.concatenate(puzzles)
        return d.batch(rows[self.local], puzzles[self.local], pad_to=self.local.stop - self.local.start)


def test_batches(data, num_examples, global_batch_size, rank, world_size):
    """The first num_examples of the test split in order, in global batches; the last one padded."""
    local = global_batch_size // world_size
    for start in range(0, num_examples, global_batch_size):
        rows = np.arange(start + rank * local, min(start + (rank + 1) * local, num_examples))
        puzzles = np.searchsorted(data.puzzle_indices, rows, side='right') - 1
        yield data.batch(rows, puzzles, pad_to=local)


# -----------------------------------------------------------------------------
# model, optimizers, and the state to resume from

data_dir = os.path.join('data', dataset)
train_data = PuzzleData(os.path.join(data_dir, 'train'))
test_data = PuzzleData(os.path.join(data_dir, 'test'))
num_eval = len(test_data.inputs) if eval_max_examples <= 0 else min(eval_max_examples, len(test_data.inputs))
meta = train_data.meta
total_steps = int(epochs * train_data.num_groups * meta['mean_puzzle_examples'] / global_batch_size)  # lr schedule
stop_step = min(total_steps, max_steps) if max_steps > 0 else total_steps
model_args = dict(vocab_size=meta['vocab_size'], seq_len=meta['seq_len'], batch_size=batch_size,
                  num_puzzle_identifiers=meta['num_puzzle_identifiers'], puzzle_emb_ndim=puzzle_emb_ndim,
                  H_cycles=H_cycles, L_cycles=L_cycles, H_layers=H_layers, L_layers=L_layers,
                  hidden_size=hidden_size, num_heads=num_heads, expansion=expansion, pos_encodings=pos_encodings,
                  halt_max_steps=halt_max_steps, halt_exploration_prob=halt_exploration_prob,
                  forward_dtype=dtype, loss_type=loss_type)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
iter_num = 0
checkpoint = None
torch.manual_seed(seed)  # the same initial weights in every process
if init_from == 'scratch':
    model = HRM(HRMConfig(**model_args))
elif init_from == 'resume':
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"init_from='resume' but there is no checkpoint at {ckpt_path}")
    checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    model_args = dict(checkpoint['model_args'], batch_size=batch_size, forward_dtype=dtype)
    model = HRM(HRMConfig(**model_args))
    model.load_state_dict(checkpoint['model'])
    iter_num = checkpoint['iter_num']
elif init_from == 'reference':
    if not os.path.exists(reference_checkpoint):
        raise SystemExit(f"init_from='reference' needs reference_checkpoint=<path>; {reference_checkpoint!r} does not exist")
    model = load_reference_checkpoint(reference_checkpoint, model_args)
else:
    raise SystemExit(f"init_from must be 'scratch', 'resume' or 'reference', got {init_from!r}")
model.to(device)
raw_model = model
dense_optimizer, sparse_optimizer = model.configure_optimizers(
    learning_rate, weight_decay, (beta1, beta2), puzzle_emb_lr, puzzle_emb_weight_decay, optimizer)
optimizers = [(dense_optimizer, learning_rate)] + ([(sparse_optimizer, puzzle_emb_lr)] if sparse_optimizer else [])
train_batches = TrainBatches(train_data, global_batch_size, rank, world_size, seed)
torch.manual_seed(seed + rank)  # halting exploration differs between processes
carry = None
if checkpoint is not None:
    dense_optimizer.load_state_dict(checkpoint['optimizer'])
    if sparse_optimizer:
        sparse_optimizer.load_state_dict(checkpoint['sparse_optimizer'])
    train_batches.load_state_dict(checkpoint['loader'])
    # the carry of the whole global batch: this process takes its slice
    saved_batch = checkpoint['carry']['z_H'].shape[0]
    if saved_batch != global_batch_size:
        raise SystemExit(f"the checkpoint was trained with global_batch_size={saved_batch}; resume with the same")
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    saved = {k: v[mine].to(device) for k, v in checkpoint['carry'].items()}
    carry = Carry(z_H=saved.pop('z_H'), z_L=saved.pop('z_L'), steps=saved.pop('steps'),
                  halted=saved.pop('halted').bool(), current_data=saved)
    if checkpoint['world_size'] == world_size:
        torch.set_rng_state(checkpoint['rng'][rank]['cpu'])
        if device_type == 'cuda':
            torch.cuda.set_rng_state(checkpoint['rng'][rank]['cuda'])
    elif master_process:
        print(f"resuming on {world_size} processes from {checkpoint['world_size']}: exploration is reseeded")
    checkpoint = None
if compile:
    model = torch.compile(model)
if ddp:
    # the puzzle embedding's buffers are per-process (its optimizer syncs them): never broadcast them
    model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None,
                broadcast_buffers=False)
if master_process:
    os.makedirs(out_dir, exist_ok=True)
    print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters; {len(train_data.inputs):,} training examples in "
          f"{train_data.num_groups:,} groups; {stop_step:,} steps of {global_batch_size} on {world_size} "
          f"process(es), {device}, {dtype}")


def get_lr_scale(step):
    """Linear warmup, then cosine decay from 1 to lr_min_ratio at total_steps (constant when it is 1)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr_min_ratio + (1 - lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def gather(tensor):
    """Concatenate a tensor of every process along dim 0, in rank order."""
    if world_size == 1:
        return tensor
    out = tensor.new_empty((world_size * tensor.shape[0],) + tuple(tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor.contiguous())
    return out


def save_checkpoint():
    """Everything a resumed run needs to continue exactly: weights, both optimizers, the step, the data
    position, the ACT carry of the whole batch and every process's RNG; written to a temporary file, then
    renamed, so that an interrupted save leaves the previous checkpoint intact."""
    if world_size > 1:  # every process must hold the same weights and puzzle embedding; check before saving
        fingerprint = torch.stack([t.double().sum() for t in raw_model.state_dict().values() if t.is_floating_point()])
        fingerprints = gather(fingerprint[None])
        if not (fingerprints == fingerprints[0]).all():
            raise SystemExit(f"step {iter_num}: the processes' weights differ; not saving")
    state = dict(z_H=carry.z_H, z_L=carry.z_L, steps=carry.steps, halted=carry.halted.to(torch.uint8),
                 **carry.current_data)
    saved_carry = {k: gather(v).cpu() for k, v in state.items()}
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if device_type == 'cuda' else None)
    rngs = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if master_process:
        checkpoint = dict(model=raw_model.state_dict(), model_args=model_args, config=config, iter_num=iter_num,
                          optimizer=dense_optimizer.state_dict(),
                          sparse_optimizer=sparse_optimizer.state_dict() if sparse_optimizer else None,
                          loader=train_batches.state_dict(), carry=saved_carry, rng=rngs, world_size=world_size)
        torch.save(checkpoint, ckpt_path + '.tmp')
        os.replace(ckpt_path + '.tmp', ckpt_path)


EVAL_METRICS = ('count', 'accuracy', 'exact_accuracy', 'q_halt_accuracy', 'steps')


@torch.no_grad()
def evaluate():
    """Run every test batch from a fresh carry until all its sequences halt; sums over all processes."""
    model_in_eval = model.module if ddp else model
    raw_model.eval()
    sums = torch.zeros(len(EVAL_METRICS), device=device)
    batches = test_batches(test_data, num_eval, global_batch_size, rank, world_size)
    for batch in tqdm(batches, desc='eval', total=math.ceil(num_eval / global_batch_size),
                      disable=not master_process, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        eval_carry = raw_model.initial_carry(batch)
        while True:
            eval_carry, _, metrics, _ = model_in_eval(eval_carry, batch)
            if eval_carry.halted.all():
                break
        sums += torch.stack([metrics[k].float() for k in EVAL_METRICS])
    if world_size > 1:
        dist.all_reduce(sums)
    raw_model.train()
    count = max(sums[0].item(), 1)
    return {k: v / count for k, v in zip(EVAL_METRICS[1:], sums[1:].tolist())}


def log_eval(step):
    metrics = evaluate()
    if master_process:
        tqdm.write(f"step {step}: eval exact_accuracy {metrics['exact_accuracy']:.4f}, accuracy "
                   f"{metrics['accuracy']:.4f}, steps {metrics['steps']:.2f}, q_halt_accuracy {metrics['q_halt_accuracy']:.4f}")
        with open(os.path.join(out_dir, 'eval_log.jsonl'), 'a') as f:
            f.write(json.dumps(dict(step=step, **metrics)) + '\n')
        if wandb_log:
            wandb.log({f'eval/{k}': v for k, v in metrics.items()}, step=step)
    return metrics


if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

if eval_only:
    log_eval(iter_num)
    if ddp:
        dist.destroy_process_group()
    raise SystemExit

# -----------------------------------------------------------------------------
# the training loop

raw_model.train()
log_sums, first_bad_step = None, torch.full((), -1, device=device)
progress = tqdm(total=stop_step, initial=iter_num, disable=not master_process, desc='train')
t0, t0_step = time.time(), iter_num
while iter_num < stop_step:
    batch = {k: v.pin_memory().to(device, non_blocking=True) if device_type == 'cuda' else v.to(device)
             for k, v in next(train_batches).items()}
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
    iter_num += 1
    # stop on a non-finite loss without a sync every step: remember the first bad step on the device
    first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), iter_num, first_bad_step)
    values = torch.stack([metrics[k].float() for k in sorted(metrics)])
    log_sums = values if log_sums is None else log_sums + values

    last = iter_num == stop_step
    if iter_num % log_interval == 0 or last or iter_num % eval_interval == 0:
        if world_size > 1:
            dist.all_reduce(log_sums)
            dist.all_reduce(first_bad_step, op=dist.ReduceOp.MAX)
        if first_bad_step.item() >= 0:
            progress.close()
            raise SystemExit(f"non-finite loss at step {first_bad_step.item()}: stopping; the last good "
                             f"checkpoint (if any) is {ckpt_path}")
        sums = dict(zip(sorted(metrics), log_sums.tolist()))
        steps_logged = iter_num - t0_step
        count = max(sums['count'], 1)
        stats = {k: v / (global_batch_size * steps_logged if k.endswith('loss') else count) for k, v in sums.items()}
        dt = (time.time() - t0) / steps_logged
        if master_process:
            tqdm.write(f"step {iter_num}: loss {stats['lm_loss']:.4f}, accuracy {stats['accuracy']:.4f}, exact "
                       f"{stats['exact_accuracy']:.4f}, steps {stats['steps']:.2f}, lr {lr_scale * learning_rate:.2e}, "
                       f"{dt * 1000:.1f} ms/step, {global_batch_size / dt:,.0f} examples/s")
            progress.update(steps_logged)
            if wandb_log:
                wandb.log({f'train/{k}': v for k, v in stats.items()} | {'train/lr': lr_scale * learning_rate},
                          step=iter_num)
        log_sums, t0, t0_step = None, time.time(), iter_num
    if iter_num % eval_interval == 0 or last:
        log_eval(iter_num)
        if always_save_checkpoint or last:
            save_checkpoint()
        t0 = time.time()  # evaluation time is not training time
progress.close()
if ddp:
    dist.destroy_process_group()
