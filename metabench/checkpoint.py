"""Resumable meta-training checkpoints: learner, optimisers, schedulers, counters, RNG states, position.

Layout under ``<run>/checkpoints/``: ``step-<update>.learner.safetensors`` (the learner's tensors),
``step-<update>.state.safetensors`` (optimiser/scheduler tensors and the torch RNG state) and
``latest.json`` (everything else, with tensors referenced by name). Each file is written to a
temporary name and renamed; ``latest.json`` is written last and is the commit point, so a run killed
at any moment leaves the previous checkpoint intact. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from episodes.atomic import atomic_path, atomic_write
from metabench.learners.base import Learner

__all__ = ["CheckpointError", "TrainPosition", "atomic_save", "load_training_checkpoint", "mark_training_done",
           "read_position", "save_training_checkpoint"]

log = logging.getLogger(__name__)
LATEST = "latest.json"
_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, said in one sentence."""


class TrainPosition(dict):
    """``latest.json``'s content: update, tasks, training_done, files and the encoded state."""

    @property
    def update(self) -> int:
        return int(self.get("update", 0))

    @property
    def done(self) -> bool:
        return bool(self.get("training_done", False))


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON-able form of a state dict; tensors go to ``tensors`` and dict keys keep their types."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.copy())
        return {"__ndarray__": path}
    if isinstance(obj, dict):
        return {"__map__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"Cannot checkpoint a {type(obj).__name__} at {path}.")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj["__map__"]}
    return obj


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def atomic_save(save: Any, path: Path) -> None:
    """``save(tmp)`` then rename to ``path`` (``episodes.atomic``): readers see the old file or the new one."""
    with atomic_path(path) as tmp:
        save(tmp)


def save_training_checkpoint(directory: Path, learner: Learner, *, update: int, tasks: int,
                             identity: dict[str, str]) -> None:
    """Save everything needed to continue meta-training after ``update`` outer updates (``tasks`` seen).

    ``identity`` (learner and backbone names) is checked on load, so a checkpoint never loads into
    another model.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"step-{update:08d}"
    tensors: dict[str, torch.Tensor] = {}
    state = _encode({"learner": learner.training_state(), "rng": _rng_state()}, tensors, "s")
    atomic_save(lambda p: save_model(learner, str(p)), directory / f"{stem}.learner.safetensors")
    atomic_save(lambda p: save_file(tensors, str(p)), directory / f"{stem}.state.safetensors")
    position = {"format": _FORMAT, "update": update, "tasks": tasks, "training_done": False, "identity": identity,
                "learner_file": f"{stem}.learner.safetensors", "state_file": f"{stem}.state.safetensors",
                "state": state}
    atomic_write(directory / LATEST, json.dumps(position) + "\n")
    _remove_other_steps(directory, keep=stem)
    log.debug("Checkpoint at update %d (%d tasks) in %s", update, tasks, directory)


def mark_training_done(directory: Path, *, update: int, tasks: int, identity: dict[str, str]) -> None:
    """Training finished and the final learner is saved elsewhere: drop the step files, keep the position."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / LATEST, json.dumps({"format": _FORMAT, "update": update, "tasks": tasks,
                                                 "training_done": True, "identity": identity}) + "\n")
    _remove_other_steps(directory, keep=None)


def _remove_other_steps(directory: Path, keep: str | None) -> None:
    for path in directory.glob("step-*"):
        if keep is None or not path.name.startswith(keep + "."):
            path.unlink(missing_ok=True)


def read_position(directory: Path) -> TrainPosition | None:
    """The last committed checkpoint position, or None when training never checkpointed."""
    path = directory / LATEST
    if not path.is_file():
        return None
    try:
        return TrainPosition(json.loads(path.read_text()))
    except ValueError:
        raise CheckpointError(f"{path} is not a readable checkpoint record; delete the run's checkpoints "
                              "folder to restart its training from the beginning.") from None


def load_training_checkpoint(directory: Path, position: TrainPosition, learner: Learner,
                             identity: dict[str, str]) -> None:
    """Restore the learner, its optimisers and schedulers, and the RNG states of ``position``.

    Call after ``learner.setup_training`` (which creates the schedulers whose state is restored here).
    """
    if position.get("identity") != identity:
        raise CheckpointError(f"The checkpoint in {directory} belongs to {position.get('identity')}, not {identity}; "
                              "resume it with the learner and backbone it was trained with.")
    try:
        missing, unexpected = load_model(learner, str(directory / position["learner_file"]), strict=False)
        tensors = load_file(str(directory / position["state_file"]))
    except (OSError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"The checkpoint in {directory} is incomplete or damaged ({err}); delete that folder "
                              "to restart training from the beginning.") from None
    if missing or unexpected:
        raise CheckpointError(f"The checkpoint in {directory} does not fit learner \"{identity.get('learner')}\" "
                              f"(first bad key: {(missing or unexpected)[0]}).")
    state = _decode(position["state"], tensors)
    learner.load_training_state(state["learner"])
    _set_rng_state(state["rng"])
