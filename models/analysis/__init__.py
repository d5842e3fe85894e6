"""One chest CT in, a report out: the scan pipeline as a library (``analyze_scan.py`` is its command line).

Load the models once, then analyse any number of scans::

    from models.analysis import analyze, load_models

    models = load_models("pretrained_models", device="cpu")  # or checkpoints={"lung_seg": "L.pth", ...}
    report = analyze("data/phantom/volumes/imagesTr/chest_2003.nii.gz", models, out_dir="runs/analyze/chest_2003")
    report.summary["quantities"]["total"]["involvement_percent"], report.summary["covid"]

The pipeline: lung segmentation (lung_seg), split into left and right lung by position; lesion
segmentation (lesion_seg), kept inside the lungs, the lung mask extended by the lesions it encloses;
lesion types by Hounsfield band (:mod:`utils.quantify`); the COVID-19 probability of the 3D
classifier (covid_cls) with its GradCAM map, and of the 2D COVID-CT-Mask-Net over the lung slices.

Modules: :mod:`.loading` (where each checkpoint comes from, :class:`Models`), :mod:`.scan` (the
input as a HU volume), :mod:`.steps` (segmentations and classifiers) and :mod:`.pipeline`
(:func:`analyze`, :class:`Report`); :mod:`.inputs` (one scan, or the scans of a folder, a list or a
datalist) and :mod:`.cohort` (many scans with the models loaded once, shards, their merged table).
"""
from .loading import CLASSIFIERS, MODELS, LoadedModel, Models, ModelSpec, load_models, resolve_model_paths
from .pipeline import OUTPUT_FILES, Report, analyze
from .scan import PNG_SPACING, Scan, read_scan

__all__ = ["CLASSIFIERS", "MODELS", "OUTPUT_FILES", "PNG_SPACING", "LoadedModel", "ModelSpec", "Models", "Report",
           "Scan", "analyze", "load_models", "read_scan", "resolve_model_paths"]
