"""
Run a trained HRM on new inputs: the task is the one its dataset was built for.

Sudoku:
$ python sample.py --out_dir=out-sudoku --puzzle="4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......"
$ python sample.py --out_dir=out-sudoku --puzzles=my_puzzles.txt      # 81-character lines, or 9x9 grids
$ python sample.py --out_dir=out-sudoku --puzzles=test.csv            # Sudoku-Extreme CSV: answers are scored
$ python sample.py --out_dir=out-sudoku --puzzle=... --show_steps=True --halt_max_steps=32
$ python sample.py --out_dir=out-sudoku --puzzles=test.csv --quiet=True --compile=True --halt_adaptive=True
$ python sample.py --out_dir=out-sudoku --puzzles=test.csv --quiet=True --compile=True --votes=8

A Sudoku is 81 characters, row by row, '.' or '0' for a blank; in a text file also a grid of 9 lines of 9,
blank lines between grids (spaces, '|' and separator lines ignored: a grid as sample.py prints it). An input
that cannot be read (wrong length, other characters, clues that already conflict, an answer that does not
solve it) gets a one-line error and the others are still solved; the exit status is non-zero when none
could be. With --votes=K each puzzle is also solved under K - 1 random symmetries (rows and columns shuffled
within Sudoku's structure, digits relabelled, as in training), each answer mapped back, and the answer is
the grid most copies give, ties going to the highest mean Q-halt probability: the model's own vote, no
Sudoku rules consulted.

Puzzles, mazes and ARC inputs stream through batch_size slots on the device, each running halt_max_steps segments,
or with --halt_adaptive=True (the default for a run that evaluated so) until its Q head says halt, a freed
slot taking the next input; the summary gives inputs per second and the mean number of segments.

Maze (the model's size: 30x30 for config/maze.py, 15x15 for config/maze_small.py):
$ python sample.py --out_dir=out-maze --maze=my_maze.txt              # a grid, a line per row: '#' wall, ' ' open, S, G
$ python sample.py --out_dir=out-maze --maze=test.csv --max_puzzles=20  # the original's CSV: answers are scored
$ python sample.py --out_dir=out-maze --maze="$(head -1 mazes.txt)"     # one maze as a line of 900 characters

A text file may hold several mazes, as grids with blank lines between them or as one line each. Each maze is
drawn with the predicted path ('o') and 'x' on the cells the model got wrong (walls changed, or a path cell
on no shortest path), in colour on a terminal (not with NO_COLOR set), and said to be a valid shortest path
or not, and why; with a CSV's answers also whether it is the answer's path. Mazes that cannot be read (size,
characters, not one S and one G, G out of reach) get a one-line error, as Sudoku puzzles do.

ARC:
$ python sample.py --out_dir=out-arc1 --arc_task=00576224           # a task of the dataset's evaluation set
$ python sample.py --out_dir=out-arc1 --arc_task=my_task.json       # a task in the official per-task layout

Shows the task's demonstrations, then each test input with the model's two attempts, voted over the
task's variants in the dataset the model trained on (as prepare_arc.evaluate votes), and the answer where
it is known: coloured blocks on a terminal (digits when piped or NO_COLOR is set). A task that was not
in training has no puzzle embedding: it runs with the blank one and says so.

Time series (a model trained on a series from prepare_timeseries.py):
$ python sample.py --out_dir=out-etth1 --plot=forecast.svg            # forecast every test window, plot the last
$ python sample.py --out_dir=out-etth1 --plot=ot.svg --window=0 --variable=OT --split=val

It prints the errors of the forecasts of every window of the split (MSE and MAE on the normalised scale and
in the series' units) beside the last-value and DLinear forecasts', and --plot draws one window's history,
forecast and truth of one variable as an SVG chart that a browser opens.

An option that only another task reads (--plot for a maze model, --show_steps for an ARC one) is refused in
one line rather than ignored.
"""
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from dataset import (BadRows, DataError, SeriesData, Windows, check_ranges, dataset_dir, eval_batches,
                     exit_cleanly, identifiers_digest, is_csv_header, task_of, write_text_atomically)
from model import build_model, check_device, check_fp8, load_checkpoint

# -----------------------------------------------------------------------------
_not_config = set(globals())
out_dir = 'out-sudoku'      # holds ckpt.pt from train.py
puzzle = ''                 # Sudoku: one puzzle
puzzles = ''                # Sudoku: a text file of puzzles, or a CSV with a 'question' (and 'answer') column
maze = ''                   # Maze: one maze (size*size characters), a text file of mazes, or a CSV like puzzles
max_puzzles = 0             # if > 0, solve only the first this-many
halt_max_steps = 0          # if > 0, ACT segments per input (may exceed the number trained with); 0: as the run
                            # evaluated (train.py's eval_halt_max_steps, else halt_max_steps)
show_steps = False          # print the board after every segment with the Q head's halting probability
halt_adaptive = False       # each input stops where its Q head says halt, as in training (else halt_max_steps);
                            # unset: as the run evaluated (train.py's halt_adaptive)
votes = 1                   # Sudoku: solve each puzzle as itself and under votes - 1 random symmetries, and vote
arc_task = ''               # ARC: a task's JSON file, or the id of a task in the dataset's evaluation set
batch_size = 256
quiet = False               # with many inputs: print only errors and the score
dataset = ''                # ARC, time series: the dataset in data/ (or a path) the model trained on ('' = the
                            # checkpoint's)
split = 'test'              # time series: forecast the windows of 'test' or 'val'
plot = ''                   # time series: draw one window's forecast into this SVG file
window = -1                 # time series: the window to draw, its index in the split (negative: from the end)
variable = ''               # time series: the variable (column) to draw; '' = the last one (OT for ETT)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
compile = False             # torch.compile the model (worth it for thousands of inputs on a GPU)
fp8 = False                 # the MLPs' gate-and-up matmul in FP8 (train.py's fp8); unset: as the run trained
weight_average = True       # the average of the weights the run kept (train.py's ema_decay), as it evaluated;
                            # False: the weights as trained
config_keys = [k for k in globals() if k not in _not_config and not k.startswith('_')]
# -----------------------------------------------------------------------------


def load_model():
    """(task, model, forward): the checkpoint's model in eval mode, and it or its compiled version."""
    if os.path.isfile(out_dir):
        raise DataError(f"out_dir={out_dir!r} is a file: give the folder that holds the run's ckpt.pt")
    try:
        checkpoint = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    except DataError as e:
        raise DataError(f"{e} (train a model with train.py, or set --out_dir)") from None
    model = build_model(dict(checkpoint['model_args'], forward_dtype=dtype,
                             **({'fp8': fp8} if 'fp8' in config_overrides else {})))
    if model.config.fp8:
        check_fp8(device, dtype)
    # a run that kept an average of its weights evaluated with it: so does sample.py, unless told otherwise
    model.load_state_dict({**checkpoint['model'], **((checkpoint.get('ema') or {}) if weight_average else {})})
    if checkpoint.get('ema'):
        print("weights: " + ("the average the run kept (train.py's ema_decay)" if weight_average else
                             "as trained, not the average the run kept"))
    elif 'weight_average' in config_overrides:
        print("weights: as trained (the run kept no average of them)")
    global dataset, halt_adaptive, trained_series, trained_identifiers
    trained_series = checkpoint.get('series')  # (from train.py's checkpoints of series runs)
    trained_identifiers = checkpoint.get('identifiers')  # (of puzzle runs: a digest of identifiers.json)
    dataset = dataset or checkpoint['config']['dataset']  # where ARC and time series find their data
    # ACT can think longer than it was trained to; unset: as long as the run evaluated (eval_halt_max_steps)
    model.config.halt_max_steps = halt_max_steps or checkpoint['config'].get('eval_halt_max_steps') or \
        model.config.halt_max_steps
    if 'halt_adaptive' not in config_overrides:  # as the run evaluated, unless every segment is to be shown
        halt_adaptive = checkpoint['model_args'].get('halt_adaptive', False) and not show_steps
    model.config.halt_adaptive = halt_adaptive
    model.to(device).eval()
    task = task_of(checkpoint.get('task'), checkpoint['model_args'].get('seq_len'),
                   checkpoint['model_args'].get('vocab_size'))
    if task not in TASKS:
        raise DataError(f"{out_dir}/ckpt.pt was trained on {'a ' + task if task else 'an unnamed'} dataset; sample.py "
                        f"runs models of the tasks {', '.join(TASKS)}")
    return task, model, torch.compile(model) if compile else model


@torch.no_grad()
def run(model, forward, tokens, puzzle_identifiers=None):
    """Tokens (N, seq_len) -> the predicted tokens (segments, N, seq_len) and the Q head's halting
    probabilities (segments, N) after the last segment only (segments = 1), or after every segment with
    show_steps; and the segments each input ran (N,). puzzle_identifiers (N,): the trained puzzle embeddings
    to use (the blank one, 0, by default)."""
    ids = np.zeros(len(tokens), np.int32) if puzzle_identifiers is None else np.asarray(puzzle_identifiers, np.int32)
    tokens, ids = torch.from_numpy(tokens.astype(np.int32)).to(device), torch.from_numpy(ids).to(device)
    if show_steps:  # batch by batch, every segment of every input
        history, q_halt = [], []
        for start in tqdm(range(0, len(tokens), batch_size), desc='solving', disable=len(tokens) <= batch_size):
            batch = dict(inputs=tokens[start:start + batch_size], puzzle_identifiers=ids[start:start + batch_size])
            carry, history_b, q_halt_b = model.initial_carry(batch), [], []
            while True:
                carry, _, _, outputs = forward(carry, batch)
                history_b.append(outputs['logits'].argmax(-1).cpu().numpy())
                q_halt_b.append(torch.sigmoid(outputs['q_halt_logits']).float().cpu().numpy())
                if carry.halted.all():
                    break
            history.append(np.stack(history_b))
            q_halt.append(np.stack(q_halt_b))
        history, q_halt = np.concatenate(history, 1), np.concatenate(q_halt, 1)
        return history, q_halt, np.full(len(tokens), len(history))
    if compile:  # compilation happens on the first call: do it before the clock starts
        model.solve(forward, tokens[:batch_size], ids[:batch_size], batch_size)
    started = time.time()
    with tqdm(total=len(tokens), desc='solving', disable=len(tokens) <= batch_size) as bar:
        predictions, q_halt, segments = model.solve(forward, tokens, ids, batch_size,
                                                    progress=lambda finished: bar.update(finished - bar.n))
    predictions, q_halt, segments = predictions.cpu().numpy(), q_halt.cpu().numpy(), segments.cpu().numpy()
    seconds = time.time() - started
    rate = len(tokens) / seconds
    rate = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2f}"  # a slow run on a CPU still shows its rate
    print(f"{len(tokens):,} input(s) in {seconds:.2f} s ({rate}/s), "
          f"{segments.mean():.2f} segments on average" + (' (halting adaptively)' if halt_adaptive else '')
          + (', FP8 gate-and-up' if model.config.fp8 else ''))
    return predictions[None], q_halt[None], segments


def print_exact_accuracy(entries, finals, what="exact accuracy against the given answers"):
    """The share of the (name, question, answer) entries with an answer whose final prediction is exactly it."""
    right = [np.array_equal(final, answer) for final, (_, _, answer) in zip(finals, entries) if answer is not None]
    if right:
        print(f"{what}: {sum(right)}/{len(right)} = {sum(right) / len(right):.4f}")


def vote_over_symmetries(model, forward, questions):
    """Sudoku's --votes (prepare_sudoku.vote): returns the voted boards (N, 81), the puzzle-alone boards
    (N, 81), the winner's votes (N,) and the segments all copies of a puzzle ran (N,)."""
    import prepare_sudoku as ps
    segments = []

    def solve(tokens):
        predictions, q_halt, copy_segments = run(model, forward, tokens)
        segments.append(copy_segments)
        return predictions[-1], q_halt[-1]

    voted, alone, agree = ps.vote(solve, questions, votes)
    return voted, alone, agree, segments[0].reshape(len(questions), votes).sum(1)


def sudoku(model, forward):
    import prepare_sudoku as ps
    entries, errors = [], 0  # (name, question digits, answer digits or None)
    if puzzle:
        try:
            entries.append(("--puzzle", ps.parse_puzzle(puzzle), None))
        except ValueError as e:
            print(f"sample.py: --puzzle: {e}")
            errors += 1
    if puzzles:
        try:
            with open(puzzles, encoding='utf-8-sig') as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{puzzles}: not UTF-8 text ({e.reason})") from None
        if lines and is_csv_header(lines[0], 'question'):  # a CSV: the builder's reader
            bad = BadRows(skip_bad=True)
            try:
                questions, answers, _, lines = ps.read_sudoku_csv(puzzles, bad=bad, need_answers=False)
            except DataError as e:  # about the whole file (its rows' problems are counted below)
                questions, answers, lines = [], None, []
                print(f"sample.py: {e}")
            entries += [(f"{puzzles} line {line}", q, None if answers is None else answers[i])
                        for i, (line, q) in enumerate(zip(lines, questions))]
            for line in bad.report():
                print(f"sample.py: {line}")
            errors += sum(bad.counts.values())
        else:
            for line, text, problem in ps.text_puzzles(lines):
                try:
                    if problem:
                        raise ValueError(problem)
                    entries.append((f"{puzzles} line {line}", ps.parse_puzzle(text), None))
                except ValueError as e:
                    print(f"sample.py: {puzzles} line {line}: {e}")
                    errors += 1
    entries = entries[:max_puzzles] if max_puzzles > 0 else entries
    if not entries:
        raise DataError(f"no puzzle could be read ({errors} had errors)" if errors else f"{puzzles}: no puzzles in it"
                        if puzzles else "give --puzzle=<81 characters> or --puzzles=<file>")
    questions = np.stack([q for _, q, _ in entries])
    if votes > 1:
        voted, alone, agree, segments = vote_over_symmetries(model, forward, questions)
        boards = voted[None]
    else:
        tokens, q_halt, segments = run(model, forward, ps.encode(questions))
        boards = ps.decode(tokens)
    problems = ps.grid_problems(questions, boards[-1])
    for i, (name, question, answer) in enumerate([] if quiet else entries):
        final = boards[-1, i]
        print(f"\n{name}\npuzzle:\n{ps.format_grid(question)}")
        for step in range(len(boards) if show_steps else 0):
            print(f"after segment {step + 1} (Q says halt with p = {q_halt[step, i]:.3f}):\n"
                  f"{ps.format_grid(boards[step, i])}")
        verdict = 'a valid solution' if problems[i] is None else f'not a solution ({problems[i][1]})'
        if answer is not None:
            verdict += ', matches the answer' if np.array_equal(final, answer) else ', differs from the answer'
        how = f"voted by {agree[i]} of {votes} symmetric copies ({segments[i]} segments in all)" if votes > 1 else \
            f"solution after {segments[i]} segments"
        print(f"{how}, {verdict}:\n{ps.format_grid(final)}")
    print(f"\n{len(entries)} puzzle(s) through the model" + (f", each under {votes} symmetries" if votes > 1 else "")
          + f", {problems.count(None)} answered with a valid Sudoku solution"
          + (f"; {errors} could not be read" if errors else ''))
    if votes > 1:
        print_exact_accuracy(entries, alone, "the puzzles alone, without voting, exact")
    print_exact_accuracy(entries, boards[-1])


def solve_mazes(model, forward):
    import prepare_maze as pm
    if not maze:
        raise DataError("give --maze=<a maze of size*size characters, a text file of mazes, or a CSV>")
    side = math.isqrt(model.config.seq_len)
    entries, errors, unread = pm.read_mazes(maze, side)
    for error in errors:
        print(f"sample.py: {error}")
    entries = entries[:max_puzzles] if max_puzzles > 0 else entries
    if not entries:
        raise DataError(f"no maze could be read ({unread} had errors)" if unread else f"{maze}: no mazes in it")
    colour = sys.stdout.isatty() and not os.environ.get('NO_COLOR')
    tokens, q_halt, segments = run(model, forward, np.stack([q for _, q, _ in entries]))
    problems = [pm.maze_problem(question, tokens[-1, i], side) for i, (_, question, _) in enumerate(entries)]
    for i, (name, question, answer) in enumerate([] if quiet else entries):
        problem = problems[i]
        for step in range(len(tokens) - 1 if show_steps else 0):
            print(f"\n{name}, after segment {step + 1} (Q says halt with p = {q_halt[step, i]:.3f}):\n"
                  f"{pm.render(question, tokens[step, i], side, colour)}")
        verdict = 'a valid shortest path' if problem is None else f'not a valid shortest path ({problem[1]})'
        if answer is not None:
            verdict += ', the answer\'s path' if np.array_equal(tokens[-1, i], answer) else ', not the answer\'s path'
        print(f"\n{name}, after {segments[i]} segments: {verdict}\n"
              f"{pm.render(question, tokens[-1, i], side, colour)}")
    print(f"\n{len(entries)} maze(s) through the model, {problems.count(None)} solved with a valid shortest path"
          + (f"; {unread} could not be read" if unread else ''))
    print_exact_accuracy(entries, tokens[-1])


def arc(model, forward):
    import prepare_arc as pa
    if not arc_task:
        raise DataError("give --arc_task=<a task's JSON file>, or the id of a task in the dataset's evaluation set")
    data_dir = dataset_dir(dataset)
    identifiers = pa.read_identifiers(data_dir)
    if not identifiers and model.config.num_puzzle_identifiers > 1:  # its puzzle embeddings are named there
        raise DataError(f"{data_dir}: no such dataset: the one the model trained on names its puzzle embeddings "
                        f"(set --dataset, or run from the folder that holds data/)")
    if identifiers and len(identifiers) != model.config.num_puzzle_identifiers:
        raise DataError(f"{data_dir} has {len(identifiers):,} puzzle identifiers, the model "
                        f"{model.config.num_puzzle_identifiers:,}: not the dataset it trained on (set --dataset)")
    if trained_identifiers and identifiers_digest(data_dir) != trained_identifiers:
        raise DataError(f"{data_dir}'s identifiers.json names other puzzles than the dataset {out_dir}/ckpt.pt "
                        f"trained on (rebuilt since, or --dataset names another): its puzzle embeddings would serve "
                        f"puzzles they never saw")
    if os.path.isdir(arc_task):
        raise DataError(f"arc_task={arc_task!r}: a folder, not a task's JSON file")
    task = pa.read_task_file(arc_task) if os.path.isfile(arc_task) else \
        pa.task_from_dataset(data_dir, arc_task, identifiers)
    variants = [(i, *pa.parse_name(n)[1:]) for i, n in enumerate(identifiers)
                if n.startswith(task.id) and pa.parse_name(n)[0] == task.id]  # (puzzle identifier, transform, colours)
    if not variants:
        print(f"task {task.id} is not in {data_dir}'s puzzle identifiers: the model never trained on it and has no "
              f"puzzle embedding for it, so it runs with the blank one (0) under the 8 dihedral transforms; HRM "
              f"learns an ARC task through that embedding, so expect little")
        variants = [(0, t, pa.IDENTITY) for t in range(8)]
    colour = sys.stdout.isatty() and not os.environ.get('NO_COLOR')
    shape = lambda grid: 'unknown' if grid is None else f"{grid.shape[0]}x{grid.shape[1]}"
    if not quiet:
        print(f"task {task.id} ({task.where}), {len(variants)} variant(s) voting")
        for j, (x, y) in enumerate(task.demos):
            print(f"\n{pa.format_grids([x, y], [f'demonstration {j + 1}: {shape(x)}', f'-> {shape(y)}'], colour)}")
    tokens = np.stack([pa.encode(pa.transform(x, t, m)) for x, _ in task.tests for _, t, m in variants])
    ids = np.tile([i for i, _, _ in variants], len(task.tests))
    predictions, q_halt, _ = run(model, forward, tokens, ids)
    predictions, q_halt = predictions[-1], q_halt[-1]
    right = 0
    for j, (x, answer) in enumerate(task.tests):
        rows = range(j * len(variants), (j + 1) * len(variants))
        ranked = pa.rank([(pa.untransform(pa.crop(predictions[r]), t, m), float(q_halt[r]))
                          for r, (_, t, m) in zip(rows, variants)])[:2]
        hits = [answer is not None and np.array_equal(grid, answer) for grid, _, _ in ranked]
        right += any(hits)
        verdict = 'no answer known' if answer is None else f"attempt {hits.index(True) + 1} is right" if any(hits) \
            else 'neither attempt is right'
        print(f"\ntest input {j + 1}: {verdict}")
        if not quiet:
            titles = [f"input {shape(x)}"] + [f"attempt {a + 1}: {votes}/{len(variants)} votes, q {q:.2f}"
                                              for a, (_, votes, q) in enumerate(ranked)]
            grids = [x] + [grid for grid, _, _ in ranked] + [None] * (2 - len(ranked))
            titles += ['no attempt'] * (2 - len(ranked)) + [f"answer {shape(answer)}"]
            print(pa.format_grids(grids + [answer], titles, colour))
    if all(answer is not None for _, answer in task.tests):
        print(f"\n{right}/{len(task.tests)} test input(s) right within two attempts")


def timeseries(model, forward):
    import prepare_timeseries as pt
    config = model.config
    series = SeriesData(dataset_dir(dataset))
    if series.num_features != config.num_features:
        raise DataError(f"{series.path} has {series.num_features} variables, the model forecasts {config.num_features}")
    changed = trained_series and series.changes_since(trained_series)
    if changed and 'dataset' not in config_overrides:
        raise DataError(f"{series.path} was rebuilt since {out_dir}/ckpt.pt was trained: {changed} (--dataset "
                        f"forecasts another series with this model)")
    if changed:  # another series, on purpose
        print(f"note: {series.path} is not the series the model trained on: {changed}")
    if split not in ('val', 'test'):
        raise DataError(f"split={split!r}: must be 'val' or 'test'")
    windows = Windows(series, split, config.input_len, config.horizon)
    n, column = windows.num_examples, variable or series.columns[-1]
    if not plot and ({'window', 'variable'} & set(config_overrides)):
        raise DataError("window and variable pick what --plot draws: give --plot=<an SVG file>")
    if plot and column not in series.columns:
        raise DataError(f"variable={column!r}: the series has {', '.join(series.columns)}")
    if plot and not -n <= window < n:
        raise DataError(f"window={window}: the {split} part has {n:,} windows (0 to {n - 1:,}, or -1 for the last)")
    if plot and not os.path.isdir(os.path.dirname(os.path.abspath(plot))):
        raise DataError(f"plot={plot!r}: no such directory")
    if plot and os.path.isdir(plot):
        raise DataError(f"plot={plot!r} is a directory: give an SVG file's path")
    forecasts = []
    for batch in tqdm(eval_batches(windows, n, batch_size, 0, 1), desc='forecasting', total=math.ceil(n / batch_size),
                      disable=quiet):
        _, outputs = model.run_to_halt(forward, {k: torch.from_numpy(v).to(device) for k, v in batch.items()})
        forecasts.append(model.predictions(outputs).float().cpu().numpy())
    forecasts = np.concatenate(forecasts)[:n]
    print(f"{n:,} {split} windows of {series.path}: {config.input_len} steps -> {config.horizon}, "
          f"{series.num_features} variables\n{'':12} {'MSE':>8} {'MAE':>8}   real units: {'MSE':>10} {'MAE':>10}")
    for forecaster, (mse, mae, mse_real, mae_real) in pt.scores(windows, forecasts).items():
        print(f"{forecaster:12} {mse:8.4f} {mae:8.4f}   {'':11} {mse_real:10.4g} {mae_real:10.4g}")
    if plot:
        i, j = window % n, series.columns.index(column)
        history, truth = pt.window_arrays(windows, np.array([i]))
        real = lambda values: values[0, :, j] * series.std[j] + series.mean[j]
        origin = series.timestamps[windows.starts[i] + config.input_len]
        step = pt.format_step(series.meta.get('step_seconds', 0))
        write_text_atomically(plot, pt.forecast_svg(real(history), real(forecasts[i:i + 1]), real(truth),
                                            f"{column}: {split} window {i}, forecast from {origin}", column,
                                            f"time steps of {step} from the forecast's start"))
        print(f"wrote {plot}: window {i} of {split}, {column}")


# the dataset's task -> what sample.py does with its model
TASKS = {'sudoku': sudoku, 'maze': solve_mazes, 'arc': arc, 'timeseries': timeseries}
# the options only some tasks read: set for a model of another task, one is refused rather than ignored
# (votes > 1 has a message of its own below)
TASK_OPTIONS = {'puzzle': ('sudoku',), 'puzzles': ('sudoku',), 'maze': ('maze',),
                'max_puzzles': ('sudoku', 'maze'), 'show_steps': ('sudoku', 'maze'), 'arc_task': ('arc',),
                'split': ('timeseries',), 'plot': ('timeseries',), 'window': ('timeseries',),
                'variable': ('timeseries',), 'dataset': ('arc', 'timeseries')}

if __name__ == '__main__':
    exit_cleanly('sample.py')  # bad input ends with one line, not a traceback
    defaults = {k: globals()[k] for k in TASK_OPTIONS}
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    check_ranges(globals(), [('batch_size', batch_size >= 1, '>= 1'),
                             ('max_puzzles', max_puzzles >= 0, '>= 0 (0: all)'),
                             ('halt_max_steps', halt_max_steps >= 0, ">= 0 (0: the run's own)"),
                             ('dtype', dtype in ('float32', 'bfloat16', 'float16'),
                              "'float32', 'bfloat16' or 'float16'")])
    if show_steps and halt_adaptive:
        raise DataError("show_steps shows every segment of every input: leave halt_adaptive off with it")
    if votes < 1 or (votes > 1 and show_steps):
        raise DataError(f"votes={votes}: must be >= 1, and 1 with show_steps (which shows one run of each input)")
    if puzzles and not os.path.isfile(puzzles):
        raise DataError(f"{puzzles}: a directory, not a file of puzzles" if os.path.isdir(puzzles) else
                        f"{puzzles}: no such file")
    check_device(device)
    task, model, forward = load_model()
    a_model = f"{'an' if task[0] in 'aeiou' else 'a'} {task} model"
    if votes > 1 and task != 'sudoku':
        raise DataError(f"votes={votes}: voting over symmetries is for Sudoku, and this is {a_model}")
    for key, tasks in TASK_OPTIONS.items():
        if task not in tasks and config_overrides.get(key, defaults[key]) != defaults[key]:
            raise DataError(f"{key}={config_overrides[key]!r}: for {' and '.join(tasks)} models, and this is {a_model}")
    TASKS[task](model, forward)
