"""Checkpoints as safetensors + JSON: no pickle, so loading an untrusted checkpoint runs no code.

Any nested state (model and optimizer state dicts, accountant history, generator states) is split
into its tensors, stored in ``state.safetensors``, and everything else, stored in ``state.json``
with references to the tensors. Dicts with non-string keys (optimizer state is keyed by int) and
tuples are tagged so they come back as they were.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or not ours."""


FORMAT = "trustml-checkpoint-1"


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = path or "root"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, tensors, f"{path}.{k}" if path else k) for k, v in value.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint {type(value).__name__} at {path!r}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {k: _decode(v, tensors) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def save_state(state: dict[str, Any], folder: str | Path) -> None:
    """Write ``state`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = _encode(state, tensors, "")
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "state": meta}))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    meta_path, tensor_path = folder / "state.json", folder / "state.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r}: expected state.json and "
                              "state.safetensors")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {str(folder)!r} is unreadable: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(folder)!r}: expected format {FORMAT!r}")
    try:
        return _decode(meta["state"], tensors)
    except KeyError as err:
        raise CheckpointError(f"checkpoint {str(folder)!r}: tensor {err} is missing") from None


def save_model(model: torch.nn.Module, path: str | Path) -> None:
    """Model weights alone (tied weights stored once per name, as copies)."""
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
              str(path))


def load_model(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model weights {str(path)!r} do not exist")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"model weights {str(path)!r} are unreadable: {err}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"model weights {str(path)!r} do not fit the configured model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model
