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


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch (and process): a fixed function of the run's seed, the epoch and the rank.

    Seeding every epoch from ``(seed, epoch, rank)`` makes an epoch's data order, augmentation and
    sampling the same whether the run went straight through or was killed and resumed before it.
    """
    return int(np.random.SeedSequence([seed % 2**32, epoch, rank]).generate_state(1)[0])


def seed_epoch(seed: int, epoch: int, *, rank: int = 0, generator: torch.Generator | None = None,
               dataset=None) -> int:
    """Seed Python, NumPy and torch for ``epoch``; also a loader's ``generator`` and a MONAI ``dataset``'s
    random transforms.

    Args:
        seed: the run's seed.
        epoch: the epoch about to start.
        rank: the process rank under DDP.
        generator: the DataLoader's generator (its shuffle order and worker seeds), or None.
        dataset: a dataset whose MONAI ``Randomizable`` transforms are re-seeded, or None.

    Returns:
        The epoch's seed.
    """
    value = epoch_seed(seed, epoch, rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    if generator is not None:
        generator.manual_seed(value)
    if dataset is not None:
        from monai.data.utils import set_rnd

        set_rnd(dataset, value)
    return value


def rng_state() -> dict:
    """The Python, NumPy and torch (CPU, and CUDA when present) generator states, as checkpoint values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": [list(random.getstate()[1]), random.getstate()[0]],
             "numpy": {"kind": kind, "keys": torch.as_tensor(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states :func:`rng_state` returned."""
    internal, version = state["python"]
    random.setstate((version, tuple(internal), None))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
