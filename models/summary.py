"""Parameter counts of the 2D models beside the published COVID-CT-Mask-Net figures.

    python -m models.summary

The classifier rows follow the original's own table (total and trainable parameters: S and the
backbone's BatchNorm affine parameters), with notes where ours differ by more than 1%. Segmentation
rows are built with ``num_classes=2`` (mask_type merge, the original's default;
``both`` adds 645 parameters to the lightweight models). Counts include BatchNorm affine parameters.
"""
from __future__ import annotations

import argparse

import torch

from models.mask_net import covid_mask_net, maskrcnn_resnet_fpn

# Published figures (millions of parameters) of the segmentation models.
PUBLISHED_SEGMENTATION = {("resnet34", 1): 11.45, ("resnet18", 1): 6.12, ("resnet50", 0): 31.78}
TOLERANCE = 0.01  # relative difference that the README must explain when exceeded
SEGMENTATION_CONFIGS = [(name, t) for name in ("resnet18", "resnet34") for t in (0, 1, 2)] + [("resnet50", 0)]


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter values of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def segmentation_rows(num_classes: int = 2) -> list[dict]:
    """One row per backbone x truncation: model name, total, published figure, relative difference."""
    rows = []
    for name, truncation in SEGMENTATION_CONFIGS:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = maskrcnn_resnet_fpn(backbone_name=name, truncation=truncation, num_classes=num_classes)
        total, trainable = parameter_counts(model)
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
        sizes = f"{r['total'] / 1e6:>10.2f} {r['trainable'] / 1e6:>14.2f}"
        lines.append(f"{r['model']:<32} {sizes} {pub:>14} {diff:>8}{flag}")
    return "\n".join(lines)


# The original's table: (backbone, truncation, B, s_features) -> (total, trainable) in millions.
ORIGINAL_PARAMETER_TABLE = {
    ("resnet34", 0, 128, 512): (24.86, 0.6), ("resnet34", 1, 128, 512): (11.74, 0.6),
    ("resnet34", 2, 128, 512): (4.92, 0.6), ("resnet18", 0, 128, 512): (14.75, 0.6),
    ("resnet18", 1, 128, 512): (6.35, 0.6), ("resnet18", 2, 128, 512): (4.25, 0.6),
    ("resnet50", 0, 256, 1024): (34.14, 2.36),
}
# Why a row differs from the published figure by more than 1% (README text).
FPN_LATERAL_NOTE = ("total: ours is lower by about the difference between a 512-channel and our {c}-channel "
                    "FPN lateral 1x1 convolution ({d:,} parameters); the published truncated rows are consistent "
                    "with a lateral convolution that reads 512 channels whatever the truncation, while ours reads "
                    "the channels of the last kept stage, as the forward pass needs")
TRAINABLE_ROUNDING_NOTE = "trainable: the published figure has one decimal (0.6M); ours rounds to the same value"
RESNET50_NOTES = ("total: ours has no mask branch (2.62M in the segmentation model's torchvision-style 4x256 mask "
                  "head and predictor); counting it, ours would be 34.09M (-0.1%), so the published figure appears "
                  "to include the unused mask branch",
                  "trainable: ours counts the 53,120 BatchNorm affine parameters of the ResNet50 body; S alone is "
                  "2.364M (+0.2%), matching the published figure, which leaves BatchNorm out (as torchvision's "
                  "FrozenBatchNorm2d would; norm='frozen' builds that variant)")


def parameter_table(*, num_classes: int = 2) -> list[dict]:
    """Our parameter counts beside the original's, one row per configuration of its table.

    Models are built on the meta device (shapes only, no memory or initialisation).

    Args:
        num_classes: the segmentation model's classes (2, mask_type merge, the original's default,
            as the segmentation rows; 3 adds 645 parameters to every row).

    Returns:
        Per row: ``model`` (name), ``total`` and ``trainable`` (ours), ``original_total`` and
        ``original_trainable`` (millions, as published), ``total_diff`` / ``trainable_diff``
        (relative differences of ours from the published figures) and ``notes`` (why a figure
        differs by more than 1%).
    """
    rows = []
    for (backbone_name, truncation, b, s), (orig_total, orig_trainable) in ORIGINAL_PARAMETER_TABLE.items():
        with torch.device("meta"):
            model = covid_mask_net(backbone_name=backbone_name, truncation=truncation, num_classes=num_classes,
                                   roi_batch_size=b, s_features=s)
        total, trainable = parameter_counts(model)
        name = f"{backbone_name}+FPN, " + ("full" if backbone_name == "resnet50" else f"truncation {truncation}")
        row = {"model": f"COVID-CT-Mask-Net {name} (B={b}, S={s})", "total": total, "trainable": trainable,
               "original_total": orig_total, "original_trainable": orig_trainable,
               "total_diff": total / (orig_total * 1e6) - 1, "trainable_diff": trainable / (orig_trainable * 1e6) - 1}
        rows.append({**row, "notes": _notes(row, model)})
    return rows


def _notes(row: dict, model) -> list[str]:
    """Explanations for the differences above 1% of one row."""
    if row["model"].startswith("COVID-CT-Mask-Net resnet50"):
        return list(RESNET50_NOTES)
    notes = []
    if abs(row["total_diff"]) > 0.01:
        channels = model.backbone.body.out_channels_list[-1]
        notes.append(FPN_LATERAL_NOTE.format(c=channels, d=(512 - channels) * model.backbone.out_channels))
    if abs(row["trainable_diff"]) > 0.01 and round(row["trainable"] / 1e6, 1) == row["original_trainable"]:
        notes.append(TRAINABLE_ROUNDING_NOTE)
    return notes


def format_parameter_table(rows: list[dict]) -> str:
    """The rows of :func:`parameter_table` as a text table (millions; relative differences in %)."""
    lines = [f"{'model':<58}{'total':>9}{'orig.':>8}{'diff':>8}{'trainable':>11}{'orig.':>7}{'diff':>8}"]
    for r in rows:
        total = f"{r['total'] / 1e6:>8.2f}M{r['original_total']:>7.2f}M{100 * r['total_diff']:>+7.1f}%"
        trainable = f"{r['trainable'] / 1e6:>10.3f}M{r['original_trainable']:>6.2f}M{100 * r['trainable_diff']:>+7.1f}%"
        lines.append(f"{r['model']:<58}{total}{trainable}")
        lines += [f"    note: {note}" for note in r["notes"]]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_classes", type=int, default=2,
                   help="classes of the segmentation models, background included (default: 2)")
    return p


def main(args: argparse.Namespace) -> None:
    print(format_table("Segmentation models (Mask R-CNN)", segmentation_rows(args.num_classes)))
    print("\nCOVID-CT-Mask-Net classifiers (total and trainable: S + backbone BatchNorm affine)")
    print(format_parameter_table(parameter_table(num_classes=args.num_classes)))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
