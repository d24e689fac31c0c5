"""
Run a trained HRM on new inputs: the task is the one its dataset was built for.

Sudoku:
$ python sample.py --out_dir=out-sudoku --puzzle="4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......"
$ python sample.py --out_dir=out-sudoku --puzzles=my_puzzles.txt      # one 81-character puzzle per line
$ python sample.py --out_dir=out-sudoku --puzzles=test.csv            # Sudoku-Extreme CSV: answers are scored
$ python sample.py --out_dir=out-sudoku --puzzle=... --show_steps=True --halt_max_steps=32

A Sudoku is 81 characters, row by row, '.' or '0' for a blank. An input that cannot be read (wrong length,
other characters, clues that already conflict, an answer that does not solve it) gets a one-line error and
the others are still solved; the exit status is non-zero when none could be.

Time series (a model trained on a series from prepare_timeseries.py):
$ python sample.py --out_dir=out-etth1 --plot=forecast.svg            # forecast every test window, plot the last
$ python sample.py --out_dir=out-etth1 --plot=ot.svg --window=0 --variable=OT --split=val

It prints the errors of the forecasts of every window of the split (MSE and MAE on the normalised scale and
in the series' units) beside the last-value and DLinear forecasts', and --plot draws one window's history,
forecast and truth of one variable as an SVG chart that a browser opens.
"""
import math
import os

import numpy as np
import torch
from tqdm import tqdm

from dataset import BadRows, DataError, SeriesData, Windows, brief_errors, window_batches
from model import build_model, check_device, load_checkpoint

# -----------------------------------------------------------------------------
_not_config = set(globals())
out_dir = 'out-sudoku'      # holds ckpt.pt from train.py
puzzle = ''                 # Sudoku: one puzzle
puzzles = ''                # Sudoku: a text file of puzzles, or a CSV with a 'question' (and 'answer') column
max_puzzles = 0             # if > 0, solve only the first this-many
halt_max_steps = 0          # if > 0, ACT segments per input (may exceed the number trained with)
show_steps = False          # print the board after every segment with the Q head's halting probability
batch_size = 256
quiet = False               # with many inputs: print only errors and the score
dataset = ''                # time series: the series in data/ to forecast ('' = the one the model trained on)
split = 'test'              # time series: forecast the windows of 'test' or 'val'
plot = ''                   # time series: draw one window's forecast into this SVG file
window = -1                 # time series: the window to draw, its index in the split (negative: from the end)
variable = ''               # time series: the variable (column) to draw; '' = the last one (OT for ETT)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
compile = False
config_keys = [k for k in globals() if k not in _not_config and not k.startswith('_')]
# -----------------------------------------------------------------------------


def load_model():
    """(task, model, forward): the checkpoint's model in eval mode, and it or its compiled version."""
    try:
        checkpoint = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
        model = build_model(dict(checkpoint['model_args'], forward_dtype=dtype))
    except DataError as e:
        raise DataError(f"{e} (train a model with train.py, or set --out_dir)") from None
    model.load_state_dict(checkpoint['model'])
    if halt_max_steps > 0:
        model.config.halt_max_steps = halt_max_steps  # ACT can think longer than it was trained to
    model.to(device).eval()
    return checkpoint.get('task') or 'sudoku', model, torch.compile(model) if compile else model


@torch.no_grad()
def run(model, forward, tokens, puzzle_identifiers=None):
    """Tokens (N, seq_len) -> predicted tokens after every segment (segments, N, seq_len) and the Q head's
    halting probabilities (segments, N). puzzle_identifiers (N,): the trained puzzle embeddings to use (the
    blank one, 0, by default)."""
    ids = np.zeros(len(tokens), np.int32) if puzzle_identifiers is None else np.asarray(puzzle_identifiers, np.int32)
    batch = dict(inputs=torch.from_numpy(tokens.astype(np.int32)).to(device),
                 puzzle_identifiers=torch.from_numpy(ids).to(device))
    carry, predictions, q_halt = model.initial_carry(batch), [], []
    while True:
        carry, _, _, outputs = forward(carry, batch)
        predictions.append(outputs['logits'].argmax(-1).cpu().numpy())
        q_halt.append(torch.sigmoid(outputs['q_halt_logits']).float().cpu().numpy())
        if carry.halted.all():
            return np.stack(predictions), np.stack(q_halt)


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
        with open(puzzles, encoding='utf-8-sig') as f:
            is_csv = 'question' in f.readline().split(',')
        if is_csv:  # the builder's reader and checks; bad rows are counted
            bad = BadRows(skip_bad=True)
            try:
                questions, answers, _, lines = ps.read_sudoku_csv(puzzles, bad=bad, need_answers=False)
            except DataError as e:
                questions, answers, lines = [], None, []
                print(f"sample.py: {e}")
            entries += [(f"{puzzles} line {line}", q, None if answers is None else answers[i])
                        for i, (line, q) in enumerate(zip(lines, questions))]
            for line in bad.report():
                print(f"sample.py: {line}")
            errors += sum(bad.counts.values())
        else:
            with open(puzzles, encoding='utf-8-sig') as f:
                for line, text in enumerate(f, start=1):
                    try:
                        if text.strip():
                            entries.append((f"{puzzles} line {line}", ps.parse_puzzle(text), None))
                    except ValueError as e:
                        print(f"sample.py: {puzzles} line {line}: {e}")
                        errors += 1
    entries = entries[:max_puzzles] if max_puzzles > 0 else entries
    if not entries:
        raise DataError(f"no puzzle could be read ({errors} had errors)" if errors else
                        "give --puzzle=<81 characters> or --puzzles=<file>")
    valid = scored = correct = 0
    for start in tqdm(range(0, len(entries), batch_size), desc='solving', disable=quiet or len(entries) <= batch_size):
        chunk = entries[start:start + batch_size]
        tokens, q_halt = run(model, forward, ps.encode(np.stack([q for _, q, _ in chunk])))
        boards = ps.decode(tokens)
        problems = ps.grid_problems(np.stack([q for _, q, _ in chunk]), boards[-1])
        for i, (name, question, answer) in enumerate(chunk):
            final = boards[-1, i]
            valid += problems[i] is None
            matches = answer is not None and np.array_equal(final, answer)
            scored, correct = scored + (answer is not None), correct + matches
            if quiet:
                continue
            print(f"\n{name}\npuzzle:\n{ps.format_grid(question)}")
            for step in range(len(boards) if show_steps else 0):
                print(f"after segment {step + 1} (Q says halt with p = {q_halt[step, i]:.3f}):\n"
                      f"{ps.format_grid(boards[step, i])}")
            verdict = 'a valid solution' if problems[i] is None else f'not a solution ({problems[i][1]})'
            if answer is not None:
                verdict += ', matches the answer' if matches else ', differs from the answer'
            print(f"solution after {len(boards)} segments, {verdict}:\n{ps.format_grid(final)}")
    print(f"\n{len(entries)} puzzle(s) through the model, {valid} answered with a valid Sudoku solution"
          + (f"; {errors} could not be read" if errors else ''))
    if scored:
        print(f"exact accuracy against the given answers: {correct}/{scored} = {correct / scored:.4f}")


def timeseries(model, forward):
    import prepare_timeseries as pt
    config = model.config
    name = dataset or load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['config']['dataset']
    series = SeriesData(os.path.join('data', name))
    if series.num_features != config.num_features:
        raise DataError(f"{series.path} has {series.num_features} variables, the model forecasts {config.num_features}")
    if split not in ('val', 'test'):
        raise DataError(f"split={split!r}: must be 'val' or 'test'")
    windows = Windows(series, split, config.input_len, config.horizon)
    n, column = windows.num_examples, variable or series.columns[-1]
    if plot and column not in series.columns:
        raise DataError(f"variable={column!r}: the series has {', '.join(series.columns)}")
    if plot and not -n <= window < n:
        raise DataError(f"window={window}: the {split} part has {n:,} windows (0 to {n - 1:,}, or -1 for the last)")
    if plot and not os.path.isdir(os.path.dirname(os.path.abspath(plot))):
        raise DataError(f"plot={plot!r}: no such directory")
    forecasts = []
    for batch in tqdm(window_batches(windows, n, batch_size, 0, 1), desc='forecasting', total=math.ceil(n / batch_size),
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
        pt.write_text(plot, pt.forecast_svg(real(history), real(forecasts[i:i + 1]), real(truth),
                                            f"{column}: {split} window {i}, forecast from {origin}", column,
                                            f"time steps of {step} from the forecast's start"))
        print(f"wrote {plot}: window {i} of {split}, {column}")


TASKS = {'sudoku': sudoku, 'timeseries': timeseries}  # the dataset's task -> what sample.py does with its model

if __name__ == '__main__':
    brief_errors('sample.py')  # bad input ends with one line, not a traceback
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    if batch_size < 1 or max_puzzles < 0 or halt_max_steps < 0:
        raise DataError("batch_size must be >= 1, max_puzzles and halt_max_steps >= 0")
    if puzzles and not os.path.isfile(puzzles):
        raise DataError(f"{puzzles}: no such file")
    check_device(device)
    task, model, forward = load_model()
    TASKS[task](model, forward)
