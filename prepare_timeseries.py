"""
Build a time series for train.py: a CSV, an ETT file or a built-in synthetic series, checked, split in time,
normalised by its training part and stored with calendar features (the layout is in dataset.py).

$ python prepare_timeseries.py                              # the synthetic series, offline: data/synthetic
$ python prepare_timeseries.py --source=ett --ett=ETTh1     # download ETTh1 from the ETDataset repository: data/etth1
$ python prepare_timeseries.py --csv=ETTh1.csv              # a CSV: a date column and numeric columns (data/etth1)
$ python prepare_timeseries.py --csv=sales.csv --columns=units,price --borders=0.6,0.2,0.2 --fill=ffill

Input: a CSV with a header, a date column (ISO 8601: 2016-07-01 00:00:00; times with an offset are taken in
UTC, so a daylight-saving change neither repeats nor skips an hour) and numeric columns, one row per
time step in time order (ETT's layout: date,HUFL,HULL,MUFL,MULL,LUFL,LULL,OT). Every column but the date is
a variable, both input and forecast (multivariate: ETT's 'M' setting), unless --columns picks some. A row
whose date does not parse, a cell that is not a number, a date earlier than the row before or equal to it
stops the build with the file, line and reason; a missing cell (empty, NaN, NA, null) too, unless --fill
says how to fill it: 'ffill' repeats the column's last value, 'linear' interpolates in time within each part
of the split, so that no validation or test value reaches the training part (and its normalisation).

The split is chronological. ETT files (named ETTh1, ETTh2, ETTm1, ETTm2 in any case, or --borders=ett) get the standard
protocol of the literature, so that figures compare: 12 months of 30 days for training, 4 for validation,
4 for test (rows 8,640 / 11,520 / 14,400 of the hourly files, 4 x that of the 15-minute ones; the rest is
not used). Other series are split by fractions, 0.7 / 0.1 / 0.2 by default, rounded as the common loaders
round them. Every column is normalised by its mean and standard deviation over the training rows only
(saved, so that forecasts map back to real units); windows are cut from the arrays when they are needed.

Here too, for train.py and sample.py: the task's evaluate (errors in real units, and two baselines on the
same windows: the last value, and DLinear fitted to the training windows) and the SVG plot of a forecast.
"""
import csv as csv_module
import datetime
import os
import re
import time
import xml.sax.saxutils

import numpy as np

from dataset import (CALENDAR, DataError, Windows, check_ranges, dataset_path, download_once, exit_cleanly,
                     human_bytes, read_csv, resolve_input, write_series)

# -----------------------------------------------------------------------------
# default config values: the synthetic series, offline
_not_config = set(globals())
source = ''                 # 'synthetic' (built in), 'csv' (read csv) or 'ett' (download ett); '' = csv if given
csv = ''                    # a CSV with a date column and numeric columns
ett = 'ETTh1'               # source='ett': ETTh1, ETTh2 (hourly), ETTm1 or ETTm2 (every 15 minutes)
ett_url = 'https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small'  # + /<ett>.csv
download_dir = 'data/ett-csv'  # where source='ett' keeps the CSV (reused if present)
out_dir = 'data'            # the series goes to out_dir/name
name = ''                   # '' = the CSV's name in lower case (etth1), or 'synthetic'
date_column = 'date'
columns = ''                # the variables, comma-separated; '' = every column but the date
borders = 'auto'            # 'ett' (12/4/4 months), fractions 'train,val,test', or the rows where each part ends
fill = ''                   # missing cells: '' = an error, 'ffill' = the last value, 'linear' = interpolated
synthetic_rows = 14400      # source='synthetic': hourly steps (20 months of 30 days, as ETT's protocol uses)
seed = 0                    # source='synthetic': its noise
progress = True             # a progress bar while downloading
config_keys = [k for k in globals() if k not in _not_config and not k.startswith('_')]
# -----------------------------------------------------------------------------

ETT_FILES = ("ETTh1", "ETTh2", "ETTm1", "ETTm2")
ETT_MONTHS = (12, 16, 20)  # where ETT's training, validation and test parts end, in months of 30 days
MISSING = {"", "nan", "na", "n/a", "null", "none"}  # cells read as missing (in lower case)
DLINEAR_KERNEL = 25  # DLinear's moving average, in steps


# -----------------------------------------------------------------------------
# reading and checking

def read_series(path, date_column="date", columns=(), fill=""):
    """(timestamps (rows,) datetime64[s], values (rows, variables) float64, column names) of a CSV; a problem
    is a DataError naming the file, line and reason. columns: the variables to keep (all others if empty).
    With fill='linear' the missing cells stay NaN: build_series interpolates them once it knows the split."""
    if fill not in ("", "ffill", "linear"):
        raise DataError(f"fill={fill!r}: must be '', 'ffill' or 'linear'")
    if not columns and os.path.isfile(path):
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            header = [c.strip() for c in next(csv_module.reader(f), [])]
        if "" in header:  # pandas' to_csv writes its index so, a trailing comma leaves one at the end
            raise DataError(f"{path}: column {header.index('') + 1} has no name (an index column or a trailing "
                            f"comma?): name the variables to read with --columns=...")
        columns = [c for c in header if c != date_column]
    if date_column in columns:
        raise DataError(f"columns: {date_column!r} is the date column, not a variable")
    twice = next((c for i, c in enumerate(columns) if c in columns[:i]), None)
    if twice is not None:
        raise DataError(f"{path}: column {twice!r} comes twice: name each variable once")
    stamps, rows, lines, first_missing = [], [], [], None
    for line, row in read_csv(path, (date_column, *columns)):
        try:
            stamp = datetime.datetime.fromisoformat(row[date_column])
            stamps.append(stamp.astimezone(datetime.timezone.utc).replace(tzinfo=None) if stamp.tzinfo else stamp)
        except ValueError:
            raise DataError(f"{path} line {line}: {date_column} {row[date_column]!r} is not a date and time "
                            f"(YYYY-MM-DD or YYYY-MM-DD HH:MM:SS)") from None
        if not lines:
            first_offset = (line, row[date_column], stamp.tzinfo is not None)
        elif (stamp.tzinfo is not None) != first_offset[2]:  # UTC for some rows, local time for others: no order
            raise DataError(f"{path} line {line}: {date_column} {row[date_column]!r} and line {first_offset[0]}'s "
                            f"{first_offset[1]!r} differ in having a UTC offset: give every date one, or none")
        values = []
        for column in columns:
            text = row[column]
            if text.lower() in MISSING:
                first_missing = first_missing or (line, column, text)
                values.append(np.nan)
                continue
            try:
                values.append(float(text))
            except ValueError:
                raise DataError(f"{path} line {line}: {column} is {text!r}, not a number") from None
            if not np.isfinite(values[-1]):
                raise DataError(f"{path} line {line}: {column} is {text!r}, not a finite number")
        rows.append(values)
        lines.append(line)
    if not rows or not columns:
        raise DataError(f"{path}: no rows" if columns else f"{path} line 1: no column besides {date_column}")
    timestamps = np.array(stamps, "datetime64[s]")
    steps = np.diff(timestamps).astype(np.int64)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0)) + 1
        what = "repeats" if steps[i - 1] == 0 else "is earlier than"
        raise DataError(f"{path} line {lines[i]}: {date_column} {stamps[i]} {what} line {lines[i - 1]}'s "
                        f"{stamps[i - 1]}: rows must be in time order, one per time step")
    values = np.array(rows, np.float64)
    if first_missing:
        line, column, text = first_missing
        if not fill:
            raise DataError(f"{path} line {line}: {column} is missing ({text!r}); --fill=ffill or --fill=linear "
                            f"fills missing values")
        for j, column in enumerate(columns):
            missing = np.isnan(values[:, j])
            if missing.all():
                raise DataError(f"{path}: {column} has no value at all")
            if fill == "ffill":
                if missing[0]:
                    raise DataError(f"{path} line {lines[0]}: {column} is missing and no row before it has a value "
                                    f"to repeat (--fill=linear takes the next one)")
                values[:, j] = values[np.maximum.accumulate(np.where(missing, 0, np.arange(len(values)))), j]
    return timestamps, values, list(columns)


def interpolate_within_parts(values, timestamps, ends, columns):
    """values with their NaNs interpolated in time from the values of their own part of the split and the
    parts before it (a run at a part's end takes the last value before it): a later part never fills an
    earlier one."""
    t = timestamps.astype(np.int64).astype(np.float64)
    read, values = values, values.copy()  # interpolated between values read, never between filled ones
    for j, column in enumerate(columns):
        if np.isnan(read[:ends[0], j]).all():
            raise DataError(f"{column} has no value in the training rows 0-{ends[0] - 1:,}: --fill=linear has "
                            f"nothing to interpolate from")
        start = 0
        for end in ends:
            missing, known = np.isnan(read[start:end, j]), ~np.isnan(read[:end, j])
            values[start:end, j][missing] = np.interp(t[start:end][missing], t[:end][known], read[:end, j][known])
            start = end
    return values


def calendar_features(timestamps):
    """(rows, 5) float32: hour / 23, day of week (Monday 0) / 6, (day of month - 1) / 30, (day of year - 1)
    / 365, (month - 1) / 11, each minus 0.5 (the time features of the Informer/Autoformer code, in [-0.5, 0.5])."""
    seconds = timestamps.astype("datetime64[s]")
    days = seconds.astype("datetime64[D]")
    months = days.astype("datetime64[M]")
    hour = (seconds - days).astype("timedelta64[h]").astype(np.int64)
    weekday = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
    day_of_month = (days - months).astype(np.int64) + 1
    day_of_year = (days - days.astype("datetime64[Y]")).astype(np.int64) + 1
    month = months.astype(np.int64) % 12 + 1
    features = np.stack([hour / 23, weekday / 6, (day_of_month - 1) / 30, (day_of_year - 1) / 365, (month - 1) / 11], 1)
    return (features - 0.5).astype(np.float32)


def split_borders(spec, rows, step_seconds):
    """The rows where the training, validation and test parts end, from spec: 'ett' (12, 16 and 20 months of
    30 days of steps), three fractions that sum to 1 (the common loaders' rounding: test and training
    rounded down, validation the rest), or three increasing row numbers."""
    parts = [p.strip() for p in spec.split(",")]
    if spec == "ett":
        if step_seconds <= 0:
            raise DataError("borders='ett' needs at least two time steps to know their spacing")
        per_month = 30 * 24 * 3600 / step_seconds
        if per_month != int(per_month):
            raise DataError(f"borders='ett': a time step of {step_seconds} s does not divide a day")
        ends = [int(months * per_month) for months in ETT_MONTHS]
    elif len(parts) == 3 and all(re.fullmatch(r"\d+", p) for p in parts):
        ends = [int(p) for p in parts]
    elif len(parts) == 3 and all(re.fullmatch(r"\d*\.\d+|\d+\.?", p) for p in parts) and \
            abs(sum(map(float, parts)) - 1) < 1e-9:
        train, _, test = map(float, parts)
        ends = [int(rows * train), rows - int(rows * test), rows]
    else:
        raise DataError(f"borders={spec!r}: must be 'auto', 'ett', three fractions that sum to 1 ('0.7,0.1,0.2') "
                        f"or three increasing row numbers ('8640,11520,14400')")
    if not 0 < ends[0] < ends[1] < ends[2] <= rows:
        raise DataError(f"borders={spec!r}: the parts end at rows {ends}, which must increase from above 0 to at "
                        f"most the series' {rows:,} rows")
    return ends


def synthetic_series(rows, seed=0):
    """(timestamps, values, columns): three hourly variables from 2020-01-01 with daily, weekly and yearly
    cycles of different shapes and phases, a slow trend and autocorrelated noise; the third follows the first
    two a few hours late. Deterministic for a seed."""
    day, week, year = 2 * np.pi / 24, 2 * np.pi / 168, 2 * np.pi / (24 * 365)  # radians per hour
    demand = lambda t: 50 + 8 * np.sin(day * t - 2) + 3 * np.sin(2 * day * t) + 5 * np.sin(week * t) + \
        4 * np.sin(year * t) + 0.001 * t
    temperature = lambda t: 15 + 6 * np.sin(day * t - 3) + 9 * np.sin(year * t - 1)
    t = np.arange(rows, dtype=np.float64)
    noise = np.random.default_rng(seed).standard_normal((rows, 3))
    for i in range(1, rows):  # AR(1) noise
        noise[i] += 0.6 * noise[i - 1]
    values = np.stack([demand(t), temperature(t), 0.7 * demand(t - 3) - 0.4 * temperature(t - 5) + 20], 1)
    values += noise * [1.0, 0.8, 1.2]
    timestamps = np.datetime64("2020-01-01T00:00:00", "s") + np.arange(rows) * np.timedelta64(1, "h")
    return timestamps, values, ["demand", "temperature", "supply"]


# -----------------------------------------------------------------------------
# the build

def build_series(timestamps, values, columns, out_path, borders="auto", is_ett=False, build=None, log=print):
    """Split, normalise by the training part, add calendar features and write the series atomically
    (dataset.write_series). Returns the bytes written."""
    step_seconds = int(np.median(np.diff(timestamps).astype(np.int64))) if len(timestamps) > 1 else 0
    if borders == "auto":
        borders = "ett" if is_ett else "0.7,0.1,0.2"
    ends = split_borders(borders, len(values), step_seconds)
    unused = len(values) - ends[2]
    values, timestamps = values[:ends[2]], timestamps[:ends[2]]
    if np.isnan(values).any():  # read_series's --fill=linear: interpolated within each part
        values = interpolate_within_parts(values, timestamps, ends, columns)
    mean, std = values[:ends[0]].mean(0), values[:ends[0]].std(0)
    std[std == 0] = 1  # a column constant over the training rows is only centred, as StandardScaler does
    irregular = int((np.diff(timestamps).astype(np.int64) != step_seconds).sum())
    meta = dict(task="timeseries", columns=columns, mean=mean.tolist(), std=std.tolist(), borders=ends,
                rows=len(values), step_seconds=step_seconds, irregular_steps=irregular, calendar=list(CALENDAR),
                start=str(timestamps[0]), end=str(timestamps[-1]), build=dict(build or {}, borders=borders))
    arrays = dict(values=((values - mean) / std).astype(np.float32), calendar=calendar_features(timestamps),
                  timestamps=timestamps.astype("datetime64[s]"))
    log(f"{len(values):,} rows of {len(columns)} variables ({', '.join(columns)}) from {meta['start']} to "
        f"{meta['end']}, a step of {step_seconds} s; train rows 0-{ends[0] - 1:,}, val {ends[0]:,}-{ends[1] - 1:,}, "
        f"test {ends[1]:,}-{ends[2] - 1:,}" + (f" (the {unused:,} rows after it are not used)" if unused else "") +
        (f"; {irregular:,} steps differ from it (gaps?)" if irregular else ""))
    return write_series(out_path, arrays, meta)


def main():
    kind = source or ("csv" if csv else "synthetic")
    if kind not in ("synthetic", "csv", "ett"):
        raise DataError(f"source={source!r}: must be 'synthetic', 'csv' or 'ett'")
    check_ranges(globals(), [("seed", seed >= 0, ">= 0"), ("synthetic_rows", synthetic_rows >= 1, ">= 1")])
    # an option the source does not read is refused, not ignored
    read_by = dict(csv=("csv",), ett=("ett",), synthetic_rows=("synthetic",), date_column=("csv", "ett"),
                   columns=("csv", "ett"), fill=("csv", "ett"))
    ignored = [k for k, kinds in read_by.items() if kind not in kinds and k in config_overrides]
    if ignored:
        key = ignored[0]
        raise DataError(f"{key}={config_overrides[key]!r} is for source={' or '.join(read_by[key])}, and this is "
                        f"source={kind!r}" + (" (--csv picks source='csv')" if csv and not source else ""))
    started = time.time()
    build = dict(script="prepare_timeseries.py", source=kind, fill=fill)
    if kind == "synthetic":
        timestamps, values, names = synthetic_series(synthetic_rows, seed)
        path = ""
        build.update(rows=synthetic_rows, seed=seed)
    else:
        if kind == "csv" and not csv:
            raise DataError("source='csv' needs --csv=<file>")
        path = resolve_input(csv)
        if kind == "ett":
            if ett not in ETT_FILES:
                raise DataError(f"ett={ett!r}: must be one of {', '.join(ETT_FILES)}")
            path = download_once(ett_url, download_dir, (f"{ett}.csv",), show_progress=progress,
                                 by_hand=f"--csv=<{ett}.csv> (in place of --source=ett and --ett)")[0]
        timestamps, values, names = read_series(path, date_column, [c.strip() for c in columns.split(",") if c.strip()],
                                                fill)
        build.update(csv=os.path.abspath(path))
    base = os.path.splitext(os.path.basename(path))[0] if path else "synthetic"
    out_path = dataset_path(out_dir, name or base.lower())
    is_ett = base.lower() in (f.lower() for f in ETT_FILES)  # (a copy of ETTh1.csv saved as etth1.csv is ETTh1)
    size = build_series(timestamps, values, names, out_path, borders, is_ett=is_ett, build=build)
    print(f"wrote {out_path} ({human_bytes(size)}) in {time.time() - started:.1f} s")


# -----------------------------------------------------------------------------
# evaluation: train.py's hook, and the baselines beside the model

def errors(forecast, truth):
    """(MSE, MAE) over every window, step and variable."""
    error = np.asarray(forecast, np.float64) - truth
    return float(np.mean(error ** 2)), float(np.mean(np.abs(error)))


def window_arrays(windows, rows):
    """(history (n, input_len, F), truth (n, horizon, F)) of the windows `rows`, normalised."""
    batch = windows.batch(rows, pad_to=len(rows))
    return batch["inputs"], batch["labels"]


def last_value_forecast(history, horizon):
    """Every step of the horizon is the window's last value."""
    return np.repeat(history[:, -1:], horizon, axis=1)


def moving_average(x, kernel=DLINEAR_KERNEL):
    """DLinear's trend of x (..., L): the mean over an odd `kernel` of steps centred on each step, with the
    first and last values repeated (kernel - 1) // 2 times at either end."""
    half = (kernel - 1) // 2
    padded = np.concatenate([np.repeat(x[..., :1], half, -1), x, np.repeat(x[..., -1:], half, -1)], -1)
    sums = np.cumsum(np.concatenate([np.zeros_like(padded[..., :1]), padded], -1), -1)
    return (sums[..., kernel:] - sums[..., :-kernel]) / kernel


def dlinear_features(history):
    """(windows x variables, 2 L + 1): every variable's history split into trend and remainder, and a 1."""
    x = np.asarray(history, np.float64).transpose(0, 2, 1).reshape(-1, history.shape[1])
    trend = moving_average(x)
    return np.concatenate([trend, x - trend, np.ones((len(x), 1))], 1)


def fit_dlinear(windows, validation, ridges=(1e-6, 1e-4, 1e-2, 1, 1e2), chunk=4096):
    """DLinear (Zeng et al. 2023): a linear map from a variable's trend and remainder to its next horizon
    steps, one map shared by the variables, fitted to every training window. By least squares rather than
    its paper's Adam: the same model and loss, solved exactly, deterministic and fast; trend and remainder add
    up to the history, so a small ridge makes the solution unique, and the ridge is picked on the validation
    windows as the paper's early stopping picks its epoch. Returns the (2 L + 1, horizon) weights."""
    dim = 2 * windows.input_len + 1
    gram, cross = np.zeros((dim, dim)), np.zeros((dim, windows.horizon))
    for start in range(0, windows.num_examples, chunk):
        history, truth = window_arrays(windows, np.arange(start, min(start + chunk, windows.num_examples)))
        features = dlinear_features(history)
        gram += features.T @ features
        cross += features.T @ truth.transpose(0, 2, 1).reshape(-1, windows.horizon)
    scale = np.trace(gram) / dim
    history, truth = window_arrays(validation, np.arange(validation.num_examples))
    fits = []
    for ridge in ridges:
        penalty = np.diag(np.r_[np.full(dim - 1, ridge * scale), 0.0])  # the bias is not penalised
        weights = np.linalg.solve(gram + penalty, cross)
        fits.append((errors(dlinear_forecast(weights, history), truth)[0], ridge, weights))
    return min(fits, key=lambda fit: fit[0])[2]


def dlinear_forecast(weights, history):
    n, _, F = history.shape
    return (dlinear_features(history) @ weights).reshape(n, F, -1).transpose(0, 2, 1)


_dlinear = {}  # (series path, input_len, horizon) -> weights, fitted once per process


def scores(windows, forecasts):
    """{forecaster: (MSE, MAE, MSE in real units, MAE in real units)} over the first len(forecasts) windows:
    'model' (the forecasts given, normalised), 'last_value' and 'dlinear'."""
    history, truth = window_arrays(windows, np.arange(len(forecasts)))
    series = windows.series
    key = (os.path.abspath(series.path), windows.input_len, windows.horizon)
    if key not in _dlinear:
        _dlinear[key] = fit_dlinear(Windows(series, "train", windows.input_len, windows.horizon),
                                    Windows(series, "val", windows.input_len, windows.horizon))
    result = {}
    for name, forecast in (("model", forecasts), ("last_value", last_value_forecast(history, windows.horizon)),
                           ("dlinear", dlinear_forecast(_dlinear[key], history))):
        result[name] = errors(forecast, truth) + errors(forecast * series.std, truth * series.std)
    return result


def evaluate(windows, predictions, q_halt, out_dir):
    """train.py's hook for one evaluation split (Windows): the model's forecasts (n, horizon, F), normalised,
    of its first n windows. Returns their errors in real units, and the baselines' on the normalised scale
    (train.py reports the model's own there: mse, mae)."""
    result = scores(windows, predictions)
    metrics = dict(mse_real=result["model"][2], mae_real=result["model"][3])
    for name in ("last_value", "dlinear"):
        metrics[f"{name}_mse"], metrics[f"{name}_mae"] = result[name][:2]
    return metrics


# -----------------------------------------------------------------------------
# a forecast as an SVG chart (standard library only), for sample.py

def nice_ticks(low, high, count=6):
    """About `count` round values spanning [low, high]: steps of 1, 2 or 5 x 10^k."""
    span = max(high - low, 1e-12)
    step = 10 ** np.floor(np.log10(span / count))
    step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= count)
    return [float(v) + 0.0 for v in np.arange(np.ceil(low / step) * step, high + step * 1e-9, step)]  # no -0


def forecast_svg(history, forecast, truth, title, y_label, x_label, width=900, height=420):
    """An SVG line chart of one variable: its history (steps -L..-1), then the forecast and the truth over the
    horizon (steps 0..H-1), with axes, ticks, labels and a legend. Returns the SVG text."""
    left, right, top, bottom = 70, 20, 50, 50
    L, H = len(history), len(forecast)
    low, high = min(map(np.min, (history, forecast, truth))), max(map(np.max, (history, forecast, truth)))
    low, high = low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9)
    x = lambda step: left + (step + L) / max(L + H - 1, 1) * (width - left - right)
    y = lambda value: top + (high - value) / (high - low) * (height - top - bottom)
    line = lambda steps, values, color, dash="": (
        f'<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} points="'
        + " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, values)) + '"/>')
    esc = xml.sax.saxutils.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{esc(title)}</text>']
    for value in nice_ticks(low, high):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:g}</text>')
    for step in nice_ticks(-L, H - 1, count=10):
        parts.append(f'<line x1="{x(step):.1f}" x2="{x(step):.1f}" y1="{height - bottom}" y2="{height - bottom + 5}" '
                     f'stroke="black"/><text x="{x(step):.1f}" y="{height - bottom + 18}" '
                     f'text-anchor="middle">{step:g}</text>')
    parts += [f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="black"/>',
              f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="black"/>',
              f'<line x1="{x(-0.5):.1f}" x2="{x(-0.5):.1f}" y1="{top}" y2="{height - bottom}" stroke="#999" '
              f'stroke-dasharray="4 3"/>',
              f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">{esc(x_label)}</text>',
              f'<text transform="translate(16 {(top + height - bottom) / 2}) rotate(-90)" '
              f'text-anchor="middle">{esc(y_label)}</text>',
              line(range(-L, 0), history, "#444"), line(range(H), truth, "#2a7d2a"),
              line(range(H), forecast, "#d03030", ' stroke-dasharray="6 3"')]
    for i, (label, color) in enumerate((("history", "#444"), ("truth", "#2a7d2a"), ("forecast", "#d03030"))):
        at = width - right - 300 + 100 * i  # above the plot's top right corner
        parts.append(f'<line x1="{at}" x2="{at + 25}" y1="{top - 12}" y2="{top - 12}" stroke="{color}" '
                     f'stroke-width="2"/><text x="{at + 30}" y="{top - 8}">{label}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def format_step(seconds):
    """A time step in words: '1 h', '15 min', '1 day', '90 s'."""
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


if __name__ == "__main__":
    exit_cleanly("prepare_timeseries.py")  # bad input: one line, not a traceback; SIGTERM cleans up as Ctrl-C does
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    main()
