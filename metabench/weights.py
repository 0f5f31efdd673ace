"""Weight files for backbones: safe loading, checkpoint adaptation, package files and the hub cache.

Nothing here unpickles code (torch files load with ``weights_only=True``), and nothing here waits on
the network for long: the hub is used only when a TCP connect to it succeeds within two seconds.
``metabench.backbones`` decides the resolution order; this module provides the steps.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import pickle
import socket
import struct
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

__all__ = [
    "WeightsError",
    "WeightsInfo",
    "hub_cache_dir",
    "hub_download",
    "hub_offline",
    "hub_reachable",
    "find_in_hub_cache",
    "load_checkpoint_into",
    "load_into",
    "load_state_dict_file",
    "map_by_position",
    "package_file",
    "sha256_file",
]

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model")  # training scripts nest the weights under these
_PREFIXES = ("module.", "model.", "backbone.")  # DDP, metabench.Backbone, PMF-style wrappers
_TORCH_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # pickled magic number that opens pre-1.6 torch files
_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # what timm publishes, preferred first
_TRUE = {"1", "on", "yes", "true"}


class WeightsError(ValueError):
    """A weights file that cannot be used; the message is one sentence naming the file."""


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of a backbone's weights, recorded in every run manifest."""

    pretrained: bool
    source: str  # "file" | "package" | "hub_cache" | "hub" | "random"
    location: str | None  # file path / package file / hub repo id
    tag: str | None
    sha256: str | None  # of the weights file when one was read
    note: str  # one sentence, e.g. why random init was used


# --------------------------------------------------------------------------- reading files


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed so large checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # safetensors: u64 little-endian header length, then a JSON header starting with "{".
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 8 + n <= size and head[8:9] == b"{"


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors or torch state dict without ever unpickling code.

    A dict wrapping the weights under "state_dict" or "model" (timm, DeiT, training checkpoints) is
    unwrapped. Anything else is a ``WeightsError`` naming the file.
    """
    path = Path(path)
    head = _head(path, "Weights file")
    if _looks_like_safetensors(head, path.stat().st_size):
        return _load_safetensors(path, "Weights file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            with open(path, "rb") as f:  # a file object: torch would hand a *.safetensors path to safetensors
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if head.startswith((_TORCH_ZIP_MAGIC, _TORCH_LEGACY_MAGIC)):
            raise WeightsError(
                f"Weights file {path} holds Python objects other than tensors, which metabench never unpickles; "
                "re-save only the state dict (torch.save(model.state_dict(), path)) or convert it to safetensors."
            ) from None
        raise WeightsError(f"Weights file {path} is {_NOT_WEIGHTS}.") from None
    except Exception:  # torch raises many types (RuntimeError, KeyError, EOFError) for non-torch bytes
        raise WeightsError(f"Weights file {path} is {_NOT_WEIGHTS}.") from None
    return _as_state_dict(obj, path)


_NOT_WEIGHTS = ("neither a safetensors file nor a torch state dict; pass a .safetensors file or a state dict saved "
                "with torch.save(model.state_dict(), path)")


def _head(path: Path, what: str) -> bytes:
    """The first bytes of ``path``, which must be a readable file (else one clear error naming it)."""
    if path.is_dir():
        raise WeightsError(f"{what} {path} is a folder; pass the file itself.")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist; pass a safetensors or torch state-dict file.")
    with open(path, "rb") as f:
        return f.read(16)


def _load_safetensors(path: Path, what: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{what} {path} is a damaged safetensors file ({e}); copy or save it again.") from None


def load_checkpoint_into(module: nn.Module, path: str | Path, what: str) -> None:
    """Load a safetensors checkpoint written from a module like ``module`` (a learner), strictly.

    ``what`` names the module for messages (e.g. 'learner "pmf" on backbone vit_test'). A file that is
    not safetensors, or whose keys or shapes differ (another learner or backbone), is one
    ``WeightsError`` and leaves nothing half-loaded that would be used. Never unpickles.
    """
    from safetensors.torch import load_model

    path = Path(path)
    head = _head(path, "Checkpoint")
    if not _looks_like_safetensors(head, path.stat().st_size):
        raise WeightsError(f"Checkpoint {path} is not a safetensors file, so metabench did not write it; restore "
                           "the run's own checkpoint or run it again.")
    expected = module.state_dict()
    advice = "evaluate it with the learner and backbone it was trained with"
    for key, value in _load_safetensors(path, "Checkpoint").items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise WeightsError(f"Checkpoint {path} does not fit {what}: key '{key}' has shape {tuple(value.shape)} "
                               f"in the file but {tuple(expected[key].shape)} here; {advice}.")
    missing, unexpected = load_model(module, str(path), strict=False)  # knows safetensors' shared-tensor dedup
    if missing or unexpected:
        first = f"key '{sorted(missing)[0]}' is missing from the file" if missing else \
            f"key '{sorted(unexpected)[0]}' in the file is not in {what}"
        more = len(missing) + len(unexpected) - 1
        raise WeightsError(f"Checkpoint {path} does not fit {what}: {first}"
                           f"{f' ({more} more keys differ)' if more else ''}; {advice}.")


def _as_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    """Unwrap training-checkpoint nesting and insist on a flat ``{str: Tensor}`` mapping."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"Weights file {path} holds a {type(obj).__name__}, not a state dict of tensors.")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise WeightsError(
                f"Weights file {path} is not a plain state dict: entry {key!r} is a {type(value).__name__}, "
                "not a tensor."
            )
    return dict(obj)


# --------------------------------------------------------------------------- fitting a state dict to a model


def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove wrapper prefixes shared by every key (repeatedly: "module.model.blocks..." -> "blocks...")."""
    changed = True
    while changed and sd:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _checkpoint_filter(model: nn.Module):
    """timm's own filter for the model's family (ViT: resamples position embeddings), if it has one."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return tuple(f"{h}." for h in heads)


def _first_mismatch(model_sd: dict[str, Tensor], sd: dict[str, Tensor]) -> tuple[str, int] | None:
    """Describe the first key that does not fit, and how many do not fit in all."""
    problems: list[str] = []
    for key, ref in model_sd.items():
        if key not in sd:
            if not key.endswith("num_batches_tracked"):  # a counter, often dropped by converters
                problems.append(f"key '{key}' is missing from the file")
        elif tuple(sd[key].shape) != tuple(ref.shape):
            problems.append(
                f"key '{key}' has shape {tuple(sd[key].shape)} in the file but {tuple(ref.shape)} in the model"
            )
    problems += [f"key '{k}' in the file is not in the model" for k in sd if k not in model_sd]
    return (problems[0], len(problems)) if problems else None


def load_into(model: nn.Module, sd: Mapping[str, Tensor], origin: str) -> None:
    """Load ``sd`` into a timm ``model`` strictly, except for a classifier head the model does not have.

    Prefixes are stripped and timm's checkpoint filter runs first, so DINO/timm/DDP checkpoints and ones
    trained at another image size load. A key that still does not fit is one ``WeightsError`` sentence.
    """
    sd = _strip_prefixes(dict(sd))
    filter_fn = _checkpoint_filter(model)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception as e:  # timm's converters fail with assorted errors on foreign checkpoints
            raise WeightsError(f"Weights file {origin} could not be adapted to {type(model).__name__} ({e}).") from None
    model_sd = model.state_dict()
    heads = _head_prefixes(model)
    sd = {k: v for k, v in sd.items() if k in model_sd or not k.startswith(heads)}
    mismatch = _first_mismatch(model_sd, sd)
    if mismatch is not None:
        problem, count = mismatch
        more = f" ({count - 1} more keys do not fit either)" if count > 1 else ""
        raise WeightsError(f"Weights file {origin} does not fit this backbone: {problem}{more}.")
    model.load_state_dict(sd, strict=False)  # strictness was checked above, tolerating num_batches_tracked


def map_by_position(sd: Mapping[str, Tensor], reference: Mapping[str, Tensor], origin: str) -> dict[str, Tensor]:
    """Rename ``sd`` to ``reference``'s keys by position, checking every shape pair.

    For ports whose names differ from timm's but whose tensors come in the same order.
    """
    if len(sd) != len(reference):
        raise WeightsError(
            f"Weights file {origin} has {len(sd)} tensors but the timm model expects {len(reference)}; "
            "it is not the expected checkpoint."
        )
    out: dict[str, Tensor] = {}
    for (src_key, value), (dst_key, ref) in zip(sd.items(), reference.items(), strict=True):
        if tuple(value.shape) != tuple(ref.shape):
            raise WeightsError(
                f"Weights file {origin} does not match the timm model by position: '{src_key}' has shape "
                f"{tuple(value.shape)} but '{dst_key}' needs {tuple(ref.shape)}."
            )
        out[dst_key] = value
    return out


def package_file(package: str, relative: str) -> Path | None:
    """Path of a data file shipped inside an installed package, or None when it is not installed."""
    try:
        path = Path(str(importlib.resources.files(package).joinpath(relative)))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


# --------------------------------------------------------------------------- Hugging Face hub


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set now (read at call time, unlike huggingface_hub's import-time constant)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return (env or "").strip().lower() in _TRUE or (env is None and constants.is_offline_mode())


def hub_cache_dir() -> Path:
    """The hub cache directory, honouring HF_HUB_CACHE / HF_HOME as they are set now."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _split_repo(repo_id: str) -> tuple[str, str | None]:
    repo, _, revision = repo_id.partition("@")  # timm allows "org/name@revision"
    return repo, revision or None


def find_in_hub_cache(repo_id: str, filenames: Iterable[str] = _HUB_FILENAMES) -> Path | None:
    """First of ``filenames`` already in the local hub cache for ``repo_id``; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    repo, revision = _split_repo(repo_id)
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(), revision=revision)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_reachable(timeout: float = 2.0) -> bool:
    """One quick TCP connect to the hub host, so an offline machine falls back in seconds, not minutes."""
    url = urlparse(_hub_endpoint())
    proxy = os.environ.get(f"{url.scheme.upper()}_PROXY") or os.environ.get(f"{url.scheme}_proxy")
    if proxy:  # behind a proxy the hub is reachable when the proxy is
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_download(repo_id: str, filenames: Iterable[str] = _HUB_FILENAMES) -> Path | None:
    """Download the first available of ``filenames`` into the hub cache; None when that fails."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    repo, revision = _split_repo(repo_id)
    for filename in filenames:
        try:
            path = hf_hub_download(
                repo,
                filename,
                revision=revision,
                cache_dir=hub_cache_dir(),
                endpoint=_hub_endpoint(),
                etag_timeout=5,
            )
        except RemoteEntryNotFoundError:  # the repo has the other format; try it
            continue
        except Exception as e:  # network, auth, disk: all mean "no weights from the hub this time"
            log.info("Download of %s/%s failed: %s", repo, filename, e)
            return None
        return Path(path)
    return None
