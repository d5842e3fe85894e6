"""The report a person reads for one analysed scan: montages, quantities, probabilities, models.

:func:`write_report` takes the ``report.json`` dict of :func:`models.analysis.analyze` (what
``analyze_scan.py`` runs) and the masks, draws the pictures next to it and writes ``report.html``
(self-contained apart from the PNGs beside it). The run's warnings, when there are any, come first,
so that a report never looks clean when the run was not.
"""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils.plots_volume import MASK_COLOURS, axial_montage, display_slices  # noqa: E402

LUNG_COLOURS = (MASK_COLOURS[0], (0.2, 0.6, 1.0, 1.0), (0.2, 0.85, 0.4, 1.0))  # left blue, right green
LESION_COLOURS = (MASK_COLOURS[0], (1.0, 0.85, 0.1, 1.0), (1.0, 0.2, 0.2, 1.0))  # GGO yellow, consolidation red
SIDES = ("left", "right", "total")


def write_report(report: dict, image: np.ndarray, lungs: np.ndarray, lesions: np.ndarray, affine: np.ndarray,
                 out: str | Path) -> Path:
    """Draw the pictures and write ``<out>/report.html``.

    Args:
        report: the ``report.json`` dict (``quantities``, ``covid``, ``models``, ``files``, ``warnings``, ...).
        image: Float[X, Y, Z] HU; lungs, lesions: UInt8[X, Y, Z] label maps; affine: Float64[4, 4].
        out: output folder.

    Returns:
        Path of ``report.html``.
    """
    out = Path(out)
    pictures = draw_pictures(report, image, lungs, lesions, affine, out)
    sections = [_header(report), _warning_box(report.get("warnings", [])), _quantity_table(report["quantities"]),
                _covid_table(report["covid"]),
                *(f"<h2>{html.escape(title)}</h2><p><img src='{html.escape(p.name)}' alt='{html.escape(title)}'></p>"
                  for title, p in pictures.items()),
                _models_table(report["models"]), _conventions(report)]
    page = out / "report.html"
    page.write_text("<!doctype html><meta charset=utf-8><title>Chest CT report</title>"
                    "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
                    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
                    ".warnings{background:#fff3cd;border:2px solid #d39e00;padding:4px 12px}"
                    "</style>\n" + "\n".join(sections) + "\n")
    return page


def draw_pictures(report: dict, image: np.ndarray, lungs: np.ndarray, lesions: np.ndarray, affine: np.ndarray,
                  out: Path) -> dict[str, Path]:
    """Montages of lungs and lesions over the lung's extent, the saliency overlay and the slice profile."""
    z_range = _lung_extent(lungs, affine)
    pictures = {
        "Lungs": axial_montage(image, lungs, out / "montage_lungs.png", affine=affine, window=(-1350.0, 150.0),
                               z_range=z_range, colours=LUNG_COLOURS, legend={1: "left lung", 2: "right lung"},
                               title="Lung segmentation (radiological view: patient's right on the left)"),
        "Lesions": axial_montage(image, lesions, out / "montage_lesions.png", affine=affine, window=(-1350.0, 150.0),
                                 z_range=z_range, colours=LESION_COLOURS, alpha=0.6,
                                 legend={1: "ground-glass opacity", 2: "consolidation"}, title="Lesions"),
        "Involvement and 2D probability per slice": slice_profile(report, lungs, lesions, affine,
                                                                  out / "slice_profile.png"),
    }
    overlay = report["covid"].get("covid_cls", {}).get("overlay")
    if overlay:
        pictures = {**pictures, "3D classifier GradCAM": Path(overlay)}
    return pictures


def slice_profile(report: dict, lungs: np.ndarray, lesions: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Percent of lung involved per axial slice and, when run, the 2D model's slice probabilities."""
    lung_area = display_slices(lungs > 0, affine).sum(axis=(1, 2))
    lesion_area = display_slices(lesions > 0, affine).sum(axis=(1, 2))
    percent = np.where(lung_area > 0, 100.0 * lesion_area / np.maximum(lung_area, 1), np.nan)
    fig, ax = plt.subplots(figsize=(8, 3), dpi=80)
    ax.plot(np.arange(len(percent)), percent, color="tab:red", label="lung involved (%)")
    ax.set_xlabel("axial slice (inferior to superior)")
    ax.set_ylabel("lung involved (%)")
    mask_net = report["covid"].get("mask_net_classifier")
    if mask_net:
        twin = ax.twinx()
        twin.plot(mask_net["slices"], mask_net["slice_probabilities"], "o-", color="tab:blue", ms=3,
                  label="2D p(COVID-19)")
        twin.set_ylim(0, 1)
        twin.set_ylabel("2D p(COVID-19)")
        fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _lung_extent(lungs: np.ndarray, affine: np.ndarray) -> tuple[int, int] | None:
    hits = np.flatnonzero(display_slices(lungs > 0, affine).any(axis=(1, 2)))
    return (int(hits[0]), int(hits[-1])) if hits.size else None


def _header(report: dict) -> str:
    grid = report["grid"]
    spacing = " x ".join(f"{s:.2f}" for s in grid["spacing_mm"])
    assumed = report.get("assumed")
    note = (f"<p><b>Assumed, not read from the scan:</b> {html.escape(str(assumed))}; volumes and lesion types "
            "are only as right as these.</p>") if assumed else ""
    return (f"<h1>Chest CT report</h1><p>Input: <code>{html.escape(report['input'])}</code><br>"
            f"Grid: {' x '.join(map(str, grid['shape']))} voxels of {spacing} mm</p>{note}")


def _warning_box(messages: list[str]) -> str:
    """The run's warnings, highlighted; empty when there are none."""
    if not messages:
        return ""
    items = "".join(f"<li>{html.escape(m)}</li>" for m in messages)
    return (f"<div class='warnings'><h2>Warnings ({len(messages)})</h2><p>The analysis warned about its input; "
            f"read the results with these in mind.</p><ul>{items}</ul></div>")


def _quantity_table(quantities: dict) -> str:
    rows = "".join(
        f"<tr><th>{side}</th><td>{v['lung_ml']:.1f}</td><td>{v['ggo_ml']:.1f}</td><td>{v['consolidation_ml']:.1f}</td>"
        f"<td>{v['involvement_percent']:.1f}</td><td>{v['severity_score']}</td></tr>"
        for side, v in ((s, quantities[s]) for s in SIDES))
    return ("<h2>Lungs and lesions</h2><table><tr><th></th><th>lung (mL)</th><th>GGO (mL)</th>"
            "<th>consolidation (mL)</th><th>involved (%)</th><th>severity (0-5)</th></tr>"
            f"{rows}</table><p>CT severity score, both lungs: <b>{quantities['severity_total']}</b> of 10 "
            "(total row: score of the whole lung's involvement)</p>")


def _covid_table(covid: dict) -> str:
    if not covid:
        return "<h2>COVID-19 probability</h2><p>No classifier was run.</p>"
    names = {"covid_cls": "3D DenseNet121 (lung region)",
             "mask_net_classifier": "2D COVID-CT-Mask-Net (mean over lung slices)"}
    rows = "".join(f"<tr><th>{html.escape(names.get(k, k))}</th><td>{v['probability']:.3f}</td></tr>"
                   for k, v in covid.items())
    return f"<h2>COVID-19 probability</h2><table>{rows}</table>"


def _models_table(models: list[dict]) -> str:
    rows = "".join(f"<tr><th>{html.escape(m['name'])}</th><td>{html.escape(m['builder'])}</td><td>{m['epoch']}</td>"
                   f"<td><code>{m['sha256'][:12]}</code></td><td><code>{html.escape(m['path'])}</code></td></tr>"
                   for m in models)
    return ("<h2>Models</h2><table><tr><th>model</th><th>builder</th><th>epoch</th><th>sha256</th><th>file</th></tr>"
            f"{rows}</table>")


def _conventions(report: dict) -> str:
    items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in report["conventions"].items())
    files = "".join(f"<li><a href='{html.escape(Path(p).name)}'>{html.escape(Path(p).name)}</a></li>"
                    for p in report["files"].values())
    return f"<h2>Conventions</h2><ul>{items}</ul><h2>Files</h2><ul>{files}</ul>"
