"""Procedural chest-CT phantom: stands in for the public data sets, in their exact layouts.

Each patient is drawn from a seed: body and chest wall, ribs, spine, mediastinum and heart, two lungs
whose shape and size vary between patients and along the body axis, a 3D pulmonary vessel tree, and
class-specific lesions (Control none; CP mostly unilateral lobar/segmental consolidation, sometimes
with a ground-glass halo; COVID-19 bilateral, peripheral, multifocal ground-glass, some with
consolidation inside). Slices and volumes of one patient cut the same 3D anatomy. Intensities are
Hounsfield units: air -1000, fat about -100, soft tissue 40-60, bone 300-1000, lung parenchyma about
-870, ground-glass -640..-320, consolidation -60..+25, then scanner blur and noise (sigma 10-30 HU).

Label maps
    Slice masks (CNCB, ``datasets.conventions``): 0 background, 1 lung, 2 GGO, 3 consolidation.
    Volume lung labels: 0 background, 1 LEFT lung, 2 RIGHT lung, in patient anatomical terms (the
    patient's left, whatever the voxel order; check with the affine).
    Volume lesion labels: 0 none, 1 ground-glass opacity, 2 consolidation.
    Per-scan COVID label: 1 COVID-19, 0 Control or CP.
    Abdomen labels: ``ORGAN_NAMES`` (BTCV order: 1 spleen, 2 right kidney, 3 left kidney,
    4 gallbladder, 5 esophagus, 6 liver, 7 stomach, 8 aorta, 9 IVC, 10 portal and splenic veins,
    11 pancreas, 12 right adrenal, 13 left adrenal).

Layout written by ``generate_dataset(out_dir)`` (all paths below are relative to ``out_dir``)
    ``seg/{train,val,test}/imgs/<name>.png`` 8-bit lung window (``datasets.conventions.LUNG_WINDOW``:
    centre -600, width 1500) and
    ``seg/{train,val,test}/masks/<name>.png`` with the same names, values 0..3 (the validation split
    chooses checkpoints, so that the test split stays unseen).
    ``cls/{train,val,test}/<name>.png`` and ``cls/{train,val,test}_COVIDx_CT.txt``, one line per
    slice: ``<filename> <class> <xmin> <ymin> <xmax> <ymax>`` (class 0/1/2, body box in pixels,
    max exclusive: ``image[ymin:ymax, xmin:xmax]`` is the body).
    Slice names: ``{Normal|CP|NCP}_{patient}_{scan}_{slice:04d}.png``.
    ``volumes/imagesTr/chest_<patient>.nii.gz`` int16 HU, ``volumes/labelsTr/`` lung labels,
    ``volumes/lesionsTr/`` lesion labels (same file names). In-plane spacing 0.6-0.9 mm, slice
    spacing 1-5 mm; even-numbered volumes RAS voxel order, odd ones LPS.
    Datalists in ``volumes/`` (Clara/MSD style: ``training``, ``validation``, ``test`` lists; paths
    relative to the ``volumes/`` folder that holds them):
    ``dataset_lung.json`` ``{"image", "label"}`` (label = lung label map);
    ``dataset_lesion.json`` ``{"image", "label"}`` (label = lesion label map);
    ``dataset_covid.json`` and the identical ``dataset.json`` ``{"image", "label_image", "label",
    "class"}`` (label_image = lung label map, label = 0/1 COVID-19, class = class name).
    ``abdomen/imagesTr/img0001.nii.gz``, ``abdomen/labelsTr/label0001.nii.gz`` and
    ``abdomen/dataset.json`` (``{"image", "label"}``, paths relative to ``abdomen/``).
    ``montage.png``, ``montage_volumes.png`` and ``summary.json``.
    Patients are split by patient (stratified by class) and never appear in two splits or outputs.
"""
from .abdomen import ORGAN_NAMES, make_abdomen_volume
from .chest import Patient, make_chest_slice, make_patient
from .generate import generate_dataset
from .lesions import LESION_CONSOLIDATION, LESION_GGO
from .tissues import TISSUE_AIR, TISSUE_AIRWAY, TISSUE_BONE, TISSUE_FAT, TISSUE_LUNG, TISSUE_SOFT
from .volume_writers import COVID_LABELS, LESION_LABELS, LUNG_LABELS
from .volumes import make_chest_volume

LUNG_LEFT, LUNG_RIGHT = 1, 2

__all__ = [
    "COVID_LABELS", "LESION_CONSOLIDATION", "LESION_GGO", "LESION_LABELS", "LUNG_LABELS", "LUNG_LEFT",
    "LUNG_RIGHT", "ORGAN_NAMES", "Patient", "TISSUE_AIR", "TISSUE_AIRWAY", "TISSUE_BONE",
    "TISSUE_FAT", "TISSUE_LUNG", "TISSUE_SOFT", "generate_dataset", "make_abdomen_volume",
    "make_chest_slice", "make_chest_volume", "make_patient",
]
