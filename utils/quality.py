"""The quality summary of a demo or benchmark run: each model's test result beside its goal.

``collect_summary`` reads the files that the evaluation scripts wrote in a run folder laid out as
``demo.py`` lays it out, and returns the ``summary.json`` dict::

    {"seed": 0, "budget": "fast", "minutes": 17.2,
     "mask_net_segmentation": {"segm_mAP": ..., "segm_AP50": ..., "train_minutes": ...},
     "mask_net_classifier": {"slice_accuracy": ..., "macro_auc": ..., "scan_accuracy": ..., "train_minutes": ...},
     "lung_seg": {"mean_dice": ..., "cases": ...}, "lesion_seg": {...}, "covid_cls": {"auc": ..., ...}}

An entry appears only when its evaluation file exists. ``quality_rows`` checks the entries against
goals (:data:`DEMO_FLOORS` for the demo, :data:`FULL_GOALS` for ``benchmarks/bench_quality.py
--budget full``); ``markdown_table`` and ``html_table`` print them.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

# (model, metric) -> lowest passing value on the test split.
DEMO_FLOORS = {
    ("mask_net_segmentation", "segm_AP50"): 0.30, ("mask_net_segmentation", "segm_mAP"): 0.10,
    ("mask_net_classifier", "slice_accuracy"): 0.70, ("mask_net_classifier", "macro_auc"): 0.85,
    ("lung_seg", "mean_dice"): 0.90, ("lesion_seg", "mean_dice"): 0.50, ("covid_cls", "auc"): 0.80,
}
FULL_GOALS = {
    ("mask_net_segmentation", "segm_mAP"): 0.40, ("mask_net_segmentation", "segm_AP50"): 0.70,
    ("mask_net_segmentation_resnet34", "segm_mAP"): 0.40,
    ("mask_net_classifier", "slice_accuracy"): 0.90, ("mask_net_classifier", "macro_auc"): 0.97,
    ("mask_net_classifier", "scan_accuracy"): 0.95,
    ("lung_seg", "mean_dice"): 0.95, ("lesion_seg", "mean_dice"): 0.70, ("covid_cls", "auc"): 0.95,
    ("organ_seg", "mean_dice"): 0.70, ("organ_seg", "gain"): 1e-9,  # a gain above zero
}
# The least number of test cases behind each goal (covid_cls needs enough scans for an AUC).
MIN_CASES = {"fast": {"covid_cls": 10}, "full": {"covid_cls": 30}}
# Entry of the summary -> (run folder, evaluation file in it, training step).
SOURCES = {
    "mask_net_segmentation": ("segmentation", "eval/metrics.json", "train_seg"),
    "mask_net_segmentation_resnet34": ("segmentation_resnet34", "eval/metrics.json", "train_seg_resnet34"),
    "mask_net_classifier": ("classifier", "eval/metrics.json", "train_cls"),
    "lung_seg": ("lung_seg", "test/metrics.json", "train_lung_seg"),
    "lesion_seg": ("lesion_seg", "test/metrics.json", "train_lesion_seg"),
    "covid_cls": ("covid_cls", "test/metrics.json", "train_covid_cls"),
    "organ_seg": ("organ_seg", "test/metrics.json", "train_organ_seg"),
}


def _segmentation(metrics: dict) -> dict:
    segm = metrics["segm"]
    return {"segm_mAP": segm["mAP"], "segm_AP50": segm["AP50"], "bbox_mAP": metrics["bbox"]["mAP"],
            "slices": segm["num_images"], "predictions": segm["num_predictions"]}


def _classifier(metrics: dict) -> dict:
    out = {"slice_accuracy": metrics["slice"]["accuracy"], "macro_auc": metrics["slice"]["macro_auc"],
           "slices": metrics["slice"]["n"]}
    if "scan" in metrics:
        out.update(scan_accuracy=metrics["scan"]["accuracy"], scan_macro_auc=metrics["scan"]["macro_auc"],
                   scans=metrics["scan"]["n"])
    return out


def _dice(metrics: dict) -> dict:
    """Mean Dice and the cases in the mean (with ``ignore_empty``, those whose ground truth is not empty)."""
    ignore_empty = bool(metrics.get("ignore_empty", False))
    cases = metrics["cases"] - (metrics.get("empty_ground_truth_cases", 0) if ignore_empty else 0)
    return {"mean_dice": metrics["mean_dice"], "cases": cases, "ignore_empty": ignore_empty}


def _covid(metrics: dict) -> dict:
    return {key: metrics[key] for key in ("auc", "accuracy", "sensitivity", "specificity", "cases")}


def _organs(metrics: dict) -> dict:
    return {"mean_dice": metrics["mean_dice"], "cases": metrics["cases"]}


READERS = {"mask_net_segmentation": _segmentation, "mask_net_segmentation_resnet34": _segmentation,
           "mask_net_classifier": _classifier, "lung_seg": _dice, "lesion_seg": _dice, "covid_cls": _covid,
           "organ_seg": _organs}


def collect_summary(run: str | Path, *, seed: int, budget: str, minutes: float,
                    step_seconds: dict[str, float] | None = None) -> dict:
    """The ``summary.json`` dict of a run folder (see the module docstring).

    Args:
        run: the run folder (``demo.py --out``).
        seed, budget, minutes: recorded as given.
        step_seconds: step name -> seconds; gives each entry its ``train_minutes``.

    Raises:
        ValueError: naming the file when an evaluation file lacks a key it should hold.
    """
    run, step_seconds = Path(run), step_seconds or {}
    summary: dict = {"seed": int(seed), "budget": budget, "minutes": round(float(minutes), 2)}
    for name, (folder, filename, train_step) in SOURCES.items():
        path = run / folder / filename
        if not path.is_file():
            continue
        try:
            entry = READERS[name](json.loads(path.read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not the evaluation output expected for {name} ({err!r})") from err
        if train_step in step_seconds:
            entry["train_minutes"] = round(step_seconds[train_step] / 60.0, 2)
        summary[name] = entry
    _add_random_init(summary, run / "organ_seg_random" / "test" / "metrics.json")
    return summary


def _add_random_init(summary: dict, path: Path) -> None:
    """organ_seg's ``mean_dice_random_init`` and ``gain`` over it, from the randomly initialised run."""
    if "organ_seg" in summary and path.is_file():
        random_init = json.loads(path.read_text())["mean_dice"]
        summary["organ_seg"].update(mean_dice_random_init=random_init,
                                    gain=summary["organ_seg"]["mean_dice"] - random_init)


def quality_rows(summary: dict, goals: dict) -> list[dict]:
    """One row per goal whose model is in ``summary``: model, metric, value, goal, cases, pass.

    A goal fails when its value is missing or NaN, or when the model was measured on fewer test
    cases than :data:`MIN_CASES` asks for the summary's budget.
    """
    rows = []
    needed = MIN_CASES.get(summary.get("budget", "fast"), {})
    for (model, metric), goal in goals.items():
        entry = summary.get(model)
        if entry is None:
            continue
        value = entry.get(metric, math.nan)
        cases = entry.get("scans") if metric.startswith("scan_") else entry.get("cases", entry.get("slices"))
        enough = cases is None or cases >= needed.get(model, 0)
        passed = value is not None and not math.isnan(value) and value >= goal and enough
        rows.append({"model": model, "metric": metric, "value": value, "goal": goal, "cases": cases,
                     "train_minutes": entry.get("train_minutes"), "pass": bool(passed)})
    return rows


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (model, metric, result, goal, test cases, training minutes, pass)."""
    lines = ["| model | metric | result | goal | test cases | training (min) | pass |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['metric']} | {_fmt(r['value'])} | >= {r['goal']:.2f} | {_fmt(r['cases'])} | "
              f"{_fmt(r['train_minutes'], 1)} | {'yes' if r['pass'] else 'NO'} |" for r in rows]
    return "\n".join(lines) + "\n"


def html_table(rows: list[dict]) -> str:
    """The rows as an HTML table, failing rows marked."""
    head = "".join(f"<th>{h}</th>" for h in ("model", "metric", "result", "floor", "test cases", "training (min)",
                                                "pass"))
    body = []
    for r in rows:
        cells = (r["model"], r["metric"], _fmt(r["value"]), f"&ge; {r['goal']:.2f}", _fmt(r["cases"]),
                 _fmt(r["train_minutes"], 1), "yes" if r["pass"] else "<b>no</b>")
        style = "" if r["pass"] else " style='background:#fde2e2'"
        body.append(f"<tr{style}>" + "".join(f"<td>{c if '&' in c or '<b>' in c else html.escape(c)}</td>"
                                            for c in cells) + "</tr>")
    return f"<table border=1 cellpadding=4 style='border-collapse:collapse'><tr>{head}</tr>{''.join(body)}</table>"
