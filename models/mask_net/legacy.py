"""Checkpoints of the original COVID-CT-Mask-Net, read safely and mapped onto this project's models.

The original (torch 1.1, torchvision 0.3) saves dicts of ``model_weights`` (torchvision 0.3's names;
the classifier's S under ``s2new.*``), ``anchor_generator`` (a pickled ``AnchorGenerator`` of
``models.mask_net.rpn`` or ``rpn_segmentation``), ``optimizer_state``, ``epoch`` (a string: epochs
done), ``model_name`` and ``lrate``.

Reading: :class:`RestrictedUnpickler` resolves only tensor rebuilding, a few harmless containers and
the anchor generator, as :class:`LegacyAnchorGenerator` (sizes and aspect ratios only). Any other
global is refused before anything is called, so reading a file cannot run code.

Mapping: :func:`map_legacy_keys` renames torchvision 0.3's names to ours (see ``KEY_RULES``);
:func:`infer_config` reads the architecture from tensor shapes.
"""
from __future__ import annotations

import _compat_pickle
import collections
import functools
import pickle
import re
import types
import zipfile
from pathlib import Path

import torch

from datasets.conventions import CLASS_NAMES, class_names_for, num_detection_classes
from utils.checkpoint import make_checkpoint

from .backbone import RESNETS, STAGES, out_channels_of
from .covid_mask_net import (
    CLASSIFIER_BUILDER,
    NUM_SLICE_CLASSES,
    ROW_WIDTH,
    S_PREFIX,
    SEGMENTATION_BUILDER,
    covid_mask_net,
)
from .mask_rcnn import COVID_DEFAULTS, FULL_MASK_LAYERS, LIGHT_MASK_LAYERS, maskrcnn_resnet_fpn

ANCHOR_GENERATOR_PATHS = ("models.mask_net.rpn", "models.mask_net.rpn_segmentation")
LEGACY_S_PREFIX = "s2new."


class LegacyAnchorGenerator:
    """Stand-in for the original's pickled ``AnchorGenerator``: keeps ``sizes`` and ``aspect_ratios`` only.

    Attributes: ``sizes``, ``aspect_ratios`` (as pickled, or None) and ``source`` (the class's ``module.name``).
    """

    source = "models.mask_net.rpn.AnchorGenerator"
    sizes = aspect_ratios = None

    def __setstate__(self, state) -> None:
        """Keep the two anchor settings of the pickled ``__dict__``; drop everything else (tensors, caches)."""
        if isinstance(state, tuple):  # (dict state, slot state)
            state = state[0]
        state = state if isinstance(state, dict) else {}
        self.sizes, self.aspect_ratios = state.get("sizes"), state.get("aspect_ratios")


class _InertObject:
    """Stand-in for torch 1.1's function backend, which a pickled module carries and nothing needs."""

    def __setstate__(self, state) -> None:
        pass


class RefusedGlobalError(ValueError):
    """A pickle names a global that :class:`RestrictedUnpickler` does not allow."""


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    # torch 1.1 modules pickle their ``_backend`` by reference to this function, or as the class.
    ("torch.nn.backends.thnn", "_get_thnn_function_backend"): _InertObject,
    ("torch.nn.backends.thnn", "THNNFunctionBackend"): _InertObject,
    **{("torch._utils", name): getattr(torch._utils, name)
       for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")
       if hasattr(torch._utils, name)},
    **{(path, "AnchorGenerator"): type("AnchorGenerator", (LegacyAnchorGenerator,),
                                       {"source": f"{path}.AnchorGenerator"}) for path in ANCHOR_GENERATOR_PATHS},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals an original checkpoint needs.

    Allowed: the entries of ``_ALLOWED`` (tensor rebuild functions, plain containers, the two
    ``AnchorGenerator`` paths as :class:`LegacyAnchorGenerator`) and torch dtypes; storages are
    resolved by ``torch.load`` itself.

    Raises:
        RefusedGlobalError: for any other global, naming it as ``module.name``; nothing is imported.
    """

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles name Python 2 modules (__builtin__.set); map them as pickle itself does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise RefusedGlobalError(f"refused to unpickle the global {module}.{name}: an original COVID-CT-Mask-Net "
                                 f"checkpoint holds only tensors, plain containers and an AnchorGenerator")


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# The module-like object handed to torch.load(pickle_module=...): its Unpickler and load are restricted.
restricted_pickle = types.ModuleType("restricted_pickle", "pickle with RestrictedUnpickler")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold constants.pkl; torch.load would pass them to torch.jit.load, past our unpickler."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rpartition("/")[2] == "constants.pkl" for name in archive.namelist())


def read_legacy_file(path: str | Path) -> dict:
    """Read an original checkpoint with :class:`RestrictedUnpickler` (zip or torch 1.1 legacy format), on the CPU.

    Returns:
        The file's dict; ``model_weights`` is checked to be a dict of tensors.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: naming the file when it holds a refused global, is TorchScript or no torch file,
            is not a dict, or has no ``model_weights`` state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"original checkpoint not found: {path}")
    if _is_torchscript(path):
        raise ValueError(f"{path}: a TorchScript archive, not an original COVID-CT-Mask-Net checkpoint")
    try:
        data = torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except RefusedGlobalError as err:
        raise ValueError(f"{path}: {err}") from None
    except Exception as err:  # torch and pickle raise several types for files that are not torch.save'd
        raise ValueError(f"{path}: cannot be read as a torch.save'd checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict with 'model_weights', got a {type(data).__name__}")
    weights = data.get("model_weights")
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"{path}: no 'model_weights' state dict (keys: {sorted(map(str, data))})")
    bad = [str(k) for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: 'model_weights' must map names to tensors; bad entries {bad[:4]}")
    return data


def _mask_fcn(match: re.Match) -> str:
    return f"roi_heads.mask_head.{int(match[1]) - 1}.0.{match[2]}"


_PARAM = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
# (old-name pattern, new name): a template for re.sub, or a function of the match. First match wins.
KEY_RULES = (
    (rf"^backbone\.body\.(conv1|bn1)\.{_PARAM}$", r"\g<0>"),
    (rf"^backbone\.body\.layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01])\.{_PARAM}$", r"\g<0>"),
    (r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$", r"backbone.fpn.\1.\2.0.\3"),
    (r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.\d+\.0\.(weight|bias)$", r"\g<0>"),  # torchvision >= 0.13
    (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^rpn\.head\.conv\.0\.0\.(weight|bias)$", r"\g<0>"),
    (r"^rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)$", r"\g<0>"),
    (r"^roi_heads\.box_head\.(fc6|fc7)\.(weight|bias)$", r"\g<0>"),
    (r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$", r"\g<0>"),
    (r"^roi_heads\.mask_head\.mask_fcn([1-9]\d*)\.(weight|bias)$", _mask_fcn),
    (r"^roi_heads\.mask_head\.\d+\.0\.(weight|bias)$", r"\g<0>"),
    (r"^roi_heads\.mask_predictor\.(conv5_mask|mask_fcn_logits)\.(weight|bias)$", r"\g<0>"),
    (r"^s2new\.fc_scores\.(weight|bias)$", S_PREFIX + r"0.\1"),
    (r"^s2new\.fc_scores_2\.(weight|bias)$", S_PREFIX + r"2.\1"),
    (r"^s2new\.fc_scores_img\.(weight|bias)$", S_PREFIX + r"4.\1"),
)
_COMPILED_RULES = tuple((re.compile(p), r) for p, r in KEY_RULES)


def map_key(old: str) -> str | None:
    """Our parameter name for an original (torchvision 0.3 style) one, or None when no rule knows it."""
    for pattern, replacement in _COMPILED_RULES:
        match = pattern.match(old)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    return None


def map_legacy_keys(state: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Rename an original state dict to our names (a DistributedDataParallel ``module.`` prefix is dropped).

    Raises:
        ValueError: naming ``source`` and the keys when some have no known place, or two map to one name.
    """
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    mapped, unknown, clashes = {}, [], []
    for old, tensor in state.items():
        new = map_key(old)
        if new is None:
            unknown.append(old)
        elif new in mapped:
            clashes.append(f"{old} -> {new}")
        else:
            mapped[new] = tensor
    if unknown:
        raise ValueError(f"{source}: unknown key layout; {len(unknown)} keys have no place in this project's models: "
                         f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    if clashes:
        raise ValueError(f"{source}: keys of two layouts name the same parameter: {clashes[:4]}")
    return mapped


@functools.lru_cache(maxsize=None)
def resnet_layouts() -> dict[str, tuple[bool, tuple[int, ...], tuple[int, ...]]]:
    """Per ResNet: (bottleneck blocks?, blocks per stage, channels per stage), read from torchvision's modules."""
    layouts = {}
    for name, make in RESNETS.items():
        with torch.device("meta"):
            net = make(weights=None)
        stages = [getattr(net, s) for s in STAGES]
        layouts[name] = (hasattr(stages[0][0], "conv3"), tuple(len(s) for s in stages),
                         tuple(out_channels_of(s) for s in stages))
    return layouts


def infer_backbone(state: dict[str, torch.Tensor], *, source: str) -> tuple[str, int, str]:
    """(backbone_name, truncation, description) from the ResNet body's keys and shapes (our names).

    Raises:
        ValueError: naming ``source`` when the stages are not layer1..layerK or match no known ResNet.
    """
    blocks: dict[int, set[int]] = collections.defaultdict(set)
    for key in state:
        match = re.match(r"^backbone\.body\.layer(\d)\.(\d+)\.", key)
        if match:
            blocks[int(match[1])].add(int(match[2]))
    stages = sorted(blocks)
    if stages != list(range(1, len(stages) + 1)) or len(stages) < 2:
        raise ValueError(f"{source}: the ResNet body has stages {['layer%d' % s for s in stages]}; expected "
                         f"layer1..layerK with K = 2, 3 or 4")
    bottleneck = any(".conv3." in k for k in state if k.startswith("backbone.body.layer"))
    kind, last_bn = ("bottleneck", "bn3") if bottleneck else ("basic", "bn2")
    counts = tuple(len(blocks[s]) for s in stages)
    widths = tuple(int(state[f"backbone.body.layer{s}.{max(blocks[s])}.{last_bn}.weight"].shape[0]) for s in stages)
    names = [name for name, (bneck, n, w) in resnet_layouts().items()
             if bneck == bottleneck and n[:len(stages)] == counts and w[:len(stages)] == widths]
    if not names:
        raise ValueError(f"{source}: the ResNet body ({kind} blocks, {counts} "
                         f"blocks and {widths} channels per stage) matches none of {sorted(RESNETS)}")
    truncation = len(STAGES) - len(stages)
    if names[0] == "resnet50" and truncation:
        raise ValueError(f"{source}: a resnet50 body without {STAGES[len(stages):]}; resnet50 is used whole")
    return names[0], truncation, f"{kind} blocks {list(counts)}, channels {list(widths)}"


def _shape(state: dict, key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"{source}: 'model_weights' has no tensor for {key} (our name)")
    return tuple(state[key].shape)


def infer_s_module(state: dict[str, torch.Tensor], *, source: str) -> tuple[int, int]:
    """(B, s_features) from S's layers: the first reads 5B values, the last gives 3 logits.

    Raises:
        ValueError: naming ``source`` when S's shapes are inconsistent.
    """
    first, last = _shape(state, S_PREFIX + "0.weight", source), _shape(state, S_PREFIX + "4.weight", source)
    if first[1] % ROW_WIDTH or last[0] != NUM_SLICE_CLASSES:
        raise ValueError(f"{source}: S ({LEGACY_S_PREFIX}*) reads {first[1]} values (not a multiple of {ROW_WIDTH}) "
                         f"or gives {last[0]} logits (expected {NUM_SLICE_CLASSES})")
    return first[1] // ROW_WIDTH, first[0]


def infer_config(state: dict[str, torch.Tensor], *, source: str) -> dict:
    """The architecture of a mapped state dict, from its keys and tensor shapes.

    Returns:
        ``kind`` ("segmentation" or "classifier"), ``backbone_name``, ``truncation``, ``body``
        (description), ``num_classes``, ``representation_size``, ``fpn_channels``,
        ``anchors_per_position``, ``mask_layers`` (segmentation) and ``roi_batch_size`` /
        ``s_features`` (classifier).

    Raises:
        ValueError: naming ``source`` for an unknown backbone, missing heads, or a classifier with a mask branch.
    """
    backbone_name, truncation, body = infer_backbone(state, source=source)
    classifier = any(k.startswith(S_PREFIX) for k in state)
    mask_keys = sorted(k for k in state if k.startswith("roi_heads.mask_"))
    if classifier and mask_keys:
        raise ValueError(f"{source}: holds both S ({LEGACY_S_PREFIX}*) and a mask branch ({mask_keys[:2]}); "
                         f"an original classifier has no mask branch")
    config = {"kind": "classifier" if classifier else "segmentation", "backbone_name": backbone_name,
              "truncation": truncation, "body": body,
              "num_classes": _shape(state, "roi_heads.box_predictor.cls_score.weight", source)[0],
              "representation_size": _shape(state, "roi_heads.box_head.fc6.weight", source)[0],
              "fpn_channels": _shape(state, "backbone.fpn.inner_blocks.0.0.weight", source)[0],
              "anchors_per_position": _shape(state, "rpn.head.cls_logits.weight", source)[0]}
    if classifier:
        config["roi_batch_size"], config["s_features"] = infer_s_module(state, source=source)
    else:
        layers = sorted(int(k.split(".")[2]) for k in mask_keys if k.endswith(".0.weight") and ".mask_head." in k)
        if not layers:
            raise ValueError(f"{source}: a segmentation model needs roi_heads.mask_head.* (original mask_fcn1, ...)")
        config["mask_layers"] = tuple(_shape(state, f"roi_heads.mask_head.{i}.0.weight", source)[0] for i in layers)
    return config


def _per_level_setting(value, name: str, num_levels: int, source: str) -> tuple[tuple[float, ...], ...]:
    """The original's per-level tuples; a flat tuple is read as its constructor reads it (sizes: one per level)."""
    if not isinstance(value, (tuple, list)) or not value:
        raise ValueError(f"{source}: the anchor generator's {name} is {value!r}, not a tuple")
    if not isinstance(value[0], (tuple, list)):
        value = tuple((v,) for v in value) if name == "sizes" else (tuple(value),) * num_levels
    levels = tuple(tuple(level) for level in value)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for level in levels for v in level):
        raise ValueError(f"{source}: the anchor generator's {name} must hold numbers, got {value!r}")
    return levels


def anchor_settings(generator: LegacyAnchorGenerator | None, *, num_levels: int, anchors_per_position: int,
                    source: str) -> dict:
    """Builder overrides ``anchor_sizes`` / ``aspect_ratios`` from the original's anchor generator.

    As in the original, level i of the FPN uses the generator's i-th entry (extra entries are unused).
    Equal levels give a flat tuple. Settings equal to our defaults give no override.

    Returns:
        ``{"overrides": {...}, "sizes": ..., "aspect_ratios": ..., "from": description}``.

    Raises:
        ValueError: naming ``source`` when the generator has fewer levels than the FPN, or its anchors
            per position differ from the RPN head's.
    """
    if generator is None:
        sizes, ratios = COVID_DEFAULTS["anchor_sizes"], COVID_DEFAULTS["aspect_ratios"]
        origin = "defaults (the file has no anchor_generator)"
    else:
        levels = [_per_level_setting(v, n, num_levels, source) for v, n in ((generator.sizes, "sizes"),
                                                                          (generator.aspect_ratios, "aspect_ratios"))]
        if min(len(levels[0]), len(levels[1])) < num_levels:
            raise ValueError(f"{source}: the anchor generator gives {len(levels[0])} levels of sizes and "
                             f"{len(levels[1])} of aspect ratios; the FPN has {num_levels}")
        sizes, ratios = (_flatten_equal(level[:num_levels]) for level in levels)
        origin = f"pickled {generator.source}"
    per_level = [len(s) * len(r) for s, r in zip(*(_as_levels(x, num_levels) for x in (sizes, ratios)))]
    if set(per_level) != {anchors_per_position}:
        raise ValueError(f"{source}: the anchor settings ({origin}) give {per_level} anchors per position, but the "
                         f"RPN head predicts {anchors_per_position}")
    overrides = {}
    if _floats(sizes) != _floats(COVID_DEFAULTS["anchor_sizes"]):
        overrides["anchor_sizes"] = sizes
    if _floats(ratios) != _floats(COVID_DEFAULTS["aspect_ratios"]):
        overrides["aspect_ratios"] = ratios
    return {"overrides": overrides, "sizes": sizes, "aspect_ratios": ratios, "from": origin}


def _flatten_equal(levels: tuple[tuple, ...]) -> tuple:
    return levels[0] if all(level == levels[0] for level in levels) else levels


def _as_levels(value: tuple, num_levels: int) -> tuple[tuple, ...]:
    return value if isinstance(value[0], tuple) else (value,) * num_levels


def _floats(value):
    """Nested tuples of floats, so that (1, 2) equals [1.0, 2.0] and a flat tuple differs from per-level ones."""
    return tuple(_floats(v) for v in value) if isinstance(value, (tuple, list)) else float(value)


def builder_and_kwargs(config: dict, anchor_overrides: dict) -> tuple[str, dict]:
    """Our builder and its keyword arguments for an inferred ``config``: required ones plus differing settings."""
    kwargs = {k: config[k] for k in ("backbone_name", "truncation", "num_classes")}
    if config["kind"] == "classifier":
        kwargs.update(roi_batch_size=config["roi_batch_size"], s_features=config["s_features"])
    for key in ("representation_size", "fpn_channels"):
        if config[key] != COVID_DEFAULTS[key]:
            kwargs[key] = config[key]
    if config["kind"] == "segmentation":
        default_mask = FULL_MASK_LAYERS if config["backbone_name"] == "resnet50" else LIGHT_MASK_LAYERS
        if tuple(config["mask_layers"]) != tuple(default_mask):
            kwargs["mask_layers"] = tuple(config["mask_layers"])
    kwargs.update(anchor_overrides)
    return (CLASSIFIER_BUILDER if config["kind"] == "classifier" else SEGMENTATION_BUILDER), kwargs


def build_and_load(builder: str, kwargs: dict, state: dict[str, torch.Tensor], *, source: str
                   ) -> tuple[torch.nn.Module, list[str]]:
    """Build our model and load the mapped weights strictly.

    BatchNorm ``num_batches_tracked`` counters absent from the file (torch < 0.4.1) are filled with 0.

    Returns:
        The model and the names of the counters that were filled.

    Raises:
        ValueError: naming ``source`` and the tensors when keys are missing or unexpected or shapes differ.
    """
    make = {SEGMENTATION_BUILDER: maskrcnn_resnet_fpn, CLASSIFIER_BUILDER: covid_mask_net}[builder]
    model = make(**kwargs)
    own = model.state_dict()
    filled = [k for k in own if k not in state and k.endswith("num_batches_tracked")]
    state = {**state, **{k: torch.zeros_like(own[k]) for k in filled}}
    problems = {"missing": [k for k in own if k not in state], "unexpected": [k for k in state if k not in own],
                "shape (file vs model)": [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                                          if k in own and v.shape != own[k].shape]}
    problems = {what: keys for what, keys in problems.items() if keys}
    if problems:
        detail = "; ".join(f"{what}: {keys[:4]}{' ...' if len(keys) > 4 else ''}" for what, keys in problems.items())
        raise ValueError(f"{source}: the weights do not fit {builder}({kwargs}): {detail}")
    model.load_state_dict(state, strict=True)
    return model, filled


def legacy_epoch(value, *, source: str) -> int:
    """Our epoch (0-based, the last completed) from the original's ``epoch`` (epochs done, ``str(e + 1)``).

    A file without ``epoch`` gives 0.

    Raises:
        ValueError: naming ``source`` when ``epoch`` is not a non-negative whole number.
    """
    if value is None:
        return 0
    try:
        done = int(str(value).strip())
        if done < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{source}: 'epoch' must be a non-negative whole number of epochs, got {value!r}") from None
    return max(done - 1, 0)


def _plain_value(value):
    """A value fit for a weights-only checkpoint's ``args`` (numbers, strings, None; anything else as str)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _extras(config: dict, mask_type: str | None, source: str) -> dict:
    """``mask_type`` and ``class_names`` stored beside the weights, as the training scripts store them."""
    if config["kind"] == "classifier":
        return {"class_names": list(CLASS_NAMES)}
    n = config["num_classes"]
    if mask_type is None:
        mask_type = {3: "both", 2: "merge"}.get(n)
    if mask_type is None or num_detection_classes(mask_type) != n:
        raise ValueError(f"{source}: the model has {n} classes (background included); mask_type "
                         f"{mask_type!r} does not fit (3: both; 2: merge or ggo)")
    return {"mask_type": mask_type, "class_names": list(class_names_for(mask_type))}


def convert_legacy_checkpoint(*, source: str | Path, mask_type: str | None = None) -> tuple[dict, dict]:
    """Read an original checkpoint and return it in this project's schema, with what was inferred.

    Args:
        source: the original file.
        mask_type: segmentation only: "both", "ggo" or "merge"; None takes "both" for 3 classes and
            "merge" (the original's default) for 2.

    Returns:
        (checkpoint, info): the checkpoint dict (optimizer None, ``args`` naming the source file and
        the original ``model_name``, ``lrate`` and ``epoch``), and ``info``, the inferred settings
        (see :func:`infer_config`) plus ``builder``, ``builder_kwargs``, ``anchors``, ``epoch``,
        ``tensors`` and ``filled_num_batches_tracked``.

    Raises:
        FileNotFoundError, ValueError: from :func:`read_legacy_file` and the mapping, inference and loading steps.
    """
    src = str(source)
    data = read_legacy_file(source)
    state = map_legacy_keys(dict(data["model_weights"]), source=src)
    config = infer_config(state, source=src)
    generator = data.get("anchor_generator")
    if generator is not None and not isinstance(generator, LegacyAnchorGenerator):
        raise ValueError(f"{src}: 'anchor_generator' is a {type(generator).__name__}, not an AnchorGenerator")
    fpn_levels = sum(1 for k in state if re.match(r"^backbone\.fpn\.inner_blocks\.\d+\.0\.weight$", k))
    anchors = anchor_settings(generator, num_levels=fpn_levels,
                              anchors_per_position=config["anchors_per_position"], source=src)
    builder, kwargs = builder_and_kwargs(config, anchors["overrides"])
    model, filled = build_and_load(builder, kwargs, state, source=src)
    extras = _extras(config, mask_type, src)
    epoch = legacy_epoch(data.get("epoch"), source=src)
    args = {"converted_from": str(Path(source).resolve()), **{f"original_{k}": _plain_value(data.get(k))
                                                             for k in ("model_name", "lrate", "epoch")}}
    checkpoint = make_checkpoint(model=model, builder=builder, builder_kwargs=kwargs, epoch=epoch, args=args,
                                 optimizer=None, **extras)
    info = {**config, **extras, "builder": builder, "builder_kwargs": kwargs, "anchors": anchors, "epoch": epoch,
            "tensors": len(state), "filled_num_batches_tracked": len(filled), "args": args}
    return checkpoint, info

