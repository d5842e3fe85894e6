"""Checkpoint schema, atomic save, weights-only load and the run directory."""
import json

import pytest
import torch

from utils.checkpoint import (
    REQUIRED_KEYS,
    build_model_from_checkpoint,
    load_checkpoint,
    make_checkpoint,
    resolve_builder,
    save_checkpoint,
)
from utils.cli import resolve_device
from utils.reproducibility import seed_everything
from utils.run_dir import Best, RunDir


def _tiny_builder(*, width: int = 3):
    return torch.nn.Linear(2, width)


# Resolvable builder for the tests: resolve_builder imports under models.
import models  # noqa: E402

models._test_tiny_builder = _tiny_builder  # type: ignore[attr-defined]
BUILDER = "models._test_tiny_builder"


def _checkpoint(model, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    return make_checkpoint(model=model, builder=BUILDER, builder_kwargs={"width": 3}, epoch=4,
                           args={"lr": 0.1, "dir": "x"}, optimizer=opt, **kw)


def test_roundtrip_rebuilds_model_with_weights_only_load(tmp_path):
    model = _tiny_builder(width=3)
    path = save_checkpoint(_checkpoint(model, best_dice=0.5), tmp_path / "sub" / "c.pth")
    loaded = load_checkpoint(path)
    assert set(REQUIRED_KEYS) <= set(loaded)
    assert loaded["epoch"] == 4 and loaded["best_dice"] == 0.5
    rebuilt = build_model_from_checkpoint(loaded)
    for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded["optimizer"]["state"], "optimizer momentum buffers are saved"


def test_save_leaves_no_temp_files_and_replaces_atomically(tmp_path):
    model = _tiny_builder()
    target = tmp_path / "c.pth"
    save_checkpoint(_checkpoint(model), target)
    save_checkpoint(_checkpoint(model), target)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_failed_save_keeps_previous_file(tmp_path):
    model = _tiny_builder()
    target = tmp_path / "c.pth"
    save_checkpoint(_checkpoint(model), target)
    before = target.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint({"bad": lambda: None}, target)  # not picklable
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_load_rejects_foreign_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    torch.save({"model": {}}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth.*missing keys"):
        load_checkpoint(tmp_path / "partial.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_checkpoint(tmp_path / "corrupt.pth")


def test_builder_must_live_in_models():
    with pytest.raises(ValueError, match="under 'models.'"):
        resolve_builder("os.system")
    with pytest.raises(ValueError, match="under 'models.'"):
        make_checkpoint(model={}, builder="subprocess.run", builder_kwargs={}, epoch=0)


def test_ddp_prefix_is_dropped():
    state = {"module.weight": torch.ones(1)}
    ckpt = make_checkpoint(model=state, builder=BUILDER, builder_kwargs={}, epoch=0)
    assert list(ckpt["model"]) == ["weight"]


def test_run_dir_writes_args_env_metrics_and_best(tmp_path):
    run = RunDir(tmp_path / "run", args={"lr": 0.1}, seed=7, best=Best("val_acc", higher_is_better=True))
    assert json.loads((run.path / "args.json").read_text()) == {"lr": 0.1}
    env = (run.path / "env.txt").read_text()
    assert "torch:" in env and "seed: 7" in env
    model = _tiny_builder()
    assert run.end_epoch(_checkpoint(model), {"epoch": 0, "val_acc": 0.2})
    assert not run.end_epoch(_checkpoint(model), {"epoch": 1, "val_acc": 0.1})
    assert run.end_epoch(_checkpoint(model), {"epoch": 2, "val_acc": 0.3}, extra_name="model_e3.pth")
    assert run.best_value == 0.3 and run.best.epoch == 2 and (run.path / "model_e3.pth").is_file()
    assert load_checkpoint(run.best_path)["best"] == {"metric": "val_acc", "higher_is_better": True,
                                                      "value": 0.3, "epoch": 2}
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]
    assert [json.loads(x)["best"] for x in lines] == [True, False, True]


def test_seed_everything_repeats_streams():
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))


def test_resolve_device_errors_clearly():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_run_dir_appends_metrics_when_resuming(tmp_path):
    RunDir(tmp_path / "run", args={}).log_metrics({"epoch": 0, "loss": 1.0})
    RunDir(tmp_path / "run", args={}, resume=True).log_metrics({"epoch": 1, "loss": 0.5})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
