"""The networks of both tracks and the pipelines that train, evaluate and run them.

``mask_net/`` is the 2D COVID-CT-Mask-Net stack (one file per detection stage, the classifier S, the
CPU fast path in ``mask_net/fast/`` and the 2D pipelines in ``mask_net/workflows/``); ``volumetric/``
holds the 3D MONAI tasks, one module each; ``summary.py`` prints parameter counts. See
docs/ARCHITECTURE.md for the layers and where each thing lives.
"""
