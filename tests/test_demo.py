"""The demo's plan: every step's command parses with its script's own parser, scans appear once known."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import demo
from utils import manifest


def _parse(argv: list[str]) -> None:
    if argv[0] == "-m":
        assert argv[1] == "utils.manifest"
        manifest.get_args_parser().parse_args(argv[2:])
    else:
        importlib.import_module(Path(argv[0]).stem).get_args_parser().parse_args(argv[1:])


def test_every_step_parses_and_analysis_follows_the_test_split(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    before = [s.name for s in demo.demo_steps(demo.Plan(data, out))]
    assert not any(name.startswith("analyze_") for name in before)
    (data / "volumes").mkdir(parents=True)
    listing = {"test": [{"image": f"imagesTr/chest_{i}.nii.gz", "label_image": f"labelsTr/chest_{i}.nii.gz",
                         "label": int(i in (7, 9))} for i in (5, 7, 8, 9)]}
    (data / "volumes" / "dataset_covid.json").write_text(json.dumps(listing))
    steps = demo.demo_steps(demo.Plan(data, out))
    assert [s.name for s in steps] == [*before, "analyze_chest_7", "analyze_chest_5"]  # one COVID-19, one not
    assert len({s.name for s in steps}) == len(steps)
    for step in steps:
        _parse(step.argv)
    registered = {s.argv[s.argv.index("--name") + 1] for s in steps if s.name.startswith("register_")}
    assert registered >= {"lung_seg", "lesion_seg", "covid_cls", "mask_net_classifier"}  # what analyze_scan needs


def test_every_budget_plans_steps_that_parse(tmp_path):
    for budget in demo.BUDGETS:
        steps = demo.demo_steps(demo.Plan(tmp_path / "data", tmp_path / "out", seed=3, budget=budget))
        assert len({s.name for s in steps}) == len(steps)
        for step in steps:
            _parse(step.argv)
    full = {s.name for s in demo.demo_steps(demo.Plan(tmp_path, tmp_path, budget="full"))}
    assert {"train_seg_resnet34", "train_ssl_pretrain", "train_organ_seg", "train_organ_seg_random"} <= full
