"""Write the phantom data set in the public layouts (CNCB seg, COVIDx-CT cls, Clara/MSD volumes)."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.conventions import CLASS_TO_PREFIX, hu_to_png

from .chest import lesion_heights, make_chest_slice, make_patient

OUTPUTS = ("seg", "cls", "volumes", "abdomen")
SEG_SPLITS = CLS_SPLITS = ("train", "val", "test")
VOLUME_SPLITS = ("training", "validation", "test")
# Patient-ID ranges of each output, so that no patient appears in two outputs either.
ID_BASE = {"seg": 1, "cls": 1001, "volumes": 2001, "abdomen": 3001}


def patient_seed(seed: int, pid: int) -> int:
    """Seed of patient ``pid`` in the data set of ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(pid)]).generate_state(1)[0])


def split_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Counts per split summing to ``n``; every split gets one when ``n`` allows."""
    counts = [int(np.floor(n * f)) for f in fractions]
    order = np.argsort([-(n * f - c) for f, c in zip(fractions, counts)], kind="stable")
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):
        if counts[i] == 0 and n >= len(counts):
            counts[int(np.argmax(counts))] -= 1
            counts[i] = 1
    return counts


def split_patients(classes: dict[int, int], names, fractions, seed: int) -> dict[int, str]:
    """Assign each patient (``pid -> class``) to one split, by patient, classes spread evenly.

    Patients are shuffled within their class, interleaved across classes, then dealt to the split
    furthest below its share, so every split gets a mix of classes and its target count.
    """
    rng = np.random.default_rng([int(seed), 99])
    groups = []
    for cls in sorted(set(classes.values())):
        pids = [pid for pid, c in sorted(classes.items()) if c == cls]
        rng.shuffle(pids)
        groups.append(pids)
    order = [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]
    targets = split_counts(len(order), fractions)
    assigned = [0] * len(names)
    out = {}
    for m, pid in enumerate(order):
        open_ = [j for j in range(len(names)) if assigned[j] < targets[j]]
        j = max(open_, key=lambda j: (fractions[j] * (m + 1) - assigned[j], -j))
        assigned[j] += 1
        out[pid] = names[j]
    return out


def slice_heights(p, n: int, rng, lesion_share: float) -> list[float]:
    """``n`` distinct slice levels: a share through the lesions, the rest anywhere in the lungs."""
    heights = lesion_heights(p)
    out = []
    for i in range(n):
        if heights and i < round(lesion_share * n):
            out.append(float(np.clip(rng.choice(heights) + rng.normal(0, 0.03), 0.05, 0.95)))
        else:
            out.append(float(rng.uniform(0.12, 0.88)))
    return sorted(out)


def slice_name(cls: int, pid: int, t: float, used: set) -> str:
    """``{Normal|CP|NCP}_{patient}_{scan}_{slice:04d}.png``; slice numbers count from the lung bases."""
    number = int(round(t * 300))
    while number in used:
        number += 1
    used.add(number)
    return f"{CLASS_TO_PREFIX[cls]}_{pid}_{pid * 10 + 1}_{number:04d}.png"


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def _seg_patient(task: dict) -> list[dict]:
    """Write one patient's slices and masks to the CNCB layout; returns one record per slice."""
    p = make_patient(seed=task["pseed"], cls=task["cls"], halo=task["halo"])
    rng = np.random.default_rng([task["pseed"], 3])
    folder, used, records = Path(task["folder"]), set(), []
    for t in slice_heights(p, task["n_slices"], rng, 0.75):
        s = make_chest_slice(seed=task["pseed"], size=task["size"], cls=task["cls"], t=t, patient=p)
        name = slice_name(task["cls"], task["pid"], t, used)
        _save_png(folder / "imgs" / name, hu_to_png(s["image"]))
        _save_png(folder / "masks" / name, s["mask"])
        records.append(dict(file=name, cls=task["cls"], values=sorted(int(x) for x in np.unique(s["mask"]))))
    return records


def _cls_patient(task: dict) -> list[dict]:
    """Write one patient's slices to the COVIDx-CT layout; returns split-file records."""
    p = make_patient(seed=task["pseed"], cls=task["cls"])
    rng = np.random.default_rng([task["pseed"], 4])
    folder, used, records = Path(task["folder"]), set(), []
    for t in slice_heights(p, task["n_slices"], rng, 1.0):
        s = make_chest_slice(seed=task["pseed"], size=task["size"], cls=task["cls"], t=t, patient=p)
        name = slice_name(task["cls"], task["pid"], t, used)
        _save_png(folder / name, hu_to_png(s["image"]))
        records.append(dict(file=name, cls=task["cls"], box=s["body_box"]))
    return records


def _run(fn, tasks: list[dict], workers: int) -> list:
    if workers <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, tasks))


def patient_classes(kind: str, n: int, seed: int) -> dict[int, int]:
    """``pid -> class`` for ``n`` patients, classes in turn (Control, CP, COVID-19)."""
    return {ID_BASE[kind] + i: i % 3 for i in range(n)}


def write_seg(out: Path, *, seed: int, n_patients: int, n_slices: int, size, workers: int) -> dict:
    """CNCB layout: ``seg/{train,val,test}/{imgs,masks}/<name>.png`` (a validation split added to CNCB's two)."""
    classes = patient_classes("seg", n_patients, seed)
    splits = split_patients(classes, SEG_SPLITS, (0.6, 0.2, 0.2), seed)
    tasks = []
    for i, (pid, cls) in enumerate(classes.items()):
        folder = out / "seg" / splits[pid]
        for sub in ("imgs", "masks"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        tasks.append(dict(pid=pid, cls=cls, pseed=patient_seed(seed, pid), halo=(i // 3) % 2 == 1,
                          folder=str(folder), n_slices=n_slices, size=size))
    records = _run(_seg_patient, tasks, workers)
    counts = {name: sum(len(r) for r, t in zip(records, tasks) if splits[t["pid"]] == name) for name in SEG_SPLITS}
    patients = {n: sorted(p for p, s in splits.items() if s == n) for n in SEG_SPLITS}
    return dict(root=str(out / "seg"), slices=counts, patients=patients)


def write_cls(out: Path, *, seed: int, n_patients: int, n_slices: int, size, workers: int) -> dict:
    """COVIDx-CT layout: ``cls/{train,val,test}/<name>.png`` and ``cls/{split}_COVIDx_CT.txt``."""
    classes = patient_classes("cls", n_patients, seed)
    splits = split_patients(classes, CLS_SPLITS, (0.6, 0.2, 0.2), seed)
    tasks = []
    for pid, cls in classes.items():
        folder = out / "cls" / splits[pid]
        folder.mkdir(parents=True, exist_ok=True)
        tasks.append(dict(pid=pid, cls=cls, pseed=patient_seed(seed, pid), folder=str(folder),
                          n_slices=n_slices, size=size))
    records = _run(_cls_patient, tasks, workers)
    files = {}
    for name in CLS_SPLITS:
        lines = [f"{r['file']} {r['cls']} {' '.join(str(x) for x in r['box'])}"
                 for recs, t in zip(records, tasks) if splits[t["pid"]] == name for r in recs]
        files[name] = out / "cls" / f"{name}_COVIDx_CT.txt"
        files[name].write_text("".join(line + "\n" for line in lines))
    return dict(root=str(out / "cls"), split_files={k: str(v) for k, v in files.items()},
                slices={k: len(v.read_text().splitlines()) for k, v in files.items()})
