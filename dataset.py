"""
The on-disk puzzle format every task shares, and the batches train.py draws from it.

A dataset is a directory data/<name>/ in the layout of the original HRM code (github.com/sapientinc/HRM),
so that datasets built by either code base load in both:

    identifiers.json                  puzzle identifier -> name (e.g. an ARC task and its augmentation)
    train/, test/                     one directory per split, each with
        dataset.json                  pad_id, ignore_label_id, blank_identifier_id, vocab_size, seq_len,
                                      num_puzzle_identifiers, total_groups, mean_puzzle_examples, sets
                                      (and here also: task, the prepare_<task>.py that wrote it)
        <set>__inputs.npy             (examples, seq_len) tokens
        <set>__labels.npy             (examples, seq_len) tokens; ignore_label_id is not scored
        <set>__puzzle_identifiers.npy (puzzles,) int32
        <set>__puzzle_indices.npy     (puzzles + 1,) int32: puzzle p holds examples [i[p], i[p + 1])
        <set>__group_indices.npy      (groups + 1,) int32: group g holds puzzles [j[g], j[g + 1])

An example is one (input, label) sequence, a puzzle a run of examples that share an identifier (the
demonstrations of one ARC task under one augmentation), a group a run of puzzles that are one original
puzzle (its augmentations). Training draws one random puzzle per group per epoch.

Here: DataError (every bad input is one line naming the file, and row, and what is wrong), reading CSV
rows, writing a dataset atomically (a temporary directory renamed into place: an interrupted build leaves
nothing half-written, and nothing is deleted that is not a dataset), reading it back, the training and test
batches, the 8 dihedral transforms of a grid, and a plain-HTTPS download.
"""
import csv
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

IGNORE_LABEL_ID = -100  # labels equal to a dataset's ignore_label_id become this, which model.py does not score
ARRAYS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
METADATA_TYPES = dict(pad_id=int, blank_identifier_id=int, vocab_size=int, seq_len=int, num_puzzle_identifiers=int,
                      total_groups=int, mean_puzzle_examples=(int, float), sets=list)


class DataError(ValueError):
    """Bad input: a file, row, dataset, checkpoint or setting; str() is one line naming it and what is wrong."""


def check_ranges(values, rules):
    """rules: (name, ok, what it must be); the first broken one is a DataError 'name=value: must be ...'.
    values: a dict or an object with the names as attributes."""
    for name, ok, need in rules:
        if not ok:
            value = values[name] if isinstance(values, dict) else getattr(values, name)
            raise DataError(f"{name}={value!r}: must be {need}")


def exit_cleanly(script, interrupted=lambda: ""):
    """For a script's main program: from now on a DataError that reaches the top ends it as one line
    'script: message' (exit status 1) instead of a traceback, Ctrl-C as 'script: interrupted' and what
    interrupted() adds (None: no line, as in a process other than torchrun's first), any other exception is
    still reported in full (as the bug it is), and SIGTERM unwinds the program like Ctrl-C, so that what it
    was writing is cleaned up by the same handlers (a temporary dataset directory, a download's .part file)."""
    def hook(kind, error, traceback):
        for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar still open would share the line
            bar.close()
        if issubclass(kind, DataError):
            print(f"{script}: {error}", file=sys.stderr)
        elif issubclass(kind, KeyboardInterrupt):
            if (said := interrupted()) is not None:
                print(f"{script}: interrupted{said}", file=sys.stderr)
        else:
            sys.__excepthook__(kind, error, traceback)
    sys.excepthook = hook
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


# -----------------------------------------------------------------------------
# reading CSVs

class BadRows:
    """Stops at the first bad row with DataError('path line N: reason'), or with skip_bad counts the bad
    rows by category and keeps the first message of each."""

    def __init__(self, skip_bad):
        self.skip_bad, self.counts, self.examples = skip_bad, {}, {}

    def add(self, path, line, category, reason):
        message = f"{path} line {line}: {reason}"
        if not self.skip_bad:
            raise DataError(message)
        self.counts[category] = self.counts.get(category, 0) + 1
        self.examples.setdefault(category, message)

    def report(self):
        """One line per category of skipped rows."""
        return [f"skipped {n:,} x {category}, e.g. {self.examples[category]}"
                for category, n in sorted(self.counts.items())]


def task_of(named, seq_len, vocab_size):
    """The task a dataset (or a checkpoint) names. The original's datasets name none: its Sudoku is known by 81
    cells of 11 tokens, its mazes by square grids of 6 tokens (padding, wall, open, start, goal, path), its
    ARC by 30 x 30 grids of 12 (padding, end of grid, ten colours)."""
    if named:
        return named
    if seq_len == 81 and vocab_size == 11:
        return "sudoku"
    if vocab_size == 6 and seq_len and math.isqrt(seq_len) ** 2 == seq_len:
        return "maze"
    if seq_len == 900 and vocab_size == 12:
        return "arc"
    return None


def is_csv_header(line, column):
    """Whether a file's first line is a CSV header with this column (its names quoted or not)."""
    return column in [name.strip() for name in next(csv.reader([line]), [])]


def line_blocks(lines, blank=lambda text: not text):
    """The runs of non-blank lines of a text file that separates its records by blank lines (sample.py's
    mazes, Sudoku grids), each a list of (line number from 1, text). blank: what counts as a blank line (a
    maze's row of spaces is data)."""
    blocks, block = [], []
    for number, text in enumerate(lines + [""], start=1):
        if not blank(text):
            block.append((number, text))
        elif block:
            blocks.append(block)
            block = []
    return blocks


def read_csv(path, required, optional=(), bad=None, strip=True):
    """Rows of a CSV with a header line, as (line number, {column: text}) for the required and optional
    columns present; the text is stripped of surrounding spaces unless strip is False (where spaces are data:
    a maze's open cells). A UTF-8 byte-order mark and CRLF line ends are fine; blank lines are skipped.
    Raises DataError('path line N: ...') for a missing file, a header without a required column, malformed
    CSV or text that is not UTF-8; a row with the wrong number of fields goes to `bad` (a BadRows: skipped
    and counted, or an error)."""
    bad = bad or BadRows(skip_bad=False)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise DataError(f"{path} line 1: empty file, expected a header with {','.join(required)}")
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path} line 1: the header has no {' or '.join(missing)} column "
                                f"(got {','.join(header)})")
            columns = {c: header.index(c) for c in (*required, *optional) if c in header}
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    bad.add(path, reader.line_num, "wrong number of fields",
                            f"expected {len(header)} fields ({','.join(header)}), got {len(row)}")
                    continue
                yield reader.line_num, {c: row[i].strip() if strip else row[i] for c, i in columns.items()}
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path} line {_first_non_utf8_line(path)}: not UTF-8 text ({e.reason})") from None


def _first_non_utf8_line(path):
    """The decoder reads ahead of the CSV reader, so its error does not know the line: find it."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number


# -----------------------------------------------------------------------------
# writing a dataset

def puzzle_arrays(inputs, labels, examples_per_puzzle, puzzles_per_group, puzzle_identifiers=None):
    """The five arrays of one set from examples laid out puzzle by puzzle and group by group.
    examples_per_puzzle, puzzles_per_group: an int (all the same) or one count per puzzle / group."""
    num_puzzles = len(inputs) // examples_per_puzzle if np.isscalar(examples_per_puzzle) else len(examples_per_puzzle)
    per_puzzle = np.broadcast_to(examples_per_puzzle, (num_puzzles,))
    num_groups = num_puzzles // puzzles_per_group if np.isscalar(puzzles_per_group) else len(puzzles_per_group)
    per_group = np.broadcast_to(puzzles_per_group, (num_groups,))
    assert per_puzzle.sum() == len(inputs) == len(labels) and per_group.sum() == num_puzzles
    ids = np.zeros(num_puzzles, np.int32) if puzzle_identifiers is None else np.asarray(puzzle_identifiers, np.int32)
    return dict(inputs=np.asarray(inputs, np.uint8), labels=np.asarray(labels, np.uint8), puzzle_identifiers=ids,
                puzzle_indices=np.concatenate([[0], np.cumsum(per_puzzle)]).astype(np.int32),
                group_indices=np.concatenate([[0], np.cumsum(per_group)]).astype(np.int32))


def metadata(arrays, task, vocab_size, num_puzzle_identifiers=1, **extra):
    """dataset.json of one set named 'all': the original's fields (PAD = 0 is also the label not scored),
    then the task that wrote it and anything else (build options, counts)."""
    num_puzzles = len(arrays["puzzle_identifiers"])
    return dict(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=vocab_size,
                seq_len=int(arrays["inputs"].shape[1]), num_puzzle_identifiers=num_puzzle_identifiers,
                total_groups=len(arrays["group_indices"]) - 1,
                mean_puzzle_examples=len(arrays["inputs"]) / max(num_puzzles, 1), sets=["all"], task=task,
                num_puzzles=num_puzzles, num_examples=len(arrays["inputs"]), **extra)


def is_dataset(path):
    """A directory this module (or the original code) wrote: identifiers.json and train/dataset.json, or
    (a time series) dataset.json at its top."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "dataset.json")) or (
        os.path.isfile(os.path.join(path, "identifiers.json")) and
        os.path.isfile(os.path.join(path, "train", "dataset.json"))))


def dataset_dir(dataset):
    """The folder that train.py's and sample.py's --dataset names: data/<dataset>, or the path itself where
    data/<dataset> is nothing (a path given with its data/, or absolute)."""
    path = os.path.join("data", dataset)
    if not os.path.exists(path) and (os.path.exists(dataset) or dataset.startswith("data" + os.sep)):
        path = dataset  # (a path under data/ that is not there is named as given, not as data/data/...)
    parent, split = os.path.split(os.path.normpath(path))
    if split in ("train", "test") and is_dataset(parent):  # (a split holds a dataset.json, as a series does)
        raise DataError(f"dataset={dataset!r}: {path} is the {split} split of the dataset {parent}; give the "
                        f"dataset's folder")
    return path


def identifiers_digest(path):
    """A digest of a dataset's identifiers.json ('' without one): which puzzle each trained puzzle embedding
    belongs to. A checkpoint keeps it, so that a dataset rebuilt since (an ARC build with another seed names
    other augmentations) is found out rather than given embeddings that were learnt for other puzzles."""
    path = os.path.join(path, "identifiers.json")
    if not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def check_folder(path, setting, what_goes_there):
    """A folder's path that can be made before anything is built: no file where it or a folder above it
    would be (a DataError naming the setting, and what goes there)."""
    existing = os.path.abspath(path)  # path, or the nearest path above it that exists
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DataError(f"{setting}={path!r}: {existing} is a file, not a folder ({what_goes_there})")


def dataset_path(out_dir, name):
    """out_dir/name, where name must be a plain directory name: '.', '..', '' or a path would make the
    build replace a directory that is not a dataset."""
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        raise DataError(f"name={name!r}: must be a plain directory name (the dataset goes to out_dir/name)")
    check_folder(out_dir, "out_dir", "the dataset goes to out_dir/name")
    path = os.path.join(out_dir, name)
    if os.path.lexists(path) and not is_dataset(path):
        raise DataError(f"{path} exists and is not a dataset: not replacing it (choose another name or out_dir)")
    return path


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, as another user's process
        return True
    return True


TEMP_MARK = ".partial"  # in every temporary directory this project makes, until it is renamed into place


def temp_path(path):
    """Where path is written until it is complete: .<name>.tmp-<pid> beside it."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.tmp-{os.getpid()}")


def write_atomically(path, write):
    """write(temporary path), then rename it to path: path is always its old self or complete, and on an
    error or interrupt (SIGTERM too, under exit_cleanly) the temporary file is removed."""
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomically(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomically(path, write)


def remove_stale_temp_files(directory, names=()):
    """Delete what a killed process of this project left in directory (.<name>.tmp-<pid> or .<name>.old-<pid>
    whose process is gone): a temporary directory (it holds TEMP_MARK), a dataset moved aside while its
    replacement was renamed into place, and the temporary files of `names`. Nothing else is touched."""
    if not os.path.isdir(directory):
        return
    for entry in os.listdir(directory):
        match = re.fullmatch(r"\.(.+)\.(tmp|old)-(\d+)", entry)
        if not match or int(match.group(3)) == os.getpid() or pid_alive(int(match.group(3))):
            continue
        path = os.path.join(directory, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            if os.path.exists(os.path.join(path, TEMP_MARK)) or (match.group(2) == "old" and is_dataset(path)):
                shutil.rmtree(path)
        elif match.group(1) in names and match.group(2) == "tmp":
            os.remove(path)


def write_dataset(path, entries, identifiers):
    """Write a dataset: entries maps each split ('train', 'test') to (arrays, metadata), or any entry to a
    function that writes it at the path it is given (a split too large to hold in memory, which makes that
    directory and writes its five arrays and dataset.json; a time series' files); identifiers goes to
    identifiers.json (None: no such file). Built in a temporary directory beside path and renamed into place
    only when complete; an existing dataset at path is replaced only then, and on any error or interrupt
    nothing of the new build stays behind. Returns the number of bytes written."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temp_files(parent)
    tmp, old = temp_path(path), os.path.join(parent, f".{name}.old-{os.getpid()}")
    try:  # an interrupt even between making the directory and marking it leaves nothing
        shutil.rmtree(tmp, ignore_errors=True)  # a killed build of an earlier process with this pid
        os.makedirs(tmp)
        open(os.path.join(tmp, TEMP_MARK), "w").close()
        for entry, contents in entries.items():
            if callable(contents):
                contents(os.path.join(tmp, entry))
                continue
            arrays, meta = contents
            os.makedirs(os.path.join(tmp, entry))
            for key in ARRAYS:
                np.save(os.path.join(tmp, entry, f"all__{key}.npy"), arrays[key])
            with open(os.path.join(tmp, entry, "dataset.json"), "w") as f:
                json.dump(meta, f, indent=2)
        if identifiers is not None:
            with open(os.path.join(tmp, "identifiers.json"), "w") as f:
                json.dump(identifiers, f)
        os.remove(os.path.join(tmp, TEMP_MARK))
        size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(tmp) for f in files)
        replace_directory(tmp, path, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size


def replace_directory(new, path, old):
    """Rename the finished directory `new` to path; an existing path is moved to `old` first and deleted
    only once the new one is in place (and moved back if that rename fails)."""
    if not os.path.lexists(path):
        os.replace(new, path)
        return
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def resolve_input(path):
    """A relative path that does not exist from here is looked up beside this file (the shipped samples)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    return beside if os.path.exists(beside) else path


# -----------------------------------------------------------------------------
# reading a dataset

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def load_array(path, mmap=False):
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (ValueError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy array, truncated or corrupt? ({e})") from None


class PuzzleData:
    """One split: examples (inputs, labels: the files' tokens), puzzles (consecutive runs of examples, each
    with a puzzle identifier) and groups (consecutive runs of puzzles: an original puzzle and its
    augmentations). Every file is checked as it is read; a problem is a DataError naming the file. Inputs and
    labels stay on disk, memory-mapped (ARC's are gigabytes), and batches read the rows they need."""

    def __init__(self, path):
        meta_path = os.path.join(path, "dataset.json")
        if not os.path.isfile(meta_path):
            raise DataError(f"no dataset at {path} (no dataset.json): build one with a prepare_*.py script")
        self.path, self.meta = path, read_json(meta_path)
        for key, kind in METADATA_TYPES.items():
            if not isinstance(self.meta.get(key), kind) or isinstance(self.meta.get(key), bool):
                raise DataError(f"{meta_path}: {key} is {self.meta.get(key)!r}, "
                                f"expected {getattr(kind, '__name__', 'a number')}")
        parts = {k: [] for k in ARRAYS}
        examples = puzzles = 0
        for set_name in self.meta["sets"]:  # several sets are laid end to end, their offsets shifted
            arrays = {k: load_array(os.path.join(path, f"{set_name}__{k}.npy"), mmap=k in ("inputs", "labels"))
                      for k in ARRAYS}
            self._check(set_name, arrays)
            parts["inputs"].append(arrays["inputs"])
            parts["labels"].append(arrays["labels"])
            parts["puzzle_identifiers"].append(arrays["puzzle_identifiers"])
            parts["puzzle_indices"].append(arrays["puzzle_indices"][:-1] + examples)
            parts["group_indices"].append(arrays["group_indices"][:-1] + puzzles)
            examples += len(arrays["inputs"])
            puzzles += len(arrays["puzzle_identifiers"])
        parts["puzzle_indices"] = [np.concatenate(parts["puzzle_indices"] + [[examples]])]
        parts["group_indices"] = [np.concatenate(parts["group_indices"] + [[puzzles]])]
        for k, v in parts.items():  # one set (every dataset written here) stays memory-mapped
            setattr(self, k, v[0] if len(v) == 1 else np.concatenate(v))
        self.num_examples, self.num_groups = len(self.inputs), len(self.group_indices) - 1

    def _check(self, set_name, arrays):
        """Shapes and offsets agree with each other and with dataset.json."""
        where = os.path.join(self.path, f"{set_name}__")
        inputs, labels = arrays["inputs"], arrays["labels"]
        problems = [
            (inputs.ndim == 2 and inputs.shape[1] == self.meta["seq_len"],
             f"inputs.npy has shape {inputs.shape}, expected (examples, seq_len={self.meta['seq_len']})"),
            (labels.shape == inputs.shape, f"labels.npy has shape {labels.shape}, inputs.npy {inputs.shape}"),
            (inputs.size == 0 or 0 <= inputs.min() and inputs.max() < self.meta["vocab_size"],
             f"inputs.npy has tokens outside 0..vocab_size-1 = {self.meta['vocab_size'] - 1}"),
            (labels.size == 0 or 0 <= labels.min() and labels.max() < self.meta["vocab_size"],
             f"labels.npy has tokens outside 0..vocab_size-1 = {self.meta['vocab_size'] - 1}"),
            ((arrays["puzzle_identifiers"] >= 0).all() and
             (arrays["puzzle_identifiers"] < self.meta["num_puzzle_identifiers"]).all(),
             f"puzzle_identifiers.npy has identifiers outside 0..num_puzzle_identifiers-1 = "
             f"{self.meta['num_puzzle_identifiers'] - 1}"),
        ]
        for key, total in (("puzzle_indices", len(inputs)), ("group_indices", len(arrays["puzzle_identifiers"]))):
            offsets = arrays[key]
            problems.append((offsets.ndim == 1 and len(offsets) >= 2 and offsets[0] == 0 and offsets[-1] == total
                             and (np.diff(offsets) > 0).all(),
                             f"{key}.npy is not increasing offsets from 0 to {total}"))
        problems.append((len(arrays["puzzle_indices"]) == len(arrays["puzzle_identifiers"]) + 1,
                         "puzzle_indices.npy and puzzle_identifiers.npy disagree on the number of puzzles"))
        for ok, message in problems:
            if not ok:
                raise DataError(where + message)

    def batch(self, rows, pad_to, puzzles=None):
        """Arrays for the examples `rows` of puzzles `puzzles` (found from the rows when not given), padded to
        pad_to sequences that score nothing."""
        if puzzles is None:
            puzzles = np.searchsorted(self.puzzle_indices, rows, side="right") - 1
        pad = pad_to - len(rows)
        inputs = np.pad(self.inputs[rows].astype(np.int32), ((0, pad), (0, 0)), constant_values=self.meta["pad_id"])
        labels = self.labels[rows].astype(np.int32)
        if self.meta.get("ignore_label_id") is not None:
            labels[labels == self.meta["ignore_label_id"]] = IGNORE_LABEL_ID
        labels = np.pad(labels, ((0, pad), (0, 0)), constant_values=IGNORE_LABEL_ID)
        ids = np.pad(self.puzzle_identifiers[puzzles].astype(np.int32), (0, pad),
                     constant_values=self.meta["blank_identifier_id"])
        return dict(inputs=inputs, labels=labels, puzzle_identifiers=ids)


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
        self.epoch, self.position, self.plan = state["epoch"], state["position"], None

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
            whole = int(np.searchsorted(np.cumsum(sizes), need, side="right"))  # puzzles that fit entirely
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
            if self.position >= d.num_groups:  # past it: resumed on a dataset rebuilt smaller
                self.epoch, self.position = self.epoch + 1, 0
        rows, puzzles = np.concatenate(rows), np.concatenate(puzzles)
        return d.batch(rows[self.local], self.local.stop - self.local.start, puzzles[self.local])


def eval_batches(data, num_examples, global_batch_size, rank, world_size):
    """The first num_examples of a split (a PuzzleData's examples, a series' Windows) in order, in global
    batches; the last one padded. Row start + i is position i of the global batch gathered from the processes."""
    local = global_batch_size // world_size
    for start in range(0, num_examples, global_batch_size):
        rows = np.arange(start + rank * local, min(start + (rank + 1) * local, num_examples))
        yield data.batch(rows, pad_to=local)


# -----------------------------------------------------------------------------
# the 8 symmetries of a square grid (the original's numbering, so its augmentation names stay valid), and
# voting over what a puzzle's symmetric copies answer

DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)  # transform t is undone by transform DIHEDRAL_INVERSE[t]


def dihedral(grid, t):
    """Transform t of a grid (or of a stack of grids: the last two axes): 0 identity, 1-3 rotations by 90,
    180 and 270 degrees counter-clockwise, 4 left-right mirror, 5 up-down mirror, 6 transpose, 7 the
    anti-diagonal mirror."""
    grid = np.asarray(grid)
    rotate = lambda g, k: np.rot90(g, k, axes=(-2, -1))
    return [lambda g: g, lambda g: rotate(g, 1), lambda g: rotate(g, 2), lambda g: rotate(g, 3),
            lambda g: np.flip(g, -1), lambda g: np.flip(g, -2), lambda g: np.swapaxes(g, -1, -2),
            lambda g: np.flip(rotate(g, 1), -1)][t](grid)


def inverse_dihedral(grid, t):
    return dihedral(grid, DIHEDRAL_INVERSE[t])


def random_relabellings(count, rng):
    """count random permutations of the symbols 1..9 with 0 kept (Sudoku's digits, ARC's colours): (count, 10)
    uint8, symbol s becomes maps[:, s]."""
    maps = np.zeros((count, 10), np.uint8)
    maps[:, 1:] = rng.permuted(np.tile(np.arange(1, 10, dtype=np.uint8), (count, 1)), axis=1)
    return maps


def rank(candidates):
    """Voting over the answers a puzzle's symmetries give back, mapped to the puzzle's own frame: pools
    identical grids among candidates [(grid, halting probability)] into [(grid, votes, mean probability)],
    most votes first, then the highest mean probability (then the first seen). An empty grid (nothing could
    be cropped) is no candidate."""
    pooled = {}
    for grid, q in candidates:
        if grid.size:
            entry = pooled.setdefault((grid.shape, grid.tobytes()), [grid, 0, 0.0])
            entry[1] += 1
            entry[2] += q
    return sorted(((grid, votes, total / votes) for grid, votes, total in pooled.values()),
                  key=lambda entry: entry[1:], reverse=True)


# -----------------------------------------------------------------------------
# downloading

def download_once(base_url, directory, names, show_progress=True, by_hand="its path"):
    """directory/name for each name, downloaded from base_url/name unless it is there from an earlier run.
    by_hand: what to pass instead, the files fetched by hand, should a download fail."""
    paths = [os.path.join(directory, name) for name in names]
    remove_stale_temp_files(directory, names)  # a download that was killed
    for path in paths:
        if os.path.exists(path):
            print(f"using {path} (downloaded before; delete it to fetch again)")
        else:
            download(f"{base_url}/{os.path.basename(path)}", path, show_progress=show_progress, by_hand=by_hand)
    return paths


def download(url, dest, show_progress=True, timeout=60, by_hand="its path"):
    """Fetch url to dest over HTTPS with a progress bar, into a temporary file renamed at the end, so dest is
    either absent or complete. Raises DataError with a one-line reason (offline, HTTP error, cut short)."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = temp_path(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=os.path.basename(dest),
                      disable=not show_progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
        if total is not None and os.path.getsize(part) != total:
            raise DataError(f"download of {url} stopped after {os.path.getsize(part)} of {total} bytes")
        os.replace(part, dest)
    except BaseException as e:
        if os.path.exists(part):
            os.remove(part)
        if isinstance(e, urllib.error.HTTPError):
            raise DataError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise DataError(f"could not write {dest} ({e.strerror})") from None
        if isinstance(e, (urllib.error.URLError, OSError)):
            reason = getattr(e, "reason", None) or e
            raise DataError(f"could not download {url} ({reason}): offline? Fetch the file by hand and pass "
                            f"{by_hand} instead") from None
        raise


# -----------------------------------------------------------------------------
# time series
#
# A prepared series (prepare_timeseries.py writes it) is one directory data/<name>/ holding
#
#     dataset.json     task "timeseries", columns, the training part's mean and std of each column, borders
#                      (the rows where train, val and test end), the time step, the build options
#     values.npy       (rows, features) float32: the series normalised, (value - mean) / std
#     calendar.npy     (rows, 5) float32: hour, day of week, day of month, day of year, month, in [-0.5, 0.5]
#     timestamps.npy   (rows,) datetime64[s]
#
# A window is input_len rows of history followed directly by the horizon rows to forecast, cut from these
# arrays as it is needed (no window is stored). It belongs to the part whose rows hold all its targets; its
# history may reach back into the part before, as the standard ETT loaders do: with input_len 96 the first
# validation window reads rows 8544-8639 of the training part and forecasts rows 8640-8735.

SERIES_FILES = ("values", "calendar", "timestamps")
SPLITS = ("train", "val", "test")
CALENDAR = ("hour", "day_of_week", "day_of_month", "day_of_year", "month")


def write_series(path, arrays, meta):
    """Write a prepared series atomically, as write_dataset writes a dataset. Returns the bytes written."""
    def write_json(file):
        with open(file, "w") as f:
            json.dump(meta, f, indent=2)
    files = {f"{k}.npy": (lambda file, a=arrays[k]: np.save(file, a)) for k in SERIES_FILES}
    return write_dataset(path, dict(files, **{"dataset.json": write_json}), identifiers=None)


class SeriesData:
    """A prepared series, every file checked as it is read (a problem is a DataError naming the file)."""

    def __init__(self, path):
        meta_path = os.path.join(path, "dataset.json")
        if not os.path.isfile(meta_path):
            raise DataError(f"no time series at {path} (no dataset.json): build one with prepare_timeseries.py")
        self.path, self.meta = path, read_json(meta_path)
        for key, kinds, what in (("columns", (str,), "names"), ("mean", (int, float), "numbers"),
                                 ("std", (int, float), "numbers"), ("borders", (int,), "integers")):
            values = self.meta.get(key)
            if not isinstance(values, list) or not all(type(v) in kinds for v in values):
                raise DataError(f"{meta_path}: {key} is {values!r}, expected a list of {what}")
        self.columns, self.borders = self.meta["columns"], self.meta["borders"]
        self.mean, self.std = np.array(self.meta["mean"], np.float64), np.array(self.meta["std"], np.float64)
        self.values, self.calendar, self.timestamps = (load_array(os.path.join(path, f"{k}.npy")) for k in SERIES_FILES)
        rows, self.num_features = len(self.values), len(self.columns)
        problems = [
            (self.values.shape == (rows, self.num_features) and self.values.dtype == np.float32,
             f"values.npy is {self.values.dtype} {self.values.shape}, expected float32 (rows, {self.num_features})"),
            (self.calendar.shape == (rows, len(CALENDAR)),
             f"calendar.npy has shape {self.calendar.shape}, expected ({rows}, {len(CALENDAR)})"),
            (self.timestamps.shape == (rows,), f"timestamps.npy has shape {self.timestamps.shape}, expected ({rows},)"),
            (len(self.mean) == len(self.std) == self.num_features, "dataset.json: mean and std need one per column"),
            (len(self.borders) == 3 and 0 < self.borders[0] < self.borders[1] < self.borders[2] <= rows,
             f"dataset.json: borders {self.borders} are not 0 < train end < val end < test end <= {rows} rows")]
        for ok, message in problems:
            if not ok:
                raise DataError(os.path.join(path, message))

    def record(self):
        """What ties a model to this series (kept in its checkpoint): the columns, the split, the normalisation."""
        return dict(columns=self.columns, borders=self.borders, mean=self.meta["mean"], std=self.meta["std"])

    def changes_since(self, record):
        """How this series differs from `record` (a checkpoint's record of the series it trained on), or ''."""
        if record["columns"] != self.columns:
            return f"its columns were {', '.join(record['columns'])} and are now {', '.join(self.columns)}"
        if record["borders"] != self.borders:
            return f"its parts ended at rows {record['borders']} and now end at {self.borders}"
        std = np.asarray(record["std"])  # (a mean near 0 compared on the scale of its column)
        if not (np.allclose(std, self.meta["std"], rtol=1e-6, atol=0) and
                np.all(np.abs(np.subtract(record["mean"], self.meta["mean"])) <= 1e-6 * std)):
            return "its normalisation (the training rows' mean and standard deviation) changed"
        return ""

    def window_starts(self, split, input_len, horizon):
        """The first rows of the split's windows, in order (stride 1)."""
        end = self.borders[SPLITS.index(split)]
        begin = (0, *self.borders)[SPLITS.index(split)]
        first, last = max(begin - input_len, 0), end - input_len - horizon
        if last < first:  # a window's history may reach back into the parts before
            need = (f"horizon={horizon} rows (its windows' input_len={input_len} steps of history come from the "
                    f"rows before it)" if begin >= input_len else
                    f"{input_len - begin + horizon:,} rows for one window of input_len={input_len} + horizon={horizon}"
                    + (f" (the {begin:,} rows before it give the rest of its history)" if begin else ""))
            raise DataError(f"{self.path}: the {split} part (rows {begin:,}-{end - 1:,}) is too short: it needs "
                            f"{need}")
        return np.arange(first, last + 1)

    def batch(self, starts, input_len, horizon, pad_to):
        """The windows starting at rows `starts`, padded to pad_to windows that valid marks as padding:
        inputs (B, input_len, features) and labels (B, horizon, features), their calendar features
        input_marks and target_marks (the future's calendar is known)."""
        history = starts[:, None] + np.arange(input_len)
        future = starts[:, None] + input_len + np.arange(horizon)
        pad = lambda a: np.pad(a, [(0, pad_to - len(starts))] + [(0, 0)] * (a.ndim - 1))
        return dict(inputs=pad(self.values[history]), input_marks=pad(self.calendar[history]),
                    labels=pad(self.values[future]), target_marks=pad(self.calendar[future]),
                    valid=pad(np.ones(len(starts), bool)))


class Windows:
    """The windows of one part of a series (train, val or test), in order."""

    def __init__(self, series, split, input_len, horizon):
        self.series, self.split, self.input_len, self.horizon = series, split, input_len, horizon
        self.starts = series.window_starts(split, input_len, horizon)
        self.num_examples = len(self.starts)

    def batch(self, rows, pad_to):
        return self.series.batch(self.starts[rows], self.input_len, self.horizon, pad_to)


class WindowBatches(TrainBatches):
    """TrainBatches over Windows (the same interface, state and slicing): each epoch visits every window once,
    in a random order drawn from (seed, epoch); epochs follow each other without a gap."""

    def _plan(self):
        if self.plan is None or self.plan[0] != self.epoch:
            self.plan = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.data.num_examples))
        return self.plan[1]

    def __next__(self):
        rows, need = [], self.global_batch_size
        while need > 0:
            taken = self._plan()[self.position:self.position + need]
            rows.append(taken)
            need, self.position = need - len(taken), self.position + len(taken)
            if self.position >= self.data.num_examples:
                self.epoch, self.position = self.epoch + 1, 0
        rows = np.concatenate(rows)[self.local]
        return self.data.batch(rows, pad_to=len(rows))
