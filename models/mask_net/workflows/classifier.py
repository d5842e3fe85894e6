"""Train COVID-CT-Mask-Net's classification module S on top of a trained segmentation model.

Weights of the backbone, FPN, RPN and RoI box branch are copied by name from the segmentation
checkpoint (its mask-branch weights are ignored); a classification checkpoint loads strictly. Only S
and the affine parameters of the backbone's BatchNorm layers are trained; BatchNorm running statistics
stay frozen and every other parameter has ``requires_grad=False``. The default loss is the original's
binary cross-entropy with logits on one-hot labels (``loss="ce"`` for cross-entropy). The run
directory receives args.json, env.txt, metrics.jsonl, checkpoint_last.pth, checkpoint_best.pth
(highest validation accuracy so far, a tie going to the later epoch, kept across a resume; the
validation loss and macro AUC are logged beside it)
and every ``save_every`` epochs ``<model_name>_ckpt_<epoch>.pth``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.data import DataLoader

from datasets.classification import SliceClassificationDataset
from datasets.conventions import CLASS_NAMES
from models.mask_net.covid_mask_net import (
    CLASSIFIER_BUILDER,
    SEGMENTATION_BUILDER,
    covid_mask_net,
    load_segmentation_weights,
)
from models.mask_net.workflows.model_io import builder_keywords, check_architecture, stored_settings
from models.summary import parameter_counts
from utils.amp import grad_scaler
from utils.checkpoint import load_checkpoint
from utils.classification_metrics import one_vs_rest_auc
from utils.distributed import DistContext, means_over_ranks, train_shuffling
from utils.reproducibility import worker_init_fn
from utils.run_dir import Best, RunDir
from utils.training import (
    RunConfig,
    current_lr,
    fit,
    load_weights,
    start_training,
)

from .classifier_evaluation import ClassifierSettings, collate_slices, predict_logits
from .loops import prepare_training, train_one_epoch
from .losses import classification_loss, inverse_frequency_weights

DEFAULT_ROI_BATCH_SIZE, DEFAULT_S_FEATURES = 128, 512
# A new classifier's rows: each score in its lesion class's column (the original's "shared" column
# leaves S unable to tell a consolidation from a ground-glass detection scored alike).
DEFAULT_SCORE_COLUMNS = "per_class"
# The metric (in metrics.jsonl) that chooses checkpoint_best.pth; higher is better.
SELECTION_METRIC = "val_accuracy"  # always defined, unlike an AUC on a one-class validation set
# Segmentation builder settings the classifier does not inherit (mask branch, detection filtering);
# everything else (architecture, transform, anchors, RPN) carries over so that the weights fit.
NOT_INHERITED = ("with_masks", "mask_layers", "mask_roi_size", "mask_overlap_thresh", "box_score_thresh",
                 "box_detections_per_img", "box_nms_thresh", "pretrained_backbone")
# Settings that leave parameter shapes alone: given ones replace the checkpoint's.
SETTING_OVERRIDES = ("rpn_nms_th", "roi_nms_th", "image_size")


@dataclass(kw_only=True)
class ClassifierTrainConfig(RunConfig, ClassifierSettings):
    """Settings of :func:`train_classifier`: the run's (:class:`utils.training.RunConfig`), the model's
    (:class:`ClassifierSettings`; on a segmentation checkpoint B, S's width and the score columns default to
    128, 512 and "per_class"), and:

    Attributes:
        pretrained_segmentation_model: segmentation checkpoint whose weights (mask branch excluded)
            initialise the model, or None.
        pretrained_classification_model: classification checkpoint loaded strictly; takes precedence.
        train_data_dir, val_data_dir: folders of slices; ``split_file`` / ``val_split_file`` (COVIDx-CT)
            select some of them, or None.
        crop_to_box: crop slices to the split file's lung box (needs both split files).
        image_size: short side the model resizes slices to (None: the segmentation model's).
        loss: ``bce`` (the original's) or ``ce``.
        class_balance: weight each slice's loss by the inverse frequency of its class.
    """

    pretrained_segmentation_model: str | None = None
    pretrained_classification_model: str | None = None
    train_data_dir: str = "data/phantom/cls/train"
    val_data_dir: str = "data/phantom/cls/val"
    split_file: str | None = None
    val_split_file: str | None = None
    crop_to_box: bool = False
    image_size: int | None = None
    loss: str = "bce"
    class_balance: bool = False
    save_dir: str = "runs/classifier"
    model_name: str = "covid_ct_mask_net"
    batch_size: int = 8


def classifier_loaders(config: ClassifierTrainConfig, ctx: DistContext | None = None
                       ) -> tuple[DataLoader, DataLoader]:
    """Shuffled (seeded; this process's DistributedSampler share under DDP) training loader and validation
    loader in file order.

    Raises:
        ValueError: for ``crop_to_box`` without both split files (they hold the boxes).
    """
    if config.crop_to_box and (config.split_file is None or config.val_split_file is None):
        raise ValueError("--crop_to_box needs --split_file and --val_split_file: the boxes come from the split files")

    def dataset(root, split_file):
        return SliceClassificationDataset(root, split_file=split_file, crop_to_box=config.crop_to_box)

    train_set = dataset(config.train_data_dir, config.split_file)
    val_set = dataset(config.val_data_dir, config.val_split_file)
    common = dict(batch_size=config.batch_size, num_workers=config.num_workers, collate_fn=collate_slices,
                  worker_init_fn=worker_init_fn)
    generator = torch.Generator().manual_seed(config.seed)
    return (DataLoader(train_set, generator=generator, **train_shuffling(train_set, ctx, config.seed), **common),
            DataLoader(val_set, shuffle=False, **common))


def build_classifier(config: ClassifierTrainConfig) -> tuple[torch.nn.Module, dict]:
    """Model and its builder kwargs, from (in this order) ``resume``, the classification or the
    segmentation checkpoint.

    Raises:
        ValueError: when no checkpoint is given, or a setting contradicts the checkpoint.
    """
    path = config.resume or config.pretrained_classification_model or config.pretrained_segmentation_model
    if path is None:
        raise ValueError("give --pretrained_segmentation_model (or --pretrained_classification_model / --resume): "
                         "S is trained on top of a segmentation model and cannot be trained from scratch")
    if config.pretrained_classification_model and config.pretrained_segmentation_model:
        print(f"both pretrained models given: using {path}, ignoring the segmentation model")
    from_segmentation = path == config.pretrained_segmentation_model
    wanted = (SEGMENTATION_BUILDER, CLASSIFIER_BUILDER) if from_segmentation else (CLASSIFIER_BUILDER,)
    ckpt = load_checkpoint(path, builder=wanted, kind=None if from_segmentation else "classification")
    check_architecture(path, stored_settings(ckpt), asdict(config))
    if ckpt["builder"] == CLASSIFIER_BUILDER:
        kwargs = {**ckpt["builder_kwargs"], **builder_keywords(asdict(config), names=SETTING_OVERRIDES)}
        model = covid_mask_net(**kwargs)
        load_weights(model, ckpt["model"], path)
        print(f"loaded classification checkpoint {path} strictly")
        return model, kwargs
    kwargs = classifier_kwargs_from_segmentation(config, ckpt["builder_kwargs"])
    model = covid_mask_net(**kwargs)
    counts = load_segmentation_weights(model, ckpt["model"], source=path)
    print(f"segmentation weights from {path}: {counts['loaded']} tensors loaded, {counts['ignored_mask']} mask-branch "
          f"tensors ignored, {counts['new']} new tensors (module S) initialised")
    return model, kwargs


def classifier_kwargs_from_segmentation(config: ClassifierTrainConfig, seg_kwargs: dict) -> dict:
    """Builder kwargs of a new classifier on a segmentation model with builder kwargs ``seg_kwargs``."""
    kwargs = {k: v for k, v in seg_kwargs.items() if k not in NOT_INHERITED}
    settings = asdict(config)
    kwargs.update(builder_keywords(settings, names=("backbone_name", "truncation", "num_classes")))
    kwargs["roi_batch_size"] = config.roi_batch_size or DEFAULT_ROI_BATCH_SIZE
    kwargs["s_features"] = config.s_features or DEFAULT_S_FEATURES
    kwargs["score_columns"] = config.score_columns or DEFAULT_SCORE_COLUMNS
    return {**kwargs, **builder_keywords(settings, names=SETTING_OVERRIDES)}


def validate(model, loader, *, device: torch.device, loss_kind: str, max_steps: int | None = None,
             progress: bool = True) -> dict[str, float]:
    """Unweighted validation loss, accuracy and one-vs-rest macro AUC, in eval mode (no gradients, no
    BatchNorm updates). The AUC is NaN when the validation slices hold a single class."""
    logits, labels, _ = predict_logits(model, loader, device=device, progress=progress, max_steps=max_steps)
    loss = classification_loss(logits, labels, kind=loss_kind)
    _, macro_auc = one_vs_rest_auc(labels.numpy(), torch.softmax(logits.float(), dim=1).numpy())
    return {"loss": float(loss), "accuracy": float((logits.argmax(dim=1) == labels).double().mean()),
            "macro_auc": macro_auc}


def train_classifier(config: ClassifierTrainConfig) -> RunDir | None:
    """Train S (and the backbone's BatchNorm affine parameters), as one process or as one of several under
    ``torchrun`` (DDP).

    Under DDP each process trains on its share and gradients are averaged, so with the unweighted loss
    (a mean over the batch) ``world_size`` processes of ``batch_size`` slices step as one process of
    ``world_size * batch_size`` slices; with ``class_balance`` each process's weighted mean is averaged
    instead. Rank 0 alone validates and writes the run directory while the others wait at a barrier.
    ``sync_bn`` changes nothing here: the backbone's BatchNorm layers always normalise with their
    frozen running statistics.

    Returns:
        The run directory (None on non-zero ranks).

    Raises:
        FileExistsError: for a new run in a used ``save_dir`` without ``overwrite``.
        ValueError: without a checkpoint to start from, for one of another kind, or a setting that
            contradicts it.
    """
    with start_training(config) as ctx:
        return _train_classifier(config, ctx)


def _train_classifier(config: ClassifierTrainConfig, ctx: DistContext) -> RunDir | None:
    train_loader, val_loader = classifier_loaders(config, ctx)
    model, kwargs = build_classifier(config)
    net, optimizer, set_lr_for = prepare_training(model, config, ctx, train_loader)
    total, trainable = parameter_counts(model)
    print(f"trainable parameters: {trainable:,} of {total:,} (module S and the backbone's BatchNorm affine parameters)")
    weights = inverse_frequency_weights(train_loader.dataset.labels) if config.class_balance else None
    device = ctx.device
    steps = dict(max_steps=config.max_steps, progress=not config.no_progress and ctx.is_main)
    scaler = grad_scaler(device, config.amp)

    def loss_fn(m, images, labels):
        return {"loss_cls": classification_loss(m(images), labels, kind=config.loss, class_weights=weights)}

    def run_epoch(epoch: int) -> dict:
        train = train_one_epoch(net, train_loader, optimizer, device=device, epoch=epoch, loss_fn=loss_fn,
                                set_lr=set_lr_for(epoch), amp=config.amp, scaler=scaler,
                                freeze_bn_stats=True, **steps)
        train = means_over_ranks(train, ctx)
        if not ctx.is_main:
            return {}
        val = validate(model, val_loader, device=device, loss_kind=config.loss, **steps)
        print(f"Epoch {epoch}: train loss = {train['loss']:.3f}, validation loss = {val['loss']:.3f}, "
              f"validation accuracy = {val['accuracy']:.3f}, validation macro AUC = {val['macro_auc']:.3f}")
        return {"train_loss": train["loss"], **{f"val_{k}": v for k, v in val.items()}, "lr": current_lr(optimizer)}

    def checkpoint_extras(record: dict) -> dict:
        return {"class_names": list(CLASS_NAMES), "val_loss": record["val_loss"],
                "val_macro_auc": record["val_macro_auc"], SELECTION_METRIC: record[SELECTION_METRIC]}

    return fit(config, ctx=ctx, model=model, optimizer=optimizer, train_loader=train_loader,
               builder=CLASSIFIER_BUILDER, builder_kwargs=kwargs, kind="classification", run_epoch=run_epoch,
               checkpoint_extras=checkpoint_extras, best=Best(SELECTION_METRIC, higher_is_better=True), scaler=scaler)
