"""
Tests of prepare_sudoku.py: parsing and checking puzzles, the augmentation, the dataset layout (the original
HRM implementation's), bad-input errors, atomic writes and the download. CPU only, a few seconds:

$ python -m pytest -q test_sudoku_data.py
"""
import csv
import functools
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import prepare_sudoku as ps  # noqa: E402

SAMPLE_TRAIN = os.path.join(HERE, "assets", "sudoku", "train.csv")
SAMPLE_TEST = os.path.join(HERE, "assets", "sudoku", "test.csv")
SHARED_SUDOKU = os.path.join(HERE, "..", "shared", "data", "sudoku")  # only for an optional test
SCRIPT = os.path.join(HERE, "prepare_sudoku.py")
HEADER = ["source", "question", "answer", "rating"]


def read_rows(path, limit=None):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[:limit] if limit else rows


def write_csv(path, rows, header=HEADER):
    """rows: dicts, or lists written as they are (to make ragged rows)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row[c] for c in header] if isinstance(row, dict) else row)
    return str(path)


def quiet(*args, **kwargs):
    pass


def run_script(*args, cwd):
    return subprocess.run([sys.executable, SCRIPT, "--progress=False", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def digits(text):
    return ps.parse_puzzle(text)


@pytest.fixture(scope="module")
def puzzles():
    """(questions, answers) digit arrays of the first 40 shipped training puzzles."""
    rows = read_rows(SAMPLE_TRAIN, 40)
    return (np.stack([digits(r["question"]) for r in rows]).astype(np.uint8),
            np.stack([digits(r["answer"]) for r in rows]).astype(np.uint8))


# -----------------------------------------------------------------------------
# one puzzle: parsing, checking, printing

def test_parse_puzzle_reads_blanks_and_digits():
    row = read_rows(SAMPLE_TRAIN, 1)[0]
    grid = ps.parse_puzzle(row["question"])
    assert grid.shape == (81,) and grid.min() >= 0 and grid.max() <= 9
    assert np.array_equal(ps.parse_puzzle("  " + row["question"].replace(".", "0") + "\n"), grid)
    assert (grid == 0).sum() == row["question"].count(".")
    assert np.array_equal(ps.parse_puzzle(row["answer"], allow_blank=False), digits(row["answer"]))


@pytest.mark.parametrize("text, allow_blank, reason", [
    ("1" * 80, True, "expected 81 characters, got 80"),
    ("." * 40 + "x" + "." * 40, True, "character 'x' at row 5, col 5 is not 1-9, '.' or '0'"),
    ("1" * 80 + ".", False, "character '.' at row 9, col 9 is not a digit 1-9"),
    ("1" * 9 + "0" + "1" * 71, False, "character '0' at row 2, col 1 is not a digit 1-9"),
])
def test_parse_puzzle_errors(text, allow_blank, reason):
    with pytest.raises(ValueError) as e:
        ps.parse_puzzle(text, allow_blank=allow_blank)
    assert str(e.value) == reason


def test_puzzle_conflicts_names_row_column_and_box():
    grid = np.zeros(81, dtype=int)
    assert ps.puzzle_conflicts(grid) is None
    row = grid.copy(); row[[9, 17]] = 5
    assert ps.puzzle_conflicts(row) == "digit 5 appears twice in row 2"
    col = grid.copy(); col[[3, 75]] = 7
    assert ps.puzzle_conflicts(col) == "digit 7 appears twice in column 4"
    box = grid.copy(); box[[30, 50]] = 2  # (3, 3) and (5, 5): the middle box, different row and column
    assert ps.puzzle_conflicts(box) == "digit 2 appears twice in box 5 (rows 4-6, cols 4-6)"
    thrice = grid.copy(); thrice[[0, 1, 2]] = 1
    assert ps.puzzle_conflicts(thrice) == "digit 1 appears 3 times in row 1"


def test_check_solution(puzzles):
    question, answer = puzzles[0][0], puzzles[1][0]
    assert ps.check_solution(question, answer) is None
    assert ps.check_solution(question.reshape(9, 9), answer.reshape(9, 9)) is None
    assert ps.puzzle_conflicts(question) is None and ps.puzzle_conflicts(answer) is None
    blank = answer.copy(); blank[40] = 0
    assert ps.check_solution(question, blank) == "answer leaves row 5, col 5 blank"
    clue = int(np.flatnonzero(question)[0])
    d, e = answer[clue], answer[clue] % 9 + 1  # swap the labels d and e: a valid grid that breaks the clue
    relabelled = np.where(answer == d, e, np.where(answer == e, d, answer))
    assert ps.puzzle_conflicts(relabelled) is None
    assert ps.check_solution(question, relabelled).startswith(
        f"answer contradicts clue at row {clue // 9 + 1}, col {clue % 9 + 1} (clue {answer[clue]}, answer ")
    empty = np.zeros(81, dtype=np.uint8)
    swapped = answer.copy(); swapped[[0, 1]] = swapped[[1, 0]]  # row intact, columns 1 and 2 now repeat
    assert ps.check_solution(empty, swapped).startswith("answer is not a valid Sudoku: digit ")
    assert "column 1" in ps.check_solution(empty, swapped)


def test_format_grid():
    grid = digits("12345678." + "." * 72)
    text = ps.format_grid(grid)
    lines = text.split("\n")
    assert len(lines) == 11 and lines[3] == lines[7] == "------+-------+------"
    assert lines[0] == "1 2 3 | 4 5 6 | 7 8 ."
    assert lines[10] == ". . . | . . . | . . ."
    assert ps.format_grid(grid.reshape(9, 9)) == text


def test_encode_decode_round_trip():
    grid = np.arange(81) % 10
    tokens = ps.encode(grid)
    assert tokens.dtype == np.uint8 and tokens.min() == 1 and tokens.max() == 10
    assert np.array_equal(ps.decode(tokens), grid)
    assert ps.decode(np.array([0]))[0] == 0  # PAD reads as blank


def test_import_has_no_side_effects(tmp_path):
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import prepare_sudoku"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# augmentation

def test_transforms_are_cell_bijections_and_digit_permutations():
    cell_source, digit_map = ps.random_transforms(2000, np.random.default_rng(0))
    assert cell_source.shape == (2000, 81) and digit_map.shape == (2000, 10)
    assert (np.sort(cell_source, axis=1) == np.arange(81)).all()
    assert (digit_map[:, 0] == 0).all() and (np.sort(digit_map[:, 1:], axis=1) == np.arange(1, 10)).all()
    # The cells of a new row come from one old row (no transpose) or one old column (transpose), about half each.
    from_one_row = (cell_source[:, :9] // 9 == cell_source[:, :1] // 9).all(axis=1)
    from_one_col = (cell_source[:, :9] % 9 == cell_source[:, :1] % 9).all(axis=1)
    assert (from_one_row ^ from_one_col).all()
    assert 800 < from_one_col.sum() < 1200
    # Any old cell can land in the corner, uniformly (2000 / 81 = 25 expected each).
    corner = np.bincount(cell_source[:, 0], minlength=81)
    assert corner.min() >= 5 and corner.max() <= 55


def test_augmented_puzzles_are_valid(puzzles):
    questions, answers = puzzles
    num_aug = 50
    inputs, labels = ps.augment(questions, answers, num_aug, np.random.default_rng(1))
    assert inputs.shape == labels.shape == (40 * (1 + num_aug), 81) and inputs.dtype == labels.dtype == np.uint8
    groups_in, groups_lab = inputs.reshape(40, 1 + num_aug, 81), labels.reshape(40, 1 + num_aug, 81)
    assert np.array_equal(groups_in[:, 0], questions) and np.array_equal(groups_lab[:, 0], answers)
    clues = (questions > 0).sum(axis=1)
    assert ((groups_in > 0).sum(axis=2) == clues[:, None]).all()  # clue count unchanged
    assert ((inputs == 0) | (inputs == labels)).all()             # clues agree with the answer
    assert not ps._has_repeats(labels).any() and (labels > 0).all()  # answers are valid grids
    assert not ps._has_repeats(inputs).any()
    for i in range(0, len(inputs), 97):                           # and by the one-puzzle checker
        assert ps.check_solution(inputs[i], labels[i]) is None
    changed = (groups_in[:, 1:] != groups_in[:, :1]).any(axis=2)
    assert changed.mean() > 0.99


def test_augmentation_depends_on_the_seed_only(puzzles):
    questions, answers = puzzles
    a = ps.augment(questions, answers, 5, np.random.default_rng(7))
    b = ps.augment(questions, answers, 5, np.random.default_rng(7))
    c = ps.augment(questions, answers, 5, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_shuffle_sudoku_one_example(puzzles):
    question, answer = puzzles[0][3].reshape(9, 9).astype(np.int64), puzzles[1][3].reshape(9, 9).astype(np.int64)
    q1, a1 = ps.shuffle_sudoku(question, answer, np.random.default_rng(3))
    q2, a2 = ps.shuffle_sudoku(question, answer, np.random.default_rng(3))
    q3, _ = ps.shuffle_sudoku(question, answer, np.random.default_rng(4))
    assert q1.shape == (9, 9) and q1.dtype == question.dtype
    assert np.array_equal(q1, q2) and np.array_equal(a1, a2) and not np.array_equal(q1, q3)
    assert ps.check_solution(q1, a1) is None and (q1 > 0).sum() == (question > 0).sum()
    q_flat, a_flat = ps.shuffle_sudoku(question.reshape(81), answer.reshape(81))
    assert q_flat.shape == (81,) and ps.check_solution(q_flat, a_flat) is None


# -----------------------------------------------------------------------------
# the dataset files

NUM_AUG = 3


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    """20 training puzzles x (1 + 3) and 10 test puzzles, built from the shipped sample."""
    root = tmp_path_factory.mktemp("build")
    train_rows, test_rows = read_rows(SAMPLE_TRAIN, 20), read_rows(SAMPLE_TEST, 10)
    train_csv, test_csv = write_csv(root / "train.csv", train_rows), write_csv(root / "test.csv", test_rows)
    out = root / "data" / "sudoku-small"
    summary = ps.build_dataset(train_csv, test_csv, str(out), num_aug=NUM_AUG, seed=0, log=quiet)
    return out, train_rows, test_rows, summary


def load_split(path):
    with open(os.path.join(path, "dataset.json")) as f:
        meta = json.load(f)
    arrays = {k: np.load(os.path.join(path, f"all__{k}.npy"))
              for k in ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")}
    return meta, arrays


def test_output_layout_matches_the_original(small_build):
    out, train_rows, test_rows, summary = small_build
    assert sorted(os.listdir(out)) == ["identifiers.json", "test", "train"]
    with open(out / "identifiers.json") as f:
        assert json.load(f) == ["<blank>"]
    assert not [e for e in os.listdir(out.parent) if e.startswith(".")]  # no temporary directory left
    for split, groups, per_group in (("train", 20, 1 + NUM_AUG), ("test", 10, 1)):
        assert sorted(os.listdir(out / split)) == ["all__group_indices.npy", "all__inputs.npy", "all__labels.npy",
                                                   "all__puzzle_identifiers.npy", "all__puzzle_indices.npy",
                                                   "dataset.json"]
        meta, a = load_split(out / split)
        n = groups * per_group
        # The fields of the original's PuzzleDatasetMetadata, with the original's values for Sudoku.
        assert {k: meta[k] for k in ("pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len",
                                     "num_puzzle_identifiers", "total_groups", "mean_puzzle_examples", "sets")} == \
            dict(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=11, seq_len=81,
                 num_puzzle_identifiers=1, total_groups=groups, mean_puzzle_examples=1, sets=["all"])
        assert meta["num_puzzles"] == meta["num_examples"] == n
        assert meta["build"]["num_aug"] == (NUM_AUG if split == "train" else 0)
        assert meta["build"]["seed"] == 0 and meta["build"]["original_puzzles"] == groups
        assert a["inputs"].dtype == a["labels"].dtype == np.uint8
        assert a["inputs"].shape == a["labels"].shape == (n, 81)
        for k in ("puzzle_identifiers", "puzzle_indices", "group_indices"):
            assert a[k].dtype == np.int32 and a[k].ndim == 1
        assert np.array_equal(a["puzzle_identifiers"], np.zeros(n))
        assert np.array_equal(a["puzzle_indices"], np.arange(n + 1))  # one example per puzzle
        assert np.array_equal(a["group_indices"], np.arange(0, n + 1, per_group))
        assert a["inputs"].min() >= 1 and a["inputs"].max() <= 10      # never PAD
        assert a["labels"].min() >= 2 and a["labels"].max() <= 10      # always a digit
        assert summary[split] == {"groups": groups, "puzzles": n}


def test_output_decodes_to_the_csv(small_build):
    out, train_rows, test_rows, _ = small_build
    _, train = load_split(out / "train")
    _, test = load_split(out / "test")
    first_of_group = train["group_indices"][:-1]
    for arrays, rows, picks in ((train, train_rows, first_of_group), (test, test_rows, np.arange(10))):
        for row, i in zip(rows, picks, strict=True):
            assert np.array_equal(ps.decode(arrays["inputs"][i]), digits(row["question"]))
            assert np.array_equal(ps.decode(arrays["labels"][i]), digits(row["answer"]))
    for g in range(20):  # each augmentation solves itself and keeps its group's clue count
        lo, hi = train["group_indices"][g], train["group_indices"][g + 1]
        q, a = ps.decode(train["inputs"][lo:hi]), ps.decode(train["labels"][lo:hi])
        assert all(ps.check_solution(q[k], a[k]) is None for k in range(hi - lo))
        assert ((q > 0).sum(axis=1) == (q[0] > 0).sum()).all()


def test_subsample_min_difficulty_and_seed(tmp_path):
    rows = read_rows(SAMPLE_TRAIN, 60)
    train_csv = write_csv(tmp_path / "train.csv", rows)
    test_csv = write_csv(tmp_path / "test.csv", read_rows(SAMPLE_TEST, 30))
    build = functools.partial(ps.build_dataset, train_csv, test_csv, log=quiet)
    build(str(tmp_path / "a"), subsample_size=7, num_aug=2, seed=5)
    build(str(tmp_path / "b"), subsample_size=7, num_aug=2, seed=5)
    build(str(tmp_path / "c"), subsample_size=7, num_aug=2, seed=6)
    a, b, c = (load_split(tmp_path / x / "train")[1] for x in "abc")
    assert a["inputs"].shape == (21, 81) and len(a["group_indices"]) == 8
    assert np.array_equal(a["inputs"], b["inputs"]) and not np.array_equal(a["inputs"], c["inputs"])
    csv_questions = {row["question"].replace(".", "0") for row in rows}
    for i in a["group_indices"][:-1]:  # the originals are rows of the CSV
        assert "".join(map(str, ps.decode(a["inputs"][i]))) in csv_questions

    ratings = sorted(int(r["rating"]) for r in rows)
    cut = ratings[len(ratings) // 2]
    summary = build(str(tmp_path / "d"), subsample_size=0, num_aug=0, min_difficulty=cut)
    meta, d = load_split(tmp_path / "d" / "train")
    assert summary["train"]["groups"] == sum(r >= cut for r in ratings) == meta["total_groups"]
    assert meta["build"]["rows_below_min_difficulty"] == sum(r < cut for r in ratings)
    test_ratings = [int(r["rating"]) for r in read_rows(SAMPLE_TEST, 30)]
    assert load_split(tmp_path / "d" / "test")[0]["total_groups"] == sum(r >= cut for r in test_ratings)


def test_default_name():
    assert ps.default_name(1000, 1000) == "sudoku-extreme-1k-aug-1000"
    assert ps.default_name(None, 0) == ps.default_name(0, 0) == "sudoku-extreme-full"
    assert ps.default_name(250, 8, 20) == "sudoku-extreme-250-diff-20-aug-8"


def test_command_line_build(tmp_path):
    result = run_script("--subsample_size=5", "--num_aug=2", f"--out_dir={tmp_path / 'data'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data" / "sudoku-extreme-5-aug-2"
    assert "train: 5 puzzles -> 15 examples in 5 groups" in result.stdout
    assert "test: 1,000 puzzles" in result.stdout and str(out) in result.stdout
    meta, a = load_split(out / "train")  # the shipped sample was found beside the script, not in cwd
    assert meta["total_groups"] == 5 and a["inputs"].shape == (15, 81)
    assert meta["build"]["source"] == "local" and meta["build"]["csv"] == os.path.abspath(SAMPLE_TRAIN)


# -----------------------------------------------------------------------------
# bad input

def corrupt(row, kind):
    """A copy of a good row made bad in one way, and the reason expected in the error."""
    src, q, a, r = row["source"], row["question"], row["answer"], row["rating"]
    clue = next(i for i, ch in enumerate(q) if ch != ".")
    blanks = [i for i, ch in enumerate(q) if ch == "."]
    if kind == "too few fields":
        return [src, q, a], "expected 4 fields (source,question,answer,rating), got 3"
    if kind == "too many fields":
        return [src, q, a, r, "x"], "expected 4 fields (source,question,answer,rating), got 5"
    if kind == "short question":
        return [src, q[:80], a, r], "question: expected 81 characters, got 80"
    if kind == "long answer":
        return [src, q, a + "1", r], "answer: expected 81 characters, got 82"
    if kind == "bad question character":
        i = blanks[0]
        return [src, q[:i] + "x" + q[i + 1:], a, r], f"question: character 'x' at row {i // 9 + 1}, col {i % 9 + 1}"
    if kind == "non-ASCII question character":
        i = blanks[0]
        return [src, q[:i] + "é" + q[i + 1:], a, r], "question: character 'é' at row"
    if kind == "blank in answer":
        return [src, q, "." + a[1:], r], "answer: character '.' at row 1, col 1 is not a digit 1-9"
    if kind == "zero in answer":
        return [src, q, a[:80] + "0", r], "answer: character '0' at row 9, col 9 is not a digit 1-9"
    if kind == "conflicting clues":
        # A blank in the clue's row set to the clue's digit: the row now holds that digit twice.
        i = next(k for k in blanks if k // 9 == clue // 9)
        return ([src, q[:i] + q[clue] + q[i + 1:], a, r],
                f"question's clues conflict: digit {q[clue]} appears twice in row {clue // 9 + 1}")
    if kind == "answer contradicts clue":
        d, e = a[clue], "1" if a[clue] != "1" else "2"  # swap two digit labels: still a valid grid
        return [src, q, a.translate(str.maketrans(d + e, e + d)), r], \
            f"answer contradicts clue at row {clue // 9 + 1}, col {clue % 9 + 1} (clue {d}, answer {e})"
    if kind == "answer not a valid grid":
        # Swap two differing answer cells of one row that are both blank in the question: the row is still a
        # permutation, the clues still hold, but two columns now repeat a digit.
        i, j = next((i, j) for i in blanks for j in blanks if i < j and i // 9 == j // 9 and a[i] != a[j])
        bad = list(a); bad[i], bad[j] = bad[j], bad[i]
        return [src, q, "".join(bad), r], "answer is not a valid Sudoku: digit "
    if kind == "rating not an integer":
        return [src, q, a, "hard"], "rating 'hard' is not an integer"
    if kind == "fractional rating":
        return [src, q, a, "12.5"], "rating '12.5' is not an integer"
    raise KeyError(kind)


BAD_KINDS = ["too few fields", "too many fields", "short question", "long answer", "bad question character",
             "non-ASCII question character", "blank in answer", "zero in answer", "conflicting clues",
             "answer contradicts clue", "answer not a valid grid", "rating not an integer", "fractional rating"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_row_stops_with_file_line_and_reason(tmp_path, kind):
    rows = read_rows(SAMPLE_TRAIN, 6)
    bad, reason = corrupt(rows[2], kind)
    path = write_csv(tmp_path / "bad.csv", [rows[0], rows[1], bad, rows[3], rows[4]])  # bad one on line 4
    with pytest.raises(ps.SudokuDataError) as e:
        ps.read_sudoku_csv(path)
    assert str(e.value).startswith(f"{path} line 4: {reason}"), str(e.value)
    result = ps.read_sudoku_csv(path, skip_bad=True)
    assert len(result.questions) == 4 and sum(result.bad_counts.values()) == 1
    assert list(result.lines) == [2, 3, 5, 6]


def test_bad_row_on_the_command_line_is_one_clean_line(tmp_path):
    rows = read_rows(SAMPLE_TRAIN, 4)
    bad, reason = corrupt(rows[1], "answer contradicts clue")
    write_csv(tmp_path / "train.csv", [rows[0], bad, rows[2]])
    write_csv(tmp_path / "test.csv", rows[:2])
    result = run_script("--train_csv=train.csv", "--test_csv=test.csv", "--num_aug=1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"prepare_sudoku: train.csv line 3: {reason}\n"
    assert not os.path.exists(tmp_path / "data")  # nothing written, not even the parent directory
    result = run_script("--train_csv=train.csv", "--test_csv=test.csv", "--num_aug=1", "--skip_bad=True",
                        "--name=skipped", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train.csv: 3 rows, 1 bad row skipped" in result.stdout
    assert "skipped 1 x answer contradicts clues, e.g. train.csv line 3" in result.stdout
    meta, _ = load_split(tmp_path / "data" / "skipped" / "train")
    assert meta["total_groups"] == 2 and meta["build"]["rows_skipped"] == {"answer contradicts clues": 1}
    result = run_script("--train_csv=missing.csv", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == "prepare_sudoku: missing.csv: no such file\n"


def test_skip_bad_counts_every_reason(tmp_path):
    rows = read_rows(SAMPLE_TRAIN, len(BAD_KINDS) + 5)
    mixed = [rows[0]] + [corrupt(rows[i + 1], kind)[0] for i, kind in enumerate(BAD_KINDS)] + rows[-4:]
    path = write_csv(tmp_path / "mixed.csv", mixed)
    result = ps.read_sudoku_csv(path, skip_bad=True)
    assert len(result.questions) == 5 and result.rows_read == len(mixed)
    assert result.bad_counts == {
        "wrong number of fields": 2, "question has wrong length": 1, "answer has wrong length": 1,
        "bad character in question": 2, "bad character in answer": 2, "clues conflict": 1,
        "answer contradicts clues": 1, "answer not a valid Sudoku": 1, "rating not an integer": 2}
    assert result.bad_examples["clues conflict"].startswith(f"{path} line 11: question's clues conflict")
    with pytest.raises(ps.SudokuDataError, match=r"line 3: expected 4 fields"):
        ps.read_sudoku_csv(path)  # without skip_bad: the first bad line


def test_vectorized_check_agrees_with_the_per_row_check(tmp_path):
    """Random single-character corruptions: the rows the numpy check rejects are exactly those the per-row
    check finds a problem with, in chunks smaller than the file."""
    rng = np.random.default_rng(0)
    rows = read_rows(SAMPLE_TRAIN, 300)
    expected = 0
    for row in rows:
        field = "question" if rng.random() < 0.5 else "answer"
        if rng.random() < 0.5:
            i = rng.integers(81)
            row[field] = row[field][:i] + rng.choice(list("0123456789.x")) + row[field][i + 1:]
        expected += ps._row_problem(row["question"], row["answer"]) is not None
    path = write_csv(tmp_path / "random.csv", rows)
    result = ps.read_sudoku_csv(path, skip_bad=True, chunk_rows=64)
    assert sum(result.bad_counts.values()) == expected and len(result.questions) == 300 - expected
    assert 20 < expected < 200


@pytest.mark.parametrize("text, reason", [
    ("", "line 1: empty file"),
    ("source,question,rating\n", "line 1: the header has no answer column"),
])
def test_bad_header(tmp_path, text, reason):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ps.SudokuDataError, match=reason):
        ps.read_sudoku_csv(str(path))


def test_optional_columns_and_min_difficulty_needs_rating(tmp_path):
    rows = read_rows(SAMPLE_TRAIN, 3)
    path = write_csv(tmp_path / "qa.csv", [{"question": r["question"], "answer": r["answer"]} for r in rows],
                     header=["question", "answer"])
    result = ps.read_sudoku_csv(path)
    assert len(result.questions) == 3 and (result.ratings == -1).all()
    with pytest.raises(ps.SudokuDataError, match="min_difficulty needs a rating column"):
        ps.read_sudoku_csv(path, min_difficulty=5)


@pytest.mark.skipif(not os.path.isdir(SHARED_SUDOKU), reason="the project's shared data is not here")
def test_the_full_shared_files_are_valid():
    for name, count in (("train.csv", 43100), ("test.csv", 5000)):
        result = ps.read_sudoku_csv(os.path.join(SHARED_SUDOKU, name))
        assert len(result.questions) == count and not result.bad_counts


# -----------------------------------------------------------------------------
# atomic writes

def snapshot(path):
    """{relative file: sha256} of a directory tree."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def tiny_csvs(tmp_path):
    return (write_csv(tmp_path / "train.csv", read_rows(SAMPLE_TRAIN, 8)),
            write_csv(tmp_path / "test.csv", read_rows(SAMPLE_TEST, 4)))


def fail_on_test_split(original):
    def write_split(split_dir, *args, **kwargs):
        if os.path.basename(split_dir) == "test":  # the training split is already on disk by now
            raise RuntimeError("simulated failure")
        return original(split_dir, *args, **kwargs)
    return write_split


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_build_leaves_nothing(tmp_path, tiny_csvs, monkeypatch, error):
    out = tmp_path / "data" / "ds"
    if error is RuntimeError:
        monkeypatch.setattr(ps, "write_split", fail_on_test_split(ps.write_split))
    else:
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(ps, "augment", interrupted)
    with pytest.raises(error):
        ps.build_dataset(*tiny_csvs, str(out), num_aug=2, log=quiet)
    assert os.listdir(tmp_path / "data") == []  # no dataset, no temporary directory


def test_failed_rebuild_keeps_the_old_dataset(tmp_path, tiny_csvs, monkeypatch):
    out = tmp_path / "data" / "ds"
    ps.build_dataset(*tiny_csvs, str(out), num_aug=2, seed=0, log=quiet)
    before = snapshot(out)
    monkeypatch.setattr(ps, "write_split", fail_on_test_split(ps.write_split))
    with pytest.raises(RuntimeError, match="simulated failure"):
        ps.build_dataset(*tiny_csvs, str(out), num_aug=5, seed=1, log=quiet)
    assert snapshot(out) == before and os.listdir(tmp_path / "data") == ["ds"]


def test_rebuild_replaces_the_dataset_and_cleans_up(tmp_path, tiny_csvs):
    out = tmp_path / "data" / "ds"
    ps.build_dataset(*tiny_csvs, str(out), num_aug=2, seed=0, log=quiet)
    stale = tmp_path / "data" / ".ds.tmp-999999999"  # left by a build killed hard (no such process)
    stale.mkdir()
    (stale / "junk").write_text("x")
    ps.build_dataset(*tiny_csvs, str(out), num_aug=5, seed=1, log=quiet)
    assert os.listdir(tmp_path / "data") == ["ds"]
    meta, a = load_split(out / "train")
    assert meta["build"]["num_aug"] == 5 and a["inputs"].shape == (8 * 6, 81)


def test_sigterm_mid_build_leaves_nothing(tmp_path):
    """A real interruption: SIGTERM to the script while it augments 1M puzzles."""
    proc = subprocess.Popen([sys.executable, SCRIPT, "--progress=False", f"--out_dir={tmp_path / 'data'}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(tmp_path / "data") and any(e.startswith(".") for e in os.listdir(tmp_path / "data")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the build finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM
    assert os.listdir(tmp_path / "data") == []


# -----------------------------------------------------------------------------
# download

@pytest.fixture
def http_server():
    """A local HTTP server over the shipped sample directory; yields its base URL."""
    handler = functools.partial(QuietHandler, directory=os.path.dirname(SAMPLE_TRAIN))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download(tmp_path, http_server):
    dest = tmp_path / "dl" / "train.csv"
    ps.download(f"{http_server}/train.csv", str(dest), show_progress=False)
    assert dest.read_bytes() == open(SAMPLE_TRAIN, "rb").read()
    assert os.listdir(tmp_path / "dl") == ["train.csv"]  # no .part file left
    with pytest.raises(ps.DownloadError, match="HTTP 404"):
        ps.download(f"{http_server}/nope.csv", str(tmp_path / "dl" / "nope.csv"), show_progress=False)
    assert os.listdir(tmp_path / "dl") == ["train.csv"]


def test_download_offline_is_a_clear_error(tmp_path):
    import socket
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_script("--source=hf", f"--hf_url=http://127.0.0.1:{port}", "--download_dir=dl", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"prepare_sudoku: could not download http://127.0.0.1:{port}/train.csv")
    assert "offline?" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path / "dl") == []


def test_source_hf_end_to_end(tmp_path, http_server):
    args = ("--source=hf", f"--hf_url={http_server}", "--download_dir=dl", "--subsample_size=4", "--num_aug=1")
    result = run_script(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "dl")) == ["test.csv", "train.csv"]
    meta, _ = load_split(tmp_path / "data" / "sudoku-extreme-4-aug-1" / "train")
    assert meta["total_groups"] == 4 and meta["build"]["source"] == "hf"
    result = run_script(*args, cwd=tmp_path)  # a second run reuses the files
    assert result.returncode == 0 and "downloaded before" in result.stdout
