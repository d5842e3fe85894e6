"""Lesion sliding-window inference: our path against the MONAI tutorial default, same network and weights.

Canonical command (about 4 minutes on 2 CPU cores; ``--quick`` is a 4x smaller analogue)::

    python benchmarks/bench_sliding_window.py

A 512 x 512 x 64-slice COVID-19 phantom chest CT is pre-processed with the lesion_seg transforms
(RAS, 0.8 x 0.8 x 5 mm, [-1000, 500] HU) once; both paths then segment the same resampled volume:

- reference: ``sliding_window_inference`` over the whole volume, ROI 224 x 224 x 32, overlap 0.25,
  ``sw_batch_size`` 4, fp32, constant blending, under ``torch.no_grad()``;
- ours: ``models.volumetric.inference.segment`` with the lesion_seg defaults: windows only inside
  the lung bounding box (lesions lie in the lungs), channels-last 3D weights and windows, Gaussian
  blending, ``torch.inference_mode()``.

The SegResNet is random-initialised; only its last 1x1x1 convolution is then fitted (a logistic
readout of the random features, seconds on a CPU) so that the foreground is not trivial. Training the
whole network is out of a benchmark's budget on a CPU, and the phantom's lesions are too small for a
readout, so by default the readout target is the lung field (``--target lesion`` for the lesions).
The script prints both times, their ratio, the Dice agreement between the two outputs (whole volume,
and inside the lung box), the foreground fractions, and the same for our path without the box.

A readout of random features is a weak model whose output depends on where the windows fall, so its
agreement says little. ``--ckpt`` takes a trained lesion_seg checkpoint instead (weights, spacing
and HU window from the checkpoint, ROI as above), and the target is the phantom's lesions::

    python benchmarks/bench_sliding_window.py --ckpt runs/demo/lesion_seg/checkpoint_best.pth
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import Compose

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.synthetic.volumes import make_chest_volume  # noqa: E402
from models.volumetric import get_task  # noqa: E402
from models.volumetric.inference import crop_box, prepare_for_inference, segment  # noqa: E402
from utils.checkpoint import build_model_from_checkpoint, load_checkpoint  # noqa: E402
from utils.dice import dice_per_class  # noqa: E402
from utils.reproducibility import seed_everything  # noqa: E402

FULL = {"shape": (512, 512, 64), "spacing": (0.7, 0.7, 5.0), "working_spacing": (0.8, 0.8, 5.0), "roi": (224, 224, 32)}
QUICK = {"shape": (256, 256, 32), "spacing": (1.4, 1.4, 10.0), "working_spacing": (1.6, 1.6, 10.0), "roi": (112, 112, 16)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256x256x32 phantom, 112x112x16 ROI (default: off, 512x512x64 and 224x224x32)")
    parser.add_argument("--seed", type=int, default=1, help="phantom patient and weight seed (default: 1)")
    parser.add_argument("--fit_steps", type=int, default=300, help="Adam steps fitting the network's readout (default: 300)")
    parser.add_argument("--target", choices=("lung", "lesion"), default="lung", help="what the network is fitted to (default: lung)")
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


def reference(model: torch.nn.Module, image: torch.Tensor, roi, mode: str = "constant") -> torch.Tensor:
    """The MONAI tutorial default over the whole volume (``mode`` of blending); UInt8[1, X, Y, Z]."""
    with torch.no_grad():
        logits = sliding_window_inference(image.as_tensor()[None], roi, 4, model, overlap=0.25, mode=mode)
    return logits[0].argmax(dim=0, keepdim=True).to(torch.uint8)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = QUICK if args.quick else FULL
    seed_everything(args.seed)
    task = get_task("lesion_seg")
    trained = load_checkpoint(args.ckpt) if args.ckpt else None
    config = _config(task, setting, trained)
    with tempfile.TemporaryDirectory() as tmp:
        case = phantom_case(Path(tmp), seed=args.seed, shape=setting["shape"], spacing=setting["spacing"],
                            target="lesion" if trained else args.target)
        data = Compose(task.preprocessing(config))(case)
    image = data["image"]
    print(f"volume {setting['shape']} -> resampled {tuple(image.shape[1:])} at {config.spacing} mm, ROI "
          f"{setting['roi']}, {torch.get_num_threads()} threads")
    if trained:
        model = build_model_from_checkpoint(trained).eval()
        print(f"weights: {args.ckpt} (epoch {trained['epoch']}); lung box {crop_box(image, config=config)}")
    else:
        model, _ = task.build_network()
        model.eval()
        _, t_fit = timed(lambda: fit_readout(model, image, data["label"], roi=setting["roi"], steps=args.fit_steps))
        print(f"fit {t_fit:.0f} s; lung box {crop_box(image, config=config)}")
    model.eval()
    ref, t_ref = timed(lambda: reference(model, image, setting["roi"]))
    gaussian = reference(model, image, setting["roi"], mode="gaussian")
    print(f"reference with Gaussian blending only: Dice agreement {dice_per_class(gaussian, ref, num_classes=2)[0]:.4f}")
    model = prepare_for_inference(model, device=torch.device("cpu"))
    ours, t_ours = timed(lambda: segment(model, image, config=config, device=torch.device("cpu")))
    whole = config.replace(crop_region="none")
    ours_whole, t_whole = timed(lambda: segment(model, image, config=whole, device=torch.device("cpu")))
    box = crop_box(image, config=config)
    print(f"ours without the lung box (whole volume, channels-last, Gaussian): {t_whole:.1f} s, x{t_ref / t_whole:.2f}, "
          f"Dice agreement {dice_per_class(ours_whole, ref, num_classes=2)[0]:.4f}; inside the lung box ours vs "
          f"reference {dice_per_class(ours[(slice(None), *box)], ref[(slice(None), *box)], num_classes=2)[0]:.4f}")
    return report(ref, ours, data["label"], t_ref, t_ours)


def _config(task, setting: dict, trained: dict | None):
    """The lesion_seg config at the benchmark's ROI; a trained checkpoint's spacing and HU window."""
    if trained is None:
        return task.make_config(spacing=setting["working_spacing"], roi_size=setting["roi"])
    stored = task.make_config(**{k: v for k, v in trained["task_config"].items() if k != "roi_size"})
    return stored.replace(roi_size=setting["roi"])


def report(ref: torch.Tensor, ours: torch.Tensor, label: torch.Tensor, t_ref: float, t_ours: float) -> dict:
    agreement = dice_per_class(ours, ref, num_classes=2)[0]
    result = {"reference_s": t_ref, "ours_s": t_ours, "ratio": t_ref / t_ours, "dice_agreement": agreement,
              "foreground_reference": float((ref > 0).float().mean()), "foreground_ours": float((ours > 0).float().mean()),
              "foreground_truth": float((label > 0).float().mean()),
              "dice_vs_truth_reference": dice_per_class(ref, (label > 0).to(torch.uint8), num_classes=2)[0],
              "dice_vs_truth_ours": dice_per_class(ours, (label > 0).to(torch.uint8), num_classes=2)[0]}
    print(f"reference (MONAI default) {t_ref:.1f} s | ours {t_ours:.1f} s | speed-up x{result['ratio']:.2f}")
    print(f"Dice agreement ours vs reference {agreement:.4f}; foreground fraction reference "
          f"{result['foreground_reference']:.3%}, ours {result['foreground_ours']:.3%}, fit target "
          f"{result['foreground_truth']:.3%} (Dice vs fit target: reference {result['dice_vs_truth_reference']:.3f}, "
          f"ours {result['dice_vs_truth_ours']:.3f})")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
