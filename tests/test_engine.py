"""The 2D epoch loops: losses, validation without gradients or BatchNorm updates, max_steps."""
import math

import pytest
import torch

from models.mask_net.workflows.loops import frozen_batchnorm_stats, train_one_epoch, validation_loss
from utils.training import RunConfig, lr_factor, lr_setter, make_optimizer


class ToyDetector(torch.nn.Module):
    """Returns a loss dict in train mode, like a detection model."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, images, targets):
        x = self.bn(self.conv(torch.stack(images)))
        return {"loss_a": x.mean() ** 2, "loss_b": torch.stack([t["y"] for t in targets]).sum() * 0 + x.var()}


def _loader(n=3):
    g = torch.Generator().manual_seed(0)
    return [([torch.rand(3, 8, 8, generator=g) * 5 for _ in range(2)], [{"y": torch.ones(1)}] * 2) for _ in range(n)]


def test_validation_loss_leaves_weights_stats_and_grads_alone():
    model = ToyDetector().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = validation_loss(model, _loader(), device=torch.device("cpu"), progress=False)
    assert set(out) == {"loss_a", "loss_b", "loss"}
    assert math.isclose(out["loss"], out["loss_a"] + out["loss_b"], rel_tol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert not model.training, "validation restores the caller's mode"


def test_train_one_epoch_steps_and_updates_bn_unless_frozen():
    model = ToyDetector()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mean0 = model.bn.running_mean.clone()
    out = train_one_epoch(model, _loader(), opt, device=torch.device("cpu"), epoch=0, progress=False)
    assert math.isfinite(out["loss"])
    assert not torch.equal(model.bn.running_mean, mean0)
    mean1, w1 = model.bn.running_mean.clone(), model.conv.weight.clone()
    train_one_epoch(model, _loader(), opt, device=torch.device("cpu"), epoch=1, freeze_bn_stats=True, progress=False)
    assert torch.equal(model.bn.running_mean, mean1)
    assert not torch.equal(model.conv.weight, w1)
    assert model.bn.training, "BatchNorm mode is restored after the epoch"


def test_max_steps_limits_the_epoch():
    model = ToyDetector()
    seen = []
    def loss_fn(m, images, targets):
        seen.append(1)
        return m(images, targets)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train_one_epoch(model, _loader(5), opt, device=torch.device("cpu"), epoch=0, loss_fn=loss_fn, max_steps=2,
                    progress=True)
    assert len(seen) == 2


def test_nan_loss_names_epoch_and_step():
    class NanModel(ToyDetector):
        def forward(self, images, targets):
            return {"loss_a": super().forward(images, targets)["loss_a"] * float("nan")}
    model = NanModel()
    with pytest.raises(FloatingPointError, match="epoch 3, step 0"):
        train_one_epoch(model, _loader(), torch.optim.SGD(model.parameters(), lr=0.1), device=torch.device("cpu"),
                        epoch=3, progress=False)


def test_frozen_batchnorm_context_restores_modes():
    model = ToyDetector().train()
    with frozen_batchnorm_stats(model):
        assert not model.bn.training and model.training
    assert model.bn.training


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [1.0, 1.0, 1.0, 1.0]),
    ("cosine", [1.0, 0.5 * (1 + math.cos(math.pi * 0.5)), 0.5 * (1 + math.cos(math.pi * 0.8)), 0.0]),
    ("step", [1.0, 1.0, 0.1, 0.01]),
])
def test_lr_factor_follows_its_schedule(schedule, expected):
    got = [lr_factor(schedule, step, 100) for step in (0, 50, 80, 100)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert lr_factor(schedule, 0, 100, warmup=10) == pytest.approx(0.001)
    assert lr_factor(schedule, 5, 100, warmup=10) == pytest.approx((0.001 + 0.999 * 0.5) * lr_factor(schedule, 5, 100))
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        lr_factor("linear", 0, 10)


def test_scheduled_epochs_set_the_lr_before_each_step_and_resume_on_the_same_curve():
    config = RunConfig(save_dir="unused", model_name="m", batch_size=2, lrate=0.1, num_epochs=3,
                       lr_schedule="cosine", warmup_steps=2, optimizer="sgd")
    model = ToyDetector()
    optimizer = make_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    seen = []
    original_step = optimizer.step
    optimizer.step = lambda *a, **k: (seen.append(optimizer.param_groups[0]["lr"]), original_step(*a, **k))[1]
    schedule = lr_setter(config, optimizer, steps_per_epoch=_loader(3).__len__())
    for epoch in range(3):
        train_one_epoch(model, _loader(3), optimizer, device=torch.device("cpu"), epoch=epoch, progress=False,
                        set_lr=schedule(epoch))
    assert seen == pytest.approx([0.1 * lr_factor("cosine", s, 9, warmup=2) for s in range(9)])
    assert lr_setter(RunConfig(save_dir="x", model_name="m", batch_size=1), optimizer, 3) is None  # constant
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer(model, RunConfig(save_dir="x", model_name="m", batch_size=1, optimizer="lamb"))
