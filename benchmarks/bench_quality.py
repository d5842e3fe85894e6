"""Quality on held-out phantom patients: train every model with the project's scripts, score it on the test split.

    python -m benchmarks.bench_quality --seed 11 --out runs/quality_11 [--budget fast|full] [--device cpu|cuda]

Generates the phantom set of ``--seed`` under ``OUT/data``, then runs the demo's training and
evaluation steps with the budget's recipe (``demo.RECIPES``: ``fast`` is what ``make demo`` trains,
``full`` trains longer, adds ResNet34 and organ_seg). Writes ``OUT/summary.json`` (the same format as
the demo's) and ``OUT/quality.md``: each metric on the test split, its goal (the demo's floors for
``fast``, the full goals for ``full``, :mod:`utils.quality`), the training time and pass/fail. The
exit code is 1 when a goal is missed. Each step's log is in ``OUT/logs``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

import demo
from utils.quality import DEMO_FLOORS, FULL_GOALS, markdown_table, quality_rows

GOALS = {"fast": DEMO_FLOORS, "full": FULL_GOALS}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="phantom and training seed (default: 0)")
    p.add_argument("--out", default="runs/quality",
                   help="output folder: data/, the runs, summary.json, quality.md (default: runs/quality)")
    p.add_argument("--budget", choices=demo.BUDGETS, default="fast",
                   help="fast: the demo's training; full: longer, with ResNet34 and organ_seg (default: fast)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    return p


def machine() -> str:
    """One line naming the machine the numbers come from."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


def write_report(summary: dict, rows: list[dict], path: Path, device: str) -> Path:
    """quality.md: the run's settings and the table of results against their goals."""
    failed = [f"{r['model']} {r['metric']}" for r in rows if not r["pass"]]
    lines = [f"# Quality on held-out phantom patients (seed {summary['seed']}, budget {summary['budget']})", "",
             f"`python -m benchmarks.bench_quality --seed {summary['seed']} --budget {summary['budget']} "
             f"--device {device}` took {summary['minutes']:.1f} min on {machine()}.", "",
             markdown_table(rows), f"{'All goals met.' if not failed else 'Missed: ' + ', '.join(failed) + '.'}", ""]
    path.write_text("\n".join(lines))
    return path


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    plan = demo.Plan(out / "data", out, args.seed, args.device, args.budget)
    summary = demo.run_plan(plan, skip=("register_", "analyze_"), goals=GOALS[args.budget])
    rows = quality_rows(summary, GOALS[args.budget])
    print(f"quality table written to {write_report(summary, rows, out / 'quality.md', args.device)}")
    return 0 if rows and all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
