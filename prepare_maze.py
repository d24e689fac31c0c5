"""
Build a Maze-Hard dataset for train.py, in the layout of the original HRM code (see dataset.py).

$ python prepare_maze.py                      # 1,000 + 1,000 generated 30x30 mazes, offline, in seconds
$ python prepare_maze.py --size=15            # 15x15 mazes for quick experiments (config/maze_small.py)
$ python prepare_maze.py --source=hf          # the original's Maze-Hard (sapientinc/maze-30x30-hard-1k)
$ python prepare_maze.py --source=local --train_csv=train.csv --test_csv=test.csv --aug=True

A maze is a square grid, row by row: '#' wall, ' ' open, 'S' start, 'G' goal; moves are 4-connected. Its
answer is the same grid with the cells of a shortest S-to-G path strictly between S and G marked 'o' (S and
G stay 'S' and 'G': the original's build_maze_dataset.py maps question and answer through one character
table, "# SGo", and trains on every cell of the answer). CSVs have the original's columns source,question,answer,
rating (only question and answer are required; spaces in them are open cells, never trimmed). Tokens:
PAD 0, '#' 1, ' ' 2, 'S' 3, 'G' 4, 'o' 5; seq_len = size * size (900); one puzzle identifier. With
--aug=True every training maze is stored under the 8 symmetries of the square, a group of 8 puzzles (the
original's option, off by default as there; the test set is never augmented).

Every row is checked: its length, its characters, exactly one S and one G, G reachable from S, and an
answer that keeps every cell of the maze, marks only open cells, and whose 'o' cells join S to G in as
many steps as the shortest path takes (any shortest path: the original's mazes may have several). A bad
row stops the build with its file, line and reason, or with --skip_bad=True is skipped and counted. A
training maze that is a test maze, as it is or turned or mirrored, is left out with a warning (training
on it would train on the test's answer; if every one is, the build stops).

The generator (the default source) makes mazes like Maze-Hard's, deterministic from --seed:
1. A perfect maze: rooms at the even (row, col) cells, joined by a randomised depth-first search (long
   winding corridors, every room reachable along exactly one route).
2. Loops and open areas: 5% of the walls left between two rooms are knocked out, which makes alternative
   routes, and 10% of the wall pillars at odd (row, col), which joins corridors into open areas.
3. S is drawn among the cells at least 80% as far from a random cell as the farthest (the ends of long
   routes), G among the cells more than min_path_length steps from S (110 at 30x30, as Maze-Hard; scaled
   by area for other sizes: 28 at 15x15).
4. One shortest path is drawn, and every cell that branches off it onto another shortest path is walled.
   Any other shortest path would have to leave the chosen one at some cell onto such a branch, so the
   shortest path becomes unique, and its length does not change (walls only lengthen other routes). The
   answer is well defined: exact accuracy and path validity agree.
5. A maze is kept only if it still has an open 2x2 area and a loop around walls (more independent loops
   than open 2x2 areas, each of which is one), else it is drawn again.
About 3 mazes are drawn per one kept at 30x30; 2,000 take under 10 s.
"""
import csv
import math
import os
import time
from functools import lru_cache

import numpy as np
from tqdm import tqdm

from dataset import (BadRows, DataError, check_folder, check_ranges, dataset_path, dihedral, download_once,
                     exit_cleanly, human_bytes, is_csv_header, line_blocks, metadata, puzzle_arrays, read_csv,
                     resolve_input, write_atomically, write_dataset)

# -----------------------------------------------------------------------------
# default config values: 1,000 + 1,000 generated 30x30 mazes, as Maze-Hard's sizes
_not_config = set(globals())
source = 'generate'         # 'generate': new mazes, offline; 'local': train_csv and test_csv; 'hf': Maze-Hard's CSVs
train_csv = ''              # with source='local': training mazes in the original's CSV layout
test_csv = ''               # with source='local': test mazes, never augmented
out_dir = 'data'            # the dataset goes to out_dir/name
name = ''                   # '' = from the options: maze-30x30-gen-1k, maze-30x30-hard-1k (CSVs), ...
size = 30                   # the grid's side: mazes are size x size (CSV rows have size * size characters)
num_train = 1000            # generated training mazes
num_test = 1000             # generated test mazes
min_path_length = 0         # generated: S to G takes more than this many steps; 0 = 110 * size**2 / 900
subsample_size = 0          # CSV: a random subset of the training mazes; 0 = all of them
aug = False                 # also store the 8 dihedral transforms of every training maze
seed = 0                    # seeds the generator and the subset
skip_bad = False            # skip (and count) bad rows instead of stopping at the first one
write_csv = ''              # a directory: also write the mazes there as train.csv and test.csv (the original's layout)
download_dir = 'data/maze-30x30-hard-1k-csv'  # where --source=hf keeps train.csv and test.csv (reused if present)
hf_url = 'https://huggingface.co/datasets/sapientinc/maze-30x30-hard-1k/resolve/main'  # + /train.csv, /test.csv
progress = True             # tqdm progress bars
config_keys = [k for k in globals() if k not in _not_config and not k.startswith('_')]
# -----------------------------------------------------------------------------

CHARSET = "# SGo"  # token = 1 + position here, as the original's table; 0 is PAD
PAD, WALL, OPEN, START, GOAL, PATH = range(6)
VOCAB_SIZE = 6
HARD_LENGTH = 110  # Maze-Hard: at 30x30, every shortest path takes more than this many steps
LOOP_RATE, OPEN_RATE = 0.05, 0.1  # the generator's share of walls between rooms, and of pillars, removed
_TOKEN = np.zeros(256, np.uint8)
_TOKEN[[ord(ch) for ch in CHARSET]] = np.arange(1, 6)


def to_text(tokens):
    """Tokens -> the maze's characters, PAD as '?'."""
    return "".join(("?" + CHARSET)[t] for t in np.asarray(tokens).tolist())


def cell(i, side):
    return f"row {i // side + 1}, col {i % side + 1}"


def _name(token):
    return "PAD" if token == PAD else repr(CHARSET[token - 1])


def to_tokens(text, side, allowed, size_option=""):
    """One maze's text -> (tokens (side*side,) uint8, None), or (None, what is wrong): its length, or a
    character not in `allowed`. A length that is another square grid's says which, and with size_option (the
    setting that chose side) how to read it: the side is never inferred, it sets the model's shape."""
    if len(text) != side * side:
        other, got = math.isqrt(len(text)), f"got {len(text)}"
        if other >= 2 and other * other == len(text):
            got += f" (a {other}x{other} maze" + (f": pass {size_option}={other})" if size_option else ")")
        return None, f"expected {side * side} characters (a {side}x{side} maze), {got}"
    j = next((k for k, ch in enumerate(text) if ch not in allowed), None)
    if j is not None:
        return None, f"character {text[j]!r} at {cell(j, side)} is not one of {allowed!r}"
    return _TOKEN[np.frombuffer(text.encode(), np.uint8)], None


# -----------------------------------------------------------------------------
# shortest paths: the row checker and the evaluation's scorer are one function

@lru_cache(maxsize=8)
def neighbours(side):
    """The 4-connected neighbours of every cell of a side x side grid, row-major."""
    return [[j for j, inside in ((i - side, i >= side), (i + side, i < side * (side - 1)), (i - 1, i % side > 0),
                                 (i + 1, i % side < side - 1)) if inside] for i in range(side * side)]


def distances(passable, start, side):
    """Breadth-first search, layer by layer: the steps from cell start to every cell through passable cells
    (a list of bools), -1 where none leads. Plain Python: ~0.3 ms on 900 cells."""
    nbrs, dist = neighbours(side), [-1] * (side * side)
    dist[start], layer, step = 0, [start], 0
    while layer:
        step += 1
        next_layer = []
        for u in layer:
            for v in nbrs[u]:
                if passable[v] and dist[v] < 0:
                    dist[v] = step
                    next_layer.append(v)
        layer = next_layer
    return dist


def maze_problem(question, answer, side):
    """The first thing wrong with one maze, and unless answer is None with its answer (token arrays of
    side*side), as (category, sentence); None if nothing is. A valid answer keeps every cell of the maze
    but marks open cells 'o', and its 'o' cells with S and G hold a path from S to G; with exactly
    (shortest length - 1) 'o' cells that path is a shortest one and nothing else is marked. So another
    shortest path is valid, a detour, a gap, a wall crossed, or garbage (PAD, several S) is not."""
    starts, goals = np.flatnonzero(question == START), np.flatnonzero(question == GOAL)
    if len(starts) != 1 or len(goals) != 1:
        return "not one S and one G", f"question has {len(starts)} S and {len(goals)} G, expected one of each"
    s, g = int(starts[0]), int(goals[0])
    length = distances((question != WALL).tolist(), s, side)[g]
    if length < 0:
        return "G unreachable", f"question: G at {cell(g, side)} cannot be reached from S at {cell(s, side)}"
    if answer is None:
        return None
    changed = np.flatnonzero((answer != question) & ~((question == OPEN) & (answer == PATH)))
    if len(changed):
        j = int(changed[0])
        return "answer changes the maze", (f"answer changes the maze at {cell(j, side)} ({_name(question[j])} "
                                           f"becomes {_name(answer[j])})")
    if distances(((answer == PATH) | (question == START) | (question == GOAL)).tolist(), s, side)[g] < 0:
        return "answer path not connected", "answer's path cells ('o') do not join S to G"
    marked = int((answer == PATH).sum())
    if marked != length - 1:
        return "answer path not shortest", (f"answer marks {marked} path cells, a shortest path has {length - 1} "
                                            f"(S to G in {length} steps)")
    return None


def wrong_cells(question, prediction, side):
    """(side*side,) bool: the cells a prediction gets wrong whichever shortest path it means: a cell of the
    maze changed, or a path cell that lies on no shortest S-to-G path."""
    changed = (prediction != question) & ~((question == OPEN) & (prediction == PATH))
    passable = (question != WALL).tolist()
    s, g = int(np.flatnonzero(question == START)[0]), int(np.flatnonzero(question == GOAL)[0])
    from_s, from_g = np.array(distances(passable, s, side)), np.array(distances(passable, g, side))
    on_shortest = (from_s >= 0) & (from_s + from_g == from_s[g])
    return changed | ((prediction == PATH) & ~on_shortest)


_COLOURS = {WALL: "\033[90m", START: "\033[1;33m", GOAL: "\033[1;33m", PATH: "\033[32m", PAD: "\033[1;31m"}


def render(question, prediction, side, colour=False):
    """The maze and, beside it, the prediction: its path drawn in ('o'), its wrong cells (wrong_cells) as
    'x'; lines of text, with ANSI colours if colour (wrong cells red, the path green)."""
    wrong = wrong_cells(question, prediction, side)
    cells = question.tolist() + np.where(wrong, PAD, np.where(prediction == PATH, PATH, question)).tolist()
    chars = ["x" if t == PAD else CHARSET[t - 1] for t in cells]
    if colour:
        chars = [f"{_COLOURS[t]}{ch}\033[0m" if t in _COLOURS else ch for t, ch in zip(cells, chars)]
    n = side * side
    return "\n".join("".join(chars[r * side:(r + 1) * side]) + "   " + "".join(chars[n + r * side:n + (r + 1) * side])
                     for r in range(side))


def evaluate(data, predictions, q_halt, out_dir):
    """train.py's hook after each evaluation: the share of the predictions that are a valid shortest path
    (another shortest path than the label's counts), and where the others fail. Exact accuracy is among
    train.py's own metrics; other_shortest_path is the part of the valid ones it counts as wrong, and
    path_cells_found (the label's path cells predicted 'o') grows long before whole paths come out right."""
    side = math.isqrt(data.meta["seq_len"])
    questions, labels = data.inputs[:len(predictions)], data.labels[:len(predictions)]
    categories = [(maze_problem(q, p, side) or (None,))[0] for q, p in zip(questions, predictions)]
    valid = np.array([c is None for c in categories])
    on_path = labels == PATH
    return dict(valid_shortest_path=float(valid.mean()),
                other_shortest_path=float((valid & (predictions != labels).any(1)).mean()),
                path_connected=float(np.mean([c in (None, "answer path not shortest") for c in categories])),
                maze_unchanged=float(np.mean([c != "answer changes the maze" for c in categories])),
                path_cells_found=float((on_path & (predictions == PATH)).sum() / max(on_path.sum(), 1)))


# -----------------------------------------------------------------------------
# reading mazes: the original's CSVs, and for sample.py a maze, a text file or a CSV

def read_maze_csv(path, side, bad=None, need_answers=True, size_option=""):
    """(questions, answers, lines) of a CSV's good rows: (N, side*side) uint8 tokens (answers None when not
    need_answers and the file has no answer column) and the line of each. Bad rows go to `bad` (a BadRows);
    a question of another size names size_option (see to_tokens)."""
    bad = bad or BadRows(skip_bad=False)
    questions, answers, lines = [], [], []
    for line, row in read_csv(path, ("question", "answer") if need_answers else ("question",), ("answer",), bad,
                              strip=False):
        question, problem = to_tokens(row["question"], side, CHARSET[:4], size_option)
        if problem:
            bad.add(path, line, "bad question", f"question: {problem}")
            continue
        answer = None
        if "answer" in row:
            answer, problem = to_tokens(row["answer"], side, CHARSET)
            if problem:
                bad.add(path, line, "bad answer", f"answer: {problem}")
                continue
        problem = maze_problem(question, answer, side)
        if problem:
            bad.add(path, line, *problem)
            continue
        questions.append(question)
        answers.append(answer)
        lines.append(line)
    if not questions:
        raise DataError(f"{path}: no usable mazes")
    return np.stack(questions), None if answers[0] is None else np.stack(answers), lines


def read_mazes(source, side):
    """Mazes for sample.py from `source`: the maze itself (side*side characters), a text file of mazes (each
    one line of side*side characters, or side lines of side; blank lines between mazes), or a CSV with a
    question (and answer) column. Returns (entries, errors, unread): entries (name, question, answer or None)
    in tokens, errors as lines to show (for a CSV one per kind of bad row), unread the mazes left out."""
    entries, errors = [], []

    def add(name, text):
        question, problem = to_tokens(text, side, CHARSET[:4])
        if problem is None:
            problem = (maze_problem(question, None, side) or (None, None))[1]
        if problem:
            errors.append(f"{name}: {problem}")
        else:
            entries.append((name, question, None))

    if os.path.isdir(source):
        raise DataError(f"maze={source!r}: a directory, not a file of mazes")
    if not os.path.isfile(source):
        if len(source) != side * side:
            raise DataError(f"maze={source[:40]!r}{'...' if len(source) > 40 else ''}: no such file, nor a maze "
                            f"of {side * side} characters ({len(source)})")
        add("--maze", source)
        return entries, errors, len(errors)
    try:
        with open(source, encoding="utf-8-sig", newline="") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e.reason})") from None
    if lines and is_csv_header(lines[0], "question"):
        bad = BadRows(skip_bad=True)
        try:
            questions, answers, numbers = read_maze_csv(source, side, bad, need_answers=False)
            entries = [(f"{source} line {n}", q, None if answers is None else answers[i])
                       for i, (n, q) in enumerate(zip(numbers, questions))]
        except DataError as e:
            errors.append(str(e))
        return entries, errors + bad.report(), sum(bad.counts.values())
    if source.lower().endswith(".csv") and lines:  # a CSV without the original's header would read as text
        raise DataError(f"{source}: a CSV needs a question column (and, to score, answer); its header is "
                        f"{lines[0][:60]!r}")
    shapes = f"(a maze is {side} lines of {side} characters, or one line of {side * side})"
    for block in line_blocks(lines):
        if len(block[0][1]) == side * side:  # one maze per line
            for number, text in block:
                add(f"{source} line {number}", text)
            continue
        bad_row = next(((number, text) for number, text in block if len(text) != side), None)
        if bad_row:
            trimmed = " (an editor may have trimmed its trailing spaces, which are open cells)" \
                if len(bad_row[1]) < side and not bad_row[1].endswith(" ") else ""
            errors.append(f"{source} line {bad_row[0]}: a row of {len(bad_row[1])} characters {shapes}{trimmed}")
        elif len(block) != side:
            errors.append(f"{source} line {block[0][0]}: a grid of {len(block)} rows {shapes}")
        else:
            add(f"{source} line {block[0][0]}", "".join(text for _, text in block))
    return entries, errors, len(errors)


# -----------------------------------------------------------------------------
# the generator (see the docstring at the top)

def perfect_maze(side, rng):
    """(side, side) bool, open cells: rooms at even (row, col), joined by a randomised depth-first search."""
    rooms = (side + 1) // 2
    is_open = np.zeros((2 * rooms, 2 * rooms), bool)  # a spare row and column when side is even, cut off below
    is_open[::2, ::2] = True
    visited = np.zeros((rooms, rooms), bool)
    draws = iter(rng.random(rooms * rooms + 1).tolist())  # two for the first room, one for every room pushed
    stack = [(int(next(draws) * rooms), int(next(draws) * rooms))]
    visited[stack[0]] = True
    while stack:
        r, c = stack[-1]
        unvisited = [(r + dr, c + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
                     if 0 <= r + dr < rooms and 0 <= c + dc < rooms and not visited[r + dr, c + dc]]
        if not unvisited:
            stack.pop()
            continue
        nr, nc = unvisited[int(next(draws) * len(unvisited))]
        visited[nr, nc] = True
        is_open[r + nr, c + nc] = True  # the cell between rooms (2r, 2c) and (2nr, 2nc)
        stack.append((nr, nc))
    return is_open[:side, :side]


def generate_maze(side, min_length, rng):
    """(question, answer) token arrays of one maze, or None if this draw does not qualify."""
    is_open = perfect_maze(side, rng)
    row, col = np.indices((side, side))
    is_open |= ((row + col) % 2 == 1) & (rng.random((side, side)) < LOOP_RATE)  # between two rooms: loops
    is_open |= (row % 2 == 1) & (col % 2 == 1) & (rng.random((side, side)) < OPEN_RATE)  # pillars: open areas
    passable = is_open.ravel().tolist()
    cells = np.flatnonzero(is_open)
    from_x = distances(passable, int(cells[rng.integers(len(cells))]), side)
    threshold = 0.8 * max(from_x)
    far = [i for i, d in enumerate(from_x) if d >= threshold]
    s = far[rng.integers(len(far))]
    from_s = distances(passable, s, side)
    goals = [i for i, d in enumerate(from_s) if d > min_length]
    if not goals:
        return None
    g = goals[rng.integers(len(goals))]
    from_g, length = distances(passable, g, side), from_s[g]
    path, nbrs = [s], neighbours(side)
    while path[-1] != g:
        u = path[-1]
        # the cells after u on shortest paths; those walled here are never a later cell's (they are one step
        # further from S than u, the successors of later cells further still)
        ahead = [v for v in nbrs[u] if from_s[v] == from_s[u] + 1 and from_g[v] == length - from_s[v]]
        step = ahead[rng.integers(len(ahead))]
        for v in ahead:
            if v != step:
                passable[v] = False
        path.append(step)
    grid = np.array(passable).reshape(side, side)
    open_2x2 = int((grid[1:, 1:] & grid[1:, :-1] & grid[:-1, 1:] & grid[:-1, :-1]).sum())
    edges = int((grid[1:] & grid[:-1]).sum() + (grid[:, 1:] & grid[:, :-1]).sum())
    if open_2x2 == 0 or edges - int(grid.sum()) + 1 <= open_2x2:  # at least edges - cells + 1 independent loops
        return None
    question = np.where(grid, OPEN, WALL).astype(np.uint8).ravel()
    question[s], question[g] = START, GOAL
    answer = question.copy()
    answer[path[1:-1]] = PATH
    return question, answer


def generate_mazes(count, side, min_length, rng, show_progress=False, desc="generating"):
    """count mazes as (questions, answers) (count, side*side) uint8 token arrays."""
    questions, answers, failed = [], [], 0
    with tqdm(total=count, unit="maze", desc=desc, disable=not show_progress) as bar:
        while len(questions) < count:
            maze = generate_maze(side, min_length, rng)
            failed = 0 if maze else failed + 1
            if failed == 1000:
                raise DataError(f"no {side}x{side} maze qualified in 1,000 draws (a shortest path longer than "
                                f"{min_length} steps, loops, an open area): lower min_path_length or raise size")
            if maze:
                questions.append(maze[0])
                answers.append(maze[1])
                bar.update()
    return np.stack(questions), np.stack(answers)


def hard_length(side):
    """Maze-Hard's 110 steps at 30x30, scaled by area."""
    return round(HARD_LENGTH * side * side / 900)


# -----------------------------------------------------------------------------
# the build

def augment(questions, answers, side):
    """Each maze followed by its 7 other dihedral transforms (the original's numbering; 0 is the identity):
    (N * 8, side*side) arrays, maze m's at rows 8m .. 8m + 7."""
    out = []
    for grids in (questions, answers):
        grids = grids.reshape(-1, side, side)
        out.append(np.stack([dihedral(grids, t) for t in range(8)], 1).reshape(-1, side * side))
    return out


def in_test_set(train_questions, test_questions, side):
    """(N,) bool: the training mazes that are a test maze as it is or turned or mirrored (one of its 8
    symmetries: with --aug the training set would hold the test maze itself, answer and all). Each maze is
    compared whole, as one opaque value of side*side bytes, by sorting (np.isin): 1,000 training mazes
    against the 8 x 1,000 test ones at 30x30 take milliseconds."""
    grids = test_questions.reshape(-1, side, side)
    test = np.stack([dihedral(grids, t) for t in range(8)]).reshape(-1, side * side)
    whole = lambda questions: np.ascontiguousarray(questions).view(np.dtype((np.void, side * side))).ravel()
    return np.isin(whole(train_questions), whole(test))


def default_name(source, size, count, aug):
    """maze-30x30-gen-1k (generated), maze-30x30-hard-1k (from CSVs: the original's name for Maze-Hard), ..."""
    count = f"{count // 1000}k" if count % 1000 == 0 else str(count)
    return f"maze-{size}x{size}-{'gen' if source == 'generate' else 'hard'}-{count}" + ("-aug" if aug else "")


def build_dataset(train, test, out_path, side, aug=False, build=None, log=print):
    """Write train and test ((questions, answers) token arrays) as a dataset, atomically; with aug the
    training mazes as groups of their 8 dihedral transforms. Returns the bytes written."""
    splits = {}
    for split, (questions, answers) in (("train", train), ("test", test)):
        per_group = 8 if aug and split == "train" else 1
        inputs, labels = augment(questions, answers, side) if per_group == 8 else (questions, answers)
        arrays = puzzle_arrays(inputs, labels, examples_per_puzzle=1, puzzles_per_group=per_group)
        splits[split] = (arrays, metadata(arrays, "maze", VOCAB_SIZE, size=side,
                                          build=dict(build or {}, aug=per_group == 8)))
        log(f"{split}: {len(questions):,} mazes -> {len(inputs):,} examples in {len(questions):,} groups")
    return write_dataset(out_path, splits, identifiers=["<blank>"])


def save_csv(path, questions, answers, source_name, side):
    """The mazes as a CSV in the original's layout (rating: the shortest path's steps), written to a
    temporary file and renamed."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["source", "question", "answer", "rating"])
            for q, a in zip(questions, answers):
                writer.writerow([source_name, to_text(q), to_text(a), int((a == PATH).sum()) + 1])
    write_atomically(path, write)


def main():
    if source not in ("generate", "local", "hf"):
        raise DataError(f"source must be 'generate', 'local' or 'hf', got {source!r}")
    check_ranges(globals(), [("size", size >= 2, ">= 2"), ("num_train", num_train >= 1, ">= 1"),
                             ("num_test", num_test >= 1, ">= 1"), ("min_path_length", min_path_length >= 0, ">= 0"),
                             ("subsample_size", subsample_size >= 0, ">= 0"), ("seed", seed >= 0, ">= 0")])
    if source == "hf" and size != 30 and "hf_url" not in config_overrides:
        raise DataError(f"size={size}: the original's Maze-Hard download is 30x30; --size sets the generated "
                        f"mazes' side, or that of --source=local's CSVs")
    if source == "generate" and (train_csv or test_csv):
        raise DataError("train_csv and test_csv are read with --source=local (the default source generates mazes)")
    if source == "generate" and "subsample_size" in config_overrides:
        raise DataError("subsample_size takes a subset of the mazes read from CSVs (--source=local or hf); "
                        "--source=generate makes num_train of them")
    settled = [k for k in ("num_train", "num_test", "min_path_length") if k in config_overrides]
    if source != "generate" and settled:
        raise DataError(f"{settled[0]} is for generated mazes (--source=generate); --source={source} takes the CSVs' "
                        f"mazes as they are (subsample_size takes fewer)")
    if write_csv:  # refused before the build, not after it; CSVs are never written over (they may be the input)
        check_folder(write_csv, "write_csv", "train.csv and test.csv go there")
        taken = [p for p in (os.path.join(write_csv, f"{s}.csv") for s in ("train", "test")) if os.path.lexists(p)]
        if taken:
            raise DataError(f"write_csv={write_csv!r}: {taken[0]} exists; not writing over it (choose another "
                            f"directory)")
    started = time.time()
    if source == "generate":
        min_length = min_path_length or hard_length(size)
        splits = [generate_mazes(n, size, min_length, np.random.default_rng([seed, i]), progress, f"generating {split}")
                  for i, (split, n) in enumerate((("train", num_train), ("test", num_test)))]
        build = dict(generator="prepare_maze.py", seed=seed, min_path_length=min_length)
        print(f"generated {num_train:,} + {num_test:,} {size}x{size} mazes, S to G in more than {min_length} steps")
    else:
        if source == "hf":
            paths = download_once(hf_url, download_dir, ("train.csv", "test.csv"), show_progress=progress,
                                  by_hand="--source=local --train_csv=<train.csv> --test_csv=<test.csv>")
        elif not train_csv or not test_csv:
            raise DataError("source='local' needs --train_csv and --test_csv")
        else:
            paths = [resolve_input(train_csv), resolve_input(test_csv)]
        splits, lines, build = [], [], dict(csv=[os.path.abspath(p) for p in paths], rows_skipped={})
        for path in paths:
            bad = BadRows(skip_bad)
            questions, answers, numbers = read_maze_csv(path, size, bad, size_option="--size")
            print(f"{path}: {len(questions):,} mazes")
            for line in bad.report():
                print("  " + line)
            splits.append((questions, answers))
            lines.append(numbers)
            build["rows_skipped"][os.path.basename(path)] = bad.counts
    named_count = len(splits[0][0])  # the default name counts the mazes read (Maze-Hard stays maze-30x30-hard-1k)
    leaked = in_test_set(splits[0][0], splits[1][0], size)  # generated too: small grids repeat (5x5: 5 in 200)
    if leaked.any():
        i = int(np.flatnonzero(leaked)[0])
        example = f"training maze {i + 1}" if source == "generate" else f"{paths[0]} line {lines[0][i]}"
        if leaked.all():
            raise DataError(f"all {len(leaked):,} training mazes are test mazes, as they are or turned or mirrored "
                            f"(e.g. {example}): nothing left to train on")
        print(f"warning: left out {leaked.sum():,} training maze(s) that are test mazes, as they are or turned or "
              f"mirrored (e.g. {example}): training on them would train on the test's answers")
        splits[0] = (splits[0][0][~leaked], splits[0][1][~leaked])
        build.update(test_mazes_left_out=int(leaked.sum()))
    if 0 < subsample_size < len(splits[0][0]):  # (CSVs only) a subset of the mazes left
        chosen = np.sort(np.random.default_rng(seed).choice(len(splits[0][0]), subsample_size, replace=False))
        splits[0] = (splits[0][0][chosen], splits[0][1][chosen])
        build.update(subsample_size=subsample_size, seed=seed)
        named_count = subsample_size
    out_path = dataset_path(out_dir, name or default_name(source, size, named_count, aug))
    written = build_dataset(*splits, out_path, size, aug, build)
    print(f"wrote {out_path} ({human_bytes(written)}) in {time.time() - started:.1f} s")
    if write_csv:
        os.makedirs(write_csv, exist_ok=True)
        for split, (questions, answers) in zip(("train", "test"), splits):
            save_csv(os.path.join(write_csv, f"{split}.csv"), questions, answers, f"prepare_maze.py seed={seed}"
                     if source == "generate" else os.path.basename(out_path), size)
        print(f"wrote {write_csv}/train.csv and test.csv")


if __name__ == "__main__":
    exit_cleanly("prepare_maze.py")  # bad input: one line, not a traceback; SIGTERM cleans up as Ctrl-C does
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    main()
