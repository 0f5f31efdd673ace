"""A run end to end: build backbone, learner and episodes from a config, train, evaluate, write the folder."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import platform
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import Subset

import metabench
from episodes.configured import build_sources
from episodes.episode import Episode, Split
from episodes.loader import EpisodeSet, make_loader
from episodes.readers.base import Source
from episodes.sampler import check_split
from metabench.backbones import BACKBONES, Backbone, create_backbone
from metabench.config import ConfigError, RunConfig, load_config, to_yaml
from metabench.distributed import gather_to_rank0, init_from_env, is_main, shard, share_from_rank0, world_size
from metabench.engine import EvalContext, evaluate, resolve_precision, select_device, select_learning_rates
from metabench.finetuning import EvalProtocol, plan_protocols
from metabench.learners import create_learner
from metabench.learners.base import Learner
from metabench.lr_selection import LrSelector
from metabench.probes import ProbeRecorder
from metabench.results import EpisodeRow, FollowerRunWriter, RunWriter, load_run
from metabench.training import CHECKPOINT, load_learner_state, meta_batch, run_training

__all__ = ["RunOutcome", "eval_episodes", "eval_saved_run", "execute", "plan_eval", "restore_learner", "run_precision",
           "resume_run", "validation_episodes"]

log = logging.getLogger(__name__)
_VALID_SEED_OFFSET = 10_007  # lr-selection episodes never coincide with evaluation episodes of eval.split=valid


@dataclass
class RunOutcome:
    run_dir: Path
    manifest: dict[str, Any]


def _run_id(cfg: RunConfig) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    digest = hashlib.sha1(to_yaml(cfg).encode()).hexdigest()[:6]
    return cfg.run_name or f"{stamp}-{cfg.learner.name}-{cfg.backbone.name}-{digest}"


def _git_state() -> dict[str, Any]:
    repo = Path(metabench.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return {"sha": None, "dirty": None}
    if sha.returncode != 0:
        return {"sha": None, "dirty": None}
    return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _versions() -> dict[str, str]:
    import timm

    return {
        "metabench": metabench.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }


def _manifest(cfg: RunConfig, run_id: str, backbone: Backbone, learner: Learner, sources: dict[str, Source],
              device: torch.device, precision: str) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "run_id": run_id,
        "created": _now(),
        "status": "running",
        "argv": ["metabench", *sys.argv[1:]],
        "git": _git_state(),
        "versions": _versions(),
        "device": str(device),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "seed": cfg.seed,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "backbone": backbone.describe(),
        "learner": learner.describe(),
        "sources": {n: {"domain": s.domain, "classes": {sp.value: len(s.spec.class_ids(sp)) for sp in Split}}
                    for n, s in sources.items()},
    }


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def eval_episodes(cfg: RunConfig, sources: dict[str, Source]) -> EpisodeSet:
    """The evaluation episodes: a frozen suite when ``eval.suite`` names one, else sampled from the seed."""
    eval_sources = [sources[n] for n in cfg.data.eval_sources]
    if cfg.eval.suite is None:
        return EpisodeSet(eval_sources, Split(cfg.eval.split), cfg.data.sampler, cfg.eval.episodes,
                          seed=cfg.seed, image_size=cfg.data.image_size, per_source=True)
    from episodes.suites import SuiteEpisodeSet, load_suite

    suite = load_suite(cfg.eval.suite)
    if suite.split.value != cfg.eval.split:
        raise ValueError(f'Suite "{suite.name}" holds {suite.split.value} episodes but eval.split is '
                         f'"{cfg.eval.split}"; set eval.split={suite.split.value}.')
    return SuiteEpisodeSet(suite, eval_sources, image_size=cfg.data.image_size, only=cfg.data.eval_sources,
                           max_per_source=cfg.eval.episodes)


def _cap_random_init(cfg: RunConfig, backbone: Backbone) -> RunConfig:
    """``eval.episodes_random_init`` episodes per source when the backbone has no pretrained weights."""
    cap = cfg.eval.episodes_random_init
    if backbone.weights.pretrained or cfg.eval.suite is not None or not 0 < cap < cfg.eval.episodes:
        return cfg
    log.warning("Backbone %s is not pretrained: evaluating %d episodes per source instead of %d "
                "(eval.episodes_random_init); the results check the pipeline, not the method.",
                backbone.spec.alias, cap, cfg.eval.episodes)
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, episodes=cap))


def plan_eval(cfg: RunConfig, learner: Learner, modes: list[str] | None = None,
              steps: list[int] | None = None) -> list[EvalProtocol]:
    """The protocols to evaluate: ``modes`` (else eval.modes, else the learner's ``default_modes``) times
    ``steps`` (else [eval.steps]); zero_shot always runs with 0 steps."""
    modes = modes or cfg.eval.modes or list(learner.default_modes)
    try:
        return plan_protocols(modes, [cfg.eval.steps] if steps is None else steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def validation_episodes(cfg: RunConfig, sources: dict[str, Source]) -> dict[str, list[Episode]]:
    """``eval.lr_valid_episodes`` validation episodes of each evaluation source that has a usable validation split."""
    found: dict[str, list[Episode]] = {}
    for name in dict.fromkeys(cfg.data.eval_sources):
        try:
            check_split(sources[name].spec, Split.VALID, cfg.data.sampler)
        except ValueError as err:
            log.info("No validation episodes for %s (%s); its learning rate is chosen on each support set.", name, err)
            continue
        episode_set = EpisodeSet([sources[name]], Split.VALID, cfg.data.sampler, cfg.eval.lr_valid_episodes,
                                 seed=cfg.seed + _VALID_SEED_OFFSET, image_size=cfg.data.image_size, per_source=True)
        found[name] = [episode_set[i] for i in range(len(episode_set))]
    return found


def _evaluate(cfg: RunConfig, learner: Learner, sources: dict[str, Source], writer: RunWriter, run_id: str,
              device: torch.device, precision: str, progress: bool,
              protocols: list[EvalProtocol], recorder: ProbeRecorder, persist: bool = False,
              episode_set: EpisodeSet | None = None) -> dict[str, Any] | None:
    """Evaluate ``protocols`` on the evaluation episodes; returns the learning-rate record (None: no fine-tuning).

    With ``persist``, each row is appended to the run's partial file as it is produced, and rows the
    writer already holds (a resumed run) are not evaluated again.
    """
    selector = LrSelector.from_eval(cfg.eval, seed=cfg.seed)
    tuning = [p for p in protocols if p.fine_tunes]
    if tuning and selector.wants_validation:
        select_learning_rates(learner, selector, validation_episodes(cfg, sources), tuning,
                              device=device, precision=precision)
    episode_set = episode_set if episode_set is not None else eval_episodes(cfg, sources)
    ctx = EvalContext(run_id, cfg.learner.name, cfg.backbone.name, {n: s.domain for n, s in sources.items()})
    mine = shard(len(episode_set))  # all of them in a single process
    order: dict[tuple[str, str], int] = {}

    def numbered(stream: Iterable[Episode]) -> Iterator[Episode]:
        for index, episode in zip(mine, stream):
            order[(episode.source, episode.episode_id)] = index
            yield episode

    loader = make_loader(Subset(episode_set, mine) if world_size() > 1 else episode_set,  # type: ignore[arg-type]
                         num_workers=cfg.data.num_workers)
    kept = list(writer.rows)
    rows = evaluate(learner, numbered(loader), ctx, protocols=protocols, device=device, precision=precision,
                    selector=selector, total=len(mine), progress=progress and is_main(),
                    on_episode=recorder.on_eval_episode, skip={r.key for r in kept} if persist else ())
    new = []
    for row in rows:
        writer.add_rows([row], persist=persist)
        new.append(row)
    if world_size() > 1:
        _merge_shards(writer, recorder, kept, new, order, protocols)
    writer.flush(final=persist)
    return selector.record() if tuning else None


def _merge_shards(writer: RunWriter, recorder: ProbeRecorder, kept: list[EpisodeRow], new: list[EpisodeRow],
                  order: dict[tuple[str, str], int], protocols: list[EvalProtocol]) -> None:
    """Rank 0 collects every rank's rows (and expert scores) in the order one process would produce."""
    parts = gather_to_rank0([(order, new, recorder.scores)])
    if not is_main():
        return
    everything, rows, scores = {}, list(kept), []
    for [(part_order, part_rows, part_scores)] in parts:
        everything.update(part_order)
        rows += part_rows
        scores += part_scores
    position = {(p.mode, p.steps): i for i, p in enumerate(protocols)}
    writer.rows = sorted(rows, key=lambda r: (everything.get((r.source, r.episode_id), -1),
                                              position.get((r.mode, r.steps), len(position))))
    recorder.scores = list({(s["episode_id"], s["expert"]): s for s in scores}.values())


def execute(cfg: RunConfig, *, progress: bool = True, run_dir: Path | None = None,
            modes: list[str] | None = None, steps: list[int] | None = None, resume: bool = False) -> RunOutcome:
    """Run ``cfg`` end to end (meta-train when configured, then evaluate) and write its run folder.

    ``modes`` and ``steps`` replace eval.modes and [eval.steps] (see ``plan_eval``). ``resume``
    continues the unfinished run in ``run_dir`` (see ``resume_run``).
    """
    _seed_everything(cfg.seed)
    device = select_device(init_from_env(cfg.device))
    sources = build_sources([*cfg.data.train_sources, *cfg.train.val_ood_sources, *cfg.data.eval_sources]
                            if cfg.train.episodes else cfg.data.eval_sources, cfg.data.root, cfg.data.sources)
    backbone = create_backbone(cfg.backbone.name, weights=cfg.backbone.weights,
                               allow_download=cfg.backbone.allow_download)
    learner = create_learner(cfg.learner.name, backbone, cfg.learner).to(device)
    cfg = _cap_random_init(cfg, backbone)
    precision = run_precision(cfg, device)
    if cfg.precision == "auto" and device.type == "cpu" and precision != "fp32":
        log.info("precision=auto: %s autocast (%s on a CPU with native bf16; precision=fp32 for plain fp32).",
                 precision, cfg.backbone.name)
    protocols = plan_eval(cfg, learner, modes, steps)
    # Episodes that cannot be drawn are reported before the run folder exists.
    if cfg.train.episodes and learner.meta_trainable:
        for name in cfg.data.train_sources:
            check_split(sources[name].spec, Split.TRAIN, cfg.data.train_sampler)
    eval_set = eval_episodes(cfg, sources)
    run_id = share_from_rank0(run_dir.name if run_dir is not None else _run_id(cfg))
    folder = run_dir or Path(cfg.out_dir) / run_id
    writer = RunWriter(folder) if is_main() else FollowerRunWriter(folder)
    manifest = _manifest(cfg, run_id, backbone, learner, sources, device, precision)
    if resume:
        manifest, _ = load_run(writer.run_dir)
        manifest.update(status="running")
        manifest.setdefault("resumed", []).append(_now())
        log.info("Resuming run %s: %d results kept.", run_id, len(writer.recover_rows()))
    else:
        writer.write_config(to_yaml(cfg))
    writer.write_manifest(manifest)
    recorder = ProbeRecorder(learner, writer.run_dir, grad_every=cfg.train.probe_every, append=resume)
    run_training(cfg, learner, sources, writer, device, precision, progress, recorder, resume=resume)
    manifest["protocols"] = [p.label for p in protocols]
    lr_record = _evaluate(cfg, learner, sources, writer, run_id, device, precision, progress, protocols,
                          recorder, persist=True, episode_set=eval_set)
    if is_main():
        recorder.finish()
    if lr_record is not None:
        manifest["lr_selection"] = lr_record
    manifest.update(status="finished", finished=_now(), learner=learner.describe(), world_size=world_size(),
                    tasks_per_update=cfg.train.tasks_per_update, meta_batch=meta_batch(cfg))
    writer.write_manifest(manifest)
    return RunOutcome(writer.run_dir, manifest)


def resume_run(run_dir: Path, *, progress: bool = True) -> RunOutcome:
    """Continue a run that was killed or interrupted: its config, its last training checkpoint, and only
    the evaluation episodes it had not finished. Same seed, same results as an uninterrupted run."""
    run_dir = Path(run_dir)
    manifest, _ = load_run(run_dir)
    if manifest.get("status") == "finished":
        raise ConfigError(f"Run {run_dir} has finished already; evaluate it further with "
                          f"`metabench eval --run {run_dir}`.")
    cfg = load_config(run_dir / "config.yaml")
    return execute(cfg, progress=progress, run_dir=run_dir, resume=True)


def run_precision(cfg: RunConfig, device: torch.device) -> str:
    """The precision a run of ``cfg`` takes on ``device``: ``precision=auto`` follows its backbone's
    ``cpu_bf16`` on a CPU (``engine.resolve_precision``)."""
    return resolve_precision(cfg.precision, device, BACKBONES.get(cfg.backbone.name).cpu_bf16)


def restore_learner(cfg: RunConfig, run_dir: Path, device: torch.device) -> Learner:
    """The run's learner on ``device``: its backbone rebuilt from the config, its trained weights loaded from
    the run's checkpoint (a learner without meta-training has none and keeps its backbone's weights)."""
    backbone = create_backbone(cfg.backbone.name, weights=cfg.backbone.weights,
                               allow_download=cfg.backbone.allow_download)
    learner = create_learner(cfg.learner.name, backbone, cfg.learner)
    if (run_dir / CHECKPOINT).exists():
        load_learner_state(learner, run_dir / CHECKPOINT)
    return learner.to(device)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def eval_saved_run(run_dir: Path, overrides: list[str], *, modes: list[str] | None = None,
                   steps: list[int] | None = None, progress: bool = True) -> RunOutcome:
    """Evaluate a saved run again (e.g. more episodes, or fine-tuning protocols) and append the rows to its results.

    Args:
        run_dir: a folder written by ``execute``; its config.yaml and checkpoint are used.
        overrides: ``key=value`` strings applied to the saved config (e.g. ``eval.episodes=600``).
        modes: evaluation modes (zero_shot, full, lora); None: eval.modes, else the learner's default.
        steps: fine-tuning step counts; each fine-tuning mode runs with each positive count, zero_shot
            once with 0 steps. None: [eval.steps].
    """
    manifest, _ = load_run(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    _seed_everything(cfg.seed)
    device = select_device(init_from_env(cfg.device))
    sources = build_sources(cfg.data.eval_sources, cfg.data.root, cfg.data.sources)
    learner = restore_learner(cfg, run_dir, device)
    precision = run_precision(cfg, device)
    protocols = plan_eval(cfg, learner, modes, steps)
    writer = RunWriter(run_dir, append=True) if is_main() else FollowerRunWriter(run_dir)
    recorder = ProbeRecorder(learner, run_dir, append=True)
    lr_record = _evaluate(cfg, learner, sources, writer, manifest["run_id"], device, precision, progress, protocols,
                          recorder)
    if is_main():
        recorder.finish()
    evaluation: dict[str, Any] = {"argv": ["metabench", *sys.argv[1:]], "overrides": overrides,
                                  "protocols": [p.label for p in protocols],
                                  "at": _now()}
    if lr_record is not None:
        evaluation["lr_selection"] = lr_record
        # The latest choice per protocol label wins; each evaluation keeps its own full record above.
        latest = manifest.setdefault("lr_selection", {**lr_record, "protocols": {}})
        latest.update({k: v for k, v in lr_record.items() if k != "protocols"})
        latest.setdefault("protocols", {}).update(lr_record["protocols"])
    manifest.setdefault("evaluations", []).append(evaluation)
    writer.write_manifest(manifest)
    return RunOutcome(run_dir, manifest)
