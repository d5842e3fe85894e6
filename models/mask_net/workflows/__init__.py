"""The 2D pipelines of COVID-CT-Mask-Net, callable from Python without a command line.

Each pipeline takes one keyword-only dataclass config whose fields are the flags of the root script of
the same name (``train_segmentation.py`` -> ``train_segmentation(SegmentationTrainConfig(...))``);
the scripts only parse their flags and call the pipeline.

- ``segmentation``: :func:`train_segmentation`, :func:`infer_segmentation` (Mask R-CNN lesion model);
- ``evaluation``: :func:`evaluate_mean_ap` (mask and box AP of a segmentation checkpoint);
- ``classifier``: :func:`train_classifier` (module S on a segmentation model);
- ``classifier_evaluation``: :func:`evaluate_classifier` (reports, predictions, plots);
- ``conversion``: :func:`convert_checkpoint` (a checkpoint of the original repository into ours);
- ``losses``: S's classification loss and class weights;
- ``loops``: the 2D epoch loops (one training pass, validation loss).
"""
from .classifier import ClassifierTrainConfig, train_classifier
from .classifier_evaluation import ClassifierEvalConfig, evaluate_classifier
from .conversion import ConversionConfig, convert_checkpoint
from .evaluation import MeanAPConfig, evaluate_mean_ap
from .segmentation import SegmentationInferenceConfig, SegmentationTrainConfig, infer_segmentation, train_segmentation

__all__ = ["ClassifierEvalConfig", "ClassifierTrainConfig", "ConversionConfig", "MeanAPConfig",
           "SegmentationInferenceConfig", "SegmentationTrainConfig", "convert_checkpoint", "evaluate_classifier",
           "evaluate_mean_ap", "infer_segmentation", "train_classifier", "train_segmentation"]
