"""Parameter counts of the 2D models beside the published COVID-CT-Mask-Net figures.

    python -m models.summary

Segmentation rows are built with ``num_classes=2`` (mask_type merge, the original's default;
``both`` adds 645 parameters to the lightweight models). Counts include BatchNorm affine parameters.
"""
from __future__ import annotations

import argparse

import torch

from models.mask_net import maskrcnn_resnet_fpn

# Published figures (millions of parameters) of the segmentation models.
PUBLISHED_SEGMENTATION = {("resnet34", 1): 11.45, ("resnet18", 1): 6.12, ("resnet50", 0): 31.78}
TOLERANCE = 0.01  # relative difference that the README must explain when exceeded
SEGMENTATION_CONFIGS = [(name, t) for name in ("resnet18", "resnet34") for t in (0, 1, 2)] + [("resnet50", 0)]


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable) parameter counts of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def segmentation_rows(num_classes: int = 2) -> list[dict]:
    """One row per backbone x truncation: model name, total, published figure, relative difference."""
    rows = []
    for name, truncation in SEGMENTATION_CONFIGS:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = maskrcnn_resnet_fpn(backbone_name=name, truncation=truncation, num_classes=num_classes)
        total, trainable = count_parameters(model)
        rows.append(_row(f"{name}+FPN, truncation {truncation}", total, trainable,
                         PUBLISHED_SEGMENTATION.get((name, truncation))))
    return rows


def _row(model: str, total: int, trainable: int, published: float | None) -> dict:
    diff = None if published is None else (total / 1e6 - published) / published
    return {"model": model, "total": total, "trainable": trainable, "published_M": published, "rel_diff": diff}


def format_table(title: str, rows: list[dict]) -> str:
    """A plain-text table; rows beyond ``TOLERANCE`` are flagged with '!'."""
    lines = [title, f"{'model':<32} {'total (M)':>10} {'trainable (M)':>14} {'published (M)':>14} {'diff':>8}"]
    for r in rows:
        pub = "-" if r["published_M"] is None else f"{r['published_M']:.2f}"
        diff = "-" if r["rel_diff"] is None else f"{100 * r['rel_diff']:+.2f}%"
        flag = " !" if r["rel_diff"] is not None and abs(r["rel_diff"]) > TOLERANCE else ""
        lines.append(f"{r['model']:<32} {r['total'] / 1e6:>10.2f} {r['trainable'] / 1e6:>14.2f} {pub:>14} {diff:>8}{flag}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_classes", type=int, default=2,
                   help="classes of the segmentation models, background included (default: 2)")
    return p


def main(args: argparse.Namespace) -> None:
    print(format_table("Segmentation models (Mask R-CNN)", segmentation_rows(args.num_classes)))
    from models.mask_net.covid_mask_net import format_parameter_table, parameter_table

    print("\nCOVID-CT-Mask-Net classifiers (total and trainable: S + backbone BatchNorm affine)")
    print(format_parameter_table(parameter_table(num_classes=args.num_classes)))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
