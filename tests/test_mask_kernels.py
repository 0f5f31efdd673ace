"""The fused mask kernels (metabench.nn.hard_concrete.MaskKernels, learner.mask_kernels=compiled) against the eager
path they replace: the same gates, densities and gradients to float rounding. Elementwise results agree to 1e-6 of
their scale (measured: bit for bit); sums over a tensor's entries, and gradients that pass back through a network
whose merged weights differ in the last bit, to 1e-5 (float32 summation order)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metabench.backbones import create_backbone
from metabench.learners import create_learner
from metabench.learners.smat import SMATConfig
from metabench.nn.expert_merge import FusedMerge, GateCache
from metabench.nn.hard_concrete import L0_SHIFT, MaskKernels, hard_concrete, hard_concrete_backward
from metabench.nn.sparse_experts import SparseInterpolatedExperts
from tests.test_smat import _episode

M = 8  # experts: SMAT's default, the count the fixture compiles for (another count compiles again)
DENSITY_GRAD = torch.linspace(-1.3, 2.1, M)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("vit_test").requires_grad_(False)


@pytest.fixture(scope="module", autouse=True)
def _compiler() -> None:
    for noise in (False, True):
        if not MaskKernels(noise, M).ready(torch.device("cpu")):
            pytest.skip("torch.compile has no working C++ compiler here; the eager path is tested elsewhere")


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6, what: str = "") -> None:
    actual, expected = actual.detach().double(), expected.detach().double()
    assert float((actual - expected).abs().max()) <= tol * (float(expected.abs().max()) or 1.0), what


def _experts(vit: nn.Module, noise: bool, fused: bool) -> SparseInterpolatedExperts:
    experts = SparseInterpolatedExperts(_params(vit), n_experts=M, noise=noise, init_mean=0.5, init_std=2.0,
                                        generator=torch.Generator().manual_seed(2))
    for d in experts.delta.values():
        d.data.normal_(std=0.1, generator=torch.Generator().manual_seed(3))
    experts.use_fused_kernels(fused)
    assert experts.fused() is fused
    return experts


def _task_grads(vit: nn.Module, experts: SparseInterpolatedExperts, merge) -> dict[str, torch.Tensor]:
    """Two tasks' backward through ``merge(alpha)``; alpha's gradients."""
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    out = {}
    for i, row in enumerate(torch.randn(2, M, generator=torch.Generator().manual_seed(5))):
        leaf = row.clone().requires_grad_()
        functional_call(vit, experts.merge(_params(vit), merge(leaf.softmax(0))), (x,)).square().mean().backward()
        out[f"alpha{i}"] = leaf.grad
    return out


@pytest.mark.parametrize(("noise", "keep_noise"), [(False, False), (True, False), (True, True)])
def test_the_fused_merge_takes_the_gate_cache_gradients(vit, noise: bool, keep_noise: bool) -> None:
    """Two tasks' alpha and delta gradients, the update's statistics, and the mask logits' gradient (the gates' and
    the expected density's) as the eager GateCache gives them."""
    runs = {}
    for fused in (False, True):
        experts = _experts(vit, noise, fused)
        if fused:
            merge = FusedMerge(experts, noise_seed=7, keep_noise=keep_noise)
            grads, (density, expected) = _task_grads(vit, experts, merge.updates), merge.statistics()
        else:
            cache = GateCache(experts, noise_seed=7)
            grads = _task_grads(vit, experts, lambda alpha, c=cache, e=experts: e.updates(alpha, c.z))
            density, expected = experts.density(cache.z), experts.expected_density().detach()
            merge = cache
        deltas = {k: p.grad.clone() for k, p in experts.delta.items()}
        merge.flush(DENSITY_GRAD)
        runs[fused] = (grads, deltas, density, expected, {k: p.grad.clone() for k, p in experts.mask_logits.items()})
    (g0, dl0, d0, e0, l0), (g1, dl1, d1, e1, l1) = runs[False], runs[True]
    for k in g0:
        _close(g1[k], g0[k], 1e-5, k)
    for k in dl0:
        _close(dl1[k], dl0[k], 1e-5, f"delta gradient {k}")
    for k in l0:
        _close(l1[k], l0[k], 1e-5, f"logit gradient {k}")  # the two tasks' sum in another float order
    assert torch.equal(d1, d0)
    _close(e1, e0, 1e-5, "expected density")


def test_fused_kernels_give_the_eager_operations_results() -> None:
    """One task's gate gradient and update, directly: the elementwise results are the eager ones to 1e-6."""
    g = torch.Generator().manual_seed(0)
    la, alpha = (torch.randn(M, 6, 5, generator=g) * 2).clamp(-4.61, 4.61), torch.rand(M, generator=g)
    delta, grad, scale = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g), torch.rand(M, generator=g)
    kernels = MaskKernels(n_experts=M)
    z = hard_concrete(la)
    _close(kernels("merge", la, None, alpha, delta), torch.tensordot(alpha, z, dims=1) * delta, what="update")
    eager = hard_concrete_backward(alpha[:, None, None] * grad * delta, la)
    p_open = torch.sigmoid(la + L0_SHIFT)
    eager += scale[:, None, None] * (1 - p_open) * p_open
    _close(kernels("flush", la, None, alpha[None], (grad * delta)[None], scale), eager, what="logit gradient")


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("memory", ["cache", "recompute"])
def test_a_compiled_meta_update_takes_the_eager_gradients_and_step(memory: str, noise: bool) -> None:
    """learner.mask_kernels=compiled: one SMAT update of two tasks leaves the eager update's gradients, parameters
    and metrics, whichever gate memory the eager one keeps. The fused mask step leaves the logits' gradient
    unclipped (the eager ``clip_grad_norm_`` scales it in place)."""
    runs = {}
    for kernels in ("eager", "compiled"):
        torch.manual_seed(0)
        learner = create_learner("smat", create_backbone("vit_test"),
                                 SMATConfig(name="smat", gate_memory=memory, mask_kernels=kernels, mask_clip=1e-3,
                                            mask_noise=noise))
        assert learner.experts.fused() is (kernels == "compiled")
        learner.setup_training(2)
        g = torch.Generator().manual_seed(3)
        for std, group in ((0.1, learner.experts.delta), (1.0, learner.experts.mask_logits)):
            for p in group.values():  # moving deltas and gates between 0 and 1: every mask gradient is live
                p.data.normal_(std=std, generator=g)
        learner.invalidate_caches()
        before = {n: p.detach().clone() for n, p in learner.named_parameters()}
        torch.manual_seed(5)
        metrics = learner.meta_train_step([_episode(0), _episode(1)])
        runs[kernels] = (metrics, {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None},
                         {n: (p.detach(), p.detach() - before[n]) for n, p in learner.named_parameters()})
    (m0, g0, p0), (m1, g1, p1) = runs["eager"], runs["compiled"]
    assert g0.keys() == g1.keys() and any("mask_logits" in n for n in g0)
    masks = [n for n in g1 if "mask_logits" in n]
    norm = torch.linalg.vector_norm(torch.stack([g1[n].norm() for n in masks]))
    coef = min(1.0, 1e-3 / (float(norm) + 1e-6))
    assert coef < 1.0  # the clip acted
    for name in g0:
        _close(g1[name] * (coef if name in masks else 1.0), g0[name], 1e-5, name)
    for name, (after, update) in p0.items():  # the masks' steps: lr 1e6 times the gradients, before the clamp
        if not name.startswith("experts."):
            continue  # the router's AdamW step divides by |grad|: its rounding is not the gradients'
        step = 1e6 * float(g0[name].abs().max()) if name in masks else float(update.abs().max())
        tol = 1e-5 * step + 1e-6 * float(after.abs().max())
        assert float((p1[name][0] - after).abs().max()) <= tol, f"update of {name}"
    # the loss to the float32 rounding of the logits it is made of: relative, or 1e-7 for a loss near 0
    assert m1["sparsity"] == m0["sparsity"] and m1["loss"] == pytest.approx(m0["loss"], rel=1e-6, abs=1e-7)


def test_auto_fuses_only_large_elementwise_masks() -> None:
    cfg = SMATConfig(name="smat")
    assert cfg.fused_kernels(8 * 21_000_000) and not cfg.fused_kernels(8 * 100_000)
    assert not SMATConfig(name="smat", structured=True).fused_kernels(8 * 21_000_000)
    assert not SMATConfig(name="smat", mask_kernels="eager").fused_kernels(8 * 21_000_000)
    assert SMATConfig(name="smat", mask_kernels="compiled").fused_kernels(10)


@pytest.mark.parametrize("keep_noise", [False, True])
def test_a_fused_merge_keeping_its_noise_draws_it_once_per_update(vit, keep_noise: bool, monkeypatch) -> None:
    experts = _experts(vit, noise=True, fused=True)
    draws: dict[str, int] = {}
    original = experts._noise

    def counted(t, seed):
        draws[t.key] = draws.get(t.key, 0) + 1
        return original(t, seed)

    monkeypatch.setattr(experts, "_noise", counted)
    merge = FusedMerge(experts, noise_seed=7, keep_noise=keep_noise)
    _task_grads(vit, experts, merge.updates)  # two tasks: forward and backward each
    merge.statistics()
    merge.flush(DENSITY_GRAD)
    fused = [k for k, la in experts.mask_logits.items() if la.dim() == 3 and min(la.shape[1:]) > 1]
    assert fused and {draws[k] for k in fused} == ({1} if keep_noise else {2 * 2 + 1})  # two merges and backwards, the flush
