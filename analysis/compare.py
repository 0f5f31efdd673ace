"""Paired comparisons of two settings on the same episodes, and accuracy breakdowns by episode shape.

Paired: two settings are compared on the episodes both evaluated, joined on (source, episode_id, mode, steps),
so episode difficulty cancels out; this is far more sensitive than comparing two independent CIs.

Breakdowns (after Meta-Dataset's ``analyze.py``, adapted to what the results schema records: ``way``,
``shots`` = support images in total, ``n_query``):

- by way: the episode's number of classes (as in analyze.py);
- by shot: the episode's *mean* support images per class, ``shots / way``, in buckets. analyze.py instead
  scores each class by its own shot; per-class shots are not in the schema;
- by support size: ``shots`` in buckets;
- by imbalance: analyze.py's measure, max − min of the per-class shares of the support set (the ``imbalance``
  column; 0 = balanced), in buckets. Rows written before that column existed only bound it: when ``shots`` is
  not a multiple of ``way`` the support set *must* be imbalanced (``imbalanced (unmeasured)``); otherwise it
  may or may not be (``undetermined``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.tables import setting_frame
from metabench.stats import estimate, paired_stats

__all__ = ["BREAKDOWNS", "breakdown", "paired_comparison"]

log = logging.getLogger(__name__)

JOIN = ["source", "episode_id", "mode", "steps"]
SHOT_EDGES = (0, 1, 2, 5, 10, 20, 50, np.inf)  # mean shots per class; buckets (lo, hi]
SUPPORT_EDGES = (0, 5, 10, 25, 50, 100, 250, np.inf)
IMBALANCE_EDGES = (0, 0.02, 0.05, 0.1, 0.2, 1.0)  # max - min class share; buckets (lo, hi], exact 0 = "balanced"
BREAKDOWNS = ("way", "shots_per_class", "support_size", "imbalance")


def paired_comparison(frame: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Setting ``a`` minus setting ``b`` (run labels) on shared episodes, per protocol: one row per source,
    one pooled row per domain (all its shared episodes together) and one over all episodes.

    Columns: level (source/domain/all), name, domain, mode, steps, then ``paired_stats`` (n, mean_a, mean_b,
    diff, ci_low, ci_high, t, p_t, wilcoxon, p_wilcoxon) with accuracies and differences in percent points.
    """
    frame = setting_frame(frame)
    left = frame[frame["label"] == a][[*JOIN, "domain", "accuracy"]]
    right = frame[frame["label"] == b][[*JOIN, "accuracy"]]
    joined = left.merge(right, on=JOIN, suffixes=("_a", "_b"), validate="one_to_one")
    if joined.empty:
        log.warning('Settings "%s" and "%s" share no episodes (same source, episode_id, mode, steps).', a, b)
    rows = []
    for (mode, steps), proto in joined.groupby(["mode", "steps"], sort=False):
        for source, part in proto.groupby("source", sort=False):
            rows.append(_row("source", str(source), str(part["domain"].iloc[0]), mode, steps, part))
        for domain, part in proto.groupby("domain", sort=False):
            rows.append(_row("domain", f"{str(domain).upper()} (pooled)", str(domain), mode, steps, part))
        rows.append(_row("all", "all (pooled)", "", mode, steps, proto))
    return pd.DataFrame(rows, columns=["level", "name", "domain", "mode", "steps", "n", "mean_a", "mean_b", "diff",
                                       "ci_low", "ci_high", "t", "p_t", "wilcoxon", "p_wilcoxon"])


def _row(level: str, name: str, domain: str, mode: str, steps: int, part: pd.DataFrame) -> dict:
    res = paired_stats(100 * part["accuracy_a"].to_numpy(), 100 * part["accuracy_b"].to_numpy())
    return {"level": level, "name": name, "domain": domain, "mode": mode, "steps": int(steps), **res}


def _buckets(values: pd.Series, edges: Sequence[float]) -> pd.Series:
    labels = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if np.isinf(hi):
            labels.append(f">{lo:g}")
        elif hi - lo == 1 and float(hi).is_integer() and float(lo).is_integer():
            labels.append(f"{hi:g}")
        else:
            labels.append(f"({lo:g}, {hi:g}]")
    return pd.cut(values, bins=list(edges), labels=labels, right=True).astype(str)


def _imbalance_buckets(frame: pd.DataFrame, edges: Sequence[float]) -> pd.Series:
    measured = frame["imbalance"].astype(float) if "imbalance" in frame else pd.Series(np.nan, index=frame.index)
    forced = (frame["shots"].astype(int) % frame["way"].astype(int)) != 0
    out = forced.map({True: "imbalanced (unmeasured)", False: "undetermined"}).astype(object)
    known = measured.notna()
    if known.any():
        out[known] = _buckets(measured[known], edges)
        out[known & (measured <= 0)] = "balanced"
    return out.astype(str)


def _bucket_column(frame: pd.DataFrame, by: str, edges: Sequence[float] | None) -> pd.Series:
    if by == "way":
        return frame["way"].astype(int).astype(str)
    if by == "shots_per_class":
        return _buckets(frame["shots"] / frame["way"], edges or SHOT_EDGES)
    if by == "support_size":
        return _buckets(frame["shots"].astype(float), edges or SUPPORT_EDGES)
    if by == "imbalance":
        return _imbalance_buckets(frame, edges or IMBALANCE_EDGES)
    raise ValueError(f'Unknown breakdown "{by}"; use one of {", ".join(BREAKDOWNS)}.')


def breakdown(frame: pd.DataFrame, by: str, edges: Sequence[float] | None = None,
              domain: str | None = None, source: str | None = None) -> pd.DataFrame:
    """Accuracy (percent, mean ± 1.96·σ/√n over episodes) per setting, protocol and bucket of ``by``.

    Args:
        frame: episode rows.
        by: one of ``BREAKDOWNS`` (definitions in the module docstring).
        edges: bucket edges for shots_per_class / support_size (buckets are (lo, hi]).
        domain: keep only this domain ("id"/"ood"); None pools all sources.
        source: keep only this source (analyze.py breaks down one evaluation dataset at a time).
    """
    frame = setting_frame(frame)
    if domain is not None:
        frame = frame[frame["domain"] == domain]
    if source is not None:
        frame = frame[frame["source"] == source]
    frame = frame.assign(bucket=_bucket_column(frame, by, edges))
    rows = []
    for (label, mode, steps), setting in frame.groupby(["label", "mode", "steps"], sort=False):
        for bucket in sorted(setting["bucket"].unique(), key=_natural_key):
            est = estimate(setting.loc[setting["bucket"] == bucket, "accuracy"])
            rows.append({"label": label, "mode": mode, "steps": int(steps), by: bucket,
                         "accuracy": 100 * est.mean, "ci95": 100 * est.half_width, "episodes": est.n})
    return pd.DataFrame(rows, columns=["label", "mode", "steps", by, "accuracy", "ci95", "episodes"])


def _natural_key(bucket: str) -> tuple[float, str]:
    """Order "2" < "10" and "2" < "(2, 5]" < ">50" by the label's last number (a bucket's upper edge); words last."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", bucket)
    if not numbers:
        return (np.inf, bucket)
    return (float(numbers[-1]) + (0.5 if bucket.startswith(">") else 0.0), bucket)
