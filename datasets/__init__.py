"""Dataset interfaces shared by the 2D and 3D tracks.

This package shadows the Hugging Face ``datasets`` package on purpose (docs/ARCHITECTURE.md): the project never
depends on it.
"""
