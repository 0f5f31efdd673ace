"""``smat``: Sparse MetA-Tuning (Chen et al., ICML 2024, arXiv:2403.08477); ablations in ``smat_ablations``.

A task model is theta_i = theta_pre + (sum_m alpha_im z_m) * delta: the frozen pretrained backbone
interpolated with a soft merge of M sparse experts (``metabench.nn.sparse_experts``), merge weights
alpha_i predicted from the support set by a router (``metabench.nn.router``).

Meta-training, per task (gradient accumulation over the batch):

1. alpha from the router (relaxed Bernoulli, temperature max(0.5, 5 - t/4000)), merge to theta_i;
2. class prototypes of the support set under theta_i: the head, as in ProtoMAML;
3. one first-order SGD step (lr 1e-3) of the merged weights (and, with ``head_step``, of the head) on the
   support cross-entropy: the inner gradient is detached, so theta_i' = theta_i - lr * sg(g) and the query
   loss reaches delta, masks and router through theta_i (and through the prototypes);
4. query cross-entropy at theta_i'; distillation from a dense task-specific teacher (a detached copy of
   theta_i' after ``teacher_steps`` SGD steps on the query set, as upstream, or on the support set) and,
   as upstream's code does, from the frozen pretrained model; loss = 0.75 CE + 0.25 KD + 1e-4 mean(l^2);
5. once per update: the sparsity Lagrangian (``smat_losses``; alpha-weighted as upstream under
   ``constraint_weighting=alpha``), optional SIMoE orthogonality, separate optimisers for delta (SGD,
   momentum), masks (SGD, lr 1e6, clip 5) and router (AdamW, clip 1) on ``learner.schedule``, then ascent
   on the Lagrange multipliers.

Departures from the upstream code, each an option (README, "SMAT: the upstream recipe"; the ``paper``
preset selects upstream's): the sparsity terms are not alpha-weighted (``constraint_weighting``); one
warm-up + cosine schedule to 0 with multipliers unscheduled, not upstream's per-epoch one
(``schedule``); distillation is KL(teacher || student) (``kd_direction``); the inner and teacher steps
leave the prototype head fixed (``head_step``). Fixes kept in every preset: the router's keys and tokens
are trained and saved, and alpha ignores the class order; gates are the same in training and
evaluation; the teacher step count is honoured. The dense teacher uses the query labels, as upstream
(``teacher_data=support`` avoids it).

Evaluation merges the experts into a dense copy of the backbone (``task_model``), so the generic
fine-tuning protocols work unchanged; no inner step at zero-shot, as upstream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from episodes.episode import Episode
from metabench.distributed import average_tensor, world_size
from metabench.learners import LEARNERS
from metabench.learners.base import PrototypeLearner
from metabench.learners.smat.config import SMATConfig
from metabench.learners.smat.evaluation import SMATEvaluation, SMATState
from metabench.learners.smat.losses import LagrangianSparsity, distillation, make_schedulers
from metabench.learners.smat.optim import SMATOptimisation
from metabench.learners.smat.probes import SMATProbes
from metabench.nn.expert_merge import (
    EvaluationMerge,
    FusedMerge,
    GateCache,
    expected_density_backward,
    recomputed_updates,
    training_statistics,
)
from metabench.nn.heads import class_prototypes, embed
from metabench.nn.router import TaskRouter
from metabench.nn.sparse_experts import SparseInterpolatedExperts
from metabench.probes import read_mask_allocation

__all__ = ["SMAT", "SMATConfig", "SMATState"]

log = logging.getLogger(__name__)


@dataclass
class _TaskOutcome:
    loss: Tensor
    ce: float
    kd: float
    accuracy: float
    alpha: Tensor  # the router's merge weights [M], detached


@LEARNERS.register("smat")
class SMAT(SMATProbes, SMATOptimisation, SMATEvaluation, PrototypeLearner):
    """Sparse MetA-Tuning (ICML 2024): sparse interpolated experts mixed per task by a support-set router; the
    paper preset trains it with the upstream code's recipe."""

    Config = SMATConfig
    mask_kind: ClassVar[str] = "learned"
    #: Settings per run preset, to merge under ``learner.`` (the defaults are the paper's). "cpu" makes a
    #: ~40-task run reach tau (the paper's multiplier lr needs thousands of updates) at half the memory.
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # 40 tasks: AdamW moves every unmasked delta entry from the first update (momentum SGD at 1e-3 left the
        # delta at 3e-5 of the backbone's norm), structured masks, a sparsity target that ramps over half the run.
        "cpu": {"structured": True, "kd_pretrained": False, "delta_optimizer": "adamw", "delta_lr": 1e-4,
                "lambda_lr": 10.0, "sparsity_warmup": 0.5, "temperature_decay": 9.0},
        # The upstream code's training dynamics (README, "SMAT: the upstream recipe"): alpha-weighted sparsity
        # terms, one per-epoch schedule for every group, KL(student || teacher), head steps.
        "paper": {"constraint_weighting": "alpha", "schedule": "upstream_epochs", "kd_direction": "student_teacher",
                  "head_step": True},
    }

    def __init__(self, backbone, cfg: SMATConfig) -> None:
        super().__init__(backbone, cfg)
        backbone.requires_grad_(False)
        if cfg.mask_allocation is not None and self.mask_kind not in ("random", "magnitude"):
            raise ValueError(f"learner.mask_allocation applies to fixed masks (smat_random, smat_magnitude), "
                             f'not to "{cfg.name}".')
        allocation = (read_mask_allocation(cfg.mask_allocation, cfg.n_experts)
                      if cfg.mask_allocation is not None else None)
        self.experts = SparseInterpolatedExperts(
            dict(backbone.named_parameters()), n_experts=cfg.n_experts, pattern=cfg.target,
            layer_types=cfg.layer_types, structured=cfg.structured, kind=self.mask_kind, density=1.0 - cfg.sparsity,
            densities=allocation, init_mean=cfg.mask_init_mean, init_std=cfg.mask_init_std, noise=cfg.mask_noise)
        self.experts.use_fused_kernels(cfg.fused_kernels(self.experts.n_experts * self.experts.total))
        self.router = TaskRouter(backbone.feature_dim, cfg.n_experts, n_tokens=cfg.router_tokens,
                                 heads=cfg.router_heads, mlp_ratio=cfg.router_mlp_ratio,
                                 spectral_norm=cfg.router_spectral_norm)
        self.lagrangian = (LagrangianSparsity(cfg.n_experts, cfg.sparsity, cfg.sparsity_scope)
                           if self.learns_masks else None)
        self.register_buffer("tasks_seen", torch.zeros((), dtype=torch.long))  # drives the temperature; saved
        self._updates, self._total_updates = 0, 0  # for the sparsity ramp (set by setup_training)
        log.info("%s: %d experts over %d entries of %d tensors (%s masks%s)", cfg.name, cfg.n_experts,
                 self.experts.total, len(self.experts.targets), self.mask_kind,
                 ", structured" if cfg.structured else "")
        self.optimizers = self._make_optimizers()
        self.schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
        self._lambda_factor: Any = lambda update: 1.0  # the multipliers' rate factor per update (schedule)
        self._scaler: Any = None
        self._eval_merge: EvaluationMerge | None = None  # shared by evaluation tasks until the experts change

    @property
    def learns_masks(self) -> bool:
        return self.mask_kind == "learned"

    # -- optimisation --------------------------------------------------------------------------------

    def setup_training(self, total_updates: int) -> None:
        """Schedulers for delta, masks and router, and the multipliers' rate (``learner.schedule``)."""
        self._updates, self._total_updates = 0, total_updates
        if self.lagrangian is not None:
            self.lagrangian.set_progress(0.0 if self.cfg.sparsity_warmup > 0 else 1.0)
        self.schedulers, self._lambda_factor = make_schedulers(self.optimizers, self.cfg, total_updates)

    def training_state(self) -> dict[str, Any]:
        return {**super().training_state(), "updates": self._updates}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if "_scaler" in state.get("objects", {}) and self._scaler is None:
            self._scaler = self._new_scaler()  # made at the first fp16 step: a fresh learner has none yet
        super().load_training_state(state)
        self._updates = int(state["updates"])
        if self.lagrangian is not None:
            ramp = self.cfg.sparsity_warmup * self._total_updates
            self.lagrangian.set_progress(self._updates / ramp if ramp > 0 else 1.0)

    def temperature(self) -> float:
        cfg = self.cfg
        return max(cfg.temperature_min, cfg.temperature_start - float(self.tasks_seen) / cfg.temperature_decay)

    # -- forward pieces ------------------------------------------------------------------------------

    def _base(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.backbone.named_parameters()}

    def _features(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Backbone features under ``params`` (merged tensors; the rest are the frozen weights)."""
        chunks = x.split(self.cfg.batch_size)
        return torch.cat([functional_call(self.backbone, dict(params), (c,)) for c in chunks]).float()

    def _pretrained_prototypes(self, x: Tensor, y: Tensor, way: int) -> Tensor:
        """Router input: class prototypes of the frozen pretrained model, without gradients."""
        with torch.no_grad():
            return class_prototypes(embed(self.backbone, x, self.cfg.batch_size).float(), y, way)

    def _inner_adapt(self, theta: dict[str, Tensor], x: Tensor, y: Tensor,
                     way: int) -> tuple[dict[str, Tensor], Tensor]:
        """theta_i' after first-order SGD on the support CE, and the head: the prototypes under theta_i (with
        their graph), moved by the same steps when ``head_step`` (upstream's ProtoMAML fast head; the step is
        detached, so the query loss still reaches theta_i through the prototypes)."""
        cfg = self.cfg
        feats = self._features(theta, x)
        params, head = theta, class_prototypes(feats, y, way)
        for step in range(cfg.inner_steps):
            if step:
                feats = self._features(params, x)
            leaf = head.detach().requires_grad_(cfg.head_step)
            loss = F.cross_entropy(self.logits(feats, leaf), y)
            inputs = [*params.values(), leaf] if cfg.head_step else list(params.values())
            grads = torch.autograd.grad(loss, inputs, retain_graph=True)  # no create_graph: first order
            params = {n: p - cfg.inner_lr * g for (n, p), g in zip(params.items(), grads)}
            if cfg.head_step:
                head = head - cfg.inner_lr * grads[-1]
        return params, head

    def _teacher_logits(self, ep: Episode, adapted: dict[str, Tensor], head: Tensor, ce: Tensor) -> Tensor:
        """Query logits of a dense teacher: a detached copy of theta_i' (and, with ``head_step``, of its head)
        after ``teacher_steps`` SGD steps on the query (or support) CE; otherwise the head stays fixed.

        After an inner step, the teacher's first gradient on query data is that of the student's query CE with
        respect to theta_i' (and the head), read from the student's graph instead of a second forward pass.
        Without one, theta_i' is theta_i, whose gradient also runs through the prototypes: the teacher then
        takes its first step on its own forward pass.
        """
        cfg = self.cfg
        params = {n: p.detach() for n, p in adapted.items()}
        x, y = (ep.query_x, ep.query_y) if cfg.teacher_data == "query" else (ep.support_x, ep.support_y)
        steps = cfg.teacher_steps
        if cfg.teacher_data == "query" and cfg.inner_steps > 0:
            inputs = [*adapted.values(), head] if cfg.head_step else list(adapted.values())
            grads = torch.autograd.grad(ce, inputs, retain_graph=True)
            params = {n: (p - cfg.teacher_lr * g).detach() for (n, p), g in zip(adapted.items(), grads)}
            head = head - cfg.teacher_lr * grads[-1] if cfg.head_step else head
            steps -= 1
        head = head.detach()
        for _ in range(steps):
            params = {n: p.requires_grad_() for n, p in params.items()}
            leaf = head.requires_grad_(cfg.head_step)
            loss = F.cross_entropy(self.logits(self._features(params, x), leaf), y)
            grads = torch.autograd.grad(loss, [*params.values(), leaf] if cfg.head_step else list(params.values()))
            params = {n: (p - cfg.teacher_lr * g).detach() for (n, p), g in zip(params.items(), grads)}
            head = (leaf - cfg.teacher_lr * grads[-1]).detach() if cfg.head_step else leaf.detach()
        with torch.no_grad():
            return self.logits(self._features(params, ep.query_x), head)

    def _task_loss(self, ep: Episode, updates_of: Callable[[Tensor], dict[str, Tensor]], *,
                   sample: bool) -> _TaskOutcome:
        """The per-task meta-training objective (steps 1-4 of the module docstring); ``updates_of(alpha)``: the
        experts' updates, as this update's gate mode makes them (``_merge_mode``)."""
        cfg, way = self.cfg, ep.way
        # labels for benchmarks/training.py's profile; no effect otherwise
        with torch.profiler.record_function("smat.router"):
            pre_prototypes = self._pretrained_prototypes(ep.support_x, ep.support_y, way)
            alpha, router_logits = self.router.alpha(pre_prototypes, self.temperature(), sample)
        with torch.profiler.record_function("smat.merge"):
            theta = self.experts.merge(self._base(), updates_of(alpha))
        with torch.profiler.record_function("smat.inner"):
            adapted, prototypes = self._inner_adapt(theta, ep.support_x, ep.support_y, way)
        with torch.profiler.record_function("smat.forward"):
            student = self.logits(self._features(adapted, ep.query_x), prototypes)
            ce = F.cross_entropy(student, ep.query_y)
        targets = []
        if cfg.teacher_steps > 0 and cfg.kd_weight > 0:
            with torch.profiler.record_function("smat.teacher"):
                targets.append(self._teacher_logits(ep, adapted, prototypes, ce))
        if cfg.kd_pretrained and cfg.kd_weight > 0:
            with torch.no_grad(), torch.profiler.record_function("smat.teacher_pretrained"):
                targets.append(self.logits(embed(self.backbone, ep.query_x, cfg.batch_size), pre_prototypes))
        kd = sum(distillation(student, t, cfg.kd_temperature, cfg.kd_direction) for t in targets) / max(1, len(targets))
        weight = cfg.kd_weight if targets else 0.0
        loss = (1 - weight) * ce + weight * kd + cfg.logit_penalty * router_logits.float().pow(2).mean()
        accuracy = (student.argmax(-1) == ep.query_y).float().mean().item()
        return _TaskOutcome(loss, ce.item(), float(kd.detach()) if isinstance(kd, Tensor) else float(kd), accuracy,
                            alpha.detach().float())

    # -- meta-training -------------------------------------------------------------------------------

    def _merge_mode(self, seed: int) -> tuple[Callable[[Tensor], dict[str, Tensor]], Any]:
        """(alpha -> the experts' training updates, what holds this update's gate state: a ``FusedMerge``, a
        ``GateCache``, None for recomputed gates, or the fixed masks' gates). Fused kernels take learned masks
        unless the orthogonality penalty needs the gates themselves; else ``learner.gate_memory`` decides."""
        ex = self.experts
        if not self.learns_masks:
            gates = ex.gates()
            return (lambda alpha: ex.updates(alpha, gates)), gates
        if self.cfg.ortho_weight == 0 and ex.fused():
            merge = FusedMerge(ex, seed, keep_noise=self.cfg.gate_memory == "cache")
            return merge.updates, merge
        if self.cfg.gate_memory == "recompute":
            return (lambda alpha: recomputed_updates(ex, alpha, seed)), None
        cache = GateCache(ex, seed)
        return (lambda alpha: ex.updates(alpha, cache.z)), cache

    def _mask_statistics(self, state: Any, seed: int) -> tuple[Tensor, Tensor | None]:
        """(measured density of this update's training gates ``[M]``, expected density without its graph; None for
        fixed masks)."""
        if not self.learns_masks:
            return self.experts.density(state), None
        if isinstance(state, FusedMerge):
            return state.statistics()
        if state is None:
            return training_statistics(self.experts, seed)
        with torch.no_grad():
            return self.experts.density(state.z), self.experts.expected_density()

    def _sparsity_backward(self, state: Any, weights: Tensor | None, expected: Tensor) -> None:
        """The constraint's (and orthogonality's) gradient, and the gates' gradient, to the mask logits. The
        expected density's gradient streams one tensor at a time, so its M x |theta| sigmoids are never all held."""
        expected = expected.detach().requires_grad_(True)
        penalty = self.lagrangian.penalty(expected, weights)
        if isinstance(state, GateCache) and self.cfg.ortho_weight > 0:
            penalty = penalty + self.cfg.ortho_weight * self.experts.orthogonality(state.z)
        self._backward(penalty)
        if state is None:
            expected_density_backward(self.experts, expected.grad)
        else:
            state.flush(expected.grad)

    def meta_train_step(self, episodes: Sequence[Episode]) -> dict[str, float]:
        self._maybe_scaler()
        self.invalidate_caches()  # stale after this update; do not hold M x |theta| gates through training
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        seed = int(torch.randint(2**31 - 1, ())) if self.learns_masks else 0
        with torch.profiler.record_function("smat.masks"):
            updates_of, state = self._merge_mode(seed)
        outcomes = []
        for ep in episodes:
            outcome = self._task_loss(ep, updates_of, sample=True)
            with torch.profiler.record_function("smat.backward"):
                self._backward(outcome.loss / len(episodes))
            outcomes.append(outcome)
        # Upstream weighs each expert's sparsity terms by the tasks' (detached) alpha: the batch mean, over all ranks
        weights = (average_tensor(torch.stack([o.alpha for o in outcomes]).mean(0))
                   if self.cfg.constraint_weighting == "alpha" else None)
        with torch.profiler.record_function("smat.masks"):
            density, expected = self._mask_statistics(state, seed)
            if self.learns_masks and self.lagrangian is not None:
                self._sparsity_backward(state, weights, expected)
        lr = self.optimizers["delta"].param_groups[0]["lr"]  # the rate this update used
        with torch.profiler.record_function("smat.optimizer"):
            self._step()
        if self.lagrangian is not None:
            self.lagrangian.ascend(density, self.cfg.lambda_lr * self._lambda_factor(self._updates),
                                   self.cfg.lambda_reset, weights)
            self._updates += 1
            ramp = self.cfg.sparsity_warmup * self._total_updates
            self.lagrangian.set_progress(self._updates / ramp if ramp > 0 else 1.0)
        temperature = self.temperature()
        self.tasks_seen += len(episodes) * world_size()  # every rank's share of the meta-batch
        n = len(outcomes)
        alpha = torch.stack([o.alpha for o in outcomes])
        return {"loss": sum(o.loss.item() for o in outcomes) / n, "accuracy": sum(o.accuracy for o in outcomes) / n,
                "ce": sum(o.ce for o in outcomes) / n, "kd": sum(o.kd for o in outcomes) / n,
                "sparsity": 1.0 - float(density.mean()), "temperature": temperature,
                "lambda": float(self.lagrangian.multipliers.detach().mean()) if self.lagrangian is not None else 0.0,
                "lr_delta": lr, **self._dynamics(alpha, density)}
