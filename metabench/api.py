"""The Python API: what ``metabench eval --run`` does, for a notebook or a script.

    run = metabench.load_run("runs/my-run")            # config, trained learner on its device, manifest
    rows = metabench.evaluate(run.learner, run.episodes(), run=run)   # the rows of episodes.parquet
    mine = metabench.evaluate(run.learner, my_episodes, modes=["zero_shot", "full"], run=run)

Rows are ``EpisodeRow``s in a DataFrame with the columns of ``episodes.parquet``, so they join per
episode with a run's own results and feed ``metabench report`` / ``analysis`` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from episodes.configured import build_sources
from episodes.episode import Episode
from episodes.loader import EpisodeSet
from episodes.readers.base import Source
from metabench.config import EvalConfig, RunConfig, load_config
from metabench.distributed import init_from_env
from metabench.engine import EvalContext, select_device, select_learning_rates
from metabench.engine import evaluate as _evaluate_episodes
from metabench.finetuning import plan_protocols
from metabench.learners.base import Learner
from metabench.lr_selection import LrSelector
from metabench.results import EPISODE_COLUMNS
from metabench.results import load_run as _read_run
from metabench.runs import eval_episodes, restore_learner, run_precision, validation_episodes

__all__ = ["LoadedRun", "evaluate", "load_run"]


@dataclass
class LoadedRun:
    """A saved run, ready to evaluate: its resolved config, manifest, and learner with the trained weights."""

    run_dir: Path
    config: RunConfig
    manifest: dict[str, Any]
    learner: Learner
    device: torch.device
    precision: str
    _sources: dict[str, Source] = field(default_factory=dict, repr=False)

    def sources(self) -> dict[str, Source]:
        """The run's evaluation sources, built once (from ``data.root`` and the registry, as the CLI does)."""
        if not self._sources:
            self._sources.update(build_sources(self.config.data.eval_sources, self.config.data.root,
                                              self.config.data.sources))
        return self._sources

    def episodes(self) -> EpisodeSet:
        """The run's own evaluation episodes: its frozen suite, or the episodes its seed samples."""
        return eval_episodes(self.config, self.sources())

    def domains(self) -> dict[str, str]:
        return {name: source.domain for name, source in self.sources().items()}


def load_run(run_dir: str | Path, *, overrides: Sequence[str] = (), device: str | None = None) -> LoadedRun:
    """Rebuild a run folder's learner: backbone from its config, trained weights from its checkpoint.

    Args:
        run_dir: a folder written by ``metabench run``.
        overrides: ``key=value`` strings applied to the saved config (e.g. ``eval.lr_selection=fixed``).
        device: where the learner goes; default the config's ``device`` (``auto``: a GPU when present).
    """
    run_dir = Path(run_dir)
    manifest, _ = _read_run(run_dir)
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    where = select_device(init_from_env(device or cfg.device))
    learner = restore_learner(cfg, run_dir, where)
    return LoadedRun(run_dir, cfg, manifest, learner, where, run_precision(cfg, where))


def evaluate(learner: Learner, episodes: Iterable[Episode], *, modes: Sequence[str] | None = None,
             steps: Sequence[int] | None = None, run: LoadedRun | None = None,
             domains: Mapping[str, str] | None = None, progress: bool = False) -> pd.DataFrame:
    """Score ``learner`` on ``episodes``: one row per episode and protocol, as ``episodes.parquet`` holds.

    Args:
        learner: any learner (``run.learner``, or one you built); it is not changed.
        episodes: ``Episode`` objects (an ``EpisodeSet``, a frozen suite's episodes, or your own).
        modes: zero_shot, full, lora; default the run's ``eval.modes``, else the learner's default modes.
        steps: fine-tuning step counts; default ``[eval.steps]``.
        run: a loaded run whose evaluation settings (learning-rate selection, fine-tuning options,
            precision), labels and source domains the rows take; without one, ``EvalConfig()``'s defaults,
            fp32, and the learner's own names.
        domains: source name -> "id" / "ood" for sources the run does not know (default "id").
    """
    ev = run.config.eval if run is not None else EvalConfig()
    seed = run.config.seed if run is not None else 0
    protocols = plan_protocols(list(modes or ev.modes or learner.default_modes),
                               [ev.steps] if steps is None else list(steps))
    selector = LrSelector.from_eval(ev, seed=seed)
    tuning = [p for p in protocols if p.fine_tunes]
    device = next(learner.parameters()).device
    precision = run.precision if run is not None else "fp32"
    if tuning and selector.wants_validation and run is not None:
        select_learning_rates(learner, selector, validation_episodes(run.config, run.sources()), tuning,
                              device=device, precision=precision)
    ctx = EvalContext(run.manifest.get("run_id", run.run_dir.name) if run is not None else "api",
                      learner.cfg.name, run.config.backbone.name if run is not None else learner.backbone.spec.alias,
                      {**(run.domains() if run is not None else {}), **(domains or {})})
    stream: Iterable[Episode] = episodes
    if hasattr(episodes, "__getitem__") and hasattr(episodes, "__len__"):  # a dataset such as EpisodeSet
        stream = (episodes[i] for i in range(len(episodes)))  # type: ignore[index, arg-type]
    rows = _evaluate_episodes(learner, stream, ctx, protocols=protocols, device=device, precision=precision,
                              selector=selector, progress=progress)
    return pd.DataFrame([asdict(r) for r in rows], columns=EPISODE_COLUMNS)
