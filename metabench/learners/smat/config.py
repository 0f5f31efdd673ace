"""Options of the SMAT learner (``learner.<key>=value``), kept apart from the learner's code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from metabench.config import check_choices
from metabench.learners.base import LearnerConfig
from metabench.learners.smat.losses import KdDirection

__all__ = ["SMATConfig"]

# The choices of SMAT's string options (checked as the config loads, or by __post_init__ for a config built in code).
SparsityScope = Literal["expert", "global"]
Weighting = Literal["uniform", "alpha"]
TeacherData = Literal["query", "support"]
DeltaOptimizer = Literal["sgd", "adamw"]
Schedule = Literal["warmup_cosine", "upstream_epochs"]
GateMemory = Literal["cache", "recompute"]
MaskKernelMode = Literal["auto", "compiled", "eager"]
FUSED_KERNELS_FROM = 2**24  # learner.mask_kernels=auto fuses elementwise masks of this many entries (M x |theta|)


@dataclass
class SMATConfig(LearnerConfig):
    """SMAT options; the defaults are the paper's ViT-S settings (DINO ViT-S/16, tau 0.9)."""

    n_experts: int = 8
    target: str = r".*"  # regex fully matching backbone parameter names (e.g. "model.blocks.0.attn.qkv.weight")
    layer_types: list[str] | None = None  # subset of sparse_experts.LAYER_TYPES; None: every layer
    structured: bool = False  # one gate per Linear input column / conv output channel (advised for ViT-B/L);
        # a structured gate's learning rate is mask_lr / (entries it covers), so one mask_lr suits both modes
    sparsity: float = 0.9  # tau: each expert keeps at most 1 - tau of its entries (ViT-S 0.9, ViT-B 0.95)
    sparsity_scope: SparsityScope = "expert"  # expert (SMAT) | global (SIMoE: one constraint on the mean density)
    sparsity_warmup: float = 0.0  # share of the updates over which the target ramps (cubically) from 0 to tau
    constraint_weighting: Weighting = "uniform"  # uniform (ours) | alpha: each expert's L0 and Lagrangian terms
        # times the task's alpha_m, as upstream (multipliers then rise ~M times slower; see smat.losses)
    mask_init_mean: float = 0.0
    mask_init_std: float = 0.5
    mask_noise: bool = False  # sample hard-concrete noise in training (upstream: off)
    mask_allocation: str | None = None  # smat_random / smat_magnitude: a trained SMAT run folder (or its
        # probes/mask_stats.parquet) whose per-expert, per-tensor densities the fixed masks copy;
        # None: 1 - tau everywhere
    ortho_weight: float = 0.0  # SIMoE's mask orthogonality penalty
    gate_memory: GateMemory = "cache"  # cache: the update's M x |theta| training gates and their gradient are kept
        # (gates computed once per update) | recompute: each task's backward recomputes them one tensor at a time
        # (2 x M x |theta| floats less, about 1.4 GB on an elementwise ViT-S; costs gate passes per task). Fused
        # kernels hold no gates either way; with learner.mask_noise, cache keeps the update's noise (drawn once)
    mask_kernels: MaskKernelMode = "auto"  # compiled: the masks' training jobs as fused torch.compile kernels (one
        # pass over the logits per job instead of ~5; a C++ compiler or Triton, else eager with a warning) | eager |
        # auto: compiled for elementwise masks of >= 2^24 entries (a ViT-S has 170M), eager below. Not with
        # ortho_weight > 0 (its penalty needs the gates). Compiling: 24 s on a cold cache, 4 s per process after
    router_tokens: int = 4
    router_heads: int = 4
    router_mlp_ratio: float = 2.0
    router_spectral_norm: bool = True
    temperature_start: float = 5.0  # T = max(temperature_min, temperature_start - tasks_seen / temperature_decay)
    temperature_min: float = 0.5
    temperature_decay: float = 4000.0
    logit_penalty: float = 1e-4  # weight of mean(router logits^2)
    inner_lr: float = 1e-3
    inner_steps: int = 1
    kd_weight: float = 0.25  # loss = (1 - w) CE + w KD
    kd_temperature: float = 2.0
    kd_direction: KdDirection = "teacher_student"  # teacher_student: KL(teacher||student) | student_teacher (upstream)
    teacher_steps: int = 1  # SGD steps of the dense teacher (0: no task-specific teacher)
    teacher_lr: float = 5e-3
    teacher_data: TeacherData = "query"  # query (upstream: uses the query labels) | support
    head_step: bool = False  # the inner and teacher SGD steps also move the prototype head (upstream: ProtoMAML's
        # head is a fast weight); False keeps the prototypes of theta_i as the head
    kd_pretrained: bool = True  # also distil from the frozen pretrained ProtoNet (upstream code; not in the paper text)
    delta_optimizer: DeltaOptimizer = "sgd"  # sgd (paper: momentum SGD) | adamw (moves every unmasked entry from
        # update 1)
    delta_lr: float = 1e-4  # ViT-B/L: 5e-4
    delta_momentum: float = 0.9  # sgd only
    delta_weight_decay: float = 1e-4
    mask_lr: float = 1e6  # plain SGD: the masks saturate to {0, 1}
    mask_clip: float = 5.0
    lambda_lr: float = 2e-3
    lambda_reset: bool = True  # a satisfied multiplier drops to 0 (upstream); False: projected ascent
    router_lr: float = 1e-4
    router_weight_decay: float = 1e-2
    router_clip: float = 1.0
    schedule: Schedule = "warmup_cosine"  # warmup_cosine (ours): warm-up over warmup_fraction, cosine to 0, multipliers
        # unscheduled | upstream_epochs: every group, multipliers included, on upstream's per-epoch schedule
    warmup_fraction: float = 0.1  # warmup_cosine: share of the updates spent warming up
    schedule_epochs: int = 25  # upstream_epochs: the run is split into this many epochs (ViT-S trains 25 ...
    schedule_total_epochs: int = 50  # ... of a schedule spanning 50: it ends at 0.62x the peak rate)
    schedule_warmup_epochs: int = 5
    schedule_first_lr: float = 1e-6  # upstream_epochs: the first epoch's absolute rate (delta, masks, multipliers;
        # the router's factor is 0 then, as upstream's warm-up gives it)
    batch_size: int = 128  # images per backbone forward

    def fused_kernels(self, mask_entries: int) -> bool:
        """Whether ``learner.mask_kernels`` fuses masks of ``mask_entries`` (M x |theta|) entries."""
        if self.mask_kernels == "auto":
            return not self.structured and mask_entries >= FUSED_KERNELS_FROM
        return self.mask_kernels == "compiled"

    def __post_init__(self) -> None:
        check_choices(self, "learner.")  # a config built in code (a run's config is checked as it loads)
        if not 0.0 <= self.sparsity < 1.0 or not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError("learner.sparsity must be in [0, 1) and learner.kd_weight in [0, 1].")
        if self.n_experts < 1 or self.inner_steps < 0 or self.teacher_steps < 0:
            raise ValueError("learner.n_experts must be positive; inner_steps and teacher_steps not negative.")
        if self.constraint_weighting == "alpha" and self.sparsity_scope != "expert":
            raise ValueError("learner.constraint_weighting=alpha needs learner.sparsity_scope=expert (one multiplier "
                             "per expert to weigh).")
        if self.gate_memory == "recompute" and self.ortho_weight > 0:
            raise ValueError("learner.gate_memory=recompute keeps no gates for learner.ortho_weight's penalty; "
                             "use learner.gate_memory=cache with it.")
        if self.schedule_epochs < 1 or self.schedule_total_epochs < 1 or self.schedule_warmup_epochs < 0:
            raise ValueError("learner.schedule_epochs and schedule_total_epochs must be positive, "
                             "schedule_warmup_epochs not negative.")
