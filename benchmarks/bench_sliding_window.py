"""Lesion sliding-window inference: our path against the MONAI tutorial default, same network and weights.

Canonical command, from the repository root (about 4 minutes on 2 CPU cores; ``--quick`` is a 4x smaller
analogue)::

    python -m benchmarks.bench_sliding_window

A 512 x 512 x 64-slice COVID-19 phantom chest CT is pre-processed with the lesion_seg transforms
(RAS, 0.8 x 0.8 x 5 mm, [-1000, 500] HU) once; both paths then segment the same resampled volume:

- reference: ``sliding_window_inference`` over the whole volume, ROI 224 x 224 x 32, overlap 0.25,
  ``sw_batch_size`` 4, fp32, constant blending, under ``torch.no_grad()``;
- ours: ``models.volumetric.inference.segment`` with the lesion_seg defaults: windows only inside
  the lung bounding box (lesions lie in the lungs), grown to at least the ROI so that windows hold
  image rather than padding, channels-last 3D weights and windows, Gaussian blending,
  ``torch.inference_mode()``.

The SegResNet is random-initialised; only its last 1x1x1 convolution is then fitted (a logistic
readout of the random features, seconds on a CPU) so that the foreground is not trivial. Training the
whole network is out of a benchmark's budget on a CPU, and the phantom's lesions are too small for a
readout, so by default the readout target is the lung field (``--target lesion`` for the lesions).
The script prints one row per variant: the reference, each of our changes alone, our path with the
reference's constant blending (``--blend_mode constant``, so that only the speed-ups differ), and
our default path (Gaussian blending) without and with the lung box; each
row gives its time, speed-up and Dice agreement against the reference, the foreground fraction, and
the Dice against the fitted target (or the lesions).

A readout of random features is a weak model whose output depends on where the windows fall, so its
agreement says little. ``--ckpt`` takes a trained lesion_seg checkpoint instead (weights, spacing
and HU window from the checkpoint, ROI as above), and the target is the phantom's lesions::

    python -m benchmarks.bench_sliding_window --ckpt runs/demo/lesion_seg/checkpoint_best.pth
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import nibabel as nib
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Compose

from datasets.synthetic.volumes import make_chest_volume
from models.volumetric import get_task
from models.volumetric.inference import load_task_model
from models.volumetric.sliding_window import crop_box, prepare_for_inference, segment, window_region
from utils.dice import dice_per_class
from utils.reproducibility import seed_everything

FULL = {"shape": (512, 512, 64), "spacing": (0.7, 0.7, 5.0), "working_spacing": (0.8, 0.8, 5.0), "roi": (224, 224, 32)}
QUICK = {"shape": (256, 256, 32), "spacing": (1.4, 1.4, 10.0), "working_spacing": (1.6, 1.6, 10.0),
         "roi": (112, 112, 16)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="256x256x32 phantom, 112x112x16 ROI (default: off, 512x512x64 and 224x224x32)")
    parser.add_argument("--seed", type=int, default=1, help="phantom patient and weight seed (default: 1)")
    parser.add_argument("--fit_steps", type=int, default=300,
                        help="Adam steps fitting the network's readout (default: 300)")
    parser.add_argument("--target", choices=("lung", "lesion"), default="lung",
                        help="what the network is fitted to (default: lung)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--ckpt", default=None,
                        help="trained lesion_seg checkpoint: its weights, spacing and HU window replace the fitted "
                             "readout, and the target is the lesions (default: none, the fitted readout)")
    return parser


def phantom_case(folder: Path, *, seed: int, shape, spacing, target: str) -> dict:
    """Write a COVID-19 phantom chest CT and its ``target`` mask (lung or lesion) as NIfTI."""
    volume = make_chest_volume(seed=seed, shape=shape, spacing=spacing, cls=2)
    nib.save(nib.Nifti1Image(volume["image"], volume["affine"]), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(volume[target], volume["affine"]), folder / "target.nii.gz")
    return {"image": str(folder / "ct.nii.gz"), "label": str(folder / "target.nii.gz"), "case": "phantom"}


def fit_readout(model: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, *, roi, steps: int) -> None:
    """Fit the network's last 1x1x1 convolution (a logistic readout of its random features) to ``label``.

    Features come from one whole-volume pass of windows; 200k voxels, half of them foreground, train
    the readout with Adam. The rest of the network keeps its random weights.
    """
    final = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    captured = []
    hook = final.register_forward_hook(lambda module, args, out: captured.append(args[0].detach()))
    with torch.no_grad():
        sliding_window_inference(image.as_tensor()[None], roi, 4, model, overlap=0.0)
    hook.remove()
    feats, truth = _sample_voxels(torch.cat(captured), image, label, roi)
    weight = torch.zeros(feats.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(feats @ weight + bias, truth)
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # logits [0, w.x + b]: argmax is foreground where w.x + b > 0
        final.weight.zero_()
        final.weight[1, :, 0, 0, 0] = weight
        final.bias.zero_()
        final.bias[1] = bias[0]
    print(f"readout fitted: {steps} steps, loss {loss.item():.3f}")


def _sample_voxels(features: torch.Tensor, image: torch.Tensor, label: torch.Tensor, roi, n: int = 200_000):
    """Features [N, C] and targets [N] of voxels from the windows of an overlap-0 pass."""
    from monai.data.utils import dense_patch_slices

    shape = tuple(max(s, r) for s, r in zip(image.shape[1:], roi))
    padded = torch.zeros((1, *shape))
    padded[(slice(None), *(slice(0, s) for s in label.shape[1:]))] = (label > 0).float()
    targets = torch.stack([padded[(0, *window)] for window in dense_patch_slices(shape, roi, roi)])
    feats = features.permute(0, 2, 3, 4, 1).reshape(-1, features.shape[1])  # [N, C]
    targets = targets.reshape(-1)
    generator = torch.Generator().manual_seed(0)
    pos, neg = torch.nonzero(targets > 0).flatten(), torch.nonzero(targets == 0).flatten()
    pick = torch.cat([pos[torch.randint(len(pos), (n // 2,), generator=generator)],
                      neg[torch.randint(len(neg), (n // 2,), generator=generator)]])
    return feats[pick], targets[pick]


def monai_default(model: torch.nn.Module, image: torch.Tensor, *, roi, mode: str = "constant",
                  box: tuple[slice, slice, slice] | None = None, channels_last: bool = False) -> torch.Tensor:
    """The MONAI tutorial default, optionally with one of our path's changes.

    ``sliding_window_inference`` (overlap 0.25, ``sw_batch_size`` 4) under ``torch.no_grad()`` over the
    whole volume, or over ``box`` with background elsewhere; ``mode`` of blending; windows handed to
    the network channels-last when ``channels_last`` (the weights must be channels-last too).

    Args:
        model: network in eval mode, logits Float[B, 2, x, y, z].
        image: Float[1, X, Y, Z] pre-processed volume.

    Returns:
        UInt8[1, X, Y, Z] argmax label map.
    """
    box = box or (slice(None),) * 3
    region = image.as_tensor()[(slice(None), *box)][None]  # [1, 1, x, y, z]
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    with torch.no_grad():
        logits = sliding_window_inference(region, roi, 4, lambda w: model(w.contiguous(memory_format=layout)),
                                          overlap=0.25, mode=mode)
    labels = torch.zeros((1, *image.shape[1:]), dtype=torch.uint8)
    labels[(slice(None), *box)] = logits[0].argmax(dim=0).to(torch.uint8)
    return labels


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def variants(model: torch.nn.Module, fast: torch.nn.Module, image: torch.Tensor, *,
             config) -> list[tuple[str, str, callable]]:
    """(name, region, run) of the reference, each of our changes alone, our path with the reference's
    constant blending (``--blend_mode constant``: the speed-ups alone), and our path (Gaussian blending)
    without/with the lung box.

    ``model`` has contiguous weights; ``fast``, its channels-last copy, serves the channels-last rows.
    """
    roi = config.roi_size
    box = window_region(crop_box(image, config=config), image.shape[1:], roi)
    cpu, whole = torch.device("cpu"), config.replace(crop_region="none")
    shape = "x".join(str(s) for s in image.shape[1:])
    boxed = "x".join(str(s.stop - s.start) for s in box)
    return [
        ("MONAI default (reference)", shape, lambda: monai_default(model, image, roi=roi)),
        ("  + Gaussian blending only", shape, lambda: monai_default(model, image, roi=roi, mode="gaussian")),
        ("  + channels-last only", shape, lambda: monai_default(fast, image, roi=roi, channels_last=True)),
        ("  + lung box only", boxed, lambda: monai_default(model, image, roi=roi, box=box)),
        ("ours with constant blending", boxed,
         lambda: segment(fast, image, config=config.replace(blend_mode="constant"), device=cpu)),
        ("ours without the lung box", shape, lambda: segment(fast, image, config=whole, device=cpu)),
        ("ours (lung box, channels-last, Gaussian)", boxed, lambda: segment(fast, image, config=config, device=cpu)),
    ]


def warm_up(model: torch.nn.Module, fast: torch.nn.Module, *, roi) -> None:
    """One window through both weight layouts, so that no timed row pays first-call costs."""
    window = torch.zeros((1, 1, *roi))
    with torch.no_grad():
        model(window)
        fast(window.contiguous(memory_format=torch.channels_last_3d))


def run_table(model: torch.nn.Module, image: torch.Tensor, truth: torch.Tensor, *, config,
              truth_name: str) -> list[dict]:
    """Time every variant once and print the table; rows as dicts (seconds, speed-up, agreement, Dice)."""
    fast = prepare_for_inference(copy.deepcopy(model), device=torch.device("cpu"))
    warm_up(model, fast, roi=config.roi_size)
    truth = (truth > 0).to(torch.uint8)
    rows, reference = [], None
    print(f"{'variant':<42} {'region':>12} {'s':>7} {'speed-up':>9} {'agreement':>10} {'fg %':>7} "
          f"{'Dice vs ' + truth_name:>18}")
    for name, region, run in variants(model, fast, image, config=config):
        labels, seconds = timed(run)
        reference = reference if reference is not None else (labels, seconds)
        row = {"variant": name.strip(), "region": region, "seconds": seconds, "speed_up": reference[1] / seconds,
               "agreement": dice_per_class(labels, reference[0], num_classes=2)[0],
               "foreground": float((labels > 0).float().mean()),
               "dice_vs_truth": dice_per_class(labels, truth, num_classes=2)[0]}
        print(f"{name:<42} {region:>12} {seconds:>7.1f} {row['speed_up']:>8.2f}x {row['agreement']:>10.4f} "
              f"{row['foreground']:>7.3%} {row['dice_vs_truth']:>18.3f}")
        rows.append(row)
    return rows


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = QUICK if args.quick else FULL
    seed_everything(args.seed)
    model, config, source = load_model(args, setting)
    with tempfile.TemporaryDirectory() as tmp:
        case = phantom_case(Path(tmp), seed=args.seed, shape=setting["shape"], spacing=setting["spacing"],
                            target="lesion" if args.ckpt else args.target)
        data = Compose(get_task("lesion_seg").preprocessing(config))(case)
    image = data["image"]
    print(f"volume {setting['shape']} at {setting['spacing']} mm -> {tuple(image.shape[1:])} at {config.spacing} mm; "
          f"ROI {config.roi_size}, overlap {config.overlap}, sw_batch_size {config.sw_batch_size}; "
          f"{torch.get_num_threads()} threads; lung box {crop_box(image, config=config)}")
    if args.ckpt is None:
        print(UNTRAINED_NOTE)
        _, seconds = timed(lambda: fit_readout(model, image, data["label"], roi=config.roi_size, steps=args.fit_steps))
        source = f"{source} (fitted in {seconds:.0f} s)"
    print(f"weights: {source}")
    rows = run_table(model, image, data["label"], config=config, truth_name="lesions" if args.ckpt else args.target)
    by_name = {row["variant"]: row for row in rows}
    same_blend, ours = by_name["ours with constant blending"], by_name["ours (lung box, channels-last, Gaussian)"]
    print(f"our speed-ups (constant blending, as the reference): x{same_blend['speed_up']:.2f} faster at Dice "
          f"agreement {same_blend['agreement']:.4f} (goal: >= 2x at >= 0.99); our default path (Gaussian blending): "
          f"x{ours['speed_up']:.2f} at {ours['agreement']:.4f}, Gaussian blending alone "
          f"{by_name['+ Gaussian blending only']['agreement']:.4f}")
    return {"rows": rows, "ratio": same_blend["speed_up"], "dice_agreement": same_blend["agreement"],
            "gaussian_ratio": ours["speed_up"], "gaussian_dice_agreement": ours["agreement"]}


UNTRAINED_NOTE = ("NOTE: no --ckpt, so the network is random with a fitted readout. Its output depends on where "
                  "the windows fall, so the agreement column says little; pass --ckpt with a trained lesion_seg "
                  "checkpoint for a meaningful agreement.")


def load_model(args: argparse.Namespace, setting: dict) -> tuple[torch.nn.Module, object, str]:
    """The network (contiguous weights, eval mode), the lesion_seg config at the benchmark's window settings,
    and where the weights come from.

    With ``--ckpt``: the checkpoint's weights, spacing and HU window. ROI, overlap and ``sw_batch_size``
    are always the reference's (224 x 224 x 32, 0.25, 4), so that only our path's changes differ.

    Raises:
        ValueError: naming the file when ``--ckpt`` is not a lesion_seg checkpoint.
    """
    task = get_task("lesion_seg")
    if args.ckpt is None:
        config = task.make_config(spacing=setting["working_spacing"], roi_size=setting["roi"])
        model, _ = task.build_network()
        return model.eval(), config, "random SegResNet with a readout fitted to the phantom's " + args.target
    model, _, config, ckpt = load_task_model(args.ckpt, device=torch.device("cpu"), task_name="lesion_seg")
    model = model.to(memory_format=torch.contiguous_format)
    config = config.replace(roi_size=setting["roi"], overlap=0.25, sw_batch_size=4)
    return model, config, f"{args.ckpt} (epoch {ckpt['epoch']}, trained at {tuple(ckpt['task_config']['roi_size'])})"


if __name__ == "__main__":
    main(get_args_parser().parse_args())
