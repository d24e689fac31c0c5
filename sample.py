"""
Solve Sudoku puzzles with a trained HRM.

$ python sample.py --out_dir=out-sudoku --puzzle="4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......"
$ python sample.py --out_dir=out-sudoku --puzzles=my_puzzles.txt      # one 81-character puzzle per line
$ python sample.py --out_dir=out-sudoku --puzzles=test.csv            # Sudoku-Extreme CSV: answers are scored
$ python sample.py --out_dir=out-sudoku --puzzle=... --show_steps=True --halt_max_steps=32

A puzzle is 81 characters, row by row, '.' or '0' for a blank. A puzzle that cannot be read (wrong length,
other characters, clues that already conflict) gets a one-line error and the others are still solved.
"""
import csv
import os

import numpy as np
import torch

from model import HRM, HRMConfig
from prepare_sudoku import check_solution, decode, encode, format_grid, parse_puzzle, puzzle_conflicts

# -----------------------------------------------------------------------------
out_dir = 'out-sudoku'      # holds ckpt.pt from train.py
puzzle = ''                 # one puzzle
puzzles = ''                # a text file of puzzles, or a CSV with a 'question' (and 'answer') column
max_puzzles = 0             # if > 0, solve only the first this-many
halt_max_steps = 0          # if > 0, ACT segments per puzzle (may exceed the number trained with)
show_steps = False          # print the board after every segment with the Q head's halting probability
batch_size = 256
quiet = False               # with many puzzles: print only errors and the score
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
compile = False
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())


def read_puzzles():
    """(name, question, answer or None) for every puzzle asked for."""
    found = []
    if puzzle:
        found.append(('--puzzle', puzzle, None))
    if puzzles:
        if not os.path.exists(puzzles):
            raise SystemExit(f"sample: no such file {puzzles}")
        with open(puzzles, newline='') as f:
            first = f.readline()
            f.seek(0)
            if 'question' in first.split(','):  # a CSV in Sudoku-Extreme's format
                for line, row in enumerate(csv.DictReader(f), start=2):
                    found.append((f"{puzzles} line {line}", row['question'], row.get('answer')))
            else:
                for line, text in enumerate(f, start=1):
                    if text.strip():
                        found.append((f"{puzzles} line {line}", text.strip(), None))
    if not found:
        raise SystemExit("sample: give --puzzle=<81 characters> or --puzzles=<file>")
    return found[:max_puzzles] if max_puzzles > 0 else found


def load_model():
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"sample: no checkpoint at {ckpt_path} (train one with train.py, or set --out_dir)")
    checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    model = HRM(HRMConfig(**dict(checkpoint['model_args'], forward_dtype=dtype)))
    model.load_state_dict(checkpoint['model'])
    if halt_max_steps > 0:
        model.config.halt_max_steps = halt_max_steps  # ACT can think longer than it was trained to
    model.to(device).eval()
    return model, torch.compile(model) if compile else model


@torch.no_grad()
def solve(model, forward, grids):
    """Digits (N, 81) -> predicted digits after every segment, (segments, N, 81), and the halting
    probabilities (segments, N). `forward` is the model, or its compiled version."""
    tokens = torch.from_numpy(encode(grids).astype(np.int32))
    batch = dict(inputs=tokens.to(device), puzzle_identifiers=torch.zeros(len(grids), dtype=torch.int32, device=device))
    carry, boards, q_halt = model.initial_carry(batch), [], []
    while True:
        carry, _, _, outputs = forward(carry, batch)
        boards.append(decode(outputs['logits'].argmax(-1).cpu().numpy()))
        q_halt.append(torch.sigmoid(outputs['q_halt_logits']).cpu().numpy())
        if carry.halted.all():
            return np.stack(boards), np.stack(q_halt)


def main():
    model, forward = load_model()
    readable, errors = [], 0
    for name, question, answer in read_puzzles():
        try:
            grid = parse_puzzle(question)
            conflict = puzzle_conflicts(grid)
            if conflict:
                raise ValueError(conflict)
            readable.append((name, grid, None if answer is None else parse_puzzle(answer)))
        except ValueError as e:
            print(f"sample: {name}: {e}")
            errors += 1
    valid_count = scored = correct = 0
    for start in range(0, len(readable), batch_size):
        chunk = readable[start:start + batch_size]
        boards, q_halt = solve(model, forward, np.stack([grid for _, grid, _ in chunk]))
        for i, (name, grid, answer) in enumerate(chunk):
            final = boards[-1, i]
            problem = check_solution(grid, final)
            valid_count += problem is None
            matches = answer is not None and np.array_equal(final, answer)
            scored += answer is not None
            correct += matches
            if quiet:
                continue
            print(f"\n{name}\npuzzle:\n{format_grid(grid)}")
            if show_steps:
                for step in range(len(boards)):
                    print(f"after segment {step + 1} (Q says halt with p = {q_halt[step, i]:.3f}):\n"
                          f"{format_grid(boards[step, i])}")
            verdict = 'a valid solution' if problem is None else f'not a solution ({problem})'
            if answer is not None:
                verdict += ', matches the answer' if matches else ', differs from the answer'
            print(f"solution after {len(boards)} segments, {verdict}:\n{format_grid(final)}")
    print(f"\n{len(readable)} puzzle(s) through the model, {valid_count} answered with a valid Sudoku solution"
          + (f"; {errors} could not be read" if errors else ''))
    if scored:
        print(f"exact accuracy against the given answers: {correct}/{scored} = {correct / scored:.4f}")


if __name__ == '__main__':
    main()
