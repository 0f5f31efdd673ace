"""SMAT's upstream recipe as options: alpha-weighted constraint, schedules, distillation direction, head steps,
the teacher without an inner step, fp16-scaler resume, magnitude pruning, equal allocation, LoRA on q and v."""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from metabench.catalog import catalog
from metabench.config import load_config
from metabench.finetuning import FineTuneOptions, prepare
from metabench.learners.smat import SMAT
from metabench.learners.smat.losses import LagrangianSparsity, UpstreamEpochs, distillation
from metabench.nn.expert_targets import fixed_masks
from metabench.probes import read_mask_allocation, write_mask_stats
from tests.test_smat import _episode, _randomise_delta, _smat


def _step_schedulers(learner: SMAT, n: int) -> None:
    with warnings.catch_warnings():  # stepping schedulers without optimiser steps, on purpose
        warnings.simplefilter("ignore")
        for _ in range(n):
            for scheduler in learner.schedulers:
                scheduler.step()


# -- the sparsity constraint ---------------------------------------------------------------------------

def test_alpha_weighted_penalty_and_ascent_follow_upstream() -> None:
    lag = LagrangianSparsity(4, tau=0.9)
    lag.multipliers.data = torch.tensor([1.0, 2.0, 0.0, 4.0])
    expected_density = torch.tensor([0.5, 0.2, 0.05, 0.3], requires_grad=True)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    slack = expected_density.detach() - 0.1
    assert torch.allclose(lag.penalty(expected_density, weights), (weights * lag.multipliers.detach() * slack).sum())
    assert torch.allclose(lag.penalty(expected_density), (lag.multipliers.detach() * slack).mean())
    measured = torch.tensor([0.5, 0.2, 0.05, 0.3])
    lag.ascend(measured, lr=0.5, weights=weights)  # lambda_m += lr alpha_m (rho_m - (1 - tau)); satisfied -> 0
    assert torch.allclose(lag.multipliers.detach(), torch.tensor([1.0 + 0.5 * 0.1 * 0.4, 2.0 + 0.5 * 0.2 * 0.1,
                                                                  0.0, 4.0 + 0.5 * 0.4 * 0.2]))


def test_smat_step_weighs_multipliers_by_the_batch_mean_alpha(monkeypatch: pytest.MonkeyPatch) -> None:
    learner = _smat(constraint_weighting="alpha", lambda_lr=1.0, sparsity=0.9).train()
    learner.setup_training(10)
    seen = {}
    original = learner.lagrangian.ascend

    def record(density, lr, reset=True, weights=None):
        seen.update(density=density.clone(), lr=lr, weights=weights.clone())
        original(density, lr, reset, weights)

    monkeypatch.setattr(learner.lagrangian, "ascend", record)
    learner.meta_train_step([_episode(1), _episode(2)])
    weights = seen["weights"]
    assert weights.shape == (8,) and math.isclose(float(weights.sum()), 1.0, rel_tol=1e-5)
    expected = (seen["lr"] * weights * (seen["density"] - 0.1)).clamp_min(0)
    assert torch.allclose(learner.lagrangian.multipliers.detach(), expected)
    assert float(learner.lagrangian.multipliers.detach().max()) < 1.0 / 4  # about M times below the unweighted ascent


def test_alpha_weighting_needs_one_multiplier_per_expert() -> None:
    with pytest.raises(ValueError, match="sparsity_scope=expert"):
        _smat(constraint_weighting="alpha", sparsity_scope="global")


# -- schedules ------------------------------------------------------------------------------------------

def test_upstream_epoch_schedule_shape() -> None:
    schedule = UpstreamEpochs(10, warmup=5, total=50, first_lr=1e-6)
    assert schedule(0, 1e-4) == pytest.approx(1e-2) and schedule(9, 1e-4) == pytest.approx(1e-2)  # 1e-6 absolute
    assert [schedule(u, 1e-4) for u in (10, 20, 40, 50)] == pytest.approx([0.2, 0.4, 0.8, 1.0])
    assert schedule(249, 1e-4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 45)))  # epoch 24 of 25: 0.62
    assert schedule(249, 1e-4) == pytest.approx(0.621, abs=1e-3)
    assert UpstreamEpochs(10, first_lr=None)(5, 1e-4) == 0.0  # the router's first epoch


def test_smat_learning_rates_at_chosen_updates_under_each_schedule() -> None:
    learner = _smat(schedule="upstream_epochs", delta_lr=1e-4, router_lr=1e-4, lambda_lr=2e-3)
    learner.setup_training(250)  # 25 epochs of 10 updates
    def lr(name: str) -> float:
        return learner.optimizers[name].param_groups[0]["lr"]
    assert lr("delta") == pytest.approx(1e-6) and lr("masks") == pytest.approx(1e-6) and lr("router") == 0.0
    assert learner._lambda_factor(0) * 2e-3 == pytest.approx(1e-6)
    _step_schedulers(learner, 10)
    assert lr("delta") == pytest.approx(0.2e-4) and lr("router") == pytest.approx(0.2e-4)
    _step_schedulers(learner, 239)
    assert lr("delta") / 1e-4 == pytest.approx(0.621, abs=1e-3)
    assert learner._lambda_factor(249) == pytest.approx(0.621, abs=1e-3)

    ours = _smat(warmup_fraction=0.1, delta_lr=1e-4)
    ours.setup_training(100)
    assert ours.optimizers["delta"].param_groups[0]["lr"] == pytest.approx(1e-5)  # warm-up 1/10
    _step_schedulers(ours, 99)
    assert ours.optimizers["delta"].param_groups[0]["lr"] < 1e-7 and ours._lambda_factor(99) == 1.0


# -- distillation and the teacher ----------------------------------------------------------------------

def test_kd_directions_are_the_two_kls() -> None:
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    log_s, log_t = F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1)
    kl_ts = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    kl_st = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    assert distillation(student, teacher, 2.0, "teacher_student") == pytest.approx(4 * float(kl_ts), rel=1e-5)
    assert distillation(student, teacher, 2.0, "student_teacher") == pytest.approx(4 * float(kl_st), rel=1e-5)
    # upstream: F.kl_div(log_softmax(teacher), log_softmax(student), log_target=True) is KL(student || teacher)
    upstream = F.kl_div(log_t, log_s, reduction="batchmean", log_target=True) * 4
    assert distillation(student, teacher, 2.0, "student_teacher") == pytest.approx(float(upstream), rel=1e-5)


def _task(learner: SMAT, seed: int = 3):
    ep = _episode(seed)
    alpha = learner.expert_scores(ep.support)
    theta = learner.experts.merged_params(learner._base(), alpha)
    adapted, head = learner._inner_adapt(theta, ep.support_x, ep.support_y, ep.way)
    return ep, theta, adapted, head


@pytest.mark.parametrize("head_step", [False, True])
def test_inner_step_moves_the_head_only_with_head_step(head_step: bool) -> None:
    learner = _smat(head_step=head_step, inner_lr=0.5)
    _randomise_delta(learner)
    ep, theta, _, head = _task(learner)
    feats = learner._features(theta, ep.support_x)
    prototypes = torch.stack([feats[ep.support_y == c].mean(0) for c in range(ep.way)])
    leaf = prototypes.detach().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(learner.logits(feats.detach(), leaf), ep.support_y), [leaf])
    expected = prototypes - 0.5 * grad if head_step else prototypes
    assert torch.allclose(head, expected, atol=1e-6)
    assert head.requires_grad  # the query loss still reaches theta_i through the prototypes


@pytest.mark.parametrize("inner_steps,head_step", [(0, False), (1, False), (0, True), (1, True)])
def test_teacher_equals_an_explicit_dense_teacher(inner_steps: int, head_step: bool) -> None:
    learner = _smat(inner_steps=inner_steps, head_step=head_step, teacher_lr=0.5, kd_pretrained=False).train()
    _randomise_delta(learner)
    ep, _, adapted, head = _task(learner)
    ce = F.cross_entropy(learner.logits(learner._features(adapted, ep.query_x), head), ep.query_y)
    got = learner._teacher_logits(ep, adapted, head, ce)
    params = {n: p.detach().clone().requires_grad_() for n, p in adapted.items()}
    h0 = head.detach().clone().requires_grad_(head_step)
    loss = F.cross_entropy(learner.logits(learner._features(params, ep.query_x), h0), ep.query_y)
    grads = torch.autograd.grad(loss, [*params.values(), h0] if head_step else list(params.values()))
    stepped = {n: p - 0.5 * g for (n, p), g in zip(params.items(), grads)}
    h1 = h0 - 0.5 * grads[-1] if head_step else h0
    with torch.no_grad():
        expected = learner.logits(learner._features(stepped, ep.query_x), h1)
    assert torch.allclose(got, expected, atol=1e-4)


# -- resume with an fp16 grad scaler ---------------------------------------------------------------------

def test_resume_restores_a_grad_scaler_made_at_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SMAT, "_new_scaler", staticmethod(lambda: torch.amp.GradScaler("cpu", init_scale=8.0)))
    trained = _smat()
    trained.setup_training(4)
    trained._scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # what the first fp16 CUDA step creates
    state = trained.training_state()
    fresh = _smat()
    fresh.setup_training(4)
    assert fresh._scaler is None
    fresh.load_training_state(state)
    assert fresh._scaler is not None and fresh._scaler.get_scale() == 1024.0


# -- fixed masks ---------------------------------------------------------------------------------------

def test_magnitude_masks_are_the_top_entries_of_the_pretrained_weights() -> None:
    weight = torch.randn(20, 30)
    masks = fixed_masks(weight, (20, 30), 3, 0.1, "magnitude", torch.Generator().manual_seed(0))
    again = fixed_masks(weight, (20, 30), 3, 0.1, "magnitude", torch.Generator().manual_seed(1))
    top = torch.zeros(600)
    top[weight.abs().flatten().topk(60).indices] = 1.0
    assert torch.equal(masks, again)  # deterministic
    assert all(torch.equal(masks[m].flatten(), top) for m in range(3))


def test_smat_magnitude_keeps_the_largest_pretrained_entries_per_tensor() -> None:
    learner = _smat("smat_magnitude", sparsity=0.9)
    weights = dict(learner.backbone.named_parameters())
    for t in learner.experts.targets:
        if t.rows is None and weights[t.param].ndim == 2:  # random init: no ties among |theta|
            mask = learner.experts.gate(t)[0].flatten()
            keep = round(0.1 * t.numel)
            assert int(mask.sum()) == keep
            assert torch.equal(mask.nonzero().flatten().sort().values,
                               weights[t.param].abs().flatten().topk(keep).indices.sort().values)


def test_fixed_masks_copy_a_trained_runs_allocation(tmp_path) -> None:
    trained = _smat(sparsity=0.5)
    with torch.no_grad():  # a different density per expert and tensor
        for p in trained.experts.mask_logits.values():
            p.uniform_(-4, 4)
    write_mask_stats(trained, tmp_path / "probes" / "mask_stats.parquet")
    allocation = read_mask_allocation(tmp_path, 8)
    for kind in ("smat_random", "smat_magnitude"):
        fixed = _smat(kind, mask_allocation=str(tmp_path))
        stats = pd.DataFrame(fixed.mask_stats()).groupby(["layer_name", "expert"])[["nonzero", "numel"]].sum()
        share = (stats["nonzero"] / stats["numel"]).unstack("expert")
        for name, densities in allocation.items():
            n = int(stats.loc[name, "numel"].iloc[0])
            assert share.loc[name].tolist() == pytest.approx(densities, abs=1.0 / n + 1e-9)
    with pytest.raises(ValueError, match="fixed masks"):
        _smat("smat", mask_allocation=str(tmp_path))
    with pytest.raises(ValueError, match="No mask statistics"):
        read_mask_allocation(tmp_path / "missing", 8)


# -- the paper preset ----------------------------------------------------------------------------------

def test_paper_preset_is_the_upstream_recipe() -> None:
    cfg = load_config(overrides=["preset=paper", "learner.name=smat"])
    assert (cfg.learner.constraint_weighting, cfg.learner.schedule, cfg.learner.kd_direction,
            cfg.learner.head_step) == ("alpha", "upstream_epochs", "student_teacher", True)
    assert (cfg.eval.optimizer, cfg.eval.weight_decay, cfg.eval.lora_qkv, cfg.eval.steps) == ("adamw", 0.01, "qv", 50)
    ood = [s for s in cfg.data.eval_sources if s not in cfg.data.train_sources]
    assert len(ood) == 10 and {"sketch", "clipart", "food101", "pets", "cars"} <= set(ood)
    smat = next(row for row in catalog("learners") if row["name"] == "smat")
    assert "paper: constraint_weighting=alpha" in smat["options per preset"]


def test_lora_on_query_and_value_leaves_the_key_rows_untouched() -> None:
    learner = _smat()
    options = FineTuneOptions(lora_target=r"(.*\.)?blocks\.\d+\.attn\.qkv", lora_qkv="qv", optimizer="adamw",
                              weight_decay=0.01)
    model, params = prepare(learner.backbone, "lora", options)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    ep = _episode(4)
    for _ in range(3):
        optimizer.zero_grad()
        model(ep.support_x).pow(2).mean().backward()
        optimizer.step()
    b_weights = [m.lora_B["default"].weight for n, m in model.named_modules() if n.endswith("qkv")]
    assert b_weights
    for w in b_weights:
        third = w.shape[0] // 3
        assert torch.count_nonzero(w[third:2 * third]) == 0 and torch.count_nonzero(w[:third]) > 0
        assert torch.count_nonzero(w[2 * third:]) > 0
