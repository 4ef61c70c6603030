"""``abawfeat weights import hsemotion``: HSEmotion / EmotiEffLib's whole pickled timm models as timm weights.

HSEmotion publishes its EmotiEffNet models as ``torch.save(model)`` of a timm model
(``enet_b0_8_best_afew.pt``: timm ``efficientnet_b0`` with 8 expression outputs; ``enet_b0_8_va_mtl.pt``: 10
outputs, the 8 expressions then valence and arousal; ``enet_b2_8.pt``, ``enet_b2_7.pt``: ``efficientnet_b2``).
Loading such a file the usual way runs whatever the pickle names, and ties it to the timm version that wrote
it (newer timm code on older objects fails, e.g. on attributes added since). ``import_hsemotion`` instead
reads it with a restricted unpickler and writes the weights file the ``timm`` encoder reads
(``save_timm_weights``): the state dict, the timm model name, the outputs and their names, and HSEmotion's
preprocessing. Extraction then only ever loads tensors (``weights_only=True``).

The restricted unpickler resolves nothing but an allow-list:
- module classes of ``timm`` and ``torch.nn.modules`` (a pickled timm model is a tree of them) -- and it never
  instantiates them: each becomes an inert record of the pickled attributes, from which the parameters and
  buffers are read, so no module code runs and classes renamed in later timm versions still read;
- the tensor rebuild functions of ``torch._utils`` (torch's own loader supplies the storages, in the zip and
  the legacy formats alike), ``collections.OrderedDict`` and ``builtins.set`` (a module's buffer bookkeeping);
- activation functions that older timm modules kept as attributes (``timm...activations.sigmoid``, a few of
  ``torch.nn.functional``), as inert names that are never called.
Anything else (``os.system``, ``builtins.eval``, a custom class, ``torch.storage._load_from_bytes``, which
would unpickle a nested file without restriction) is refused in one line naming the file and the global.

Preprocessing, as HSEmotion's own recogniser does it: the face resized (squashed) to 224 x 224 for the B0
models and 260 x 260 for the others, bilinear (torchvision's ``Resize`` default), ImageNet mean and std.
"""

from __future__ import annotations

import importlib
import pickle
import re
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abawfeat.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from abawfeat.encoders.timm_models import classifier_name, create_model, load_strict, save_timm_weights
from abawfeat.encoders.weights import NamedWeights, file_sha256, resolve_weights
from abawfeat.errors import CheckpointError, ConfigError
from abawfeat.utils.io import file_in_the_way

# HSEmotion's class orders (its recogniser's idx_to_class), and the two regression outputs of the _mtl models.
EXPRESSIONS_8 = ("Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise")
EXPRESSIONS_7 = ("Anger", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise")
VA = ("Valence", "Arousal")
# The models HSEmotion publishes (its recogniser's model names), fetched by name into
# $ABAWFEAT_HOME/weights/hsemotion/ when online. Not pinned to a commit (none is known here): the resolver
# records each file's sha256 beside it on download, and the converted file records it too.
_HSEMOTION_REPO = "https://github.com/HSE-asavchenko/face-emotion-recognition/raw/main/models/affectnet_emotions"
PUBLISHED: dict[str, NamedWeights] = {
    n: NamedWeights(name=n, encoder="hsemotion", filename=f"{n}.pt", url=f"{_HSEMOTION_REPO}/{n}.pt",
                    description=f"HSEmotion {n}, a pickled timm model (weights import hsemotion {n})",
                    folder="hsemotion")
    for n in ("enet_b0_8_best_vgaf", "enet_b0_8_best_afew", "enet_b0_8_va_mtl", "enet_b2_8", "enet_b2_7")
}
# File-name stems HSEmotion uses -> timm model names.
_ARCHITECTURES = {"enet_b0": "efficientnet_b0", "enet_b2": "efficientnet_b2"}
# Globals a pickled timm model needs besides module classes; nothing else is resolved.
_ALLOWED_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # pickle protocol 2 writes Python 2's module name
}
_MODULE_NAMESPACES = ("timm.", "torch.nn.modules.")
# Activation functions older timm versions kept as module attributes (SqueezeExcite's ``gate_fn``): read as
# inert markers, never called. Elsewhere in timm, only the activation modules' own functions qualify.
# (``torch.sigmoid`` itself pickles through ``builtins.getattr``, which is never allowed.)
_ACTIVATION_FUNCTIONS = {
    ("torch.nn.functional", n)
    for n in ("relu", "relu6", "silu", "gelu", "sigmoid", "tanh", "hardsigmoid", "hardswish", "mish", "elu")
}


class RefusedGlobal(Exception):
    """A pickle named a global outside the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        module = "builtins" if module == "__builtin__" else module  # Python 2's name, in protocol 2 pickles
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class PickledModule:
    """The inert record of one pickled ``nn.Module``: its class's qualified name and its pickled attributes
    (``_parameters``, ``_buffers``, ``_modules``, ...). Never a module: no code of the class runs."""

    qualified: str = ""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.qualified}: unexpected pickled state ({type(state).__name__})")
        self.state = state


_RECORDS: dict[str, type[PickledModule]] = {}


def _module_record(module: str, name: str) -> type[PickledModule] | None:
    """The record class for a timm / torch.nn module class, or None when (module, name) is not one."""
    if not module.startswith(_MODULE_NAMESPACES) or not name.isidentifier() or not name[:1].isupper():
        return None
    try:
        with warnings.catch_warnings():  # timm's deprecated import paths warn
            warnings.simplefilter("ignore")
            found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        found = None
        if not module.startswith("timm."):  # a torch.nn class that does not exist: not a module class
            return None
    if found is not None and not (isinstance(found, type) and issubclass(found, nn.Module)):
        return None  # a function or constant of those modules
    qualified = f"{module}.{name}"
    if qualified not in _RECORDS:
        _RECORDS[qualified] = type(name, (PickledModule,), {"qualified": qualified})
    return _RECORDS[qualified]


class PickledFunction:
    """An activation function a pickled module held as an attribute, by name only; not callable."""

    def __init__(self, qualified: str) -> None:
        self.qualified = qualified

    def __repr__(self) -> str:
        return f"PickledFunction({self.qualified})"


def _activation_function(module: str, name: str) -> PickledFunction | None:
    timm_activation = module.startswith("timm.") and "activations" in module.split(".")[-1]
    timm_function = timm_activation and name.isidentifier() and name.islower()
    if (module, name) in _ACTIVATION_FUNCTIONS or timm_function:
        return PickledFunction(f"{module}.{name}")
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves the allow-list only (module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_FUNCTIONS.get((module, name))
        if allowed is not None:
            return allowed
        function = _activation_function(module, name)
        if function is not None:
            return function
        record = _module_record(module, name)
        if record is None:
            raise RefusedGlobal(module, name)
        return record


# What torch.load takes as ``pickle_module``: torch's loader subclasses our Unpickler (adding storages and
# persistent ids) for both of its file formats, so every global still goes through find_class.
RESTRICTED_PICKLE = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler,
    load=lambda f, **kw: RestrictedUnpickler(f, **kw).load(),
    __name__="abawfeat.restricted_pickle",
)


def load_pickled_model(path: Path) -> PickledModule:
    """The record tree of a ``torch.save(model)`` file, through the restricted unpickler."""
    try:
        with warnings.catch_warnings():
            # The legacy format records each module class's source, which torch compares with the class it
            # gets back: ours are inert records without source, so it warns once per class. Nothing to say.
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
            obj = torch.load(path, map_location="cpu", pickle_module=RESTRICTED_PICKLE, weights_only=False)
    except RefusedGlobal as exc:
        raise CheckpointError(f"{path}: refused to unpickle {exc.qualified}: not a timm or torch.nn module "
                              "class nor a tensor (a pickled model holds nothing else); nothing in the "
                              "file was run") from None
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files fail in many ways
        text = str(exc).strip().splitlines()
        raise CheckpointError(f"{path}: not a pickled model ({type(exc).__name__}: "
                              f"{text[0][:120] if text else ''})") from None
    if not isinstance(obj, PickledModule):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a whole pickled timm model "
                              "(a state dict is given to --backbone timm --weights directly)")
    return obj


def state_dict_of(record: PickledModule, path: Path) -> dict[str, torch.Tensor]:
    """The state dict a module tree would give (parameters, then persistent buffers, then children)."""
    out: dict[str, torch.Tensor] = {}

    def walk(rec: Any, prefix: str) -> None:
        if not isinstance(rec, PickledModule):
            raise CheckpointError(f"{path}: {prefix or 'the model'} is a {type(rec).__name__}, not a module")
        state = rec.state
        for key, value in (state.get("_parameters") or {}).items():
            if value is not None:
                out[prefix + key] = value.detach()
        skip = state.get("_non_persistent_buffers_set") or set()
        for key, value in (state.get("_buffers") or {}).items():
            if value is not None and key not in skip:
                out[prefix + key] = value.detach()
        for key, child in (state.get("_modules") or {}).items():
            if child is not None:
                walk(child, f"{prefix}{key}.")

    walk(record, "")
    return out


def _architecture(record: PickledModule, path: Path, model: str | None) -> str:
    if model:
        return model
    for key in ("pretrained_cfg", "default_cfg"):
        cfg = record.state.get(key)
        if isinstance(cfg, dict) and isinstance(cfg.get("architecture"), str):
            return str(cfg["architecture"])
    for stem, name in _ARCHITECTURES.items():
        if path.name.startswith(stem + "_"):
            return name
    raise ConfigError(f"{path}: which timm model it is is recorded neither in the file nor in its name; give "
                      "--model NAME (e.g. efficientnet_b0)")


def _fit_classifier(state: dict[str, torch.Tensor], expected: set[str], clf: str | None) -> dict[str, Any]:
    """HSEmotion replaced some classifiers by ``Sequential(Linear)``: its ``classifier.0.*`` is timm's
    ``classifier.*``."""
    if not clf:
        return state
    pattern = re.compile(rf"^{re.escape(clf)}\.0\.")
    return {(pattern.sub(f"{clf}.", k) if k not in expected and pattern.match(k) else k): v
            for k, v in state.items()}


def output_names(num_classes: int, file_name: str) -> tuple[str, ...]:
    """HSEmotion's output order for a model of ``num_classes`` outputs (the _mtl models end with VA)."""
    if "_mtl" in file_name and num_classes == len(EXPRESSIONS_8) + 2:
        return (*EXPRESSIONS_8, *VA)
    if "_mtl" in file_name and num_classes == len(EXPRESSIONS_7) + 2:
        return (*EXPRESSIONS_7, *VA)
    if num_classes == len(EXPRESSIONS_8):
        return EXPRESSIONS_8
    if num_classes == len(EXPRESSIONS_7):
        return EXPRESSIONS_7
    return tuple(f"output{i}" for i in range(num_classes))


def import_hsemotion(src: str | Path, out: str | Path, *, model: str | None = None,
                     image_size: int | None = None) -> dict[str, Any]:
    """Convert HSEmotion's pickled model ``src`` (a file, or one of the ``PUBLISHED`` names: from the user
    cache, downloaded there when online) into the timm weights file ``out`` (never overwritten); return what
    was written (model, outputs, preprocessing) for the command to print."""
    out = Path(out)
    if not Path(src).is_file() and str(src) in PUBLISHED:
        src = resolve_weights(str(src), "hsemotion", PUBLISHED, verify=load_pickled_model).path
    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file (published names: {', '.join(PUBLISHED)})")
    if out.exists() or out.is_symlink():
        raise CheckpointError(f"{out}: already exists; give another --out (an imported file is never "
                              "overwritten)")
    blocker = file_in_the_way(out.parent)
    if blocker is not None:
        raise CheckpointError(f"{blocker}: is a file, so {out} cannot be written below it")
    record = load_pickled_model(src)
    if not record.qualified.startswith("timm.models."):
        raise CheckpointError(f"{src}: holds a {record.qualified}, not a timm model")
    arch = _architecture(record, src, model)
    state = state_dict_of(record, src)
    clf = classifier_name(create_model(arch, meta=True))
    classifier = next((state[k] for k in (f"{clf}.weight", f"{clf}.0.weight") if k in state), None)
    num_classes = int(classifier.shape[0]) if classifier is not None else 0
    net = create_model(arch, num_classes)
    state = _fit_classifier(state, set(net.state_dict()), clf)
    load_strict(net, state, src, arch)
    size = image_size or (224 if "_b0_" in src.name else 260)
    preprocess = {"size": size, "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
                  "std": list(IMAGENET_STD)}
    names = output_names(num_classes, src.name)
    source = {"format": "hsemotion", "file": src.name, "sha256": file_sha256(src),
              "pickled_class": record.qualified}
    save_timm_weights(out, model=arch, state=net.state_dict(), num_classes=num_classes, logit_names=names,
                      preprocess=preprocess, source=source)
    return {"out": str(out), "model": arch, "num_classes": num_classes, "logit_names": list(names),
            "preprocess": preprocess, "parameters": sum(int(p.numel()) for p in net.parameters()),
            **{"source_" + k: v for k, v in source.items()}}


# Formats ``abawfeat weights import FORMAT`` knows, each a function (src, out, **options) -> summary.
IMPORTERS = {"hsemotion": import_hsemotion}

__all__ = ["EXPRESSIONS_7", "EXPRESSIONS_8", "IMPORTERS", "PUBLISHED", "RESTRICTED_PICKLE", "VA",
           "import_hsemotion", "load_pickled_model", "state_dict_of"]
