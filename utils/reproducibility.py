"""One call seeds every random number generator the project uses."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy, torch (CPU and CUDA) and MONAI.

    Args:
        seed: the seed.
        deterministic: also ask torch for deterministic algorithms (slower; some ops warn).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    from monai.utils import set_determinism

    set_determinism(seed=seed % 2**32, use_deterministic_algorithms=deterministic or None)
    if not deterministic:
        # set_determinism turns cudnn benchmarking off; leave speed settings alone otherwise.
        torch.backends.cudnn.deterministic = False


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` giving each worker its own NumPy/Python stream."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
