"""MONAI bundles of the volumetric checkpoints: what a task supplies, and the writer.

- :mod:`.spec`: :class:`~.spec.BundleSpec`, the part of a :class:`models.volumetric.task.Task`
  that says how it is written as a bundle (its network, its bundle transforms, its README text).
- :mod:`.segmentation`: the spec of the binary segmentation tasks (lung_seg, lesion_seg).
- :mod:`.config`: ``configs/inference.json`` and ``configs/metadata.json``.
- :mod:`.readme`: ``docs/README.md``.
- :mod:`.writer`: :func:`~.writer.export_bundle`, which writes and checks a bundle.

This package imports nothing on its own, so task modules can use :mod:`.spec` and
:mod:`.segmentation` without loading the writer.
"""
