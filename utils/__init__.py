"""Shared helpers of both tracks, below the models and the scripts.

Checkpoints (``checkpoint``) and the pretrained-model manifest (``manifest``, whose command line is
``python -m utils.manifest``), command-line helpers (``cli``), run folders (``run_dir``), metrics
(``mean_ap``, ``rle``, ``dice``, ``classification_metrics``), scan quantities and the scan and cohort reports
(``quantify``, ``scan_report``, ``cohort_report``), plots, paths and reproducibility.
"""
