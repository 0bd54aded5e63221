"""Checkpoints as safetensors + JSON: no pickle, so loading an untrusted checkpoint runs no code.

Any nested state (model and optimizer state dicts, accountant history, generator states) is split
into its tensors, stored in ``state.safetensors``, and everything else, stored in ``state.json``
with references to the tensors. Dicts with non-string keys (optimizer state is keyed by int) and
tuples are tagged so they come back as they were.

Self-checking: ``state.json`` carries a SHA-256 over its own state and the tensor file's bytes, so an
edited, truncated or mixed-up checkpoint is refused instead of trusted. The digest is unkeyed: it
catches edits and torn writes, not a forger who recomputes it; against that, the loop and the
privacy state cross-check what they restore with the step count and the metrics log.

A checkpoint is replaced by writing ``<name>.tmp`` in full (fsynced), renaming the live one to
``<name>.old``, renaming ``.tmp`` into place and removing ``.old``. A crash between any two of these
leaves a complete copy that :func:`load_state` finds and verifies.
"""

from __future__ import annotations

import hashlib
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


FORMAT = "trustml-checkpoint-2"


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


def _digest(meta: Any, tensor_path: Path) -> str:
    """SHA-256 of the JSON state (canonical form) and of the tensor file's bytes."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    with tensor_path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copies(folder: Path) -> list[Path]:
    """Where a complete checkpoint may be, newest first: the live folder; after a crash between
    the two renames of a swap, the finished ``.tmp`` or the previous ``.old``."""
    return [folder, folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")]


def checkpoint_exists(folder: str | Path) -> bool:
    """Whether ``folder`` or a copy left by an interrupted swap exists."""
    return any(copy.is_dir() for copy in _copies(Path(folder)))


def save_state(state: dict[str, Any], folder: str | Path) -> None:
    """Write ``state`` atomically: a crash at any point leaves one complete, verifiable copy."""
    folder = Path(folder)
    live, tmp, old = _copies(folder)
    if not live.exists():  # a swap was interrupted: put the complete copy back first
        for copy in (tmp, old):
            if _verified(copy):
                os.replace(copy, live)
                break
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = _encode(state, tensors, "")
    save_file(tensors, str(tmp / "state.safetensors"))
    text = json.dumps({"format": FORMAT, "state": meta,
                       "sha256": _digest(meta, tmp / "state.safetensors")})
    (tmp / "state.json").write_text(text)
    for name in ("state.safetensors", "state.json"):
        _fsync(tmp / name)
    if live.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(live, old)
    os.replace(tmp, live)
    shutil.rmtree(old, ignore_errors=True)


def _verified(folder: Path) -> bool:
    try:
        _read(folder)
    except CheckpointError:
        return False
    return True


def _read(folder: Path) -> dict[str, Any]:
    meta_path, tensor_path = folder / "state.json", folder / "state.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r}: expected state.json and "
                              "state.safetensors")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {str(folder)!r} is unreadable: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(folder)!r}: expected format {FORMAT!r}")
    if meta.get("sha256") != _digest(meta.get("state"), tensor_path):
        raise CheckpointError(f"checkpoint {str(folder)!r} was modified or damaged after it was "
                              "written (its SHA-256 does not match)")
    try:
        return _decode(meta["state"], tensors)
    except KeyError as err:
        raise CheckpointError(f"checkpoint {str(folder)!r}: tensor {err} is missing") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(folder)!r} is malformed: {err}") from None


def load_state(folder: str | Path) -> dict[str, Any]:
    """The checkpoint in ``folder`` (or, after a crash mid-swap, its complete copy), verified."""
    folder = Path(folder)
    live, tmp, old = _copies(folder)
    if live.exists():
        return _read(live)
    for copy in (tmp, old):
        if _verified(copy):
            return _read(copy)
    return _read(live)  # raises: no complete copy anywhere


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
