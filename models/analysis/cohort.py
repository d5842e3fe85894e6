"""Many scans through the pipeline: what the input lists, one output folder per scan, one table for all.

The input of ``analyze_scan.py`` is one scan, or a cohort: a folder of scans (NIfTI files and/or
sub-folders that each hold one DICOM series or one folder of slice pictures), a ``.txt`` or ``.csv``
file listing scan paths, or a MONAI ``dataset.json`` (one of its sections). :func:`find_scans`
(:mod:`.inputs`) tells which; :func:`analyze_cohort` runs the scans with the models loaded once,
writes each scan's folder under a temporary name and renames it when complete, skips scans already
analysed with the same models, and keeps going past a bad scan; ``workers`` processes read the next
scans meanwhile. Shards (:func:`shard_of`) split a cohort over processes or
jobs; :func:`merge_shards` joins their tables::

    python -m models.analysis.cohort merge runs/cohort     # cohort-shard-*.csv -> cohort.csv
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from utils.cli import USER_ERRORS, resolve_device
from utils.cohort_report import write_cohort_page
from utils.distributed import DistContext, barrier, cleanup_distributed, setup_distributed

from .inputs import DEFAULT_SECTION, Cohort, find_scans, scan_id, unique_ids
from .loading import CLASSIFIERS, MODELS, Models
from .pipeline import analyze
from .scan import read_scan

COHORT_CSV = "cohort.csv"
TMP_PREFIX = ".tmp-"
BASE_COLUMNS = ("scan_id", "input", "status", "error")
BARRIER_TIMEOUT = timedelta(days=7)  # under torchrun: how long a process that is done waits for the others
__all__ = ["DEFAULT_SECTION", "Cohort", "CohortFailed", "analyze_cohort", "find_scans", "merge_shards", "parse_shard",
           "report_row", "run_cohort", "scan_id", "shard_of", "unique_ids", "write_table"]


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N) with 0 <= I < N (argparse type)."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"a shard is I/N with 0 <= I < N, e.g. 0/4, got {text!r}")
    return int(match[1]), int(match[2])


def shard_of(path: str | os.PathLike, count: int) -> int:
    """The shard (0..count-1) of a scan: sha1 of its path string mod ``count``, the same in every process."""
    return int(hashlib.sha1(str(path).encode()).hexdigest(), 16) % count


def shard_csv_name(index: int, count: int) -> str:
    return f"cohort-shard-{index}-of-{count}.csv"


def run_cohort(cohort: Cohort, load: Callable[[torch.device], Models], *, out_dir: str | os.PathLike,
               device: str = "cpu", shard: tuple[int, int] | None = None, **options) -> list[dict]:
    """The cohort in this process, or under ``torchrun`` in every process, and its summary line.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the rank and world size choose the shard; after a barrier
    (gloo, waiting up to :data:`BARRIER_TIMEOUT` for the slowest shard) rank 0 merges every shard's
    table into ``cohort.csv``.

    Args:
        cohort: from :func:`find_scans`.
        load: device -> the models (:func:`models.analysis.load_models`), called once per process.
        out_dir: the cohort's output folder.
        device: ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun ``cuda`` becomes ``cuda:LOCAL_RANK``).
        shard: (I, N), see :func:`analyze_cohort`; ignored under torchrun.
        **options: keyword arguments of :func:`analyze_cohort` (``workers``, ``verbose``) and of
            :func:`models.analysis.analyze`.

    Returns:
        The rows of this process's table (rank 0 under torchrun: of the merged table, which it alone reports).

    Raises:
        CohortFailed: after every scan was tried, when one failed (rank 0 under torchrun: any rank's).
    """
    # The processes meet only at the end, where the first done may wait for the slowest shard.
    ctx = setup_distributed(resolve_device(str(device)), backend="gloo", timeout=BARRIER_TIMEOUT)
    try:
        rows, table = _run_shard(cohort, load, ctx, out_dir=Path(out_dir), shard=shard, **options)
    except BaseException:
        cleanup_distributed(ctx, wait=False)
        raise
    cleanup_distributed(ctx)
    if not ctx.is_main:  # rank 0 reports the merged table
        return rows
    if any(row["status"] != "ok" for row in rows):
        raise CohortFailed(summary_line(rows, table))
    print(summary_line(rows, table), flush=True)
    return rows


def _run_shard(cohort: Cohort, load, ctx: DistContext, *, out_dir: Path, shard, **options) -> tuple[list[dict], Path]:
    """This process's share of the cohort and its table; under torchrun rank 0 returns the merged table."""
    shard = (ctx.rank, ctx.world_size) if ctx.distributed else shard
    rows = analyze_cohort(cohort, load(ctx.device), out_dir=out_dir, shard=shard, **options)
    table = out_dir / (shard_csv_name(*shard) if shard else COHORT_CSV)
    if ctx.distributed:
        barrier(ctx)
        if ctx.is_main:
            table, rows = merge_shards(out_dir)
    return rows, table


def analyze_cohort(cohort: Cohort, models: Models, *, out_dir: str | os.PathLike,
                   shard: tuple[int, int] | None = None, workers: int = 0, verbose: bool = True,
                   **options) -> list[dict]:
    """Analyse the cohort's scans (this shard's), each into ``out_dir/<scan id>``, and write the table.

    A scan whose folder holds a ``report.json`` made with the same models (sha256) is not analysed
    again; its row is read back. Each scan is written to ``out_dir/.tmp-<scan id>`` and renamed when
    complete, so a killed run leaves no half-written scan folder (the temporary one is redone). A scan
    that fails gets ``status`` ``error`` and a one-line message; the others go on.

    Args:
        cohort: from :func:`find_scans`.
        models: from :func:`models.analysis.load_models` (loaded once, when the first scan needs them).
        out_dir: the cohort's output folder.
        shard: (I, N) to analyse only the scans of shard I of N (:func:`shard_of`); the table is then
            ``cohort-shard-I-of-N.csv``, else ``cohort.csv``.
        workers: processes that read the next scans (:func:`models.analysis.read_scan`: the file,
            the HU and NaN checks, slice pictures stacked) while the models run on the current one;
            0 reads each scan in this process when its turn comes.
        verbose: print each scan and each step.
        **options: keyword arguments of :func:`models.analysis.analyze`.

    Returns:
        One row per scan (see :func:`report_row`), in path order; the table is rewritten after each scan.
        The whole cohort (no ``shard``) also gets ``cohort.html`` (:func:`utils.cohort_report.write_cohort_page`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [p for p in cohort.paths if shard is None or shard_of(p, shard[1]) == shard[0]]
    table = out / (shard_csv_name(*shard) if shard else COHORT_CSV)
    cards, rows, todo = models.cards(), {}, []
    for path in paths:
        done = _previous_report(out / cohort.ids[path], cards)
        if done is None:
            todo.append(path)
        else:
            rows[path] = report_row(done, path=path, scan_id=cohort.ids[path])
    if verbose:
        print(f"{len(paths)} scans: {len(rows)} done before with the same models, {len(todo)} to analyse", flush=True)
    reader = ScanReader([(p, out / f"{TMP_PREFIX}{cohort.ids[p]}") for p in todo], **_read_options(options))
    for i, (path, item) in enumerate(zip(todo, stream(reader, workers=workers)), 1):
        if verbose:
            print(f"scan {i}/{len(todo)}: {cohort.ids[path]} ({path})", flush=True)
        rows[path] = _analyze_one(item, path, cohort.ids[path], models, out=out, verbose=verbose, **options)
        write_table(list(rows.values()), table)
    if not todo:  # every scan was done before: the table is written from their reports
        write_table(list(rows.values()), table)
    if shard is None:
        write_cohort_page(list(rows.values()), out)
    return [rows[p] for p in paths]


def _previous_report(folder: Path, cards: list[dict]) -> dict | None:
    """The scan's ``report.json`` when it was made with the models of ``cards`` (same names and sha256)."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    same = [(m.get("name"), m.get("sha256")) for m in report.get("models", [])] == \
           [(m["name"], m["sha256"]) for m in cards]
    return report if same else None


def _analyze_one(item: dict, path: Path, sid: str, models: Models, *, out: Path, verbose: bool,
                 **options) -> dict:
    """One scan (read by :class:`ScanReader` into ``out/.tmp-<id>``) analysed there, renamed to ``out/<id>``
    when complete; its row, ``error`` on failure."""
    tmp, final = out / f"{TMP_PREFIX}{sid}", out / sid
    models.load_all()  # a model that cannot be loaded stops the cohort: raised here, not caught below
    try:
        if item["error"] is not None:
            raise item["error"]
        report = analyze(item["scan"], models, out_dir=tmp, verbose=verbose, **options)
    except Exception as err:  # noqa: BLE001 - a bad scan must not stop the cohort
        if verbose and not isinstance(err, USER_ERRORS):
            traceback.print_exception(err)
        message = error_message(err)
        print(f"error: {sid}: {message}", file=sys.stderr, flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
        return {"scan_id": sid, "input": str(path), "status": "error", "error": message}
    summary = _moved(report.summary, tmp, final)
    (tmp / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)  # made with other models
    os.replace(tmp, final)
    if verbose:
        print(f"      complete: {final}", flush=True)
    return report_row(summary, path=path, scan_id=sid)


READ_OPTIONS = ("png_window", "png_spacing", "allow_non_hu", "fill_nan")


def _read_options(options: dict) -> dict:
    """The options of :func:`models.analysis.analyze` that :func:`read_scan` takes."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items() if k in READ_OPTIONS}


class ScanReader(torch.utils.data.Dataset):
    """The scans of a cohort, each read by :func:`read_scan` into its (emptied) temporary output folder.

    Item ``i``: ``{"scan": Scan, "error": None}``, or ``{"scan": None, "error": the exception}`` when the
    scan cannot be read (raised again where it is analysed, so that it becomes that scan's error row).
    The warnings of the reading travel with the :class:`Scan` (``read_warnings``).
    """

    def __init__(self, items: list[tuple[Path, Path]], **read):
        self.items, self.read = items, read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, tmp = self.items[index]
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        tmp.mkdir(parents=True)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scan = read_scan(path, out_dir=tmp, **self.read)
        except Exception as err:  # noqa: BLE001 - handed to the analysis, which lists it as the scan's error
            return {"scan": None, "error": _picklable(err)}
        scan.read_warnings = tuple((w.category, str(w.message)) for w in caught)
        return {"scan": scan, "error": None}


def _picklable(err: Exception) -> Exception:
    """``err``, or a RuntimeError with its message when it cannot travel between processes."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(error_message(err))


def stream(reader: ScanReader, *, workers: int):
    """The reader's items in order, read ``workers`` scans ahead by as many processes (0: read here, in turn)."""
    if workers == 0:
        return (reader[i] for i in range(len(reader)))
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers, prefetch_factor=1,
                                         collate_fn=_as_is)
    return iter(loader)


def _as_is(item):
    return item


def error_message(err: BaseException) -> str:
    """One line: the project's message (it names the file), with the error's type when it is not a user error."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, USER_ERRORS) else f"{type(err).__name__}: {text}"


def _moved(summary: dict, tmp: Path, final: Path) -> dict:
    """``report.json``'s dict with the paths of files in ``tmp`` pointing into ``final``."""
    old, new = str(tmp), str(final)
    summary = json.loads(json.dumps(summary))  # the JSON values, as report.json holds them

    def move(value):
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
            return new + value[len(old):]
        return value

    return move(summary)


def report_row(report: dict, *, path: str | os.PathLike, scan_id: str) -> dict:
    """The table's row of one analysed scan.

    Columns: ``scan_id``, ``input``, ``status`` (``ok``), ``error`` (empty), every quantity as
    ``<region>.<quantity>`` (e.g. ``left.lung_ml``), ``<classifier>.probability``, ``warnings``
    (joined by `` | ``) and ``<model>.sha256``.
    """
    row = {"scan_id": scan_id, "input": str(path), "status": "ok", "error": ""}
    for region, values in report["quantities"].items():
        if isinstance(values, dict):
            row.update({f"{region}.{k}": v for k, v in values.items()})
        else:
            row[region] = values
    for name in CLASSIFIERS:
        if name in report.get("covid", {}):
            row[f"{name}.probability"] = report["covid"][name]["probability"]
    row["warnings"] = " | ".join(" ".join(w.split()) for w in report.get("warnings", []))
    row.update({f"{m['name']}.sha256": m["sha256"] for m in report.get("models", [])})
    return row


def _column_group(name: str) -> int:
    if name in BASE_COLUMNS:
        return BASE_COLUMNS.index(name)
    if name.endswith(".probability"):
        return 20
    if name == "warnings":
        return 30
    model = name.removesuffix(".sha256")
    if model != name:
        return 40 + (list(MODELS).index(model) if model in MODELS else len(MODELS))
    return 10  # quantities


def write_table(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write rows as a csv sorted by scan id (columns: identity, quantities, probabilities, warnings, models),
    atomically (a temporary file, then rename)."""
    path = Path(path)
    rows = sorted(rows, key=lambda row: row["scan_id"])
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    columns.sort(key=_column_group)  # stable: quantities keep the report's order
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def read_table(path: str | os.PathLike) -> list[dict]:
    """The rows of a table written by :func:`write_table` (values as strings)."""
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def merge_shards(out_dir: str | os.PathLike) -> tuple[Path, list[dict]]:
    """Join ``cohort-shard-I-of-N.csv`` of every shard into ``cohort.csv``, sorted by scan id, and ``cohort.html``.

    Raises:
        FileNotFoundError: when ``out_dir`` holds no shard table.
        ValueError: naming the shards that are missing, or tables of different shard counts.
    """
    out = Path(out_dir)
    found = {}
    for path in out.glob("cohort-shard-*-of-*.csv"):
        match = re.fullmatch(r"cohort-shard-(\d+)-of-(\d+)\.csv", path.name)
        if match:
            found[(int(match[1]), int(match[2]))] = path
    if not found:
        raise FileNotFoundError(f"{out}: no cohort-shard-I-of-N.csv to merge")
    counts = sorted({n for _, n in found})
    if len(counts) > 1:
        raise ValueError(f"{out}: shard tables of different shard counts {counts}; remove the stale ones")
    missing = [i for i in range(counts[0]) if (i, counts[0]) not in found]
    if missing:
        raise ValueError(f"{out}: shards {missing} of {counts[0]} have no table yet "
                         f"({', '.join(shard_csv_name(i, counts[0]) for i in missing)})")
    rows = [row for key in sorted(found) for row in read_table(found[key])]
    write_cohort_page(rows, out)
    return write_table(rows, out / COHORT_CSV), rows


def summary_line(rows: list[dict], table: Path) -> str:
    failed = [r["scan_id"] for r in rows if r["status"] != "ok"]
    line = f"{len(rows) - len(failed)} of {len(rows)} scans ok, {len(failed)} failed"
    return f"{line} ({', '.join(failed)}); table: {table}" if failed else f"{line}; table: {table}"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Merge the shard tables of a cohort run into cohort.csv.")
    p.add_argument("command", choices=["merge"], help="merge: cohort-shard-*.csv -> cohort.csv (sorted by scan id)")
    p.add_argument("out", help="the cohort's --out folder")
    return p


def main(args: argparse.Namespace) -> list[dict]:
    table, rows = merge_shards(args.out)
    if any(r["status"] != "ok" for r in rows):
        raise CohortFailed(summary_line(rows, table))
    print(summary_line(rows, table))
    return rows


class CohortFailed(ValueError):
    """Some scans of a cohort failed (the others were analysed; the table says which and why)."""


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main, get_args_parser())
