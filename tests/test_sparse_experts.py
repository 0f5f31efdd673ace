"""The sparse interpolated expert layer (metabench.nn.sparse_experts) and the SMAT loss pieces, on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metabench.backbones import create_backbone
from metabench.learners.smat.losses import LagrangianSparsity, distillation
from metabench.learners.smat.optim import MaskSGD
from metabench.nn.expert_merge import (
    EvaluationMerge,
    GateCache,
    expected_density_backward,
    recomputed_updates,
    training_statistics,
)
from metabench.nn.sparse_experts import (
    L0_SHIFT,
    SparseInterpolatedExperts,
    classify,
    fixed_masks,
    hard_concrete,
    select_targets,
)
from metabench.schedules import warmup_cosine


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_backbone("vit_test").requires_grad_(False)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def test_hard_concrete_gate_values_and_threshold() -> None:
    la = torch.tensor([-4.61, -L0_SHIFT - 1e-3, -L0_SHIFT + 1e-3, 0.0, 4.61])
    z = hard_concrete(la)
    assert z[0] == 0 and z[1] == 0 and z[2] > 0 and z[-1] == 1
    assert torch.isclose(z[3], torch.tensor(0.5))


def test_layer_types_of_timm_vit_names() -> None:
    assert classify("model.blocks.3.attn.qkv.weight", (144, 48)) == ([("q", 0, 48), ("k", 48, 96), ("v", 96, 144)], 3)
    assert classify("model.blocks.0.mlp.fc2.bias", (48,))[0] == [("mlp_out", 0, 48)]
    assert classify("model.patch_embed.proj.weight", (48, 3, 8, 8)) == ([("patch_embed", 0, 48)], -1)
    assert classify("model.norm.weight", (48,))[0][0][0] == "final_norm"
    assert classify("model.blocks.1.norm1.bias", (48,))[0][0][0] == "attn_norm"
    assert classify("model.cls_token", (1, 1, 48))[0][0][0] == "cls_token"


def test_target_selection_by_regex_layer_type_and_qkv_rows(vit) -> None:
    named = _params(vit)
    q_only = select_targets(named, layer_types=["q"])
    assert [t.rows for t in q_only] == [(0, 48)] * 4  # weight and bias of two blocks
    qk = select_targets(named, layer_types=["q", "k"], pattern=r".*blocks\.0\..*weight")
    assert [(t.rows, t.shape) for t in qk] == [((0, 96), (96, 48))]
    qv = select_targets(named, layer_types=["q", "v"], pattern=r".*blocks\.0\.attn\.qkv\.weight")
    assert [t.rows for t in qv] == [(0, 48), (96, 144)]
    assert len(select_targets(named)) == len(named)  # default: every parameter, whole
    with pytest.raises(ValueError, match="Unknown layer types"):
        select_targets(named, layer_types=["query"])
    with pytest.raises(ValueError, match="No backbone parameter"):
        select_targets(named, pattern="nothing")


def test_structured_masks_have_one_gate_per_column_or_channel(vit) -> None:
    experts = SparseInterpolatedExperts(_params(vit), n_experts=3, structured=True)
    shapes = {t.param: tuple(experts.mask_logits[t.key].shape) for t in experts.targets}
    assert shapes["model.blocks.0.attn.qkv.weight"] == (3, 1, 48)
    assert shapes["model.blocks.0.mlp.fc2.weight"] == (3, 1, 192)
    assert shapes["model.patch_embed.proj.weight"] == (3, 48, 1, 1, 1)
    assert shapes["model.blocks.0.norm1.weight"] == (3, 48)
    assert shapes["model.pos_embed"] == (3, 1, 17, 48)
    dense = SparseInterpolatedExperts(_params(vit), n_experts=3)
    count = lambda e: sum(p.numel() for p in e.mask_logits.values())  # noqa: E731
    assert count(experts) < count(dense) / 10 and count(dense) == 3 * dense.total


def test_zero_delta_or_zero_alpha_reproduces_the_pretrained_model_exactly(vit) -> None:
    x = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    reference = vit(x)
    for kind in ("learned", "dense", "random"):
        experts = SparseInterpolatedExperts(_params(vit), n_experts=4, kind=kind, density=0.3)
        alpha = torch.tensor([0.1, 0.2, 0.3, 0.4])
        assert torch.equal(functional_call(vit, experts.merged_params(_params(vit), alpha), (x,)), reference)
        for d in experts.delta.values():
            d.data.normal_()
        assert torch.equal(functional_call(vit, experts.merged_params(_params(vit), torch.zeros(4)), (x,)), reference)
        assert not torch.equal(functional_call(vit, experts.merged_params(_params(vit), alpha), (x,)), reference)


def test_a_q_only_expert_changes_only_the_q_rows(vit) -> None:
    experts = SparseInterpolatedExperts(_params(vit), n_experts=2, layer_types=["q"])
    for d in experts.delta.values():
        d.data.normal_()
    merged = experts.merged_params(_params(vit), torch.tensor([0.5, 0.5]))
    diff = (merged["model.blocks.1.attn.qkv.weight"] - vit.model.blocks[1].attn.qkv.weight).abs().sum(1)
    assert diff[:48].gt(0).any() and diff[48:].eq(0).all()


def test_gate_cache_gives_the_same_mask_gradient_as_direct_autograd(vit) -> None:
    torch.manual_seed(1)
    experts = SparseInterpolatedExperts(_params(vit), n_experts=3, structured=True)
    for d in experts.delta.values():
        d.data.normal_(std=0.1)
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    alphas = [torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.6, 0.3, 0.1])]
    for alpha in alphas:  # direct: a fresh gate graph per task
        merged = experts.merged_params(_params(vit), alpha, experts.gates())
        functional_call(vit, merged, (x,)).square().mean().backward()
    direct = {k: p.grad.clone() for k, p in experts.mask_logits.items()}
    experts.zero_grad()
    cache = GateCache(experts)
    for alpha in alphas:
        functional_call(vit, experts.merged_params(_params(vit), alpha, cache.z), (x,)).square().mean().backward()
    cache.flush()
    assert all(torch.allclose(direct[k], p.grad, atol=1e-6, rtol=1e-4) for k, p in experts.mask_logits.items())


@pytest.mark.parametrize(("structured", "noise", "layer_types"), [
    (False, False, None), (True, False, None), (False, True, ["q", "v"]), (True, True, None)])
def test_recomputed_gates_give_the_gate_cache_gradients(vit, structured, noise, layer_types) -> None:
    """learner.gate_memory=recompute: alpha, delta and mask-logit gradients (and the density) as GateCache's."""
    experts = SparseInterpolatedExperts(_params(vit), n_experts=3, structured=structured, noise=noise,
                                        layer_types=layer_types, init_mean=0.5, init_std=2.0,
                                        generator=torch.Generator().manual_seed(2))
    for d in experts.delta.values():
        d.data.normal_(std=0.1, generator=torch.Generator().manual_seed(3))
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    logits = torch.tensor([[0.1, -0.4, 0.9], [1.2, 0.3, -0.2]])

    def grads(merge) -> dict[str, torch.Tensor]:
        experts.zero_grad()
        out = {}
        for i, row in enumerate(logits):
            leaf = row.clone().requires_grad_()
            alpha = leaf.softmax(0)
            functional_call(vit, experts.merge(_params(vit), merge(alpha)), (x,)).square().mean().backward()
            out[f"alpha{i}"] = leaf.grad
        return {**out, **{f"delta.{k}": p.grad.clone() for k, p in experts.delta.items()},
                **{f"logits.{k}": p.grad.clone() for k, p in experts.mask_logits.items() if p.grad is not None}}

    cache = GateCache(experts, noise_seed=7)
    cached = grads(lambda alpha: experts.updates(alpha, cache.z))
    experts.zero_grad()
    cache.flush()
    cached.update({f"logits.{k}": p.grad.clone() for k, p in experts.mask_logits.items()})
    recomputed = grads(lambda alpha: recomputed_updates(experts, alpha, 7))
    assert cached.keys() == recomputed.keys()
    for key in cached:
        torch.testing.assert_close(recomputed[key], cached[key], rtol=1e-5, atol=1e-6, msg=key)
    assert torch.equal(training_statistics(experts, 7)[0], experts.density(cache.z))


@pytest.mark.parametrize(("kind", "structured", "layer_types"), [
    ("learned", False, None), ("learned", True, None), ("learned", False, ["q", "v"]), ("random", False, None),
    ("magnitude", True, None), ("dense", False, None)])
def test_evaluation_merge_equals_the_direct_merge(vit, kind, structured, layer_types) -> None:
    g = torch.Generator().manual_seed(3)
    experts = SparseInterpolatedExperts(_params(vit), n_experts=4, kind=kind, structured=structured,
                                        layer_types=layer_types, init_mean=-1.0, init_std=2.0, generator=g)
    with torch.no_grad():
        for d in experts.delta.values():
            d.normal_(0.0, 0.1, generator=g)
    merge = EvaluationMerge(experts)
    for alpha in (torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.0, 0.5, 0.0, 0.5])):
        direct = experts.merged_params(_params(vit), alpha)
        fast = merge.merged(_params(vit), alpha)
        assert fast.keys() == direct.keys()
        for name in direct:
            torch.testing.assert_close(fast[name], direct[name], rtol=0, atol=1e-6)
        masks = experts.merged_masks(alpha, experts.gates()) if kind != "dense" else None
        assert merge.zero_fraction(alpha) == experts.zero_fraction(masks)
    assert kind == "dense" or 0 < merge.closed < 1


def test_fixed_masks_keep_exactly_the_budget() -> None:
    """Random masks differ between experts; magnitude masks are magnitude pruning (tests/test_smat_recipe.py)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.linspace(0.01, 1, 200).view(20, 10)
    for kind in ("random", "magnitude"):
        masks = fixed_masks(weight, (20, 10), 4, 0.1, kind, g)
        assert masks.shape == (4, 20, 10) and masks.flatten(1).sum(1).tolist() == [20.0] * 4
    random = fixed_masks(weight, (20, 10), 4, 0.1, "random", g)
    assert not torch.equal(random[0], random[1])
    magnitude = fixed_masks(weight, (20, 10), 4, [0.1, 0.2, 0.1, 0.05], "magnitude", g)
    assert torch.equal(magnitude[0], magnitude[2]) and torch.equal(magnitude[0].flatten(), (weight > 0.902).flatten().float())
    assert torch.equal(magnitude[1] * magnitude[0], magnitude[0])  # a denser expert contains a sparser one's mask


def test_sparsity_constraint_is_met_on_a_toy_problem() -> None:
    """Masks and delta of a tiny MLP fit a sparse target update under tau = 0.9 (Lagrangian, reset rule)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4)).requires_grad_(False)
    base = _params(net)
    target = {n: p + 0.3 * torch.randn_like(p) * (torch.rand_like(p) < 0.05) for n, p in base.items()}
    experts = SparseInterpolatedExperts(base, n_experts=4)
    lagrangian = LagrangianSparsity(4, tau=0.9)
    opt_delta = torch.optim.SGD(experts.delta.parameters(), lr=0.05, momentum=0.9)
    opt_masks = MaskSGD(experts.mask_logits.parameters(), lr=1e3, clip=5.0)  # clip, SGD step, clamp
    losses = []
    for _ in range(60):
        opt_delta.zero_grad(), opt_masks.zero_grad()
        cache = GateCache(experts)
        x = torch.randn(64, 8)
        alpha = torch.softmax(torch.randn(4), 0)
        theta = experts.merged_params(base, alpha, cache.z)
        loss = (functional_call(net, theta, (x,)) - functional_call(net, target, (x,))).pow(2).mean()
        loss.backward()
        density = experts.density(cache.z)
        lagrangian.penalty(experts.expected_density()).backward()
        cache.flush()
        opt_delta.step(), opt_masks.step()
        lagrangian.ascend(density, 0.05)
        losses.append(loss.item())
    sparsity = 1 - experts.density()
    assert sparsity.min() >= 0.9 - 0.005, sparsity  # the constraint holds for every expert ...
    assert sparsity.max() <= 0.97, sparsity  # ... without collapsing them
    assert sum(losses[-10:]) < sum(losses[:10])


def test_mask_statistics_and_overlap_are_consistent(vit) -> None:
    experts = SparseInterpolatedExperts(_params(vit), n_experts=3, structured=True)
    with torch.no_grad():
        for p in experts.mask_logits.values():
            p.copy_(torch.randn_like(p) * 3).clamp_(-4.61, 4.61)
    rows = experts.mask_stats()
    for m in range(3):
        mine = [r for r in rows if r["expert"] == m]
        assert sum(r["numel"] for r in mine) == experts.total
        assert sum(r["nonzero"] for r in mine) == round(float(experts.density()[m]) * experts.total)
    assert {r["layer_type"] for r in rows} >= {"q", "k", "v", "attn_out", "mlp_in", "final_norm", "pos_embed"}
    inter, union = experts.overlap()
    assert torch.allclose(inter.diagonal(), experts.density().double() * experts.total)
    assert torch.equal(inter, inter.T) and (union >= inter).all()


def test_orthogonality_penalty_is_zero_for_disjoint_masks() -> None:
    base = {"w": torch.zeros(4, 6)}
    experts = SparseInterpolatedExperts(base, n_experts=2)
    disjoint = {"w": torch.stack([torch.eye(4, 6), 1 - torch.eye(4, 6)])}
    same = {"w": torch.ones(2, 4, 6)}
    assert experts.orthogonality(disjoint) == 0
    assert torch.isclose(experts.orthogonality(same), torch.tensor(math.sqrt(2.0)))


def test_lagrange_multipliers_ascend_while_dense_and_reset_when_sparse() -> None:
    lagrangian = LagrangianSparsity(2, tau=0.9)
    lagrangian.ascend(torch.tensor([0.5, 0.5]), lr=1.0)
    assert torch.allclose(lagrangian.multipliers, torch.tensor([0.4, 0.4]))
    lagrangian.ascend(torch.tensor([0.05, 0.3]), lr=1.0)
    assert torch.allclose(lagrangian.multipliers, torch.tensor([0.0, 0.6]))
    lagrangian.ascend(torch.tensor([0.05, 0.05]), lr=1.0, reset=False)
    assert torch.allclose(lagrangian.multipliers, torch.tensor([0.0, 0.55]))
    assert lagrangian.penalty(torch.tensor([0.1, 0.2], requires_grad=True)).requires_grad
    glob = LagrangianSparsity(2, tau=0.9, scope="global")
    glob.ascend(torch.tensor([0.05, 0.35]), lr=1.0)
    assert glob.multipliers.shape == (1,) and torch.isclose(glob.multipliers[0], torch.tensor(0.1))


def test_distillation_directions() -> None:
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    p_t, p_s = F.softmax(teacher / 2, -1), F.softmax(student / 2, -1)
    forward = (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * 4
    reverse = (p_s * (p_s.log() - p_t.log())).sum(-1).mean() * 4
    assert torch.isclose(distillation(student, teacher, 2.0), forward, atol=1e-6)
    assert torch.isclose(distillation(student, teacher, 2.0, "student_teacher"), reverse, atol=1e-6)


def test_warmup_cosine() -> None:
    assert warmup_cosine(0, warmup=10, total=100) == 0.1
    assert warmup_cosine(9, warmup=10, total=100) == 1.0
    assert warmup_cosine(100, warmup=10, total=100) == pytest.approx(0.0)


@pytest.mark.parametrize("structured", [False, True])
def test_streamed_expected_density_gradient_is_autograds(vit, structured) -> None:
    experts = SparseInterpolatedExperts(_params(vit), n_experts=3, structured=structured, init_std=2.0,
                                        generator=torch.Generator().manual_seed(5))
    grad = torch.tensor([0.7, -1.3, 2.1])
    experts.expected_density().backward(grad)
    direct = {k: p.grad.clone() for k, p in experts.mask_logits.items()}
    experts.zero_grad()
    expected_density_backward(experts, grad)
    assert all(torch.equal(p.grad, direct[k]) for k, p in experts.mask_logits.items())
