"""Read run folders into tidy frames: episodes joined with manifest columns, probes, training logs.

Torch-free: only pandas/numpy and ``metabench.results`` (itself torch-free).

Probe files (``<run>/probes/<name>.parquet``, written by the SMAT learner's probes; extra columns are kept):

``expert_scores``
    One row per (evaluation episode, expert): ``episode_id`` (str), ``source`` (str), ``domain`` ("id"/"ood"),
    ``expert`` (int, 0..M-1), ``alpha`` (float, the router's normalised merging weight; sums to 1 over experts).
``mask_stats``
    One row per (expert, parameter or parameter slice): ``expert`` (int), ``layer_name`` (str, timm name such as
    ``blocks.3.attn.qkv.weight``; a q/k/v third of a fused qkv is named ``...qkv.weight[q]``), ``layer_type``
    (str, see ``analysis.experts.LAYER_TYPES``; empty/null means "derive from the name"), ``depth`` (int block
    index from the name, -1 outside blocks), ``numel`` (int entries), ``nonzero`` (int non-zero mask entries).
``mask_overlap``
    One row per expert pair (a <= b), optionally per layer (then summed): ``expert_a``, ``expert_b`` (int),
    ``intersection`` (entries non-zero in both masks), ``nonzero_a``, ``nonzero_b`` (non-zero entries of each).
``grad_alignment``
    One row per measurement: ``tasks_seen`` (int, meta-training tasks so far), ``sparsity`` (float target sparsity)
    and/or ``label`` (str, the line's name), ``param_group`` ("delta" for the shared dense delta θ^δ,
    "expert_m" for the masked experts z_m⊙θ^δ), ``alignment`` (float, mean pairwise cosine similarity of the
    per-task meta-gradients within one meta-batch).

When ``mask_stats`` or ``mask_overlap`` is absent but ``probes/masks.npz`` exists (arrays named
``e<expert>/<layer_name>``, non-zero = kept entry), the frame is derived from the masks.

Training log (``train_log.jsonl``): one JSON object per line. Learning curves use the records that carry
``tasks`` (int, tasks seen) and ``val_id`` / ``val_ood`` (mean validation accuracy over the ID / OOD sources,
a fraction in [0, 1]); optional ``val_id_ci95`` / ``val_ood_ci95`` are 95% half-widths (fractions).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metabench.results import EPISODE_COLUMNS, TRAIN_LOG, ResultsError, load_run

__all__ = [
    "PROBE_SCHEMAS",
    "ProbeMissing",
    "config_value",
    "flat_config",
    "load_manifests",
    "load_masks",
    "load_probes",
    "load_runs",
    "load_train_log",
    "run_labels",
    "varying_keys",
]

log = logging.getLogger(__name__)

PROBE_SCHEMAS: dict[str, tuple[str, ...]] = {
    "expert_scores": ("episode_id", "source", "domain", "expert", "alpha"),
    "mask_stats": ("expert", "layer_name", "layer_type", "depth", "numel", "nonzero"),
    "mask_overlap": ("expert_a", "expert_b", "intersection", "nonzero_a", "nonzero_b"),
    "grad_alignment": ("tasks_seen", "param_group", "alignment"),
}
MASKS_FILE = "masks.npz"
# Config keys that never distinguish two settings (paths, devices, worker counts).
IGNORED_KEYS = frozenset({"run_name", "out_dir", "data.root", "device", "data.num_workers", "eval.batch_size",
                          "precision", "backbone.weights", "backbone.allow_download"})
MANIFEST_COLUMNS = ("label", "pretrained", "weights_source", "timm_name", "preset", "seed", "git_sha", "run_dir")


class ProbeMissing(FileNotFoundError):
    """A run has no such probe file (e.g. a learner without experts): callers skip the figure."""


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (lists stay values), so two configs can be compared key by key."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_value(manifest: Mapping[str, Any], key: str) -> Any:
    """The value of a dotted config key (e.g. ``learner.sparsity``) in a manifest; None when absent."""
    return flat_config(manifest.get("config", {})).get(key)


def varying_keys(manifests: list[Mapping[str, Any]]) -> list[str]:
    """Dotted config keys whose values differ between the manifests (paths, devices and workers ignored)."""
    flats = [flat_config(m.get("config", {})) for m in manifests]
    keys = sorted({k for f in flats for k in f} - IGNORED_KEYS)
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]


def _distinguishing_keys(flats: list[dict[str, Any]]) -> list[str]:
    """Greedy: add varying keys (backbone first, then learner options, then the rest) while each one
    splits runs that the keys chosen so far leave together; stop once every run is told apart."""
    keys = [k for k in sorted({k for f in flats for k in f} - IGNORED_KEYS)
            if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    keys.sort(key=lambda k: (k != "backbone.name", not k.startswith("learner."), k))
    chosen: list[str] = []

    def groups(ks: list[str]) -> int:
        return len({tuple(json.dumps(f.get(k), sort_keys=True, default=str) for k in ks) for f in flats})

    for key in keys:
        if groups(chosen) == len(flats):
            break
        if groups([*chosen, key]) > groups(chosen):
            chosen.append(key)
    return chosen


def _short_key(key: str) -> str:
    return "backbone" if key == "backbone.name" else key.removeprefix("learner.")


def run_labels(manifests: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """A short, unique column label per run id: the learner name, plus the fewest config keys that tell apart
    runs of the same learner (``smat[sparsity=0.9]``, see ``_distinguishing_keys``), plus the run id when
    configs are identical."""
    by_learner: dict[str, list[str]] = {}
    for run_id, m in manifests.items():
        by_learner.setdefault(_learner_name(m), []).append(run_id)
    labels: dict[str, str] = {}
    for learner, run_ids in by_learner.items():
        flats = [flat_config(manifests[r].get("config", {})) for r in run_ids]
        keys = _distinguishing_keys(flats) if len(run_ids) > 1 else []
        for run_id, flat in zip(run_ids, flats):
            parts = [f"{_short_key(k)}={flat.get(k)}" for k in keys]
            labels[run_id] = f"{learner}[{', '.join(parts)}]" if parts else learner
    counts = pd.Series(list(labels.values())).value_counts()
    return {r: (f"{lab}[{r}]" if counts[lab] > 1 else lab) for r, lab in labels.items()}


def _learner_name(manifest: Mapping[str, Any]) -> str:
    name = manifest.get("config", {}).get("learner", {}).get("name")
    return str(name or manifest.get("learner", {}).get("learner", "?"))


def load_manifests(paths: Iterable[str | Path]) -> dict[str, dict[str, Any]]:
    """Run id -> manifest (with ``_run_dir`` added), in the order given; duplicate run ids fail."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        manifest, _ = load_run(path)
        run_id = str(manifest.get("run_id") or Path(path).name)
        if run_id in out:
            raise ResultsError(f"Run {run_id} was given twice ({out[run_id]['_run_dir']} and {path}); "
                               "pass each run once.")
        out[run_id] = {**manifest, "_run_dir": str(Path(path))}
    return out


def _manifest_row(manifest: Mapping[str, Any], label: str) -> dict[str, Any]:
    backbone = manifest.get("backbone", {})
    return {
        "label": label,
        "pretrained": bool(backbone.get("pretrained", False)),
        "weights_source": backbone.get("weights_source"),
        "timm_name": backbone.get("timm_name"),
        "preset": manifest.get("config", {}).get("preset"),
        "seed": manifest.get("seed"),
        "git_sha": manifest.get("git", {}).get("sha"),
        "run_dir": manifest.get("_run_dir"),
    }


def load_runs(paths: Iterable[str | Path], labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """All runs' episode rows in one frame, each row joined with its run's manifest columns
    (``label``, ``pretrained``, ``weights_source``, ``timm_name``, ``preset``, ``seed``, ``git_sha``, ``run_dir``).

    Args:
        paths: run folders.
        labels: run id -> column label, overriding ``run_labels``.
    """
    manifests = load_manifests(paths)
    names = {**run_labels(manifests), **(labels or {})}
    frames = []
    for run_id, manifest in manifests.items():
        _, episodes = load_run(manifest["_run_dir"])
        if episodes.empty:
            log.warning("Run %s has no evaluated episodes yet; it adds no rows.", run_id)
            continue
        row = _manifest_row(manifest, names[run_id])
        frames.append(episodes.assign(run_id=run_id, **row))
    if not frames:
        return pd.DataFrame(columns=[*EPISODE_COLUMNS, *MANIFEST_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def load_masks(run_dir: str | Path) -> dict[int, dict[str, np.ndarray]]:
    """``probes/masks.npz`` as expert -> layer name -> boolean mask (non-zero entries are kept)."""
    path = Path(run_dir) / "probes" / MASKS_FILE
    if not path.is_file():
        raise ProbeMissing(f"{path} does not exist.")
    masks: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            expert, _, layer = key.partition("/")
            if not expert.startswith("e") or not layer:
                raise ResultsError(f'{path}: array "{key}" is not named e<expert>/<layer_name>; '
                                   "rewrite the masks file.")
            masks.setdefault(int(expert[1:]), {})[layer] = data[key] != 0
    return masks


def load_probes(run_dir: str | Path, name: str) -> pd.DataFrame:
    """One probe frame of a run (schemas in the module docstring); ``ProbeMissing`` when the run has none."""
    name = name.removesuffix(".parquet")
    if name not in PROBE_SCHEMAS:
        raise ValueError(f'Unknown probe "{name}"; expected one of {sorted(PROBE_SCHEMAS)}.')
    path = Path(run_dir) / "probes" / f"{name}.parquet"
    if path.is_file():
        frame = pd.read_parquet(path)
    elif name in ("mask_stats", "mask_overlap") and (path.parent / MASKS_FILE).is_file():
        from analysis import experts  # here: only when deriving from raw masks

        masks = load_masks(run_dir)
        derive = experts.mask_stats_from_masks if name == "mask_stats" else experts.overlap_counts_from_masks
        frame = derive(masks)
    else:
        raise ProbeMissing(f"{path} does not exist.")
    missing = [c for c in PROBE_SCHEMAS[name] if c not in frame.columns]
    if name == "grad_alignment" and not {"sparsity", "label"} & set(frame.columns):
        missing.append("sparsity or label")
    if missing:
        raise ResultsError(f"{path} lacks column(s) {', '.join(missing)}; see the probe schemas in analysis/load.py.")
    return frame


def load_train_log(run_dir: str | Path) -> pd.DataFrame:
    """The run's ``train_log.jsonl`` as a frame (one row per record; empty when there is no log)."""
    path = Path(run_dir) / TRAIN_LOG
    if not path.is_file():
        return pd.DataFrame()
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON (a crash mid-write?); skipped.", path, number)
    return pd.DataFrame.from_records(records)
