"""
Build a Sudoku dataset for train.py, in the layout of the original HRM code (see dataset.py).

$ python prepare_sudoku.py                                   # Sudoku-Extreme-1k recipe from the shipped sample
$ python prepare_sudoku.py --source=hf                       # the same from the real Sudoku-Extreme (large download)
$ python prepare_sudoku.py --train_csv=my_train.csv --test_csv=my_test.csv --subsample_size=0 --num_aug=8
$ python prepare_sudoku.py --source=hf --subsample_size=43100 --test_subsample_size=5000 --num_aug=24 \
      --name=sudoku-hard-aug-24                             # config/sudoku_fast.py's data from Sudoku-Extreme

The default is the HRM paper's Sudoku-Extreme-1k recipe: 1,000 training puzzles, each stored as itself plus
1,000 random symmetry transformations (a group of 1,001 puzzles, so a loader draws one per group per
epoch), and a test set that is not augmented. It goes to data/sudoku-extreme-1k-aug-1000/.

Input: CSVs with the columns source,question,answer,rating (Sudoku-Extreme's format; only question and
answer are required); question and answer are 81 characters, row by row, '.' (or '0') for a blank. Every
row is checked: lengths, characters, clues that repeat a digit in a row, column or box, and an answer that
is not a complete valid grid keeping every clue. A bad row stops the build with its file, line and reason,
or with --skip_bad=True is skipped and counted. Tokens: 0 = PAD, 1 = blank, digit d = d + 1.

The shipped sample assets/sudoku/{train,test}.csv holds 1,000 rows of each of the project's hard-Sudoku files
(43,100 training and 5,000 test puzzles from the tdoku project's public lists, in Sudoku-Extreme's format),
drawn with numpy.random.default_rng(0).choice(rows, 1000, replace=False) and kept in file order.
"""
import os
import time

import numpy as np
from tqdm import tqdm

from dataset import (BadRows, DataError, check_ranges, dataset_path, download_once, exit_cleanly, human_bytes,
                     line_blocks, metadata, puzzle_arrays, random_relabellings, rank, read_csv, resolve_input,
                     write_dataset)

# -----------------------------------------------------------------------------
# default config values: the HRM paper's Sudoku-Extreme-1k recipe, built from the shipped sample
_not_config = set(globals())
source = 'local'            # 'local': read train_csv and test_csv; 'hf': download Sudoku-Extreme's CSVs first
train_csv = 'assets/sudoku/train.csv'  # training puzzles (relative and not found here: looked up beside this script)
test_csv = 'assets/sudoku/test.csv'    # test puzzles, never augmented
out_dir = 'data'            # the dataset goes to out_dir/name
name = ''                   # '' = from the options: sudoku-extreme-1k-aug-1000 for the defaults
subsample_size = 1000       # random subset of the training puzzles; 0 = all of them
test_subsample_size = 0     # random subset of the test puzzles (Sudoku-Extreme's test set is 423k); 0 = all
min_difficulty = 0          # keep only puzzles (train and test) whose rating is at least this; 0 = all
num_aug = 1000              # random augmentations per training puzzle, stored besides the original
seed = 0                    # seeds the subset and the augmentations
skip_bad = False            # skip (and count) bad rows instead of stopping at the first one
download_dir = 'data/sudoku-extreme-csv'  # where --source=hf keeps train.csv and test.csv (reused if present)
hf_url = 'https://huggingface.co/datasets/sapientinc/sudoku-extreme/resolve/main'  # + /train.csv, /test.csv
progress = True             # tqdm progress bars
config_keys = [k for k in globals() if k not in _not_config and not k.startswith('_')]
# -----------------------------------------------------------------------------

SEQ_LEN, VOCAB_SIZE = 81, 11  # 81 cells; PAD, blank, digits 1..9
_CELL = np.arange(81).reshape(9, 9)
# the 27 units as cell indices: rows, columns, then boxes
UNITS = np.concatenate([_CELL, _CELL.T, _CELL.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)])
_DIGIT = np.full(256, -1, dtype=np.int16)  # character code -> digit, 0 = blank, -1 = not allowed
_DIGIT[[ord("."), ord("0")]] = 0
_DIGIT[ord("1"):ord("9") + 1] = np.arange(1, 10)


def encode(digits):
    """Digits 0..9 (0 = blank) -> the model's tokens, uint8: blank = 1, digit d = d + 1 (0 is PAD)."""
    return (np.asarray(digits) + 1).astype(np.uint8)


def decode(tokens):
    """Tokens -> digits 0..9, uint8; PAD (0) and blank (1) both read as blank."""
    return np.clip(np.asarray(tokens).astype(np.int16) - 1, 0, 9).astype(np.uint8)


def format_grid(grid):
    """A 9x9 board with box separators, '.' for blanks, as a multi-line string."""
    rows = [" | ".join(" ".join("." if v == 0 else str(v) for v in row[c:c + 3]) for c in (0, 3, 6))
            for row in np.asarray(grid).reshape(9, 9).tolist()]
    return "\n".join(rows[:3] + ["------+-------+------"] + rows[3:6] + ["------+-------+------"] + rows[6:])


def _cell(i):
    return f"row {i // 9 + 1}, col {i % 9 + 1}"


def _unit(u):
    kind, k = divmod(int(u), 9)
    if kind < 2:
        return f"{('row', 'column')[kind]} {k + 1}"
    return f"box {k + 1} (rows {3 * (k // 3) + 1}-{3 * (k // 3) + 3}, cols {3 * (k % 3) + 1}-{3 * (k % 3) + 3})"


# -----------------------------------------------------------------------------
# the checks, for many grids at once (a CSV) or one (sample.py)

def to_digits(texts, answer=False):
    """81-character strings -> (digits (N, 81) int16, problem per row or None): a wrong length or a
    character other than 1-9 (and, unless answer, '.' or '0' for a blank) is a problem."""
    fits = [len(t) == SEQ_LEN and t.isascii() for t in texts]
    codes = np.frombuffer(b"".join(t.encode() if ok else b"x" * SEQ_LEN for t, ok in zip(texts, fits)),
                          dtype=np.uint8).reshape(len(texts), SEQ_LEN)
    digits = _DIGIT[codes]
    allowed = "123456789" if answer else "123456789.0"
    problems = [None] * len(texts)
    for i in np.flatnonzero(((digits < 0) | (answer & (digits == 0))).any(1)):
        j = next((k for k, ch in enumerate(texts[i]) if ch not in allowed), None)
        problems[i] = f"expected 81 characters, got {len(texts[i])}" if len(texts[i]) != SEQ_LEN else \
            f"character {texts[i][j]!r} at {_cell(j)} is not " + ("a digit 1-9" if answer else "1-9, '.' or '0'")
    return np.maximum(digits, 0), problems


def repeated_digits(grids):
    """(N, 27): the digit that appears more than once in each row, column and box of grids (N, 81) of digits
    0..9, or 0 (blanks never count)."""
    units = np.sort(grids[:, UNITS], axis=-1)  # (N, 27, 9)
    repeat = (units[..., 1:] == units[..., :-1]) & (units[..., 1:] > 0)
    return np.where(repeat.any(-1), np.take_along_axis(units[..., 1:], repeat.argmax(-1)[..., None], -1)[..., 0], 0)


def _repeat_sentence(grid, repeats):
    u = int(np.flatnonzero(repeats)[0])
    times = int((grid[UNITS[u]] == repeats[u]).sum())
    return f"digit {repeats[u]} appears {'twice' if times == 2 else f'{times} times'} in {_unit(u)}"


def grid_problems(questions, answers=None):
    """For each row, (category, sentence) of the first thing wrong, or None: clues that repeat a digit in a
    row, column or box; with answers also a blank in the answer, an answer that contradicts a clue, or one
    that repeats a digit (81 digits 1-9 without repeats that keep the clues solve the puzzle)."""
    q_repeats = repeated_digits(questions)
    flagged = q_repeats.any(1)
    if answers is not None:
        a_repeats = repeated_digits(answers)
        contradicted = (questions != 0) & (questions != answers)
        flagged |= (answers == 0).any(1) | contradicted.any(1) | a_repeats.any(1)
    problems = [None] * len(questions)
    for i in np.flatnonzero(flagged):  # sentences only for the bad rows
        if q_repeats[i].any():
            problems[i] = ("clues conflict",
                           f"question's clues conflict: {_repeat_sentence(questions[i], q_repeats[i])}")
        elif (answers[i] == 0).any():
            problems[i] = ("answer incomplete", f"answer leaves {_cell(int(np.argmin(answers[i])))} blank")
        elif contradicted[i].any():
            j = int(np.argmax(contradicted[i]))
            problems[i] = ("answer contradicts clues", f"answer contradicts clue at {_cell(j)} "
                           f"(clue {questions[i, j]}, answer {answers[i, j]})")
        else:
            problems[i] = ("answer not a valid Sudoku",
                           f"answer is not a valid Sudoku: {_repeat_sentence(answers[i], a_repeats[i])}")
    return problems


def text_puzzles(lines):
    """The puzzles of a text file's lines, for sample.py: one of 81 characters a line, or grids of 9 rows of
    9 with blank lines between them, spaces, '|' and separator lines of '-' and '+' ignored (format_grid's
    output reads back). Returns (line number, text, problem or None) for each, text for parse_puzzle."""
    puzzles, shapes = [], "(a puzzle is 9 rows of 9 characters, or one line of 81)"
    for block in line_blocks(lines, blank=lambda text: not text.strip()):
        rows = [(n, row.replace(" ", "").replace("|", "")) for n, row in block if not set(row) <= set("-+ ")]
        if all(len(row.strip()) <= 21 for _, row in block):  # a grid's rows, drawn with spaces and '|'
            wrong = next(((n, row) for n, row in rows if len(row) != 9), None)  # named by its own line
            puzzles.append((wrong[0], "", f"a grid row of {len(wrong[1])} characters {shapes}") if wrong else
                           (block[0][0], "".join(row for _, row in rows),
                            None if len(rows) == 9 else f"a grid of {len(rows)} rows {shapes}"))
        else:
            puzzles += [(number, row, None) for number, row in block]
    return puzzles


def parse_puzzle(text, answer=False):
    """One puzzle (or, with answer, a solution) as digits (81,); ValueError saying what is wrong."""
    digits, (problem,) = to_digits([text.strip()], answer)
    if problem is None and not answer:
        problem = (grid_problems(digits) + [None])[0]
        problem = problem and problem[1]
    if problem:
        raise ValueError(problem)
    return digits[0].astype(np.uint8)


def read_sudoku_csv(path, min_difficulty=0, bad=None, need_answers=True, chunk_rows=1 << 18):
    """(questions, answers, ratings, lines) of a CSV's good rows rated at least min_difficulty: (N, 81) uint8
    digit arrays (answers None when not need_answers and the file has no answer column), (N,) ratings (-1
    without a rating column or in an empty cell) and the line of each. Bad rows go to `bad` (a BadRows). Rows
    are checked in chunks with numpy, so the 3.8M rows of Sudoku-Extreme's train.csv take seconds."""
    bad = bad or BadRows(skip_bad=False)
    kept, chunk = [], []

    def check(chunk):
        with_answers = bool(chunk) and "answer" in chunk[0][1]
        questions, q_problems = to_digits([row["question"] for _, row in chunk])
        answers, a_problems = to_digits([row["answer"] for _, row in chunk], answer=True) if with_answers else \
            (None, [None] * len(chunk))
        ratings = np.full(len(chunk), -1, np.int64)
        problems = [("bad question", f"question: {q}") if q else ("bad answer", f"answer: {a}") if a else None
                    for q, a in zip(q_problems, a_problems)]
        for i, (_, row) in enumerate(chunk):
            if problems[i] is None and row.get("rating", "").strip():
                try:
                    ratings[i] = int(row["rating"])
                except ValueError:
                    problems[i] = ("rating not an integer", f"rating {row['rating']!r} is not an integer")
        problems = [p or q for p, q in zip(problems, grid_problems(questions, answers))]
        for (line, _), problem in zip(chunk, problems):
            if problem:
                bad.add(path, line, *problem)
        good = np.array([p is None for p in problems], bool) & ((ratings >= min_difficulty) | (min_difficulty == 0))
        lines = np.array([line for line, _ in chunk], np.int64)
        kept.append((questions[good].astype(np.uint8), None if answers is None else answers[good].astype(np.uint8),
                     ratings[good], lines[good]))

    required = ("question", "answer") if need_answers else ("question",)
    for line, row in read_csv(path, required, ("answer", "rating"), bad):
        if min_difficulty and "rating" not in row:
            raise DataError(f"{path} line 1: min_difficulty needs a rating column, the header has none")
        chunk.append((line, row))
        if len(chunk) == chunk_rows:
            check(chunk)
            chunk = []
    if chunk or not kept:
        check(chunk)
    questions, answers, ratings, lines = (None if parts[0] is None else np.concatenate(parts) for parts in zip(*kept))
    if len(questions) == 0:
        raise DataError(f"{path}: no usable puzzles")
    return questions, answers, ratings, lines


# -----------------------------------------------------------------------------
# augmentation: random symmetries of Sudoku, for many puzzles at once

def _random_line_perms(count, rng):
    """count permutations of 9 rows (or columns) that keep Sudoku's structure: the 3 bands shuffled, then the
    3 rows within each band. (count, 9); entry i is the old line of new line i."""
    bands = rng.permuted(np.tile(np.arange(3), (count, 1)), axis=1)
    within = rng.permuted(np.tile(np.arange(3), (count, 3, 1)), axis=2)
    return (bands[:, :, None] * 3 + within).reshape(count, 9)


def random_transforms(count, rng):
    """count random validity-preserving transformations as (cell_source (count, 81): new cell k takes old cell
    cell_source[:, k]; digit_map (count, 10): a permutation of 1..9, blank kept at 0). Each is: transpose with
    probability 1/2, rows permuted by band and within band, columns by stack and within stack, digits
    relabelled: the same distribution as the original's shuffle_sudoku."""
    digit_map = random_relabellings(count, rng)
    transpose = rng.random(count) < 0.5
    rows = _random_line_perms(count, rng)[:, :, None]  # old row of new row i
    cols = _random_line_perms(count, rng)[:, None, :]  # old col of new col j
    cell_source = np.where(transpose[:, None, None], cols * 9 + rows, rows * 9 + cols)
    return cell_source.reshape(count, SEQ_LEN), digit_map


def apply_transforms(grids, cell_source, digit_map):
    """Transform grids (count, 81) of digits, one transform each (flat-index gathers: fast for small rows)."""
    row = np.arange(len(grids))[:, None]
    moved = np.ascontiguousarray(grids).reshape(-1)[cell_source + row * SEQ_LEN]
    return digit_map.reshape(-1)[moved + row * 10]


def undo_transforms(grids, cell_source, digit_map):
    """apply_transforms inverted: grids (count, 81) of transformed puzzles (a model's answers to them) back
    in their puzzles' own frame."""
    row = np.arange(len(grids))[:, None]
    digit_back = np.empty_like(digit_map)
    digit_back[row, digit_map] = np.arange(10, dtype=digit_map.dtype)  # digit_back[d'] = d where digit_map[d] = d'
    back = np.empty_like(grids)
    back[row, cell_source] = digit_back[row, grids]  # new cell k came from old cell cell_source[k]
    return back


def vote(solve, questions, votes):
    """Every puzzle (N, 81 digits) solved as itself and under votes - 1 random symmetries, the answers mapped
    back and pooled (dataset.rank): the grid most copies give wins, a tie going to the highest mean Q-halt
    probability; the model's own vote, no Sudoku rule consulted. solve(tokens (N * votes, 81)) -> (predicted
    tokens (N * votes, 81), Q-halt probabilities (N * votes,)). Returns the voted grids (N, 81), the puzzles'
    own answers (copy 0, the puzzle itself) and the winners' votes (N,)."""
    n = len(questions)
    # a fixed draw: the same list of puzzles is voted over the same copies in every run and by every script
    cell_source, digit_map = random_transforms(n * votes, np.random.default_rng(0))
    cell_source[::votes], digit_map[::votes] = np.arange(SEQ_LEN), np.arange(10)
    tokens, q_halt = solve(encode(apply_transforms(np.repeat(questions, votes, axis=0), cell_source, digit_map)))
    answers = undo_transforms(decode(tokens), cell_source, digit_map).reshape(n, votes, SEQ_LEN)
    q_halt = np.asarray(q_halt, np.float64).reshape(n, votes)
    winners = [rank(list(zip(answers[i], q_halt[i])))[0] for i in range(n)]
    return np.stack([grid for grid, _, _ in winners]), answers[:, 0], np.array([v for _, v, _ in winners])


def evaluate_votes(data, solve, votes, num_examples):
    """train.py's final evaluation with eval_votes: the exact accuracy of the answers voted over `votes`
    symmetric copies of each of the first num_examples test examples (vote), and the share of the copies
    that gave the winning answer (1: every copy agreed)."""
    voted, _, agreed = vote(solve, decode(data.inputs[:num_examples]), votes)
    return dict(voted_exact_accuracy=float((voted == decode(data.labels[:num_examples])).all(1).mean()),
                vote_agreement=float(agreed.mean() / votes))


def augment(questions, answers, num_aug, rng, show_progress=False):
    """Every puzzle followed by num_aug random transformations of it (puzzle and answer alike): (N * (1 +
    num_aug), 81) arrays, puzzle p's copies at rows p * (1 + num_aug) + 0..num_aug, the original first."""
    n, copies = len(questions), 1 + num_aug
    inputs, labels = np.empty((n, copies, SEQ_LEN), np.uint8), np.empty((n, copies, SEQ_LEN), np.uint8)
    inputs[:, 0], labels[:, 0] = questions, answers
    chunk = max(1, 65536 // max(num_aug, 1))  # a fixed chunk size: the output depends on the seed alone
    with tqdm(total=n * num_aug, unit="aug", desc="augmenting", disable=not show_progress or not num_aug) as bar:
        for start in range(0, n if num_aug else 0, chunk):
            stop = min(n, start + chunk)
            cell_source, digit_map = random_transforms((stop - start) * num_aug, rng)
            for out, grids in ((inputs, questions), (labels, answers)):
                out[start:stop, 1:] = apply_transforms(np.repeat(grids[start:stop], num_aug, axis=0), cell_source,
                                                       digit_map).reshape(stop - start, num_aug, SEQ_LEN)
            bar.update(len(cell_source))
    return inputs.reshape(n * copies, SEQ_LEN), labels.reshape(n * copies, SEQ_LEN)


# -----------------------------------------------------------------------------
# the build

def default_name(subsample_size, num_aug, min_difficulty, test_subsample_size=0):
    """The original's naming: sudoku-extreme-1k-aug-1000, sudoku-extreme-full, ...; a test subset adds -test-N"""
    size = "full" if not subsample_size else \
        f"{subsample_size // 1000}k" if subsample_size % 1000 == 0 else str(subsample_size)
    return (f"sudoku-extreme-{size}" + (f"-diff-{min_difficulty}" if min_difficulty else "")
            + (f"-aug-{num_aug}" if num_aug else "") + (f"-test-{test_subsample_size}" if test_subsample_size else ""))


def build_dataset(train_path, test_path, out_path, subsample_size=0, min_difficulty=0, num_aug=0, seed=0,
                  skip_bad=False, show_progress=False, log=print, test_subsample_size=0):
    """Read and check both CSVs, subsample both and augment the training puzzles, write the dataset atomically
    (dataset.write_dataset). Returns the bytes written. Raises DataError for bad input."""
    counts = dict(num_aug=num_aug, subsample_size=subsample_size, test_subsample_size=test_subsample_size,
                  min_difficulty=min_difficulty, seed=seed)
    check_ranges(counts, [(key, value >= 0, ">= 0") for key, value in counts.items()])
    splits = {}
    for split, path in (("train", train_path), ("test", test_path)):
        # each split draws from its own generator: the test subset is the same whatever the training options
        rng = np.random.default_rng(seed if split == "train" else [seed, 1])
        bad = BadRows(skip_bad)
        questions, answers, _, _ = read_sudoku_csv(path, min_difficulty, bad)
        log(f"{path}: {len(questions):,} puzzles" + (f" rated >= {min_difficulty}" if min_difficulty else ""))
        for line in bad.report():
            log("  " + line)
        size, copies = (subsample_size, num_aug) if split == "train" else (test_subsample_size, 0)
        if 0 < size < len(questions):
            chosen = np.sort(rng.choice(len(questions), size=size, replace=False))
            questions, answers = questions[chosen], answers[chosen]
        elif size > len(questions):
            log(f"{split}: {size:,} puzzles asked for, {len(questions):,} in {path}: all of them are used")
            size = 0
        inputs, labels = augment(questions, answers, copies, rng, show_progress)
        arrays = puzzle_arrays(encode(inputs), encode(labels), examples_per_puzzle=1, puzzles_per_group=1 + copies)
        build = dict(script="prepare_sudoku.py", csv=os.path.abspath(path), seed=seed, num_aug=copies,
                     subsample_size=size, min_difficulty=min_difficulty, rows_skipped=bad.counts)
        splits[split] = (arrays, metadata(arrays, "sudoku", VOCAB_SIZE, build=build))
        log(f"{split}: {len(questions):,} puzzles -> {len(inputs):,} examples in {len(questions):,} groups")
    return write_dataset(out_path, splits, identifiers=["<blank>"])


def main():
    if source not in ("local", "hf"):
        raise DataError(f"source must be 'local' or 'hf', got {source!r}")
    started = time.time()
    paths = [resolve_input(train_csv), resolve_input(test_csv)]
    if source == "hf":
        paths = download_once(hf_url, download_dir, ("train.csv", "test.csv"), show_progress=progress,
                              by_hand="--source=local --train_csv=<train.csv> --test_csv=<test.csv>")
    out_path = dataset_path(out_dir, name or default_name(subsample_size, num_aug, min_difficulty, test_subsample_size))
    size = build_dataset(*paths, out_path, subsample_size, min_difficulty, num_aug, seed, skip_bad, progress,
                         test_subsample_size=test_subsample_size)
    print(f"wrote {out_path} ({human_bytes(size)}) in {time.time() - started:.1f} s")


if __name__ == "__main__":
    exit_cleanly("prepare_sudoku.py")  # bad input: one line, not a traceback; SIGTERM cleans up as Ctrl-C does
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    main()
