"""The page a person reads for an analysed cohort: one row per scan, most involved first, and histograms.

:func:`write_cohort_page` takes the rows of ``cohort.csv`` (see :func:`models.analysis.cohort.report_row`)
and writes ``cohort.html`` beside it, with a thumbnail of each scan's lesion montage linked to its
``report.html`` and histograms of lung involvement and of the COVID-19 probabilities. Scans that failed
come last with their error.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

INVOLVEMENT = "total.involvement_percent"
PROBABILITIES = {"covid_cls.probability": "3D classifier", "mask_net_classifier.probability": "2D COVID-CT-Mask-Net"}
THUMBNAIL = "montage_lesions.png"  # written by utils.scan_report for every analysed scan
COLUMNS = {INVOLVEMENT: "involved (%)", "total.lung_ml": "lungs (mL)", "total.lesion_ml": "lesions (mL)",
           "severity_total": "severity (0-10)", **{k: f"COVID-19, {v}" for k, v in PROBABILITIES.items()}}
STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td.id{text-align:left}"
         ".error{color:#b00}img.thumb{width:160px}")


def write_cohort_page(rows: list[dict], out: str | Path) -> Path:
    """Write ``<out>/cohort.html`` and its histograms (``cohort_involvement.png``, ``cohort_covid.png``).

    Args:
        rows: the table's rows (values as numbers or as the strings of ``cohort.csv``; ``status`` ``ok``
            or ``error``).
        out: the cohort's output folder (each scan's report in ``<out>/<scan_id>/``).

    Returns:
        Path of ``cohort.html``.
    """
    out = Path(out)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=_by_involvement)
    failed = [r for r in rows if r["status"] != "ok"]
    pictures = [histogram([_number(r.get(INVOLVEMENT)) for r in ok], out / "cohort_involvement.png",
                          title="Lung involvement", xlabel="lesions, % of lung volume", bins=20, limits=(0, 100)),
                _probability_histogram(ok, out / "cohort_covid.png")]
    columns = [c for c in COLUMNS if any(c in r and r[c] != "" for r in ok)]
    body = [f"<h1>Cohort: {len(rows)} scans, {len(ok)} analysed, {len(failed)} failed</h1>",
            "".join(f"<p><img src='{p.name}' alt='{p.stem}'></p>" for p in pictures if p is not None),
            _table(ok, columns), _failures(failed)]
    page = out / "cohort.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>Cohort</title><style>{STYLE}</style>"
                    f"</head><body>{''.join(body)}</body></html>\n")
    return page


def _by_involvement(row: dict) -> tuple[bool, float]:
    """Sort key: most involved first, scans without an involvement figure last."""
    value = _number(row.get(INVOLVEMENT))
    return math.isnan(value), -value


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def histogram(values: list[float], path: Path, *, title: str, xlabel: str, bins: int,
              limits: tuple[float, float], labels: list[str] | None = None, series: list[list[float]] | None = None
              ) -> Path:
    """A histogram PNG of one series of values (or several, with ``series`` and ``labels``)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(series if series is not None else [values], bins=bins, range=limits, label=labels)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("scans")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if labels:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _probability_histogram(rows: list[dict], path: Path) -> Path | None:
    found = {k: [_number(r[k]) for r in rows if r.get(k, "") != ""] for k in PROBABILITIES}
    found = {k: v for k, v in found.items() if v}
    if not found:
        return None
    return histogram([], path, title="COVID-19 probability", xlabel="probability", bins=10, limits=(0, 1),
                     labels=[PROBABILITIES[k] for k in found], series=list(found.values()))


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(COLUMNS[c])}</th>" for c in columns)
    lines = []
    for r in rows:
        sid = html.escape(r["scan_id"])
        link = f"<a href='{sid}/report.html'><img class='thumb' src='{sid}/{THUMBNAIL}' alt='{sid}'><br>{sid}</a>"
        cells = "".join(f"<td>{_format(r.get(c, ''))}</td>" for c in columns)
        warn = f" <span class='error'>({len(str(r['warnings']).split(' | '))} warnings)</span>" if r.get("warnings") \
            else ""
        lines.append(f"<tr><td class='id'>{link}{warn}</td>{cells}</tr>")
    return f"<table><tr><th>scan</th>{head}</tr>{''.join(lines)}</table>"


def _format(value) -> str:
    number = _number(value)
    return "" if value == "" else f"{number:.3g}" if number == number else html.escape(str(value))


def _failures(rows: list[dict]) -> str:
    if not rows:
        return ""
    items = "".join(f"<li><b>{html.escape(r['scan_id'])}</b> ({html.escape(str(r['input']))}): "
                    f"{html.escape(str(r['error']))}</li>" for r in rows)
    return f"<h2 class='error'>Failed ({len(rows)})</h2><ul>{items}</ul>"
