"""What every encoder whose weights are a Hugging Face ``transformers`` checkpoint shares: the folder layout
the one resolver reads and fetches (abawfeat/encoders/weights.py), hub names as named weights, and a strict
``from_pretrained`` from a local folder. The speech encoders (speech.py) and DINOv2 (dinov2.py) use it.

A checkpoint is a folder with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), and often
``preprocessor_config.json``: one made by ``save_pretrained``, copied from the hub, or, for a hub name such as
``facebook/dinov2-base``, ``$ABAWFEAT_HOME/weights/huggingface/<org>--<name>/`` (downloaded there when online;
offline, the resolver's one line says which files to put there). transformers is imported only when a model
is built.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from abawfeat.encoders.weights import CheckpointFolder, NamedWeights, weights_dir
from abawfeat.errors import CheckpointError

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
# A Hugging Face checkpoint folder, as the one weights resolver reads and fetches it.
CHECKPOINT = CheckpointFolder(weights=("model.safetensors", "pytorch_model.bin"), required=(CONFIG,),
                              optional=(PREPROCESSOR,))
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB = "https://huggingface.co"


def transformers() -> Any:
    import transformers as tf

    return tf


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers logs about unused checkpoint weights (pre-training heads) on every load; we check the
    loading report ourselves, so its chatter is turned down while loading."""
    logging = transformers().logging
    before = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # its per-load progress bar would break our one-bar output
    try:
        yield
    finally:
        logging.set_verbosity(before)
        if bars:
            logging.enable_progress_bar()


def hub_weights(name: str, encoder: str) -> NamedWeights:
    """Hugging Face model ``name`` as named weights: its folder's files, from the hub's ``main`` revision."""
    base = f"{_HUB}/{name}/resolve/main"
    first, *others = CHECKPOINT.weights
    return NamedWeights(
        name=name, encoder=encoder, filename=first, url=f"{base}/{first}",
        description=f"Hugging Face checkpoint folder ({CHECKPOINT.describe()})",
        folder=f"huggingface/{name.replace('/', '--')}",
        alternatives=tuple((f"{base}/{n}", n) for n in others),
    )


def hub_folder(name: str) -> Path:
    """Where a Hugging Face checkpoint is looked for (and downloaded to)."""
    return weights_dir() / hub_weights(name, "").folder


def hub_named_weights(known: Iterable[str], spec: Any, encoder: str) -> dict[str, NamedWeights]:
    """The encoder's known hub checkpoints, plus ``spec`` when it is another ``org/name`` (any hub name
    works; a local folder by that path is still used first, by the resolver)."""
    names = list(known)
    if isinstance(spec, str) and HUB_NAME.fullmatch(spec) and spec not in names:
        names.append(spec)
    return {n: hub_weights(n, encoder) for n in names}


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def load_pretrained(model_cls: Any, folder: Path, what: str, optional: tuple[str, ...] = ()) -> Any:
    """``model_cls.from_pretrained(folder)`` in float32, local files only; a file transformers cannot load,
    or one that lacks weights the model needs (other than those whose names contain one of ``optional``), is
    one CheckpointError line naming the folder."""
    try:
        with quiet_transformers():
            model, info = model_cls.from_pretrained(
                str(folder), local_files_only=True, dtype=torch.float32, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/... for bad files
        text = str(exc).strip().splitlines()
        raise CheckpointError(f"{folder}: not a loadable {what} checkpoint ({type(exc).__name__}: "
                              f"{text[0][:200] if text else ''})") from None
    missing = [k for k in info.get("missing_keys", ()) if not any(o in k for o in optional)]
    if missing:
        raise CheckpointError(f"{folder}: not a complete {what} checkpoint ({len(missing)} weights "
                              f"missing, e.g. {sorted(missing)[0]})")
    return model


def config_summary(model_config: Any) -> dict[str, Any]:
    """The architecture as the provenance records it (the transformers config without bookkeeping)."""
    data = model_config.to_dict()
    for key in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype",
                "output_hidden_states", "return_dict", "_attn_implementation_autoset"):
        data.pop(key, None)
    return json.loads(json.dumps(data, default=str))
