"""The statistics behind every table, the console's and the report's: Meta-Dataset's CI, its significance rule,
tie-aware ranks, paired tests. Torch-free, so the analysis package and the CLI share it.

Conventions (Meta-Dataset): a cell is the mean of per-episode accuracies ± 1.96·σ/√n with σ the *population*
standard deviation (ddof=0). Two entries differ significantly when |Δ| > 1.96·√(s₁²/n₁ + s₂²/n₂), i.e. when
the difference exceeds 1.96 times the standard error of the difference of two independent means.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "Z95",
    "Estimate",
    "average_estimate",
    "ci95",
    "estimate",
    "paired_stats",
    "significantly_different",
    "summarize",
    "tie_groups",
    "tie_aware_ranks",
    "top_group",
]

Z95 = 1.96


def ci95(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean and Meta-Dataset's 95% half-width ``1.96 * std / sqrt(n)`` (population std) of a sample."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / n)
    return mean, 1.96 * std / math.sqrt(n), n


def summarize(frame: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Mean accuracy ± 95% CI per group (default: domain, source, mode, steps), in percent."""
    by = by or ["domain", "source", "mode", "steps"]
    out = []
    for key, group in frame.groupby(by, sort=False):
        mean, half, n = ci95(group["accuracy"])
        labels = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        out.append({**labels, "accuracy": 100 * mean, "ci95": 100 * half, "n": n})
    return pd.DataFrame(out, columns=[*by, "accuracy", "ci95", "n"])


@dataclass(frozen=True)
class Estimate:
    """A mean with the variance of that mean (σ²/n): what significance tests and CIs need."""

    mean: float
    var: float
    n: int

    @property
    def half_width(self) -> float:
        """95% half-width, 1.96·√var (= 1.96·σ/√n for an episode mean)."""
        return Z95 * math.sqrt(self.var) if self.var == self.var else math.nan

    @property
    def valid(self) -> bool:
        return self.n > 0 and not math.isnan(self.mean)


def estimate(values: Iterable[float]) -> Estimate:
    """Mean of per-episode values and the variance of that mean with the population σ (Meta-Dataset)."""
    mean, half, n = ci95(values)
    return Estimate(mean, (half / Z95) ** 2 if n else math.nan, n)


def average_estimate(parts: Sequence[Estimate]) -> Estimate:
    """Plain mean of independent means (e.g. per-source means -> "ID average"): var = Σ varᵢ / k²."""
    if not parts or not all(p.valid for p in parts):
        return Estimate(math.nan, math.nan, 0)
    k = len(parts)
    return Estimate(sum(p.mean for p in parts) / k, sum(p.var for p in parts) / k**2, sum(p.n for p in parts))


def significantly_different(a: Estimate, b: Estimate, z: float = Z95) -> bool:
    """Meta-Dataset's leaderboard rule: |Δ| > z·√(var_a + var_b). Equal means are never different."""
    return abs(a.mean - b.mean) > z * math.sqrt(a.var + b.var)


def tie_groups(entries: Mapping[Any, Estimate]) -> list[list[Any]]:
    """Partition entries into tie groups, best first.

    Rule: sort by mean, descending (equal means keep the mapping's order). The first entry not yet grouped
    leads a new group; the following entries join it, in order, while each is *not* significantly different
    from the leader; the first one that is significantly different leads the next group. Groups are therefore
    contiguous in the sorted order and anchored at their best entry: ties do not chain transitively
    (A~B and B~C but A≁C gives groups {A, B}, {C}). Invalid entries (no episodes, NaN) are left out.
    """
    order = sorted((k for k, e in entries.items() if e.valid), key=lambda k: -entries[k].mean)
    groups: list[list[Any]] = []
    for key in order:
        if groups and not significantly_different(entries[groups[-1][0]], entries[key]):
            groups[-1].append(key)
        else:
            groups.append([key])
    return groups


def tie_aware_ranks(entries: Mapping[Any, Estimate]) -> dict[Any, float]:
    """Rank 1 = best; the members of a tie group (see ``tie_groups``) share the mean of the ranks they span."""
    ranks: dict[Any, float] = {}
    position = 1
    for group in tie_groups(entries):
        shared = position + (len(group) - 1) / 2
        ranks.update({k: shared for k in group})
        position += len(group)
    return ranks


def top_group(entries: Mapping[Any, Estimate]) -> set[Any]:
    """The entries to bold: the best tie group, i.e. the best entry and every entry not significantly worse
    than it, and only when at least one valid entry *is* significantly worse (a row where nothing is
    significantly better than anything, or with one entry, has no bold)."""
    groups = tie_groups(entries)
    return set(groups[0]) if len(groups) > 1 else set()


def paired_stats(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired comparison of a and b on the same episodes.

    Returns n, mean_a, mean_b, diff (mean of a−b), its 95% CI from the t distribution with n−1 degrees of
    freedom and the sample σ (ddof=1), which is the interval that matches the paired t-test (the CI excludes 0
    exactly when p_t < 0.05), the t statistic and two-sided p (``scipy.stats.ttest_rel``), and the Wilcoxon
    signed-rank statistic and two-sided p (``scipy.stats.wilcoxon``, zero differences dropped). Statistics
    that are undefined (n < 2, all differences equal) are NaN; when all differences are 0, p values are 1.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"Paired samples need equal lengths, got {x.size} and {y.size}.")
    d = x - y
    n = int(d.size)
    out = {"n": n, "mean_a": _mean(x), "mean_b": _mean(y), "diff": _mean(d), "ci_low": math.nan,
           "ci_high": math.nan, "t": math.nan, "p_t": math.nan, "wilcoxon": math.nan, "p_wilcoxon": math.nan}
    if n < 2:
        return out
    if np.all(d == 0):
        return {**out, "ci_low": 0.0, "ci_high": 0.0, "p_t": 1.0, "p_wilcoxon": 1.0}
    sem = float(np.std(d, ddof=1)) / math.sqrt(n)
    t_crit = float(stats.t.ppf(0.975, n - 1))
    out.update(ci_low=out["diff"] - t_crit * sem, ci_high=out["diff"] + t_crit * sem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant non-zero differences: t is ±inf, fine
        t_res = stats.ttest_rel(x, y)
        w_res = stats.wilcoxon(d)
    out.update(t=float(t_res.statistic), p_t=float(t_res.pvalue),
               wilcoxon=float(w_res.statistic), p_wilcoxon=float(w_res.pvalue))
    return out


def _mean(v: np.ndarray) -> float:
    return float(v.mean()) if v.size else math.nan
