"""ssl_pretrain (ViTAutoEnc views and losses) and organ_seg (UNETR, encoder transfer, per-organ Dice)."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import Dataset, list_data_collate
from monai.transforms import Compose

from models.volumetric import organ_seg, ssl_pretrain
from models.volumetric.common import unwrap_transform_error
from utils.checkpoint import make_checkpoint, save_checkpoint

ROI = (32, 32, 32)
VIT = {"img_size": ROI, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}


def abdomen_phantom(shape=(40, 36, 24), seed=0):
    """Int16 HU abdomen (fat -80 HU) with 13 small spherical organs labelled 1..13."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    image = np.full(shape, -1000, np.int16)
    label = np.zeros(shape, np.uint8)
    image[((x - shape[0] / 2) / (0.45 * shape[0])) ** 2 + ((y - shape[1] / 2) / (0.45 * shape[1])) ** 2 <= 1] = -80
    for organ in range(1, 14):
        centre = (8 + (organ * 5) % (shape[0] - 16), 8 + (organ * 7) % (shape[1] - 16),
                  6 + (organ * 3) % (shape[2] - 12))
        ball = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= 9
        image[ball], label[ball] = 20 + 10 * organ, organ
    return (image + rng.normal(0, 5, shape)).astype(np.int16), label


def write_abdomen(folder, name, *, seed=0, label=None):
    image, truth = abdomen_phantom(seed=seed)
    truth = truth if label is None else label
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    case = {"image": str(folder / f"{name}.nii.gz"), "label": str(folder / f"{name}_label.nii.gz"), "case": name}
    nib.save(nib.Nifti1Image(image, affine), case["image"])
    nib.save(nib.Nifti1Image(truth, affine), case["label"])
    return case


def ssl_config():
    return ssl_pretrain.TASK.make_config(roi_size=ROI)


def ssl_batch(tmp_path, n=2):
    cases = [write_abdomen(tmp_path, f"u{i}", seed=i) for i in range(n)]
    transform = Compose(ssl_pretrain.preprocessing(ssl_config()) + ssl_pretrain.augmentation(ssl_config()))
    transform.set_random_state(seed=0)
    return list_data_collate([transform(c) for c in cases])


def test_ssl_views_are_two_independently_corrupted_copies(tmp_path):
    batch = ssl_batch(tmp_path)
    target, view_1, view_2 = batch["gt_image"], batch["image"], batch["image_2"]
    assert target.shape == view_1.shape == view_2.shape == (2, 1, *ROI)
    assert not torch.equal(view_1, target) and not torch.equal(view_2, target)
    assert not torch.equal(view_1, view_2)


def _nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Independent NT-Xent: each of the 2B rows against its partner, the other 2B - 2 rows negatives."""
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / temperature
    n = a.shape[0]
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return torch.nn.functional.cross_entropy(sim, partner)


def test_ssl_loss_terms_match_their_definitions():
    torch.manual_seed(0)
    recon_1, recon_2, target = (torch.rand(3, 1, 4, 4, 4) for _ in range(3))
    losses = ssl_pretrain.loss()(recon_1, recon_2, target)
    l1 = (recon_1 - target).abs().mean()
    contrastive = _nt_xent(recon_1.flatten(1), recon_2.flatten(1), ssl_pretrain.TEMPERATURE)
    torch.testing.assert_close(losses["l1"], l1)
    torch.testing.assert_close(losses["contrastive"], contrastive, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["loss"], l1 + l1 * contrastive, rtol=1e-4, atol=1e-5)


def test_ssl_loss_decreases_on_a_fixed_batch(tmp_path):
    batch = ssl_batch(tmp_path)
    torch.manual_seed(0)
    model = ssl_pretrain.build_network(num_layers=2, **VIT)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = [ssl_pretrain.train_one_epoch(model, [batch], optimizer=optimizer, loss_fn=ssl_pretrain.loss(),
                                            device=torch.device("cpu")) for _ in range(6)]
    assert set(history[0]) == {"loss", "l1", "contrastive"}  # both terms are logged
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["l1"] < history[0]["l1"]


def test_vit_builders_validate_sizes():
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        ssl_pretrain.build_network(img_size=(40, 32, 32), hidden_size=48, mlp_dim=96, num_heads=4)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        organ_seg.build_network(img_size=ROI, hidden_size=50, mlp_dim=96, num_heads=4)
    with pytest.raises(ValueError, match="roi_size.*multiple of 16"):
        organ_seg.TASK.make_config(roi_size=(40, 32, 32))


def _ssl_checkpoint(path, **sizes):
    torch.manual_seed(1)
    kwargs = {**VIT, **sizes, "num_layers": 12}
    model = ssl_pretrain.build_network(**kwargs)
    save_checkpoint(make_checkpoint(model=model, builder=ssl_pretrain.TASK.builder, builder_kwargs=kwargs, epoch=0,
                                    task="ssl_pretrain"), path)
    return model


def test_encoder_transfer_loads_every_vit_key(tmp_path):
    autoencoder = _ssl_checkpoint(tmp_path / "ssl.pth")
    model = organ_seg.build_network(feature_size=8, **VIT)
    report = organ_seg.load_pretrained_encoder(model, tmp_path / "ssl.pth")
    vit_state = model.vit.state_dict()
    assert report["loaded"] == report["expected"] == len(vit_state) > 0
    for key, value in vit_state.items():
        assert torch.equal(value, autoencoder.state_dict()[key]), key
    assert all(k.startswith("conv3d_transpose") for k in report["ignored"])  # the auto-encoder's decoder


def test_encoder_transfer_refuses_other_sizes(tmp_path):
    _ssl_checkpoint(tmp_path / "wide.pth", hidden_size=64)
    model = organ_seg.build_network(feature_size=8, **VIT)
    with pytest.raises(ValueError, match="wide.pth.*other shapes"):
        organ_seg.load_pretrained_encoder(model, tmp_path / "wide.pth")


def test_organ_seg_one_training_step(tmp_path):
    config = organ_seg.TASK.make_config(roi_size=ROI)
    case = write_abdomen(tmp_path, "a0")
    transform = Compose(organ_seg.preprocessing(config) + organ_seg.augmentation(config))
    batch = list_data_collate([transform(case), transform(case)])
    assert set(torch.unique(batch["label"]).tolist()) <= set(range(14))
    torch.manual_seed(0)
    model = organ_seg.build_network(feature_size=8, **VIT)
    optimizer = torch.optim.Adam(model.parameters(), lr=organ_seg.TASK.default_lr)
    logits = model(batch["image"])
    assert logits.shape == (2, organ_seg.NUM_CLASSES, *ROI)
    loss = organ_seg.loss()(logits, batch["label"])
    assert torch.isfinite(loss)
    before = model.vit.patch_embedding.patch_embeddings.weight.detach().clone()
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.vit.patch_embedding.patch_embeddings.weight)


def test_organ_labels_out_of_range_are_refused(tmp_path):
    _, truth = abdomen_phantom()
    truth[0, 0, 0] = 20
    case = write_abdomen(tmp_path, "bad_labels", label=truth)
    config = organ_seg.TASK.make_config(roi_size=ROI)
    with pytest.raises(ValueError, match="bad_labels.*20.*0..13"):
        try:
            Compose(organ_seg.preprocessing(config))(case)
        except RuntimeError as err:
            raise unwrap_transform_error(err) from err


def test_organ_validation_per_organ_dice_against_monai(tmp_path):
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from models.volumetric.segmentation import segment_case

    config = organ_seg.TASK.make_config(roi_size=ROI)
    case = write_abdomen(tmp_path, "a0")
    torch.manual_seed(0)
    model = organ_seg.build_network(feature_size=8, **VIT).eval()
    rows, summary = organ_seg.validate_cases([case], model=model, task=organ_seg.TASK, config=config,
                                             device=torch.device("cpu"), progress=False)
    mask = segment_case({"image": case["image"]}, model=model, task=organ_seg.TASK, config=config,
                        device=torch.device("cpu"))["mask"]
    truth = np.asarray(nib.load(case["label"]).dataobj)
    assert mask.shape == truth.shape
    metric = DiceMetric(include_background=False, ignore_empty=False)
    as_onehot = [one_hot(torch.as_tensor(v.astype(np.int64))[None, None], num_classes=14) for v in (mask, truth)]
    expected = metric(*as_onehot)[0]
    got = [rows[0][f"dice_{n.replace(' ', '_')}"] for n in organ_seg.ORGAN_NAMES]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    assert summary["mean_dice"] == pytest.approx(float(expected.mean()))


def test_organ_evaluate_reports_every_organ(tmp_path):
    config = organ_seg.TASK.make_config(roi_size=ROI)
    dataset = Dataset([write_abdomen(tmp_path, "a0")], Compose(organ_seg.preprocessing(config)))
    model = organ_seg.build_network(feature_size=8, **VIT)
    result = organ_seg.evaluate(model, dataset, task=organ_seg.TASK, config=config, device=torch.device("cpu"))
    organ_columns = [f"dice_{n.replace(' ', '_')}" for n in organ_seg.ORGAN_NAMES]
    assert [k for k in result if k.startswith("dice_")] == organ_columns
    assert 0.0 <= result["dice"] <= 1.0


def test_ssl_evaluate_is_repeatable(tmp_path):
    dataset = Dataset([write_abdomen(tmp_path, f"u{i}", seed=i) for i in range(2)],
                      Compose(ssl_pretrain.preprocessing(ssl_config())))
    model = ssl_pretrain.build_network(num_layers=2, **VIT)
    first = ssl_pretrain.evaluate(model, dataset, config=ssl_config(), device=torch.device("cpu"))
    second = ssl_pretrain.evaluate(model, dataset, config=ssl_config(), device=torch.device("cpu"))
    assert set(first) == {"loss", "l1", "contrastive"} and first == second


def _abdomen_datalist(root):
    """dataset.json of phantom abdomens (BTCV labels 0..13) with training/validation/testing sections."""
    import json

    from datasets.synthetic import make_abdomen_volume

    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(3):
        volume = make_abdomen_volume(seed=i, shape=(40, 40, 24), spacing=(3.0, 3.0, 4.0))
        nib.save(nib.Nifti1Image(volume["image"], volume["affine"]), root / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(volume["label"].astype(np.uint8), volume["affine"]), root / f"label{i}.nii.gz")
        entries.append({"image": f"img{i}.nii.gz", "label": f"label{i}.nii.gz"})
    datalist = {"training": entries[:2], "validation": entries[2:], "testing": [entries[2]["image"]]}
    (root / "dataset.json").write_text(json.dumps(datalist))
    return root / "dataset.json"


def test_pretrain_then_finetune_validate_infer_end_to_end(tmp_path, capsys):
    import csv
    import json

    import infer_volumetric
    import train_volumetric
    import validate_volumetric
    from utils.checkpoint import load_checkpoint

    datalist = _abdomen_datalist(tmp_path / "data")
    vit = ["--roi_size", "32", "32", "32", "--spacing", "3", "3", "4", "--hidden_size", "48", "--mlp_dim", "96",
           "--num_heads", "4"]
    ssl_run, seg_run = tmp_path / "ssl", tmp_path / "seg"
    train_volumetric.main(train_volumetric.get_args_parser().parse_args(
        ["--task", "ssl_pretrain", "--datalist", str(datalist), "--epochs", "1", "--save_dir", str(ssl_run), *vit]))
    record = json.loads((ssl_run / "metrics.jsonl").read_text())
    assert {"train_loss", "train_l1", "train_contrastive", "val_loss", "val_l1", "val_contrastive"} <= set(record)

    train_volumetric.main(train_volumetric.get_args_parser().parse_args(
        ["--task", "organ_seg", "--datalist", str(datalist), "--epochs", "1", "--save_dir", str(seg_run),
         "--feature_size", "8", "--pretrained_encoder", str(ssl_run / "checkpoint_last.pth"), *vit]))
    expected = sum(k.startswith("vit.") for k in load_checkpoint(seg_run / "checkpoint_last.pth")["model"])
    assert f"loaded {expected}/{expected} ViT keys" in capsys.readouterr().out
    record = json.loads((seg_run / "metrics.jsonl").read_text())
    assert "val_dice" in record and "val_dice_spleen" in record and "val_dice_left_adrenal_gland" in record

    summary = validate_volumetric.main(validate_volumetric.get_args_parser().parse_args(
        ["--task", "organ_seg", "--ckpt", str(seg_run / "checkpoint_best.pth"), "--datalist", str(datalist),
         "--output", str(tmp_path / "val")]))
    rows = list(csv.DictReader((tmp_path / "val" / "predictions.csv").open()))
    organ_columns = [f"dice_{n.replace(' ', '_')}" for n in organ_seg.ORGAN_NAMES]
    assert len(rows) == 1 and all(c in rows[0] for c in organ_columns) and all(c in summary for c in organ_columns)

    rows = infer_volumetric.main(infer_volumetric.get_args_parser().parse_args(
        ["--task", "organ_seg", "--ckpt", str(seg_run / "checkpoint_best.pth"), "--input", str(datalist),
         "--output", str(tmp_path / "infer"), "--no_montage"]))
    mask, source = nib.load(rows[0]["mask"]), nib.load(tmp_path / "data" / "img2.nii.gz")
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= set(range(14))
