"""The SMAT learner, its ablations and the probes, on the 32-px test ViT with tiny episodes."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from episodes.episode import Episode, Split, Support
from metabench.backbones import create_backbone
from metabench.learners import create_learner
from metabench.learners.smat import SMAT, SMATConfig, SMATState
from metabench.nn.heads import class_prototypes, embed
from metabench.probes import (
    EXPERT_SCORE_COLUMNS,
    ExpertScorer,
    MaskInspector,
    MetaGradientSource,
    ProbeRecorder,
    gradient_alignment,
)
from metabench.training import load_learner_state, save_learner

ABLATIONS = ("softmerge", "smat_random", "smat_magnitude")


def _episode(seed: int, way: int = 3, shots: int = 2, queries: int = 2) -> Episode:
    g = torch.Generator().manual_seed(seed)
    levels = torch.linspace(30, 220, way)

    def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(way).repeat_interleave(n)
        x = levels[y][:, None, None, None] + 25 * torch.randn(len(y), 3, 32, 32, generator=g)
        return x.clamp(0, 255).to(torch.uint8), y

    (sx, sy), (qx, qy) = images(shots), images(queries)
    return Episode(sx, sy, qx, qy, "synthetic", Split.TRAIN, f"ep{seed}")


def _smat(name: str = "smat", seed: int = 0, **options) -> SMAT:
    torch.manual_seed(seed)
    return create_learner(name, create_backbone("vit_test"), SMATConfig(name=name, **options))


def _randomise_delta(learner: SMAT) -> None:
    with torch.no_grad():
        for d in learner.experts.delta.values():
            d.normal_(std=0.05)


def test_zero_delta_reproduces_the_pretrained_model_exactly() -> None:
    learner = _smat().eval()
    ep = _episode(0)
    model = learner.task_model(ep.support)
    assert torch.equal(model(ep.query_x), learner.backbone(ep.query_x))
    _randomise_delta(learner)
    zero = learner.experts.merged_params(learner._base(), torch.zeros(8))
    assert torch.equal(learner._features(zero, ep.query_x), learner.backbone(ep.query_x))


@pytest.mark.parametrize("structured", [False, True])
def test_zero_shot_runs_a_view_of_the_merged_weights_with_the_dense_copys_outputs(structured: bool) -> None:
    """Zero-shot tasks embed through a MergedView instead of a deep copy; fine-tuning still gets a dense copy."""
    learner = _smat(structured=structured).eval()
    _randomise_delta(learner)
    ep = _episode(2)
    state = learner.adapt(ep.support)
    assert not any(True for _ in state.model.parameters())  # a view: it owns nothing
    dense = learner.task_model(ep.support)
    assert torch.equal(state.model(ep.query_x), dense(ep.query_x))
    assert torch.equal(learner.predict(state, ep.query_x),
                       learner.logits(dense(ep.query_x), class_prototypes(dense(ep.support_x), ep.support_y, 3)))
    assert isinstance(learner.adapt(ep.support, mode="full", steps=1).model, type(learner.backbone))


def test_permuting_the_support_classes_leaves_alpha_unchanged() -> None:
    learner = _smat().eval()
    ep = _episode(1, way=5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    order = torch.randperm(ep.support_y.numel(), generator=torch.Generator().manual_seed(0))
    relabelled = Support(ep.support_x[order], perm[ep.support_y][order])
    assert torch.allclose(learner.expert_scores(ep.support), learner.expert_scores(relabelled), atol=1e-6)


def test_gradients_reach_only_delta_masks_and_router_and_the_backbone_stays_frozen() -> None:
    learner = _smat().train()
    _randomise_delta(learner)
    frozen = {n: p.clone() for n, p in learner.backbone.named_parameters()}
    cache_gates = learner.experts.gates()
    outcome = learner._task_loss(_episode(2), lambda alpha: learner.experts.updates(alpha, cache_gates), sample=True)
    outcome.loss.backward()
    with_grad = {n for n, p in learner.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(n.startswith(("experts.delta.", "experts.mask_logits.", "router.")) for n in with_grad)
    assert any(n.startswith("experts.mask_logits.") for n in with_grad)
    assert any(n.startswith("router.") for n in with_grad)
    assert all(p.grad is None for p in learner.backbone.parameters())
    learner.zero_grad()
    learner.meta_train_step([_episode(3), _episode(4)])
    assert all(torch.equal(frozen[n], p) for n, p in learner.backbone.named_parameters())


def test_every_router_tensor_is_a_trained_and_saved_parameter() -> None:
    learner = _smat()
    names = {n for n, _ in learner.router.named_parameters()}
    assert {"tokens", "keys"} <= names
    state = learner.state_dict()
    assert all(f"router.{n}" in state for n in ("tokens", "keys"))
    router_opt = {id(p) for g in learner.optimizers["router"].param_groups for p in g["params"]}
    assert all(id(p) in router_opt for p in learner.router.parameters())


def test_meta_train_step_metrics_and_temperature() -> None:
    learner = _smat(temperature_decay=2.0).train()
    learner.setup_training(10)
    metrics = learner.meta_train_step([_episode(5), _episode(6)])
    assert set(metrics) >= {"loss", "accuracy", "ce", "kd", "sparsity", "lambda", "temperature"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["temperature"] == 5.0 and learner.temperature() == 4.0  # two tasks seen at decay 2
    assert metrics["lambda"] > 0  # the experts start dense, so the multipliers rise


@pytest.mark.parametrize("options", [{}, {"structured": True, "teacher_data": "support", "kd_pretrained": False,
                                          "kd_direction": "student_teacher", "ortho_weight": 0.1,
                                          "sparsity_scope": "global", "mask_noise": True, "layer_types": ["q", "v"]}])
def test_checkpoint_round_trip_and_dense_export_give_identical_logits(options: dict, tmp_path: Path) -> None:
    learner = _smat(**options).train()
    learner.meta_train_step([_episode(7)])
    _randomise_delta(learner)
    learner.eval()
    save_learner(learner, tmp_path / "learner.safetensors")
    fresh = _smat(seed=123, **options).eval()
    load_learner_state(fresh, tmp_path / "learner.safetensors")
    ep = _episode(8)
    logits = learner.predict(learner.adapt(ep.support), ep.query_x)
    assert torch.equal(logits, fresh.predict(fresh.adapt(ep.support), ep.query_x))
    backbone = create_backbone("vit_test").eval()
    backbone.load_state_dict(learner.export_dense(ep.support))
    protos = class_prototypes(embed(backbone, ep.support_x), ep.support_y, ep.way)
    assert torch.equal(learner.logits(backbone(ep.query_x), protos), logits)


def test_adapt_reports_sparsity_and_expert_scores() -> None:
    learner = _smat().eval()
    with torch.no_grad():
        for p in learner.experts.mask_logits.values():
            p.fill_(-4.61)  # every gate closed: the merged update is zero everywhere
    state = learner.adapt(_episode(9).support)
    assert isinstance(state, SMATState) and state.sparsity == 1.0
    assert state.expert_scores is not None and torch.isclose(state.expert_scores.sum(), torch.tensor(1.0))
    assert learner.adapt(_episode(9).support, mode="full", steps=1).sparsity == 1.0


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablations_meta_train_with_fixed_masks(name: str) -> None:
    learner = _smat(name).train()
    masks = {n: b.clone() for n, b in learner.experts.named_buffers()}
    delta = {n: p.clone() for n, p in learner.experts.delta.named_parameters()}
    for seed in range(2):
        metrics = learner.meta_train_step([_episode(10 + seed)])
        assert all(math.isfinite(v) for v in metrics.values())
    assert not hasattr(learner.experts, "mask_logits") and learner.lagrangian is None
    assert all(torch.equal(masks[n], b) for n, b in learner.experts.named_buffers())
    assert any(not torch.equal(delta[n], p) for n, p in learner.experts.delta.named_parameters())
    expected = 0.0 if name == "softmerge" else 0.9
    assert learner.describe()["expert_sparsity"] == pytest.approx(expected, abs=0.01)


def test_softmerge_has_one_dense_delta_per_expert() -> None:
    learner = _smat("softmerge", n_experts=3)
    assert all(d.shape[0] == 3 for d in learner.experts.delta.values())


def test_config_rejects_unknown_choices() -> None:
    with pytest.raises(ValueError, match="kd_direction"):
        SMATConfig(kd_direction="backwards")


def test_probe_protocols_and_writers(tmp_path: Path) -> None:
    learner = _smat(n_experts=3).eval()
    _randomise_delta(learner)
    assert isinstance(learner, ExpertScorer) and isinstance(learner, MaskInspector)
    assert isinstance(learner, MetaGradientSource)
    grads = learner.task_meta_gradients([_episode(12), _episode(13)])
    assert set(grads) == {"delta", "expert_0", "expert_1", "expert_2"} and len(grads["delta"]) == 2
    assert torch.allclose(grads["delta"][0], sum(grads[f"expert_{m}"][0] for m in range(3)), atol=1e-7)
    alignment = gradient_alignment(grads)
    assert all(-1 <= a <= 1 for a in alignment.values())
    recorder = ProbeRecorder(learner, tmp_path, grad_every=1)
    for ep in (_episode(14), _episode(15)):
        recorder.on_eval_episode(ep, learner.adapt(ep.support), "id")
    recorder.on_train_update([_episode(16), _episode(17)], update=1, tasks_seen=2)
    written = {p.name for p in recorder.finish()}
    assert written == {"expert_scores.parquet", "mask_stats.parquet", "mask_overlap.parquet", "grad_alignment.parquet"}
    scores = pd.read_parquet(tmp_path / "probes" / "expert_scores.parquet")
    assert list(scores.columns) == EXPERT_SCORE_COLUMNS and len(scores) == 6
    overlap = pd.read_parquet(tmp_path / "probes" / "mask_overlap.parquet")
    assert len(overlap) == 9 and (overlap.jaccard.between(0, 1)).all()
    stats = pd.read_parquet(tmp_path / "probes" / "mask_stats.parquet")
    assert stats.groupby("expert").numel.sum().eq(learner.experts.total).all()
    alignment_rows = pd.read_parquet(tmp_path / "probes" / "grad_alignment.parquet")
    assert set(alignment_rows.param_group) == {"delta", "expert_0", "expert_1", "expert_2"}


def test_sparsity_target_ramps_cubically_during_warmup() -> None:
    from metabench.learners.smat.losses import LagrangianSparsity

    lag = LagrangianSparsity(2, 0.9)
    lag.set_progress(0.0)
    assert lag.target == 0.0
    lag.set_progress(0.5)
    assert lag.target == pytest.approx(0.9 * (1 - 0.5**3))
    lag.set_progress(2.0)
    assert lag.target == pytest.approx(0.9)
    # a satisfied (ramped-down) target keeps the multipliers at zero
    lag.set_progress(0.0)
    lag.ascend(torch.tensor([0.5, 0.5]), lr=10.0)
    assert torch.equal(lag.multipliers.detach(), torch.zeros(2))


@pytest.mark.parametrize("structured", [False, True])
def test_recomputed_gates_train_as_the_gate_cache_does(structured: bool) -> None:
    """learner.gate_memory=recompute: two meta-updates of two tasks leave every trained tensor where the
    default (gates cached per update) leaves it, to rounding."""
    runs = {}
    for memory in ("cache", "recompute"):
        learner = _smat(structured=structured, gate_memory=memory, delta_optimizer="adamw", mask_lr=10.0)
        learner.setup_training(2)
        torch.manual_seed(5)
        metrics = [learner.meta_train_step([_episode(2 * i), _episode(2 * i + 1)]) for i in range(2)]
        runs[memory] = (metrics, {n: p.detach().clone() for n, p in learner.named_parameters() if p.requires_grad})
    (m_cache, p_cache), (m_rec, p_rec) = runs["cache"], runs["recompute"]
    assert p_cache.keys() == p_rec.keys()
    for name in p_cache:
        torch.testing.assert_close(p_rec[name], p_cache[name], rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(m_cache, m_rec):
        assert a["sparsity"] == b["sparsity"] and math.isclose(a["loss"], b["loss"], rel_tol=1e-5)


def test_recomputed_gates_refuse_the_orthogonality_penalty() -> None:
    with pytest.raises(ValueError, match="gate_memory=cache"):
        SMATConfig(name="smat", gate_memory="recompute", ortho_weight=0.1)



def test_the_masks_optimiser_is_clipped_sgd_then_the_clamp_exactly() -> None:
    """MaskSGD without fused kernels takes clip_grad_norm_, torch's SGD step and the clamp to +-4.61, bit for bit."""
    from metabench.learners.smat.optim import MaskSGD

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(3, 4, 5, generator=g) * 3, torch.randn(3, 7, generator=g)]
    grads = [torch.randn(x.shape, generator=g) * 10 for x in start]
    runs = []
    for kind in (MaskSGD, torch.optim.SGD):
        params = [torch.nn.Parameter(x.clone()) for x in start]
        groups = [{"params": [params[0]], "lr": 1e6}, {"params": [params[1]], "lr": 0.5}]
        for p, x in zip(params, grads):
            p.grad = x.clone()
        if kind is MaskSGD:
            MaskSGD(groups, lr=1e6, clip=5.0).step()
        else:
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            torch.optim.SGD(groups, lr=1e6).step()
            with torch.no_grad():
                for p in params:
                    p.clamp_(-4.61, 4.61)
        runs.append([p.detach() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert runs[0][0].abs().max() == pytest.approx(4.61)  # the clamp acted
