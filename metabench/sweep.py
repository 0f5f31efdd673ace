"""``metabench sweep``: one learner over a grid of config values, each setting a run, plus one report.

A sweep folder holds one run folder per setting (named after its overrides, e.g.
``learner.sparsity=0.5``) and ``sweep.json`` (the axes and each setting's state). Every setting's
config is checked before the first run starts, so a typo costs nothing; running the same command
again with the same ``--name`` skips finished settings and redoes unfinished ones (their folder is
kept aside as ``<name>.incomplete-<time>``), so an interrupted sweep loses no finished run.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from episodes.atomic import atomic_write
from metabench.config import ConfigError, RunConfig, load_config
from metabench.results import MANIFEST

__all__ = ["SweepAxis", "SweepOutcome", "parse_axes", "run_sweep", "settings"]

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepAxis:
    """One swept key and its values, as ``key=value`` override strings take them."""

    key: str
    values: tuple[str, ...]


@dataclass
class SweepOutcome:
    """Where a sweep's runs are; the CLI writes its report (the core never imports the analysis package)."""

    sweep_dir: Path
    run_dirs: list[Path]
    axes: list[SweepAxis]

    @property
    def report_dir(self) -> Path:
        return self.sweep_dir / "report"

    @property
    def sweep_key(self) -> str:
        return self.axes[0].key

    @property
    def sweep_group(self) -> str | None:
        return self.axes[1].key if len(self.axes) > 1 else None


def parse_axes(specs: Sequence[str]) -> list[SweepAxis]:
    """``["learner.sparsity=0.5,0.8,0.9", "learner.n_experts=4,8"]`` -> axes (the grid is their product)."""
    axes: list[SweepAxis] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not key.strip() or not items:
            raise ConfigError(f'Sweep axis "{spec}" is not KEY=V1,V2,...; '
                              "write e.g. --over learner.sparsity=0.5,0.8,0.9.")
        if key.strip() in {a.key for a in axes}:
            raise ConfigError(f'Sweep key "{key.strip()}" is given twice; list all its values in one --over.')
        axes.append(SweepAxis(key.strip(), items))
    if not axes or len(axes) > 2:
        raise ConfigError(f"A sweep takes one or two --over KEY=V1,V2,... axes (the report plots the first and "
                          f"groups by the second), not {len(axes)}.")
    return axes


def settings(axes: Sequence[SweepAxis]) -> list[list[str]]:
    """Every combination of the axes' values, as lists of ``key=value`` overrides (first axis slowest)."""
    return [[f"{a.key}={v}" for a, v in zip(axes, combo)] for combo in itertools.product(*(a.values for a in axes))]


def _folder_name(setting: Sequence[str]) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._=+-]", "-", s) for s in setting)


def _sweep_dir(cfg: RunConfig, axes: Sequence[SweepAxis], name: str | None) -> Path:
    if name:
        return Path(cfg.out_dir) / name
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    keys = "+".join(a.key.rsplit(".", 1)[-1] for a in axes)
    return Path(cfg.out_dir) / f"sweep-{stamp}-{cfg.learner.name}-{cfg.backbone.name}-{keys}"


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / MANIFEST).read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def _plan(config: Path | None, overrides: Sequence[str], flags: dict[str, Any],
          axes: Sequence[SweepAxis]) -> list[tuple[list[str], RunConfig]]:
    """Load every setting's config up front: a bad key or value stops the sweep before any run."""
    planned = []
    for setting in settings(axes):
        try:
            planned.append((setting, load_config(config, [*overrides, *setting], flags)))
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"Sweep setting {' '.join(setting)}: {err}") from None
    return planned


def run_sweep(axes: Sequence[SweepAxis], *, config: Path | None = None, overrides: Sequence[str] = (),
              flags: dict[str, Any] | None = None, name: str | None = None, progress: bool = True) -> SweepOutcome:
    """Run every setting of the grid (skipping finished ones of an earlier, same-named sweep)."""
    from metabench.runs import execute

    planned = _plan(config, overrides, flags or {}, axes)
    sweep_dir = _sweep_dir(planned[0][1], axes, name)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"axes": {a.key: list(a.values) for a in axes}, "overrides": list(overrides),
                             "flags": flags or {}, "settings": {}}
    run_dirs = []
    for i, (setting, cfg) in enumerate(planned, 1):
        run_dir = sweep_dir / _folder_name(setting)
        run_dirs.append(run_dir)
        if _finished(run_dir):
            log.info("Sweep %d/%d (%s): already finished, kept.", i, len(planned), " ".join(setting))
        else:
            if run_dir.exists():
                aside = run_dir.with_name(f"{run_dir.name}.incomplete-{dt.datetime.now():%Y%m%d-%H%M%S}")
                run_dir.rename(aside)
                log.warning("Sweep setting %s had an unfinished run; kept it as %s and started again.",
                            " ".join(setting), aside.name)
            log.info("Sweep %d/%d: %s", i, len(planned), " ".join(setting))
            state["settings"][run_dir.name] = {"overrides": setting, "status": "running"}
            atomic_write(sweep_dir / SWEEP_FILE, json.dumps(state, indent=2) + "\n")
            execute(cfg, progress=progress, run_dir=run_dir)
        state["settings"][run_dir.name] = {"overrides": setting, "status": "finished"}
        atomic_write(sweep_dir / SWEEP_FILE, json.dumps(state, indent=2) + "\n")
    return SweepOutcome(sweep_dir, run_dirs, list(axes))
