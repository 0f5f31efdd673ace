"""The five claims of the SMAT paper, each answered from the study's runs with paired tests (no torch).

Every answer is computed from per-episode rows of runs evaluated on the same frozen episodes
(``analysis.compare.paired_comparison``: pooled over a domain's episodes, paired t-test and Wilcoxon), or
from the runs' probes and training logs. A claim whose runs are missing is reported as not measured.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from scipy.spatial.distance import pdist, squareform

from analysis.compare import paired_comparison
from analysis.figures.curves import learning_curves, speedup
from analysis.load import ProbeMissing, load_probes, load_train_log

__all__ = ["FAR_OOD", "GROUPS", "NEAR_OOD", "Answer", "claim_a", "claim_b", "claim_c", "claim_d", "claim_e", "pooled",
           "recipe_rows"]

ALPHA = 0.05


@dataclass
class Answer:
    """One claim's verdict ("yes", "no", "not measured"), a sentence of evidence, and its numbers."""

    claim: str
    verdict: str
    evidence: str
    rows: list[dict] = field(default_factory=list)


#: Out-of-domain sources near the training scripts (unseen scripts) and far from them (digits, clothing).
NEAR_OOD: tuple[str, ...] = ("noto_telugu", "noto_greek", "noto_khmer", "noto_tamil")
FAR_OOD: tuple[str, ...] = ("digits", "mnist", "fashion_mnist")
GROUPS: dict[str, tuple[str, ...]] = {"OOD near": NEAR_OOD, "OOD far": FAR_OOD}


def pooled(frame: pd.DataFrame, a: str, b: str, domain: str, mode: str = "zero_shot") -> dict | None:
    """``a − b`` on the shared episodes of a domain ("ID", "OOD", or a group of ``GROUPS``), pooled; None if a
    run is missing or has no rows of ``mode`` (a run never fine-tuned)."""
    part = frame[frame["mode"] == mode]
    if not {a, b} <= set(part["label"]):
        return None
    if domain in GROUPS:
        part = part[part["source"].isin(GROUPS[domain])]
    table = paired_comparison(part, a, b)
    name = "OOD" if domain in GROUPS else domain
    row = table[(table["level"] == "domain") & (table["name"] == f"{name} (pooled)")]
    return {"a": a, "b": b, "domain": domain, "mode": mode, **row.iloc[0].to_dict()} if len(row) else None


def _fmt(r: dict) -> str:
    return (f"{r['a']} − {r['b']} = {r['diff']:+.2f} points [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}], "
            f"p = {r['p_t']:.2g} (Wilcoxon {r['p_wilcoxon']:.2g}), n = {int(r['n'])}")


def _better(r: dict) -> bool:
    return r["diff"] > 0 and r["p_t"] < ALPHA


def _missing(claim: str, names: list[str]) -> Answer:
    return Answer(claim, "not measured", f"runs missing: {', '.join(names)}.")


def claim_a(frame: pd.DataFrame, smat: str, pmf: str = "pmf") -> Answer:
    """(a) SMAT >= PMF out of domain, zero-shot and after full fine-tuning."""
    claim = "(a) SMAT ≥ PMF out of domain (zero-shot; after full fine-tuning)"
    rows = [{**r, "group": domain} for mode in ("zero_shot", "full") for domain in ("OOD", *GROUPS)
            if (r := pooled(frame, smat, pmf, domain, mode)) is not None]
    if not rows:
        return _missing(claim, [smat, pmf])
    zero = rows[0]
    if _better(zero):
        verdict = "yes"
    elif zero["diff"] < 0 and zero["p_t"] < ALPHA:
        verdict = "no (PMF is better)"
    else:
        verdict = "no (no significant difference)"
    wins = [f"{r['group']} {r['mode']}" for r in rows if r["group"] != "OOD" and _better(r)]
    if wins and verdict != "yes":
        verdict += f"; SMAT is better on {', '.join(wins)}"
    return Answer(claim, verdict, "; ".join(f"{r['mode']}, {r['group']}: {_fmt(r)}" for r in rows), rows)


def spearman(x: list[float], y: list[float]) -> tuple[float, float]:
    """Spearman's rho and its two-sided p: exact over every ordering of ``y`` for up to 8 points (a sweep of a few
    runs, where the t approximation is meaningless), scipy's otherwise."""
    rho = float(stats.spearmanr(x, y).statistic)
    if len(x) > 8:
        return rho, float(stats.spearmanr(x, y).pvalue)
    null = [float(stats.spearmanr(x, list(perm)).statistic) for perm in itertools.permutations(y)]
    return rho, float(np.mean([abs(r) >= abs(rho) - 1e-12 for r in null]))


def _sweep_means(frame: pd.DataFrame, runs: Mapping[float, str], domain: str) -> dict[float, float]:
    out = {}
    for tau, label in runs.items():
        part = frame[(frame["label"] == label) & (frame["mode"] == "zero_shot") & (frame["domain"] == domain.lower())]
        if len(part):
            out[tau] = float(part.groupby("source")["accuracy"].mean().mean() * 100)
    return out


def claim_b(frame: pd.DataFrame, runs: Mapping[float, str]) -> Answer:
    """(b) ID rises as sparsity falls; OOD peaks at an interior tau."""
    claim = "(b) sparsity trades ID against OOD: ID rises as τ falls, OOD peaks at an interior τ"
    present = {t: label for t, label in runs.items() if label in set(frame["label"])}
    if len(present) < 3:
        return _missing(claim, [label for label in runs.values() if label not in set(frame["label"])])
    taus = sorted(present)
    id_means, ood_means = _sweep_means(frame, present, "ID"), _sweep_means(frame, present, "OOD")
    rho_id, p_id = spearman(taus, [id_means[t] for t in taus])
    lo, hi = present[taus[0]], present[taus[-1]]
    id_trend = pooled(frame, lo, hi, "ID")
    peak = max(taus, key=lambda t: ood_means[t])
    interior = taus[0] < peak < taus[-1]
    peak_tests = [r for end in (taus[0], taus[-1]) if end != peak
                  and (r := pooled(frame, present[peak], present[end], "OOD")) is not None]
    id_yes = id_trend is not None and _better(id_trend) and rho_id < 0
    ood_yes = interior and all(_better(r) for r in peak_tests)
    verdict = "yes" if id_yes and ood_yes else ("partly" if id_yes or ood_yes else "no")
    sweep = ", ".join(f"τ {t:g}: ID {id_means[t]:.2f} / OOD {ood_means[t]:.2f}" for t in taus)
    evidence = (f"{sweep}. ID vs τ: Spearman ρ = {rho_id:+.2f} (exact p = {p_id:.2g}) over {len(taus)} runs; "
                f"{_fmt(id_trend) if id_trend else 'no paired ID test'} (ID {'rises' if id_yes else 'does not rise'} "
                f"as τ falls). OOD peaks at τ = {peak:g} ({'interior' if interior else 'an end of the sweep'})"
                + (": " + "; ".join(_fmt(r) for r in peak_tests) if peak_tests else "") +
                ". The peak is chosen on the test episodes, so its p-values are optimistic.")
    return Answer(claim, verdict, evidence, [r for r in [id_trend, *peak_tests] if r])


def claim_c(frame: pd.DataFrame, smat: str, fixed: Mapping[str, str]) -> Answer:
    """(c) Learned masks beat random and magnitude masks at equal tau (and at equal allocation)."""
    claim = "(c) learned masks beat hand-designed ones (random, magnitude) at equal τ and at equal allocation"
    rows = [r for name in fixed.values() for domain in ("ID", "OOD") if (r := pooled(frame, smat, name, domain))]
    if not rows:
        return _missing(claim, [smat, *fixed.values()])
    wins = [r for r in rows if _better(r)]
    losses = [r for r in rows if r["diff"] < 0 and r["p_t"] < ALPHA]
    verdict = "yes" if len(wins) == len(rows) else ("no" if not wins else "partly")
    evidence = "; ".join(f"{r['domain']}: {_fmt(r)}" for r in rows)
    if losses:
        evidence += f". Significantly worse in {len(losses)} of {len(rows)} comparisons."
    return Answer(claim, verdict, evidence, rows)


def domain_clustering(scores: pd.DataFrame, group: str = "source", permutations: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """Within/between-group cosine-distance ratio of per-episode router weights alpha, with a permutation p.

    ratio < 1: episodes of one group have more similar alpha than episodes of different groups. p = share of
    label permutations whose ratio is at most the observed one (one-sided).
    """
    keys = list(dict.fromkeys(["episode_id", "source", group]))
    wide = scores.pivot_table(index=keys, columns="expert", values="alpha").reset_index()
    labels = wide[group].to_numpy()
    distances = squareform(pdist(wide.drop(columns=keys).to_numpy(float), metric="cosine"))  # zero diagonal
    n, total = len(labels), distances.sum()
    codes = pd.factorize(labels)[0]
    sizes = np.bincount(codes)
    within_pairs = float((sizes * (sizes - 1)).sum())
    between_pairs = n * (n - 1) - within_pairs

    def ratio(lab: np.ndarray) -> float:  # one matrix product per labelling: sum of D over same-group pairs
        onehot = np.eye(len(sizes))[lab]
        within = float(((distances @ onehot) * onehot).sum())
        return float((within / within_pairs) / ((total - within) / between_pairs))

    observed = ratio(codes)
    rng = np.random.default_rng(seed)
    null = np.array([ratio(rng.permutation(codes)) for _ in range(permutations)])
    return {"ratio": observed, "p": float((1 + (null <= observed).sum()) / (1 + permutations)),
            "null_mean": float(null.mean()), "episodes": len(labels), "groups": len(set(labels))}


def _routing(run_dir: Path | None) -> pd.DataFrame | None:
    try:
        scores = load_probes(run_dir, "expert_scores") if run_dir is not None else None
    except ProbeMissing:
        return None
    return None if scores is None or scores.empty else scores


def claim_d(run_dir: Path | None, sweep: Mapping[float, Path] | None = None, main_tau: float = 0.9) -> Answer:
    """(d) Expert scores cluster tasks by domain: the main run's answer, and how routing changes across ``sweep``
    (tau -> run folder; a run whose router spreads over the experts can cluster where a collapsed one cannot)."""
    claim = "(d) expert scores cluster tasks by domain"
    scores = _routing(run_dir)
    if scores is None:
        return _missing(claim, ["expert scores of the main SMAT run"])
    by_source = domain_clustering(scores, "source")
    by_id = domain_clustering(scores, "domain")
    clustered = by_source["ratio"] < 1 and by_source["p"] < ALPHA
    usage = routing_usage(scores)
    collapsed = usage["collapsed_sources"] > usage["sources"] / 2
    verdict = "no" if not clustered else ("weakly: the router is nearly collapsed" if collapsed else "yes")
    evidence = (f"τ {main_tau:g}: within/between-source cosine-distance ratio of per-episode α = "
                f"{by_source['ratio']:.3f} (permutation p = {by_source['p']:.3g}, {by_source['episodes']} episodes of "
                f"{by_source['groups']} sources; 1 = no clustering); by ID/OOD: {by_id['ratio']:.3f} "
                f"(p = {by_id['p']:.3g}); but one expert takes over 90% of the mean α for "
                f"{usage['collapsed_sources']} of {usage['sources']} sources (effective number of experts used "
                f"{usage['effective_experts']:.2f} of {usage['experts']})")
    rows = [dict(level="source", **by_source), dict(level="domain", **by_id), dict(level="usage", **usage)]
    others, spread = [], []
    for tau, folder in sorted((sweep or {}).items()):
        other = _routing(folder) if tau != main_tau else None
        if other is None:
            continue
        clusters, used = domain_clustering(other, "source"), routing_usage(other)
        rows.append(dict(level="source", tau=tau, **clusters, **{f"usage_{k}": v for k, v in used.items()}))
        others.append(f"τ {tau:g}: ratio {clusters['ratio']:.3f} (p = {clusters['p']:.3g}), "
                      f"{used['effective_experts']:.2f} experts used, {used['collapsed_sources']} of "
                      f"{used['sources']} sources collapsed")
        if clusters["ratio"] < 1 and clusters["p"] < ALPHA and used["collapsed_sources"] == 0:
            spread.append(f"{tau:g}")
    if collapsed and clustered and spread:
        verdict = f"weakly at τ {main_tau:g} (router collapsed); yes at τ {', '.join(spread)} (router spread)"
    if others:
        evidence += ". Across the sweep: " + "; ".join(others)
        used_by_tau = {main_tau: usage["effective_experts"],
                       **{r["tau"]: r["usage_effective_experts"] for r in rows if "tau" in r}}
        if len(used_by_tau) > 2:
            taus = sorted(used_by_tau)
            rho, p = spearman(taus, [used_by_tau[t] for t in taus])
            evidence += f"; experts used vs τ: Spearman ρ = {rho:+.2f} (exact p = {p:.2g}, {len(taus)} runs)"
    return Answer(claim, verdict, evidence, rows)


def routing_usage(scores: pd.DataFrame) -> dict[str, float]:
    """How many experts the router really uses: per source, the mean α's largest share (``collapsed`` above 0.9);
    overall, exp(entropy) of the mean α over every episode (1 = a single expert, M = uniform)."""
    per_source = scores.pivot_table(index="source", columns="expert", values="alpha", aggfunc="mean")
    overall = scores.groupby("expert")["alpha"].mean()
    p = (overall / overall.sum()).to_numpy()
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    return {"sources": int(len(per_source)), "experts": int(per_source.shape[1]),
            "collapsed_sources": int((per_source.max(axis=1) > 0.9).sum()), "effective_experts": float(np.exp(entropy))}


def _alignment(run_dir: Path) -> pd.DataFrame | None:
    try:
        frame = load_probes(run_dir, "grad_alignment")
    except ProbeMissing:
        return None
    return frame[frame["param_group"] == "delta"]


def claim_e(run_dirs: Mapping[str, Path], runs: Mapping[float, str], smat: str, pmf: str = "pmf") -> Answer:
    """(e) Higher sparsity aligns task meta-gradients better; SMAT reaches PMF's ID accuracy in fewer tasks."""
    claim = "(e) higher τ aligns meta-gradients better; SMAT reaches PMF's ID accuracy in fewer tasks"
    curves = {t: a for t, label in runs.items() if label in run_dirs and (a := _alignment(run_dirs[label])) is not None
              and len(a)}
    if len(curves) < 2 or smat not in run_dirs or pmf not in run_dirs:
        return _missing(claim, [label for label in [*runs.values(), pmf] if label not in run_dirs])
    taus = sorted(curves)
    means = {t: float(curves[t]["alignment"].mean()) for t in taus}
    rho = spearman(taus, [means[t] for t in taus]) if len(taus) > 2 else None
    hi, lo = (curves[taus[-1]].groupby("tasks_seen")["alignment"].mean(),
              curves[taus[0]].groupby("tasks_seen")["alignment"].mean())
    common = hi.index.intersection(lo.index)
    paired = stats.wilcoxon(hi[common] - lo[common]) if len(common) > 1 else None
    aligned = (rho is None or rho[0] > 0) and hi[common].mean() > lo[common].mean() and paired is not None \
        and paired.pvalue < ALPHA
    learning = learning_curves({lab: load_train_log(run_dirs[lab]) for lab in (pmf, smat)})
    table = speedup(learning, pmf)
    row = table[table["label"] == smat].iloc[0]
    final_ood = {lab: float(c.dropna(subset=["val_ood"])["val_ood"].iloc[-1]) * 100
                 for lab, c in learning.groupby("label") if c["val_ood"].notna().any()}
    faster = not math.isnan(row["tasks_to_target"]) and row["tasks_to_target"] < row["baseline_tasks"]
    verdict = "yes" if aligned and faster else ("partly" if aligned or faster else "no")
    evidence = (", ".join(f"τ {t:g}: {means[t]:.4f}" for t in taus) + " (mean alignment of the shared delta's "
                "per-task meta-gradients over training)"
                + (f"; Spearman ρ(τ, alignment) = {rho[0]:+.2f} (exact p = {rho[1]:.2g})" if rho is not None else "")
                + (f"; τ {taus[-1]:g} − τ {taus[0]:g} over {len(common)} matched probes: "
                   f"{(hi[common] - lo[common]).mean():+.4f}, Wilcoxon p = {paired.pvalue:.3g}" if paired else "")
                + f". {smat} reaches {pmf}'s final validation ID accuracy ({row['target']:.2f}%, first reached by "
                f"{pmf} at {row['baseline_tasks']:g} tasks) "
                + (f"at {row['tasks_to_target']:g} tasks" if faster or not math.isnan(row["tasks_to_target"])
                   else "never within the run") + "."
                + (f" Final validation OOD accuracy: {smat} {final_ood[smat]:.2f}%, {pmf} {final_ood[pmf]:.2f}%."
                   if smat in final_ood and pmf in final_ood else ""))
    return Answer(claim, verdict, evidence, [{"tau": t, "alignment": means[t]} for t in taus])


def recipe_rows(frame: pd.DataFrame, run_dirs: Mapping[str, Path], main: str, variants: list[str]) -> list[dict]:
    """One row per SMAT recipe (``main`` first, then each variant that finished): zero-shot ID and OOD means, each
    variant's paired difference to ``main``, and its routing (experts used, collapsed sources, clustering by
    source): whether upstream's dynamics change what claims (a) and (d) measure."""
    rows = []
    for label in [main, *variants]:
        if label not in run_dirs or label not in set(frame["label"]):
            continue
        row: dict = {"run": label, **{f"{d} mean": mean for d in ("ID", "OOD")
                                      for mean in _sweep_means(frame, {0.0: label}, d).values()}}
        for domain in ("ID", "OOD", "OOD near", "OOD far"):
            diff = pooled(frame, label, main, domain) if label != main else None
            if diff is not None:
                row[f"{domain} vs {main}"] = diff
        scores = _routing(run_dirs[label])
        if scores is not None:
            row.update(usage=routing_usage(scores), clustering=domain_clustering(scores, "source"))
        rows.append(row)
    return rows
