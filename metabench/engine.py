"""Meta-training and evaluation loops: devices, precision, seeds and progress live here, not in learners."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from episodes.episode import Episode
from metabench.distributed import average_metrics, grad_sync, is_main, world_size
from metabench.finetuning import EvalProtocol
from metabench.learners.base import Learner
from metabench.lr_selection import LrSelector
from metabench.progress import progress as progress_bar
from metabench.results import EpisodeRow

__all__ = ["EvalContext", "autocast", "evaluate", "meta_train", "select_device", "select_learning_rates"]

log = logging.getLogger(__name__)


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f'device "{name}" was requested but CUDA is not available here; '
                         "use device=cpu or device=auto.")
    return device


def resolve_precision(precision: str, device: torch.device, cpu_bf16: bool = False) -> str:
    """``auto``: bf16 where the GPU supports it, else fp16; on a CPU fp32 (exactly reproducible), or bf16 for a
    backbone that runs faster so (``BackboneSpec.cpu_bf16``) on a CPU with native bf16 instructions."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16 and device.type == "cpu" and cpu_has_native_bf16() else "fp32"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX); False where unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """An autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class EvalContext:
    """Labels stamped on every result row of one evaluation."""

    run_id: str
    learner: str
    backbone: str
    domains: dict[str, str]  # source -> "id" | "ood"


def evaluate(
    learner: Learner,
    episodes: Iterable[Episode],
    ctx: EvalContext,
    *,
    protocols: Sequence[EvalProtocol],
    device: torch.device,
    precision: str = "fp32",
    selector: LrSelector | None = None,
    total: int | None = None,
    progress: bool = True,
    on_episode: Callable[[Episode, object, str], None] | None = None,
    skip: Container[tuple[str, str, str, int]] = (),
) -> Iterator[EpisodeRow]:
    """Adapt to each episode's support set and score its query set, one row per (episode, protocol).

    The learner is put in eval mode and is never changed: ``adapt`` returns a separate task state.
    Fine-tuning protocols get their learning rate from ``selector``, which sees the support set and
    the source name only (without one they use ``FineTuneOptions()``); query labels are read after
    ``predict``, to score. ``seconds`` includes learning-rate selection. ``skip`` holds the
    (source, episode_id, mode, steps) results that exist already (a resumed run); an episode whose
    protocols are all skipped is passed to ``on_episode`` with a None state.
    """
    learner.eval()
    bar = progress_bar(episodes, total=total, desc="evaluate", unit="ep", enabled=progress)
    running: list[float] = []
    for episode in bar:
        episode = episode.to(device)
        todo = [p for p in protocols if (episode.source, episode.episode_id, p.mode, p.steps) not in skip]
        share = torch.bincount(episode.support_y, minlength=episode.way).float() / episode.support_y.numel()
        imbalance = float(share.max() - share.min())
        if not todo and on_episode is not None:
            on_episode(episode, None, ctx.domains.get(episode.source, "id"))
        for protocol in todo:
            start = time.perf_counter()
            grad = torch.enable_grad() if protocol.fine_tunes else torch.no_grad()
            with grad, autocast(device, precision):
                if selector is not None:
                    state = selector.adapt(learner, episode.source, episode.support, protocol)
                else:
                    state = learner.adapt(episode.support, mode=protocol.mode, steps=protocol.steps)
            with torch.no_grad(), autocast(device, precision):
                logits = learner.predict(state, episode.query_x).float()
            seconds = time.perf_counter() - start
            accuracy = (logits.argmax(-1) == episode.query_y).float().mean().item()
            loss = F.cross_entropy(logits, episode.query_y).item()
            running.append(accuracy)
            domain = ctx.domains.get(episode.source, "id")
            if on_episode is not None:  # probes (e.g. expert scores) read the adapted state
                on_episode(episode, state, domain)
            yield EpisodeRow(
                run_id=ctx.run_id,
                learner=ctx.learner,
                backbone=ctx.backbone,
                source=episode.source,
                split=episode.split.value,
                domain=domain,
                episode_id=episode.episode_id,
                mode=protocol.mode,
                steps=protocol.steps,
                way=episode.way,
                shots=int(episode.support_y.numel()),
                n_query=int(episode.query_y.numel()),
                accuracy=accuracy,
                loss=loss,
                sparsity=float(getattr(state, "sparsity", math.nan)),
                seconds=seconds,
                imbalance=imbalance,
            )
        if running:
            bar.set_postfix(source=episode.source, acc=f"{100 * sum(running) / len(running):.1f}")


def select_learning_rates(
    learner: Learner,
    selector: LrSelector,
    validation: dict[str, list[Episode]],
    protocols: Sequence[EvalProtocol],
    *,
    device: torch.device,
    precision: str = "fp32",
) -> None:
    """Run ``selector.fit_on_validation`` for each source's validation episodes and fine-tuning protocol,
    before any test episode is seen (the ``valid`` learning-rate selection)."""
    learner.eval()
    for source, episodes in validation.items():
        episodes = [ep.to(device) for ep in episodes]
        for protocol in protocols:
            if protocol.fine_tunes:
                with torch.enable_grad(), autocast(device, precision):
                    selector.fit_on_validation(learner, source, protocol, episodes)


def meta_train(
    learner: Learner,
    episodes: Iterable[Episode],
    *,
    n_tasks: int,
    tasks_per_update: int,
    device: torch.device,
    precision: str = "fp32",
    log_every: int = 10,
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_update: Callable[[list[Episode], int, int], None] | None = None,
    progress: bool = True,
    start_update: int = 0,
    restore: Callable[[], None] | None = None,
) -> None:
    """Feed batches of ``tasks_per_update`` training episodes to ``learner.meta_train_step``.

    Resuming: ``episodes`` starts at task ``start_update * tasks_per_update`` and ``restore`` (called
    after ``setup_training`` built the schedules) loads the checkpointed state. Under torchrun each
    rank's ``episodes`` is its share, ``tasks_per_update / world_size`` tasks per update
    (``metabench.distributed``); counts and metrics are global.
    """
    ranks = world_size()
    local_batch = tasks_per_update // ranks
    learner.setup_training(math.ceil(n_tasks / tasks_per_update))
    stream = iter(episodes)  # before restore: starting a DataLoader draws from the global RNG
    if restore is not None:
        restore()
    learner.train()
    seen, update = start_update * tasks_per_update, start_update
    bar = progress_bar(total=n_tasks, initial=seen, desc="meta-train", unit="task", enabled=progress and is_main())
    batch: list[Episode] = []
    for episode in stream:
        batch.append(episode.to(device))
        if len(batch) < local_batch:
            continue
        start = time.perf_counter()
        with autocast(device, precision), grad_sync():
            metrics = learner.meta_train_step(batch)
        metrics = average_metrics(metrics)
        seen += len(batch) * ranks
        update += 1
        if on_update is not None:  # probes (e.g. meta-gradient alignment) on this batch
            on_update(batch, update, seen)
        bar.update(len(batch) * ranks)
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()})
        if on_log is not None and (update % log_every == 0 or seen >= n_tasks):
            on_log({"update": update, "tasks": seen, "seconds": time.perf_counter() - start, **metrics})
        batch = []
        if seen >= n_tasks:
            break
    bar.close()
    learner.eval()
