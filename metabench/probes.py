"""Analysis probes of expert-based learners: expert scores, mask statistics and overlap, and
meta-gradient alignment (the analyses of SMAT, Chen et al., ICML 2024, arXiv:2403.08477, section 5).

Learners opt in by implementing the small protocols below (``metabench.learners.smat.model`` does).
Probes write tidy parquet tables under ``<run_dir>/probes/``; ``analysis`` reads those files and
never imports this module (it needs torch). ``ProbeRecorder`` is what the engine calls during a run.

Tables (one row each):

* ``expert_scores.parquet``: episode_id, source, domain, expert, alpha (evaluation merge weights);
* ``mask_stats.parquet``: expert, layer_name, layer_type, depth, numel, nonzero;
* ``mask_overlap.parquet``: expert_a, expert_b, intersection, union, jaccard (entry counts);
* ``grad_alignment.parquet``: tasks_seen, label, param_group ("delta" | "expert_<m>"), alignment, the
  mean pairwise cosine similarity of per-task meta-gradients within one batch of tasks.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from episodes.atomic import atomic_write
from episodes.episode import Episode, Support

__all__ = [
    "EXPERT_SCORE_COLUMNS",
    "GRAD_ALIGNMENT_COLUMNS",
    "MASK_OVERLAP_COLUMNS",
    "MASK_STAT_COLUMNS",
    "ExpertScorer",
    "MaskInspector",
    "MetaGradientSource",
    "ProbeRecorder",
    "expert_score_rows",
    "grad_alignment_rows",
    "gradient_alignment",
    "read_mask_allocation",
    "write_expert_scores",
    "write_grad_alignment",
    "write_mask_overlap",
    "write_mask_stats",
]

log = logging.getLogger(__name__)

EXPERT_SCORE_COLUMNS = ["episode_id", "source", "domain", "expert", "alpha"]
MASK_STAT_COLUMNS = ["expert", "layer_name", "layer_type", "depth", "numel", "nonzero"]
MASK_OVERLAP_COLUMNS = ["expert_a", "expert_b", "intersection", "nonzero_a", "nonzero_b", "union", "jaccard"]
GRAD_ALIGNMENT_COLUMNS = ["tasks_seen", "label", "param_group", "alignment"]


@runtime_checkable
class ExpertScorer(Protocol):
    def expert_scores(self, support: Support) -> Tensor:
        """Merge weights ``[M]`` the learner gives the task with this support set."""
        ...


@runtime_checkable
class MaskInspector(Protocol):
    def mask_stats(self) -> list[dict]:
        """Rows with the ``MASK_STAT_COLUMNS`` (layer_type from ``metabench.nn.sparse_experts.LAYER_TYPES``)."""
        ...

    def mask_overlap(self) -> list[dict]:
        """Rows with the ``MASK_OVERLAP_COLUMNS``, one per ordered pair of experts (diagonal included)."""
        ...


@runtime_checkable
class MetaGradientSource(Protocol):
    def task_meta_gradients(self, episodes: Sequence[Episode]) -> dict[str, list[Tensor]]:
        """Per parameter group, one flattened meta-gradient per task."""
        ...


def gradient_alignment(grads: Mapping[str, Sequence[Tensor]]) -> dict[str, float]:
    """Mean pairwise cosine similarity across tasks, per group (nan with fewer than two tasks)."""
    out = {}
    for group, per_task in grads.items():
        n = len(per_task)
        if n < 2:
            out[group] = math.nan
            continue
        unit = F.normalize(torch.stack([g.detach().double().flatten() for g in per_task]), dim=1)
        cos = unit @ unit.T
        out[group] = float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
    return out


def grad_alignment_rows(learner: MetaGradientSource, episodes: Sequence[Episode], *, tasks_seen: int,
                        label: str = "train") -> list[dict]:
    """Alignment rows for one batch of tasks (``label`` names the batch, e.g. "train" or a source)."""
    alignment = gradient_alignment(learner.task_meta_gradients(episodes))
    return [{"tasks_seen": int(tasks_seen), "label": label, "param_group": g, "alignment": a}
            for g, a in alignment.items()]


def expert_score_rows(episode_id: str, source: str, domain: str, scores: Tensor) -> list[dict]:
    return [{"episode_id": episode_id, "source": source, "domain": domain, "expert": m, "alpha": float(a)}
            for m, a in enumerate(scores.detach().float().cpu().tolist())]


def _write(rows: Iterable[dict], columns: list[str], path: str | Path) -> Path:
    """Write rows as parquet atomically (readers see the old file or the new one, never half)."""
    frame = pd.DataFrame(list(rows), columns=columns)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def write_expert_scores(rows: Iterable[dict], path: str | Path) -> Path:
    return _write(rows, EXPERT_SCORE_COLUMNS, path)


def write_mask_stats(learner: MaskInspector, path: str | Path) -> Path:
    return _write(learner.mask_stats(), MASK_STAT_COLUMNS, path)


def read_mask_allocation(path: str | Path, n_experts: int) -> dict[str, list[float]]:
    """Per backbone tensor, each expert's share of non-zero entries in a trained run's ``mask_stats.parquet``
    (``path``: the file or the run folder): the allocation that fixed-mask ablations copy."""
    path = Path(path)
    file = path / "probes" / "mask_stats.parquet" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"No mask statistics at {file}; give learner.mask_allocation a finished SMAT run folder "
                         "(it writes probes/mask_stats.parquet) or that file.")
    stats = pd.read_parquet(file).groupby(["layer_name", "expert"])[["nonzero", "numel"]].sum()
    experts = sorted(set(stats.index.get_level_values("expert")))
    if experts != list(range(n_experts)):
        raise ValueError(f"{file} holds masks of {len(experts)} experts, not {n_experts}; set learner.n_experts to "
                         "the run's.")
    share = (stats["nonzero"] / stats["numel"]).unstack("expert")
    return {name: [float(v) for v in row] for name, row in share.iterrows()}


def write_mask_overlap(learner: MaskInspector, path: str | Path) -> Path:
    return _write(learner.mask_overlap(), MASK_OVERLAP_COLUMNS, path)


def write_grad_alignment(rows: Iterable[dict], path: str | Path) -> Path:
    return _write(rows, GRAD_ALIGNMENT_COLUMNS, path)


class ProbeRecorder:
    """Collects probe rows during a run and writes them under ``<run_dir>/probes/``.

    The engine calls ``on_train_update`` after each meta-update, ``on_eval_episode`` after each
    evaluated episode, and ``finish`` at the end. Capabilities the learner lacks are skipped.

    Args:
        learner: any learner; the protocols it implements decide what is recorded.
        run_dir: the run folder.
        grad_every: compute gradient alignment every this many meta-updates (0: never). Costs about
            (1 + M) x |theta| floats per task of the batch, and one backward pass per task.
        append: keep rows already written (re-evaluating a saved run).
    """

    def __init__(self, learner: Any, run_dir: str | Path, *, grad_every: int = 0, append: bool = False) -> None:
        self.learner, self.dir, self.grad_every = learner, Path(run_dir) / "probes", grad_every
        self.scores: list[dict] = self._previous("expert_scores.parquet") if append else []
        self.alignment: list[dict] = self._previous("grad_alignment.parquet") if append else []
        self._scored = {row["episode_id"] for row in self.scores}

    def _previous(self, name: str) -> list[dict]:
        path = self.dir / name
        return pd.read_parquet(path).to_dict("records") if path.exists() else []

    def on_train_update(self, episodes: Sequence[Episode], update: int, tasks_seen: int) -> None:
        if not (self.grad_every and update % self.grad_every == 0 and isinstance(self.learner, MetaGradientSource)):
            return
        with torch.enable_grad():
            self.alignment += grad_alignment_rows(self.learner, episodes, tasks_seen=tasks_seen)
        write_grad_alignment(self.alignment, self.dir / "grad_alignment.parquet")

    def on_eval_episode(self, episode: Episode, state: Any, domain: str) -> None:
        """Record the episode's expert scores once (the adapted state carries them when the learner
        put them there, else the learner is asked)."""
        if episode.episode_id in self._scored:
            return
        scores = getattr(state, "expert_scores", None)
        if scores is None and isinstance(self.learner, ExpertScorer):
            scores = self.learner.expert_scores(episode.support)
        if scores is not None:
            self.scores += expert_score_rows(episode.episode_id, episode.source, domain, scores)
            self._scored.add(episode.episode_id)

    def finish(self) -> list[Path]:
        """Write every table the learner supports; returns the files written."""
        written = []
        if self.scores:
            written.append(write_expert_scores(self.scores, self.dir / "expert_scores.parquet"))
        if isinstance(self.learner, MaskInspector):
            written.append(write_mask_stats(self.learner, self.dir / "mask_stats.parquet"))
            written.append(write_mask_overlap(self.learner, self.dir / "mask_overlap.parquet"))
        if self.alignment:
            written.append(write_grad_alignment(self.alignment, self.dir / "grad_alignment.parquet"))
        log.info("Probes: wrote %s", ", ".join(p.name for p in written) or "nothing")
        return written
