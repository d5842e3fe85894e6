"""The main job on phantom data: generate, train briefly, evaluate, analyse, and link it all.

Canonical command (what ``make demo`` runs)::

    python demo.py --data_dir data/phantom --out runs/demo

Each step runs one of the project's scripts exactly as a user would, logs its command and output to
``<out>/logs/<step>.log``, and the page ``<out>/index.html`` links every table and picture. Numbers
on the page are read from the files the scripts wrote; nothing is fixed in advance.
"""
from __future__ import annotations

import argparse
import glob
import html
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from utils.cli import run_cli
from utils.quality import DEMO_FLOORS, collect_summary, html_table, markdown_table, quality_rows


@dataclass
class Step:
    """One script run of the demo.

    Attributes:
        name: short name, also the log file's stem.
        title: heading on the page.
        argv: the script and its arguments (run with this Python).
        outputs: files or globs (relative to the repo root) the page links or shows.
    """

    name: str
    title: str
    argv: list[str]
    outputs: list[str] = field(default_factory=list)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/phantom",
                   help="where the phantom data set is written (default: data/phantom)")
    p.add_argument("--out", default="runs/demo", help="where runs, reports and index.html go (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantom data and the training runs (default: 0)")
    p.add_argument("--device", default="cpu", help="device for training and inference (default: cpu)")
    p.add_argument("--only", nargs="*", default=None, help="run only these steps, by name (default: all)")
    return p


# Training settings per budget: "fast" is the demo's (meant for at most 20 minutes on two CPU cores), "full" that
# of benchmarks/bench_quality.py --budget full. Each list is appended to the script's command.
RECIPES = {
    "fast": {
        # 24 training, 12 validation and 24 test scans of the default size (README, "The 3D models on
        # more scans")
        "data": ["--n_volumes", "60", "--volume_splits", "0.4", "0.2", "0.4"],
        # truncation 2 (stride 8) at 256 px: most phantom lesions are under 16 px there; 4 epochs of the
        # 384 training slices of 48 patients (README, "Fewer epochs over more patients")
        "seg": ["--backbone_name", "resnet18", "--truncation", "2", "--num_epochs", "4", "--batch_size", "2",
                "--lrate", "1e-3", "--lr_schedule", "cosine", "--warmup_steps", "50", "--image_size", "256"],
        # 3 epochs of the 288 training slices of 36 patients
        "cls": ["--num_epochs", "3", "--batch_size", "4", "--lrate", "1e-3", "--lr_schedule", "cosine",
                "--image_size", "256"],
        "lung_seg": ["--epochs", "6", "--lr", "2e-3", "--lr_schedule", "cosine", "--spacing", "1.5", "1.5", "3",
                     "--roi_size", "64", "64", "32", "--batch_size", "2"],
        # 5 warm-up epochs: from scratch at full lr, some runs never called a voxel lesion (README)
        "lesion_seg": ["--epochs", "50", "--val_every", "10", "--lr", "2e-3", "--lr_schedule", "cosine",
                       "--warmup_epochs", "5", "--spacing", "1.5", "1.5", "3", "--roi_size", "64", "64", "16",
                       "--batch_size", "2"],
        "covid_cls": ["--epochs", "15", "--lr", "1e-3", "--lr_schedule", "cosine", "--roi_size", "64", "64", "32",
                      "--batch_size", "4"],
    },
}


def with_flags(flags: list[str], **values: str) -> list[str]:
    """``flags`` with the value after each ``--name`` of ``values`` replaced (the flag must be there)."""
    out = list(flags)
    for name, value in values.items():
        out[out.index(f"--{name}") + 1] = value
    return out


# Not yet timed end to end: longer schedules, the original's ResNet18/34 truncation 1 at 512 px, 30
# covid_cls test scans, and UNETR organ_seg from the ssl_pretrain encoder against random initialisation.
_FAST = RECIPES["fast"]
_FULL_SEG = with_flags(_FAST["seg"], truncation="1", num_epochs="10", warmup_steps="100", image_size="512")
RECIPES["full"] = {
    **_FAST,
    "data": ["--n_volumes", "150", "--n_abdomen", "24"],
    "seg": _FULL_SEG,
    "seg_resnet34": with_flags(_FULL_SEG, backbone_name="resnet34"),
    "cls": with_flags(_FAST["cls"], num_epochs="5", image_size="512"),
    "lung_seg": with_flags(_FAST["lung_seg"], epochs="40"),
    "lesion_seg": with_flags(_FAST["lesion_seg"], epochs="300", val_every="20"),
    "covid_cls": with_flags(_FAST["covid_cls"], epochs="60"),
    "ssl_pretrain": ["--epochs", "50", "--val_every", "10"],
    "organ_seg": ["--epochs", "100", "--val_every", "20"],
}
BUDGETS = tuple(RECIPES)
VOLUMETRIC = {"lung_seg": "lung", "lesion_seg": "lesion", "covid_cls": "covid"}  # task -> datalist
# analyze_scan.py runs on this many test scans of each kind (COVID-19, other): the report, not a metric.
ANALYSED_PER_KIND = 1


@dataclass
class Plan:
    """Where the demo reads and writes, and how it trains: the data folder, the run folder, the
    seed, the device and the budget's recipe (:data:`RECIPES`)."""

    data: Path
    out: Path
    seed: int = 0
    device: str = "cpu"
    budget: str = "fast"

    @property
    def recipe(self) -> dict[str, list[str]]:
        return RECIPES[self.budget]

    def common(self) -> list[str]:
        """Flags every training script takes: seed and device."""
        return ["--seed", str(self.seed), "--device", self.device]


def demo_steps(plan: Plan) -> list[Step]:
    """The demo's steps, in order: 2D track, 3D track, model registry, then the scans."""
    data = plan.data
    return [
        Step("data", "Phantom data set",
             ["make_synthetic_data.py", "--out", str(data), "--seed", str(plan.seed), *plan.recipe["data"]],
             [f"{data}/montage*.png"]),
        *segmentation_2d_steps(plan),
        *classifier_2d_steps(plan),
        *second_backbone_steps(plan),
        *volumetric_steps(plan),
        *organ_steps(plan),
        *register_steps(plan),
        *analysis_steps(plan),
    ]


def segmentation_2d_steps(plan: Plan) -> list[Step]:
    """Mask R-CNN training (validated on the val split), COCO AP and overlays on the test slices."""
    seg, run = plan.data / "seg", plan.out / "segmentation"
    ckpt, flags = str(run / "checkpoint_best.pth"), plan.recipe["seg"]
    model = f"{flags[flags.index('--backbone_name') + 1]}, truncation {flags[flags.index('--truncation') + 1]}"
    return [
        Step("train_seg", f"2D lesion segmentation: Mask R-CNN ({model}) trained on the phantom slices",
             ["train_segmentation.py", *flags, "--mask_type", "both", "--save_every", "100",
              "--train_data_dir", str(seg / "train"), "--val_data_dir", str(seg / "val"),
              "--save_dir", str(run), "--overwrite", *plan.common(), "--no_progress"],
             [f"{run}/metrics.jsonl"]),
        Step("eval_seg", "2D lesion segmentation: COCO mask and box AP on the test split",
             ["evaluation_mean_ap.py", "--ckpt", ckpt, "--test_data_dir", str(seg / "test"),
              # COCO AP ranks every detection, so no score filter
              "--confidence_th", "0.0", "--save_dir", str(run / "eval"), "--device", plan.device],
             [f"{run}/eval/metrics.json"]),
        Step("infer_seg", "2D lesion segmentation: overlays of the test slices (detections scored 0.5 or more)",
             ["inference_segmentation.py", "--ckpt", ckpt, "--test_data_dir", str(seg / "test"),
              "--confidence_th", "0.5", "--save_dir", str(run / "inference"), "--device", plan.device],
             [f"{run}/inference/*CP*_overlay.png", f"{run}/inference/predictions.json"]),
    ]


def second_backbone_steps(plan: Plan) -> list[Step]:
    """The recipe's ``seg_resnet34`` model, trained and scored as the first (full budget only)."""
    if "seg_resnet34" not in plan.recipe:
        return []
    seg, run = plan.data / "seg", plan.out / "segmentation_resnet34"
    return [
        Step("train_seg_resnet34", "2D lesion segmentation: Mask R-CNN (resnet34, truncation 1)",
             ["train_segmentation.py", *plan.recipe["seg_resnet34"], "--mask_type", "both", "--save_every", "100",
              "--train_data_dir", str(seg / "train"), "--val_data_dir", str(seg / "val"),
              "--save_dir", str(run), "--overwrite", *plan.common(), "--no_progress"],
             [f"{run}/metrics.jsonl"]),
        Step("eval_seg_resnet34", "2D lesion segmentation (resnet34): COCO mask and box AP on the test split",
             ["evaluation_mean_ap.py", "--ckpt", str(run / "checkpoint_best.pth"), "--test_data_dir",
              str(seg / "test"), "--confidence_th", "0.0", "--save_dir", str(run / "eval"), "--device", plan.device],
             [f"{run}/eval/metrics.json"]),
    ]


def organ_steps(plan: Plan) -> list[Step]:
    """ssl_pretrain, then UNETR organ_seg from its encoder and from random weights (full budget only)."""
    if "organ_seg" not in plan.recipe:
        return []
    listing, ssl = str(plan.data / "abdomen" / "dataset.json"), plan.out / "ssl_pretrain"
    steps = [Step("train_ssl_pretrain", "3D ssl_pretrain: ViT auto-encoder on the abdomen volumes",
                  ["train_volumetric.py", "--task", "ssl_pretrain", "--datalist", listing, *plan.recipe["ssl_pretrain"],
                   "--batch_size", "2", "--save_dir", str(ssl), "--overwrite", *plan.common(), "--no_progress"],
                  [f"{ssl}/metrics.jsonl"])]
    for name, extra in (("organ_seg", ["--pretrained_encoder", str(ssl / "checkpoint_best.pth")]),
                        ("organ_seg_random", [])):
        run = plan.out / name
        steps += [Step(f"train_{name}", f"3D organ_seg, UNETR {'from the ssl encoder' if extra else 'from scratch'}",
                       ["train_volumetric.py", "--task", "organ_seg", "--datalist", listing, *plan.recipe["organ_seg"],
                        *extra, "--batch_size", "2", "--save_dir", str(run), "--overwrite", *plan.common(),
                        "--no_progress"], [f"{run}/metrics.jsonl"]),
                  Step(f"validate_{name}", f"3D {name}: Dice on the test volumes",
                       ["validate_volumetric.py", "--task", "organ_seg", "--ckpt", str(run / "checkpoint_best.pth"),
                        "--datalist", listing, "--section", "test", "--output", str(run / "test"),
                        "--device", plan.device], [f"{run}/test/metrics.json"])]
    return steps


def classifier_2d_steps(plan: Plan) -> list[Step]:
    """COVID-CT-Mask-Net's classifier S on the segmentation model, and its confusion matrix and ROC."""
    cls, run = plan.data / "cls", plan.out / "classifier"
    seg_flags = plan.recipe["seg"]
    model = [flag for key in ("--backbone_name", "--truncation")
             for flag in seg_flags[seg_flags.index(key):seg_flags.index(key) + 2]]
    return [
        Step("train_cls", "2D COVID-CT-Mask-Net classifier: S trained on the segmentation model",
             ["train_classifier.py",
              "--pretrained_segmentation_model", str(plan.out / "segmentation" / "checkpoint_best.pth"),
              *model, *plan.recipe["cls"], "--save_every", "100", "--train_data_dir", str(cls / "train"),
              "--val_data_dir", str(cls / "val"), "--save_dir", str(run), "--overwrite", *plan.common(),
              "--no_progress"],
             [f"{run}/metrics.jsonl"]),
        Step("eval_cls", "2D classifier: confusion matrix, sensitivity, AUC on the test slices (and per scan)",
             ["evaluate_classifier.py", "--ckpt", str(run / "checkpoint_best.pth"),
              "--test_data_dir", str(cls / "test"),
              "--aggregate", "scan", "--save_dir", str(run / "eval"), "--device", plan.device],
             [f"{run}/eval/confusion_matrix.png", f"{run}/eval/roc.png"]),
    ]


def volumetric_steps(plan: Plan) -> list[Step]:
    """Train lung_seg, lesion_seg and covid_cls; validate each on the test scans (lesion_seg's Dice
    over the scans with lesions)."""
    volumes, steps = plan.data / "volumes", []
    for task, datalist in VOLUMETRIC.items():
        run, listing = plan.out / task, str(volumes / f"dataset_{datalist}.json")
        steps.append(Step(f"train_{task}", f"3D {task}: training",
                          ["train_volumetric.py", "--task", task, "--datalist", listing, *plan.recipe[task],
                           "--save_dir", str(run), "--overwrite", *plan.common(),
                           "--no_progress"],
                          [f"{run}/metrics.jsonl"]))
        steps.append(Step(f"validate_{task}", f"3D {task}: metrics on the test scans",
                          ["validate_volumetric.py", "--task", task, "--ckpt", str(run / "checkpoint_best.pth"),
                           "--datalist", listing, "--section", "test", "--output", str(run / "test"),
                           "--device", plan.device, *(["--ignore_empty"] if task == "lesion_seg" else [])],
                          [f"{run}/test/metrics.json"]))
    return steps


def register_steps(plan: Plan) -> list[Step]:
    """Put the demo's models into a manifest folder of their own, with hashes and test metrics."""
    out, models = plan.out, plan.out / "models"
    entries = [("mask_net_segmentation", out / "segmentation", "eval/metrics.json", "phantom 2D test slices"),
               ("mask_net_classifier", out / "classifier", "eval/metrics.json", "phantom 2D test slices"),
               *((task, out / task, "test/metrics.json", "phantom test scans") for task in VOLUMETRIC)]
    return [Step(f"register_{name}", f"Register {name} in {models}/manifest.json",
                 ["-m", "utils.manifest", "register", str(models), "--name", name,
                  "--ckpt", str(run / "checkpoint_best.pth"), "--metrics", str(run / metrics),
                  "--data", f"{text} ({plan.data})", "--command", f"python demo.py (step train of {name})"],
                 [f"{models}/manifest.json"] if name == "covid_cls" else [])
            for name, run, metrics, text in entries]


def analysed_cases(listing: dict) -> list[dict]:
    """The first :data:`ANALYSED_PER_KIND` test scans with COVID-19 (label 1) and without (label 0)."""
    test = listing.get("test", [])
    return [case for label in (1, 0)
            for case in [c for c in test if int(c.get("label", 0)) == label][:ANALYSED_PER_KIND]]


def analysis_steps(plan: Plan) -> list[Step]:
    """analyze_scan.py on held-out scans (the datalist's test section), models from the manifest."""
    path = plan.data / "volumes" / "dataset_covid.json"
    listing = json.loads(path.read_text()) if path.exists() else {}
    steps = []
    for case in analysed_cases(listing):
        name = Path(case["image"]).name.split(".")[0]
        report = plan.out / "analysis" / name
        steps.append(Step(f"analyze_{name}", f"One scan in, a report out: {name} ({case.get('class', '')})",
                          ["analyze_scan.py", str(plan.data / "volumes" / case["image"]), "--out", str(report),
                           "--models_dir", str(plan.out / "models"), "--device", plan.device],
                          [f"{report}/report.html", f"{report}/montage_lesions.png", f"{report}/slice_profile.png"]))
    return steps


def run_step(step: Step, logs: Path) -> dict:
    """Run one step, tee its output to its log, and return a record for the page.

    Raises:
        ChildProcessError: naming the step and its log when the script fails.
    """
    cmd = [sys.executable, *step.argv]
    log = logs / f"{step.name}.log"
    print(f"\n== {step.title}\n$ {shlex.join(['python', *step.argv])}", flush=True)
    start = time.time()
    with log.open("w") as handle:
        handle.write(f"$ {shlex.join(['python', *step.argv])}\n")
        handle.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            handle.write(line)
        code = proc.wait()
    seconds = time.time() - start
    if code != 0:
        raise ChildProcessError(f"demo step '{step.name}' failed with exit code {code}; see {log}")
    return {"step": step, "seconds": seconds, "log": log}


def write_summary(records: list[dict], plan: Plan, total_s: float) -> dict:
    """``<out>/summary.json``: each trained model's test result, read from its evaluation files."""
    seconds = {rec["step"].name: rec["seconds"] for rec in records}
    summary = collect_summary(plan.out, seed=plan.seed, budget=plan.budget, minutes=total_s / 60.0,
                              step_seconds=seconds)
    (plan.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def write_index(records: list[dict], out: Path, total_s: float, summary: dict | None = None,
                goals: dict = DEMO_FLOORS) -> Path:
    """``<out>/index.html``: the results beside their floors, then each step's log, files and pictures."""
    parts = [f"<h1>COVID-CT demo on phantom data</h1><p>Total time {total_s / 60:.1f} min.</p>"]
    if summary:
        parts.append("<h2>Results on the held-out test patients</h2>" + html_table(quality_rows(summary, goals))
                     + "<p>Floors: what a working model clears on any phantom seed in this budget. "
                       "<a href='summary.json'>summary.json</a></p>")
    for rec in records:
        parts.append(_section(rec, out))
    page = out / "index.html"
    page.write_text("<!doctype html><meta charset=utf-8><title>COVID-CT demo</title>"
                    "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
                    "pre{background:#f4f4f4;padding:6px;overflow:auto}</style>" + "\n".join(parts))
    return page


def _section(rec: dict, out: Path) -> str:
    step: Step = rec["step"]
    rel = lambda p: html.escape(os.path.relpath(Path(p).resolve(), out.resolve()))  # noqa: E731
    body = [f"<h2>{html.escape(step.title)}</h2>",
            f"<pre>$ {html.escape(shlex.join(['python', *step.argv]))}</pre>",
            f"<p>{rec['seconds']:.0f} s &middot; <a href='{rel(rec['log'])}'>log</a></p>"]
    for pattern in step.outputs:
        for path in sorted(Path(p) for p in glob.glob(pattern))[:6]:
            body.append(_embed(path, rel(path)))
    return "\n".join(body)


def _embed(path: Path, href: str) -> str:
    if path.suffix == ".png":
        return f"<p><a href='{href}'><img src='{href}' alt='{href}'></a></p>"
    if path.suffix == ".json" and path.stat().st_size < 20000:
        text = json.dumps(json.loads(path.read_text()), indent=1)
        return f"<p><a href='{href}'>{href}</a></p><pre>{html.escape(text)}</pre>"
    return f"<p><a href='{href}'>{href}</a></p>"


def main(args: argparse.Namespace) -> Path:
    plan = Plan(Path(args.data_dir), Path(args.out), args.seed, args.device, "fast")
    run_plan(plan, only=args.only)
    return plan.out / "index.html"


def run_plan(plan: Plan, *, only: list[str] | None = None, skip: tuple[str, ...] = (), goals: dict = DEMO_FLOORS
             ) -> dict:
    """Run the plan's steps (``only`` these names, none starting with a prefix in ``skip``), keeping
    summary.json and index.html up to date after each; prints the results table and returns the summary."""
    (plan.out / "logs").mkdir(parents=True, exist_ok=True)
    start, records, done = time.time(), [], set()

    def pending() -> list[Step]:  # re-planned after each step: the scans are known once the data exist
        return [s for s in demo_steps(plan) if s.name not in done and (not only or s.name in only)
                and not s.name.startswith(skip)]

    while steps := pending():
        step = steps[0]
        print(f"\n[{len(done) + 1}/{len(done) + len(steps)}] {step.name} "
              f"({(time.time() - start) / 60:.1f} min so far)", flush=True)
        records.append(run_step(step, plan.out / "logs"))
        done.add(step.name)
        summary = write_summary(records, plan, time.time() - start)
        write_index(records, plan.out, time.time() - start, summary, goals)
    summary = write_summary(records, plan, time.time() - start)
    page = write_index(records, plan.out, time.time() - start, summary, goals)
    print("\n" + markdown_table(quality_rows(summary, goals)))
    print(f"Finished in {(time.time() - start) / 60:.1f} min. Open {page}")
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser())
