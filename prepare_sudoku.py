"""
Build a Sudoku dataset for train.py in the layout of the original HRM implementation.

$ python prepare_sudoku.py                                   # Sudoku-Extreme-1k recipe from the shipped sample
$ python prepare_sudoku.py --source=hf                       # the same from the real Sudoku-Extreme (large download)
$ python prepare_sudoku.py --train_csv=my_train.csv --test_csv=my_test.csv --subsample_size=0 --num_aug=8

The default is the HRM paper's Sudoku-Extreme-1k recipe: 1,000 training puzzles, each stored as itself plus
1,000 random symmetry transformations (a group of 1,001 puzzles, so a loader can draw one per group per
epoch), and a test set that is not augmented. It goes to data/sudoku-extreme-1k-aug-1000/.

Input: CSVs with the columns source,question,answer,rating (Sudoku-Extreme's format); question and answer are
81 characters, row by row, '.' (or '0') for a blank. Every row is checked; a bad one stops the build with its
file, line and reason, or with --skip_bad=True is skipped and counted.

Output: data/<name>/identifiers.json and data/<name>/{train,test}/ with dataset.json and the arrays
all__inputs.npy, all__labels.npy (uint8 (N, 81), token = digit + 1: 0 = PAD, 1 = blank, 2..10 = digits 1..9),
all__puzzle_identifiers.npy (int32, one per puzzle, all 0), all__puzzle_indices.npy (int32, N + 1 offsets of
each puzzle's examples) and all__group_indices.npy (int32, offsets of each group's puzzles). Datasets built by
this script and by the original's dataset/build_sudoku_dataset.py load in both code bases. The build goes to a
temporary directory beside the target and is renamed into place only when complete.

The shipped sample assets/sudoku/{train,test}.csv holds 1,000 rows of each of the project's hard-Sudoku files
(43,100 training and 5,000 test puzzles from the tdoku project's public lists, in Sudoku-Extreme's format),
drawn with numpy.random.default_rng(0).choice(rows, 1000, replace=False) and kept in file order.

The functions above the script part (parse_puzzle, puzzle_conflicts, check_solution, format_grid, encode,
decode, shuffle_sudoku, read_sudoku_csv, build_dataset, ...) can be imported without side effects.
"""
import array
import csv
import hashlib
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

# -----------------------------------------------------------------------------
# default config values: the HRM paper's Sudoku-Extreme-1k recipe, built from the shipped sample
source = 'local'            # 'local': read train_csv and test_csv; 'hf': download Sudoku-Extreme's CSVs first
train_csv = 'assets/sudoku/train.csv'  # training puzzles (relative and not found here: looked up beside this script)
test_csv = 'assets/sudoku/test.csv'    # test puzzles, never augmented
out_dir = 'data'            # the dataset goes to out_dir/name
name = ''                   # '' = from the options: sudoku-extreme-1k-aug-1000 for the defaults
subsample_size = 1000       # random subset of the training puzzles; 0 = all of them
min_difficulty = None       # if set, keep only puzzles (train and test) whose rating is at least this
num_aug = 1000              # random augmentations per training puzzle, stored besides the original
seed = 0                    # seeds the subset and the augmentations
skip_bad = False            # skip (and count) bad rows instead of stopping at the first one
download_dir = 'data/sudoku-extreme-csv'  # where --source=hf keeps train.csv and test.csv (reused if present)
hf_url = 'https://huggingface.co/datasets/sapientinc/sudoku-extreme/resolve/main'  # + /train.csv, /test.csv
progress = True             # tqdm progress bars
# -----------------------------------------------------------------------------

SEQ_LEN = 81
VOCAB_SIZE = 11             # PAD + blank + digits 1..9
PAD_ID = 0                  # a token; digit d is stored as token d + 1, so a blank (0) is token 1
BLANK_DIGIT = 0
CSV_COLUMNS = ('source', 'question', 'answer', 'rating')
DEFAULT_NAME_PREFIX = 'sudoku-extreme'

# The 27 units of a Sudoku, as cell indices into the flat 81-cell board: rows, then columns, then boxes.
_CELL = np.arange(81).reshape(9, 9)
UNITS = np.concatenate([
    _CELL,
    _CELL.T,
    _CELL.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9),  # box b = (band b // 3, stack b % 3)
])


def _unit_name(unit):
    """Human name of unit 0..26 (rows, columns, boxes), 1-based like the messages' rows and cols."""
    kind, k = divmod(int(unit), 9)
    if kind == 0:
        return f"row {k + 1}"
    if kind == 1:
        return f"column {k + 1}"
    r, c = 3 * (k // 3), 3 * (k % 3)
    return f"box {k + 1} (rows {r + 1}-{r + 3}, cols {c + 1}-{c + 3})"


def _cell_name(index):
    return f"row {index // 9 + 1}, col {index % 9 + 1}"


# -----------------------------------------------------------------------------
# one puzzle at a time: parsing, checking, printing (sample.py uses these for user input)

def parse_puzzle(text, allow_blank=True):
    """81 characters, row by row, '.' or '0' for a blank (surrounding whitespace ignored) -> int array (81,)
    of digits 0..9, 0 = blank. Raises ValueError saying what is wrong. allow_blank=False reads an answer."""
    text = text.strip()
    if len(text) != SEQ_LEN:
        raise ValueError(f"expected 81 characters, got {len(text)}")
    allowed = "123456789" + (".0" if allow_blank else "")
    for i, ch in enumerate(text):
        if ch not in allowed:
            expected = "1-9, '.' or '0'" if allow_blank else "a digit 1-9"
            raise ValueError(f"character {ch!r} at {_cell_name(i)} is not {expected}")
    return np.array([0 if ch in ".0" else ord(ch) - ord("0") for ch in text], dtype=np.int64)


def puzzle_conflicts(grid):
    """None if no digit repeats within a row, column or box (blanks ignored), else a sentence naming the
    first repeat, e.g. 'digit 5 appears twice in row 3'."""
    grid = np.asarray(grid).reshape(SEQ_LEN)
    for unit, cells in enumerate(UNITS):
        values = grid[cells]
        counts = np.bincount(values[values > 0], minlength=10)
        if counts.max(initial=0) > 1:
            digit = int(counts.argmax())
            times = "twice" if counts[digit] == 2 else f"{counts[digit]} times"
            return f"digit {digit} appears {times} in {_unit_name(unit)}"
    return None


def _solution_problem(question, answer):
    """(category, sentence) for the first thing wrong with answer as a solution of question, or None."""
    question = np.asarray(question).reshape(SEQ_LEN)
    answer = np.asarray(answer).reshape(SEQ_LEN)
    out_of_range = np.flatnonzero((answer < 0) | (answer > 9))
    if out_of_range.size:
        i = out_of_range[0]
        return "answer not a valid Sudoku", f"answer has {answer[i]} at {_cell_name(i)}, not a digit"
    blank = np.flatnonzero(answer == BLANK_DIGIT)
    if blank.size:
        return "answer incomplete", f"answer leaves {_cell_name(blank[0])} blank"
    contradicted = np.flatnonzero((question != BLANK_DIGIT) & (question != answer))
    if contradicted.size:
        i = contradicted[0]
        return ("answer contradicts clues",
                f"answer contradicts clue at {_cell_name(i)} (clue {question[i]}, answer {answer[i]})")
    # 81 digits 1..9 with no repeat in any row, column or box: each unit holds each digit once.
    conflict = puzzle_conflicts(answer)
    if conflict:
        return "answer not a valid Sudoku", f"answer is not a valid Sudoku: {conflict}"
    return None


def check_solution(question, answer):
    """None if answer (81 digits 0..9, 0 = blank) is a complete valid Sudoku grid that keeps every clue of
    question, else a sentence saying what is wrong (a blank, a contradicted clue or a repeated digit)."""
    problem = _solution_problem(question, answer)
    return None if problem is None else problem[1]


def format_grid(grid):
    """A 9x9 board with box separators, '.' for blanks, as a multi-line string."""
    grid = np.asarray(grid).reshape(9, 9)
    lines = []
    for r in range(9):
        if r in (3, 6):
            lines.append("------+-------+------")
        cells = ["." if v == BLANK_DIGIT else str(int(v)) for v in grid[r]]
        lines.append(" | ".join(" ".join(cells[c:c + 3]) for c in (0, 3, 6)))
    return "\n".join(lines)


def encode(digits):
    """Digits 0..9 (0 = blank) -> the model's tokens, uint8: blank = 1, digit d = d + 1 (0 is PAD)."""
    return (np.asarray(digits) + 1).astype(np.uint8)


def decode(tokens):
    """Tokens -> digits 0..9, uint8; PAD (0) and blank (1) both read as blank."""
    return np.clip(np.asarray(tokens).astype(np.int16) - 1, 0, 9).astype(np.uint8)


# -----------------------------------------------------------------------------
# augmentation: random symmetries of Sudoku, generated for many puzzles at once

def _random_line_perms(count, rng):
    """count permutations of the 9 rows (or columns) that keep Sudoku's structure: the 3 bands shuffled,
    then the 3 rows within each band shuffled. (count, 9) int32; entry i is the old line of new line i."""
    bands = rng.permuted(np.tile(np.arange(3, dtype=np.int32), (count, 1)), axis=1)      # (count, 3)
    within = rng.permuted(np.tile(np.arange(3, dtype=np.int32), (count, 3, 1)), axis=2)  # (count, 3, 3)
    return (bands[:, :, None] * 3 + within).reshape(count, 9)


def random_transforms(count, rng):
    """count random validity-preserving Sudoku transformations, as (cell_source, digit_map):
    cell_source (count, 81) int32, new cell k takes the old cell cell_source[:, k] (a permutation of 0..80);
    digit_map (count, 10) uint8, a permutation of 1..9 with 0 (blank) kept at 0.
    Each is: transpose with probability 1/2, then the rows permuted by band and within band, the columns by
    stack and within stack, then the digits relabelled; the same distribution as the original's
    shuffle_sudoku."""
    digit_map = np.zeros((count, 10), dtype=np.uint8)
    digit_map[:, 1:] = rng.permuted(np.tile(np.arange(1, 10, dtype=np.uint8), (count, 1)), axis=1)
    transpose = rng.random(count) < 0.5
    row_perm = _random_line_perms(count, rng)[:, :, None]   # (count, 9, 1): old row of new row i
    col_perm = _random_line_perms(count, rng)[:, None, :]   # (count, 1, 9): old col of new col j
    # new[i, j] = old'[row_perm[i], col_perm[j]] where old' is old, or old transposed (old'[r, c] = old[c, r])
    cell_source = np.where(transpose[:, None, None], col_perm * 9 + row_perm, row_perm * 9 + col_perm)
    return cell_source.reshape(count, SEQ_LEN), digit_map


def apply_transforms(grids, cell_source, digit_map):
    """Transform grids (count, 81) of digits 0..9 by random_transforms' output, one transform per grid."""
    grids = np.ascontiguousarray(grids)
    row = np.arange(len(grids), dtype=np.int64)[:, None]
    # Gathers through flat indices: faster than take_along_axis for these small rows.
    moved = grids.reshape(-1)[cell_source + row * SEQ_LEN]
    return digit_map.reshape(-1)[moved + row * 10]


def shuffle_sudoku(board, solution, rng=None):
    """One random symmetry applied identically to a puzzle and its solution (digits 0..9, shape (81,) or
    (9, 9); the result has the same shape). A solved board stays a solved board, the clue count and the
    puzzle's difficulty for any solver that has no preferred orientation stay the same."""
    rng = np.random.default_rng() if rng is None else rng
    board, solution = np.asarray(board), np.asarray(solution)
    cell_source, digit_map = random_transforms(1, rng)
    both = np.stack([board.reshape(SEQ_LEN), solution.reshape(SEQ_LEN)])
    out = apply_transforms(both, np.repeat(cell_source, 2, axis=0), np.repeat(digit_map, 2, axis=0))
    return out[0].reshape(board.shape).astype(board.dtype), out[1].reshape(solution.shape).astype(solution.dtype)


def augment(questions, answers, num_aug, rng, show_progress=False):
    """Every puzzle followed by num_aug random transformations of it (puzzle and answer alike):
    (N * (1 + num_aug), 81) uint8 digit arrays, puzzle p's copies at rows p * (1 + num_aug) + 0..num_aug,
    the untransformed one first (the original's order)."""
    n = len(questions)
    copies = 1 + num_aug
    inputs = np.empty((n, copies, SEQ_LEN), dtype=np.uint8)
    labels = np.empty((n, copies, SEQ_LEN), dtype=np.uint8)
    inputs[:, 0], labels[:, 0] = questions, answers
    if num_aug > 0:
        # A fixed number of transforms per chunk (not a machine-dependent one) keeps the output a function
        # of the seed alone, while bounding the index arrays to a few tens of MB.
        chunk = max(1, 65536 // num_aug)
        with tqdm(total=n * num_aug, unit="aug", desc="augmenting", disable=not show_progress) as bar:
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                count = (stop - start) * num_aug
                cell_source, digit_map = random_transforms(count, rng)
                q = np.repeat(questions[start:stop], num_aug, axis=0)
                a = np.repeat(answers[start:stop], num_aug, axis=0)
                shape = (stop - start, num_aug, SEQ_LEN)
                inputs[start:stop, 1:] = apply_transforms(q, cell_source, digit_map).reshape(shape)
                labels[start:stop, 1:] = apply_transforms(a, cell_source, digit_map).reshape(shape)
                bar.update(count)
    return inputs.reshape(n * copies, SEQ_LEN), labels.reshape(n * copies, SEQ_LEN)


# -----------------------------------------------------------------------------
# reading and checking CSVs

class SudokuDataError(ValueError):
    """A bad input file or row; str() is 'path line N: reason'."""


@dataclass
class SudokuRows:
    """The good rows of a CSV (after the min_difficulty filter), as digit arrays, and what was dropped."""
    questions: np.ndarray            # (N, 81) uint8, 0 = blank
    answers: np.ndarray              # (N, 81) uint8, 1..9
    ratings: np.ndarray              # (N,) int64, -1 where the file has no rating column
    lines: np.ndarray                # (N,) int64, the CSV line each row ends on (the header is line 1)
    rows_read: int = 0               # data rows in the file
    below_min_difficulty: int = 0    # good rows dropped by min_difficulty
    bad_counts: dict = field(default_factory=dict)    # reason -> rows skipped (skip_bad)
    bad_examples: dict = field(default_factory=dict)  # reason -> 'path line N: sentence' of its first row


# Byte -> digit for questions ('.' and '0' are blanks) and answers; -1 marks a character not allowed.
_QUESTION_DIGIT = np.full(256, -1, dtype=np.int16)
_QUESTION_DIGIT[[ord("."), ord("0")]] = 0
_QUESTION_DIGIT[ord("1"):ord("9") + 1] = np.arange(1, 10)
_ANSWER_DIGIT = np.full(256, -1, dtype=np.int16)
_ANSWER_DIGIT[ord("1"):ord("9") + 1] = np.arange(1, 10)
_UNIT_CELLS = UNITS.reshape(-1)  # (243,)


def _has_repeats(digits):
    """(N,) bool: some row, column or box of digits (N, 81) repeats a nonzero digit. A unit's distinct
    digits have distinct bits, so their sum equals their bitwise OR unless a digit repeats."""
    bits = np.where(digits > 0, np.left_shift(1, digits.astype(np.int32)), 0)
    per_unit = bits[:, _UNIT_CELLS].reshape(len(digits), 27, 9)
    return (per_unit.sum(axis=2) != np.bitwise_or.reduce(per_unit, axis=2)).any(axis=1)


def _row_problem(question_text, answer_text):
    """(category, sentence) for the first thing wrong with one CSV row's question and answer, or None."""
    try:
        question = parse_puzzle(question_text)
    except ValueError as e:
        return "bad character in question", f"question: {e}"
    try:
        answer = parse_puzzle(answer_text, allow_blank=False)
    except ValueError as e:
        return "bad character in answer", f"answer: {e}"
    conflict = puzzle_conflicts(question)
    if conflict:
        return "clues conflict", f"question's clues conflict: {conflict}"
    return _solution_problem(question, answer)


def _find_problems(q_bytes, a_bytes):
    """Vectorized check of many rows whose fields are 81 ASCII characters: (questions, answers) as digit
    arrays and the indices of the rows with any problem (their reasons come from _row_problem)."""
    questions = _QUESTION_DIGIT[q_bytes]
    answers = _ANSWER_DIGIT[a_bytes]
    bad = (questions < 0).any(axis=1) | (answers < 0).any(axis=1)
    questions, answers = np.maximum(questions, 0).astype(np.uint8), np.maximum(answers, 0).astype(np.uint8)
    bad |= _has_repeats(questions) | _has_repeats(answers)
    bad |= ((questions != 0) & (questions != answers)).any(axis=1)
    # An answer of 81 digits 1..9 without repeats is a valid grid, and one that keeps the clues solves them.
    return questions, answers, np.flatnonzero(bad)


def read_sudoku_csv(path, min_difficulty=None, skip_bad=False, chunk_rows=262144):
    """Read and check a CSV in Sudoku-Extreme's format (source,question,answer,rating; question and answer
    are 81 characters; only question and answer are required). Returns SudokuRows. A bad row raises
    SudokuDataError('path line N: reason'), or with skip_bad is counted per reason and dropped. Rows are
    checked in chunks with numpy, so the 3.8M rows of Sudoku-Extreme's train.csv take seconds."""
    if not os.path.isfile(path):
        raise SudokuDataError(f"{path}: no such file")
    out = SudokuRows(questions=np.empty((0, SEQ_LEN), np.uint8), answers=np.empty((0, SEQ_LEN), np.uint8),
                     ratings=np.empty(0, np.int64), lines=np.empty(0, np.int64))
    kept = {"questions": [], "answers": [], "ratings": [], "lines": []}

    def reject(line, category, sentence):
        message = f"{path} line {line}: {sentence}"
        if not skip_bad:
            raise SudokuDataError(message)
        out.bad_counts[category] = out.bad_counts.get(category, 0) + 1
        out.bad_examples.setdefault(category, message)

    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise SudokuDataError(f"{path} line 1: empty file, expected a header {','.join(CSV_COLUMNS)}")
            header = [h.strip() for h in header]
            missing = [c for c in ("question", "answer") if c not in header]
            if missing:
                raise SudokuDataError(f"{path} line 1: the header has no {' or '.join(missing)} column "
                                      f"(got {','.join(header)}; expected {','.join(CSV_COLUMNS)})")
            q_col, a_col = header.index("question"), header.index("answer")
            r_col = header.index("rating") if "rating" in header else None
            if min_difficulty is not None and r_col is None:
                raise SudokuDataError(f"{path} line 1: min_difficulty needs a rating column, the header has none")

            # Rows whose fields pass the cheap per-row checks wait here, as raw bytes, for the numpy checks.
            q_buf, a_buf, ratings, lines = bytearray(), bytearray(), array.array("q"), array.array("q")
            early = []  # (line, category, sentence) found per row in this chunk, reported in line order

            def flush():
                n = len(lines)
                q_bytes = np.frombuffer(bytes(q_buf), dtype=np.uint8).reshape(n, SEQ_LEN)
                a_bytes = np.frombuffer(bytes(a_buf), dtype=np.uint8).reshape(n, SEQ_LEN)
                line_arr = np.array(lines, dtype=np.int64)
                questions, answers, bad = _find_problems(q_bytes, a_bytes)
                problems = list(early)
                for i in bad:
                    reason = _row_problem(q_bytes[i].tobytes().decode(), a_bytes[i].tobytes().decode())
                    assert reason is not None, f"{path} line {line_arr[i]}: flagged but no reason found"
                    problems.append((int(line_arr[i]), *reason))
                for problem in sorted(problems):  # the first bad line in the file is the one reported
                    reject(*problem)
                good = np.ones(n, dtype=bool)
                good[bad] = False
                rating_arr = np.array(ratings, dtype=np.int64)
                if min_difficulty is not None:
                    easy = good & (rating_arr < min_difficulty)
                    out.below_min_difficulty += int(easy.sum())
                    good &= ~easy
                for key, values in (("questions", questions), ("answers", answers),
                                    ("ratings", rating_arr), ("lines", line_arr)):
                    kept[key].append(values[good])
                q_buf.clear()
                a_buf.clear()
                early.clear()
                del ratings[:], lines[:]

            width = len(header)
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line, e.g. a trailing one
                out.rows_read += 1
                if len(row) != width:
                    early.append((line, "wrong number of fields",
                                  f"expected {width} fields ({','.join(header)}), got {len(row)}"))
                    continue
                q, a = row[q_col].strip(), row[a_col].strip()
                if len(q) != SEQ_LEN:
                    early.append((line, "question has wrong length", f"question: expected 81 characters, got {len(q)}"))
                    continue
                if len(a) != SEQ_LEN:
                    early.append((line, "answer has wrong length", f"answer: expected 81 characters, got {len(a)}"))
                    continue
                if not (q.isascii() and a.isascii()):  # one byte per character from here on
                    reason = _row_problem(q, a)
                    assert reason is not None  # a non-ASCII character is never a digit or a blank
                    early.append((line, *reason))
                    continue
                rating = -1
                if r_col is not None:
                    try:
                        rating = int(row[r_col])
                    except ValueError:
                        early.append((line, "rating not an integer", f"rating {row[r_col]!r} is not an integer"))
                        continue
                q_buf += q.encode()
                a_buf += a.encode()
                ratings.append(rating)
                lines.append(line)
                if len(lines) + len(early) >= chunk_rows:
                    flush()
            flush()
        except csv.Error as e:
            raise SudokuDataError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise SudokuDataError(f"{path} line {reader.line_num + 1}: not UTF-8 text ({e.reason})") from None

    for key, parts in kept.items():
        if parts:
            setattr(out, key, np.concatenate(parts))
    return out


# -----------------------------------------------------------------------------
# downloading Sudoku-Extreme

class DownloadError(RuntimeError):
    pass


def download(url, dest, show_progress=True, timeout=60):
    """Fetch url to dest over HTTPS with a progress bar: into dest.part-<pid>, renamed at the end, so dest
    is either absent or complete. Raises DownloadError with a one-line reason (offline, HTTP error, ...)."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = f"{dest}.part-{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=os.path.basename(dest), disable=not show_progress) as bar:
                while True:
                    block = response.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
        size = os.path.getsize(part)
        if total is not None and size != total:
            raise DownloadError(f"download of {url} stopped after {size} of {total} bytes")
        os.replace(part, dest)
    except BaseException as e:
        if os.path.exists(part):
            os.remove(part)
        if isinstance(e, urllib.error.HTTPError):
            raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
        if isinstance(e, (urllib.error.URLError, OSError)):
            reason = getattr(e, "reason", None) or e
            raise DownloadError(f"could not download {url} ({reason}): offline? Fetch train.csv and test.csv "
                                f"by hand and pass --train_csv=... --test_csv=...") from None
        raise


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# writing the dataset

def default_name(subsample_size=None, num_aug=0, min_difficulty=None):
    """The original's naming: sudoku-extreme-1k-aug-1000, sudoku-extreme-full, ..."""
    if not subsample_size:
        size = "full"
    elif subsample_size % 1000 == 0:
        size = f"{subsample_size // 1000}k"
    else:
        size = str(subsample_size)
    name = f"{DEFAULT_NAME_PREFIX}-{size}"
    if min_difficulty is not None:
        name += f"-diff-{min_difficulty}"
    if num_aug:
        name += f"-aug-{num_aug}"
    return name


def dataset_arrays(inputs, labels, examples_per_group):
    """The original's five arrays for examples laid out group by group (one example per puzzle, every
    group the same size): inputs/labels as tokens, and the puzzle and group offsets."""
    n = len(inputs)
    assert n % examples_per_group == 0
    return {
        "inputs": encode(inputs),
        "labels": encode(labels),
        "puzzle_identifiers": np.zeros(n, dtype=np.int32),             # no per-puzzle embedding for Sudoku
        "puzzle_indices": np.arange(n + 1, dtype=np.int32),             # puzzle i = example i
        "group_indices": np.arange(0, n + 1, examples_per_group, dtype=np.int32),
    }


def write_split(split_dir, arrays, extra_metadata):
    """dataset.json (the original's PuzzleDatasetMetadata fields, then ours) and the all__*.npy arrays."""
    os.makedirs(split_dir)
    num_puzzles = len(arrays["puzzle_identifiers"])
    metadata = {
        "pad_id": PAD_ID,
        "ignore_label_id": PAD_ID,      # PAD labels are not scored (the original maps them to -100)
        "blank_identifier_id": 0,
        "vocab_size": VOCAB_SIZE,
        "seq_len": SEQ_LEN,
        "num_puzzle_identifiers": 1,
        "total_groups": len(arrays["group_indices"]) - 1,
        "mean_puzzle_examples": len(arrays["inputs"]) / max(num_puzzles, 1),
        "sets": ["all"],
        "num_puzzles": num_puzzles,
        "num_examples": len(arrays["inputs"]),
        **extra_metadata,
    }
    for key, value in arrays.items():
        np.save(os.path.join(split_dir, f"all__{key}.npy"), value)
    with open(os.path.join(split_dir, "dataset.json"), "w") as f:
        json.dump(metadata, f, indent=2)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_temp_dirs(parent, name):
    """Temporary directories of earlier builds of this dataset whose process is gone (killed hard)."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.tmp-(\d+)$")
    for entry in os.listdir(parent):
        match = pattern.match(entry)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _directory_bytes(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def build_dataset(train_csv, test_csv, out_path, subsample_size=None, min_difficulty=None, num_aug=0, seed=0,
                  skip_bad=False, show_progress=False, log=print, extra_build_info=None):
    """Read and check both CSVs, subsample and augment the training puzzles, write the dataset to out_path
    atomically (a temporary directory beside it, renamed into place when complete; an existing dataset is
    replaced only then). Returns a summary dict. Raises SudokuDataError for bad input."""
    if num_aug < 0:
        raise SudokuDataError(f"num_aug must be >= 0, got {num_aug}")
    if subsample_size is not None and subsample_size < 0:
        raise SudokuDataError(f"subsample_size must be >= 0 (0 = all), got {subsample_size}")
    started = time.time()
    out_path = os.path.normpath(out_path)
    parent, name = os.path.split(os.path.abspath(out_path))
    rng = np.random.default_rng(seed)
    splits = {}
    for split, path in (("train", train_csv), ("test", test_csv)):
        rows = read_sudoku_csv(path, min_difficulty=min_difficulty, skip_bad=skip_bad)
        report = f"{path}: {rows.rows_read:,} rows"
        if rows.below_min_difficulty:
            report += f", {rows.below_min_difficulty:,} below min_difficulty {min_difficulty}"
        if rows.bad_counts:
            bad = sum(rows.bad_counts.values())
            report += f", {bad:,} bad {'row' if bad == 1 else 'rows'} skipped"
        log(report)
        for category, count in sorted(rows.bad_counts.items()):
            log(f"  skipped {count:,} x {category}, e.g. {rows.bad_examples[category]}")
        if len(rows.questions) == 0:
            raise SudokuDataError(f"{path}: no usable puzzles")
        splits[split] = rows

    train = splits["train"]
    available = len(train.questions)
    chosen = np.arange(available)
    if subsample_size and subsample_size < available:
        chosen = np.sort(rng.choice(available, size=subsample_size, replace=False))
    elif subsample_size and subsample_size > available:
        log(f"subsample_size {subsample_size:,} > {available:,} training puzzles: using all of them")

    build_info = {
        "script": "prepare_sudoku.py",
        "seed": seed,
        "subsample_size": subsample_size or None,
        "min_difficulty": min_difficulty,
        "skip_bad": skip_bad,
        **(extra_build_info or {}),
    }
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temp_dirs(parent, name)
    tmp_path = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_path, ignore_errors=True)
    os.makedirs(tmp_path)
    try:
        summary = {}
        for split, rows, picked, augmentations in (("train", train, chosen, num_aug),
                                                   ("test", splits["test"], None, 0)):
            questions, answers = rows.questions, rows.answers
            if picked is not None:
                questions, answers = questions[picked], answers[picked]
            inputs, labels = augment(questions, answers, augmentations, rng, show_progress=show_progress)
            arrays = dataset_arrays(inputs, labels, 1 + augmentations)
            source_path = train_csv if split == "train" else test_csv
            info = dict(build_info, csv=os.path.abspath(source_path), csv_sha256=sha256_of(source_path),
                        num_aug=augmentations, rows_read=rows.rows_read,
                        rows_below_min_difficulty=rows.below_min_difficulty,
                        rows_skipped=dict(sorted(rows.bad_counts.items())), original_puzzles=len(questions))
            write_split(os.path.join(tmp_path, split), arrays, {"build": info})
            summary[split] = {"groups": len(questions), "puzzles": len(inputs)}
        with open(os.path.join(tmp_path, "identifiers.json"), "w") as f:
            json.dump(["<blank>"], f)
        _move_into_place(tmp_path, out_path)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise
    summary.update(path=out_path, bytes=_directory_bytes(out_path), seconds=time.time() - started)
    return summary


def _move_into_place(tmp_path, out_path):
    """Rename the finished tmp_path to out_path. An existing out_path is moved aside first and deleted only
    after the new one is in place (and moved back if that rename fails)."""
    if not os.path.exists(out_path):
        os.replace(tmp_path, out_path)
        return
    parent, name = os.path.split(os.path.abspath(out_path))
    old_path = os.path.join(parent, f".{name}.old-{os.getpid()}")
    shutil.rmtree(old_path, ignore_errors=True)
    os.replace(out_path, old_path)
    try:
        os.replace(tmp_path, out_path)
    except BaseException:
        os.replace(old_path, out_path)
        raise
    shutil.rmtree(old_path, ignore_errors=True)


def _resolve_input(path):
    """A relative path that does not exist from here is looked up beside this script (the shipped sample)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    return beside if os.path.exists(beside) else path


def _human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def main():
    if source not in ("local", "hf"):
        raise SystemExit(f"prepare_sudoku: source must be 'local' or 'hf', got {source!r}")
    if min_difficulty is not None and type(min_difficulty) is not int:
        raise SystemExit(f"prepare_sudoku: min_difficulty must be an integer, got {min_difficulty!r}")
    if source == "hf":
        paths = []
        for split in ("train", "test"):
            dest = os.path.join(download_dir, f"{split}.csv")
            if os.path.exists(dest):
                print(f"using {dest} (downloaded before; delete it to fetch again)")
            else:
                print(f"downloading {hf_url}/{split}.csv to {dest}")
                try:
                    download(f"{hf_url}/{split}.csv", dest, show_progress=progress)
                except DownloadError as e:
                    raise SystemExit(f"prepare_sudoku: {e}")
            paths.append(dest)
        train_path, test_path = paths
    else:
        train_path, test_path = _resolve_input(train_csv), _resolve_input(test_csv)
    dataset_name = name or default_name(subsample_size, num_aug, min_difficulty)
    out_path = os.path.join(out_dir, dataset_name)
    try:
        summary = build_dataset(train_path, test_path, out_path, subsample_size=subsample_size,
                                min_difficulty=min_difficulty, num_aug=num_aug, seed=seed, skip_bad=skip_bad,
                                show_progress=progress, extra_build_info={"source": source})
    except SudokuDataError as e:
        raise SystemExit(f"prepare_sudoku: {e}")
    for split in ("train", "test"):
        s = summary[split]
        print(f"{split}: {s['groups']:,} puzzles -> {s['puzzles']:,} examples in {s['groups']:,} groups")
    print(f"wrote {summary['path']} ({summary['bytes']:,} bytes, {_human_bytes(summary['bytes'])}) "
          f"in {summary['seconds']:.1f} s")


if __name__ == "__main__":
    import signal
    # A SIGTERM becomes SystemExit, so the temporary directory is cleaned up as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    main()
