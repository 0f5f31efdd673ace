"""Which backbone tensors SMAT's experts cover, how each is classified, and hand-designed masks.

Targets come from a regex over the backbone's parameter names and a set of layer types; timm fuses
q, k and v in one ``qkv`` Linear, so a q/k/v subset is a slice of its output rows (q first, then k,
then v). Structured masks keep one gate per input column of a Linear weight and per output channel
of a conv; everything else stays elementwise. Fixed masks (``random``: a uniform subset; ``magnitude``:
the largest |theta_pre|) keep exactly round(density * n) entries per expert and tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LAYER_TYPES", "ExpertTarget", "classify", "fixed_masks", "select_targets"]

LAYER_TYPES: tuple[str, ...] = ("patch_embed", "pos_embed", "cls_token", "q", "k", "v", "attn_out", "attn_norm",
                                "mlp_in", "mlp_out", "mlp_norm", "final_norm", "other")


@dataclass(frozen=True)
class ExpertTarget:
    """One masked slice of a backbone parameter (the whole tensor unless a q/k/v subset was chosen)."""

    key: str  # name inside the experts' ParameterDicts (dots are not allowed there)
    param: str  # backbone parameter name, e.g. "model.blocks.0.attn.qkv.weight"
    rows: tuple[int, int] | None  # row slice of the parameter (None: all of it)
    shape: tuple[int, ...]  # shape of the slice
    mask_shape: tuple[int, ...]
    parts: tuple[tuple[str, int, int], ...]  # (layer type, first row, end row) within the slice, for statistics
    depth: int  # transformer block index, -1 outside the blocks

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def repeat(self) -> int:
        """Parameter entries governed by one mask entry (1 for elementwise masks)."""
        return self.numel // math.prod(self.mask_shape)


def classify(name: str, shape: Sequence[int]) -> tuple[list[tuple[str, int, int]], int]:
    """Layer-type parts (type, first row, end row) and block depth of a timm ViT parameter name."""
    found = re.search(r"blocks\.(\d+)\.", name)
    depth = int(found.group(1)) if found else -1
    rows = shape[0] if len(shape) else 1
    rules = (("patch_embed", "patch_embed."), ("pos_embed", "pos_embed"), ("cls_token", "cls_token"),
             ("attn_out", ".attn.proj."), ("attn_norm", ".norm1."), ("mlp_norm", ".norm2."),
             ("mlp_in", ".mlp.fc1."), ("mlp_out", ".mlp.fc2."), ("q", ".attn.q."), ("k", ".attn.k."),
             ("v", ".attn.v."))
    if ".attn.qkv." in name:
        third = rows // 3
        return [("q", 0, third), ("k", third, 2 * third), ("v", 2 * third, rows)], depth
    for layer_type, needle in rules:
        if needle in name:
            return [(layer_type, 0, rows)], depth
    if depth == -1 and re.search(r"(^|\.)(fc_)?norm\.", name):
        return [("final_norm", 0, rows)], depth
    return [("other", 0, rows)], depth


def _mask_shape(shape: tuple[int, ...], structured: bool) -> tuple[int, ...]:
    if structured and len(shape) == 2:
        return (1, shape[1])  # one gate per input column of a Linear weight
    if structured and len(shape) == 4:
        return (shape[0], 1, 1, 1)  # one gate per output channel of a conv
    return shape


def select_targets(named_params: Mapping[str, Tensor], *, pattern: str = ".*", layer_types: Sequence[str] | None = None,
                   structured: bool = False) -> list[ExpertTarget]:
    """Targets: parameters whose name fully matches ``pattern``, restricted to ``layer_types`` (None: all)."""
    unknown = set(layer_types or ()) - set(LAYER_TYPES)
    if unknown:
        raise ValueError(f"Unknown layer types {sorted(unknown)}; choose from {', '.join(LAYER_TYPES)}.")
    wanted = set(layer_types) if layer_types is not None else set(LAYER_TYPES)
    regex = re.compile(pattern)
    targets = []
    for name, tensor in named_params.items():
        if not regex.fullmatch(name):
            continue
        parts, depth = classify(name, tuple(tensor.shape))
        for start, end, chosen in _row_runs([p for p in parts if p[0] in wanted]):
            whole = start == 0 and end == (tensor.shape[0] if tensor.ndim else 1)
            shape = tuple(tensor.shape) if whole else (end - start, *tensor.shape[1:])
            key = name.replace(".", "__") + ("" if whole else f"__rows_{start}_{end}")
            rel = tuple((t, a - start, b - start) for t, a, b in chosen)
            targets.append(ExpertTarget(key, name, None if whole else (start, end), shape,
                                        _mask_shape(shape, structured), rel, depth))
    if not targets:
        raise ValueError(f'No backbone parameter matches target "{pattern}" with layer types {sorted(wanted)}.')
    return targets


def _row_runs(parts: list[tuple[str, int, int]]) -> list[tuple[int, int, list[tuple[str, int, int]]]]:
    """Merge adjacent selected parts (e.g. q and k of a qkv weight) into contiguous row slices."""
    runs: list[tuple[int, int, list[tuple[str, int, int]]]] = []
    for part in sorted(parts, key=lambda p: p[1]):
        if runs and runs[-1][1] == part[1]:
            runs[-1] = (runs[-1][0], part[2], [*runs[-1][2], part])
        else:
            runs.append((part[1], part[2], [part]))
    return runs


def _importance(weight: Tensor, mask_shape: tuple[int, ...]) -> Tensor:
    """|theta| per mask entry (the L2 norm over the entries a structured gate covers)."""
    if tuple(weight.shape) == mask_shape:
        return weight.abs()
    dims = tuple(i for i, n in enumerate(mask_shape) if n == 1 and weight.shape[i] != 1)
    return weight.pow(2).sum(dims, keepdim=True).sqrt()


def fixed_masks(weight: Tensor, mask_shape: tuple[int, ...], n_experts: int, density: float | Sequence[float],
                kind: str, generator: torch.Generator) -> Tensor:
    """``[M, *mask_shape]`` 0/1 masks keeping exactly round(density_m * n) entries for expert m (``density``: one
    share for all experts, or one per expert, e.g. a trained SMAT run's allocation).

    "random": a uniformly random subset per expert (Gumbel top-k). "magnitude": magnitude pruning, the
    entries of largest |theta_pre| (per structured gate, the L2 norm it covers), deterministic, so experts
    with equal densities share one mask and a denser expert's mask contains a sparser one's.
    """
    n = math.prod(mask_shape)
    shares = [float(density)] * n_experts if isinstance(density, (int, float)) else [float(d) for d in density]
    if len(shares) != n_experts:
        raise ValueError(f"fixed_masks got {len(shares)} densities for {n_experts} experts.")
    masks = torch.zeros(n_experts, n)
    if kind == "magnitude":
        order = _importance(weight.detach().float().cpu(), mask_shape).flatten().argsort(descending=True, stable=True)
        for m, share in enumerate(shares):
            masks[m, order[:min(n, round(share * n))]] = 1.0
    else:
        scores = -torch.log(-torch.log(torch.rand(n_experts, n, generator=generator).clamp(1e-12, 1 - 1e-12)))
        for m, share in enumerate(shares):
            masks[m, scores[m].topk(min(n, round(share * n))).indices] = 1.0
    return masks.view(n_experts, *mask_shape)
