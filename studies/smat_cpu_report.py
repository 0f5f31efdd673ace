"""Report of the SMAT CPU study (docs/smat-cpu-study/report.md): tables, paired tests, the five answers, figures.

``collect`` copies each finished run's light files (manifest, config, episode rows, training log, probe tables;
no weights) into ``docs/smat-cpu-study/runs/<name>/``; ``write_report`` builds the report from those copies, so
it can be rebuilt from the repository alone. Reads results only (pandas, scipy, matplotlib; no torch).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from analysis.figures import _base as figbase
from analysis.figures.curves import learning_curves, plot_alignment, plot_learning_curves
from analysis.figures.expert_plots import plot_capacity, plot_dendrogram
from analysis.figures.sweep import plot_sparsity_tradeoff, sweep_summary
from analysis.load import ProbeMissing, load_manifests, load_probes, load_runs, load_train_log
from analysis.render import frame_to_markdown, to_markdown
from analysis.tables import results_table
from studies.smat_cpu_claims import Answer, claim_a, claim_b, claim_c, claim_d, claim_e, pooled, recipe_rows

__all__ = ["HEADER", "collect", "write_report"]

HEADER = """# SMAT at CPU scale: the paper's five claims, measured

Multi-domain meta-training a 2-core CPU runs: EfficientNet-Lite0 (ImageNet weights, the only pretrained backbone
that installs offline), 84 px, five training domains (noto's Latin, Cyrillic, Arabic, Devanagari and Thai scripts,
each its own source; their held-out test classes are in-domain), 1,000 meta-training tasks of 5-way 5-shot
10-query episodes per run, 4 tasks per update. Out of domain: four unseen scripts (Telugu, Greek, Khmer, Tamil)
near the training domains, and digits, MNIST and Fashion-MNIST far from them. Every learner is scored on the
same frozen suite `smat-cpu-study`: 100 episodes per source, 5-way 1-shot, 15 queries per class (1,200
episodes). SMAT, its sweep and its ablations share one recipe (`studies/smat_cpu.py`, `SMAT_RECIPE`). Each
claim is answered by a paired test on the same episodes: n is the number of episodes pooled over a domain's
sources, p two-sided.

Reproduce (Debian's `dataset-fashion-mnist` installed): `python studies/smat_cpu.py train --jobs 2`, then
`python studies/smat_cpu.py finetune --jobs 2` and `python studies/smat_cpu.py report` (`--jobs 2`: two runs at a
time, one torch thread each, as measured here). The light files of every run
(manifest, config, per-episode rows, training log, probes) are under `runs/` beside this report;
`python studies/smat_cpu.py report --from-docs` rebuilds it from them."""

LIGHT = ("manifest.json", "config.yaml", "episodes.parquet", "train_log.jsonl")
MAIN = "smat-tau0.9"
SWEEP = {0.5: "smat-tau0.5", 0.8: "smat-tau0.8", 0.9: MAIN, 0.95: "smat-tau0.95", 0.99: "smat-tau0.99"}
#: SMAT trained with the upstream code's dynamics, and with the paper's options unchanged (``studies/smat_cpu.py``)
RECIPES = ["smat-upstream-tau0.9", "smat-paper-recipe"]
FIXED = {"random": "smat_random", "magnitude": "smat_magnitude", "random, SMAT's allocation": "smat_random-alloc",
         "magnitude, SMAT's allocation": "smat_magnitude-alloc"}


def collect(runs_dir: Path, docs: Path) -> list[str]:
    """Copy the light files of every finished run under ``runs_dir`` to ``docs/runs/<name>/``."""
    copied = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if (p / "manifest.json").is_file()):
        if json.loads((run_dir / "manifest.json").read_text()).get("status") != "finished":
            continue
        target = docs / "runs" / run_dir.name
        (target / "probes").mkdir(parents=True, exist_ok=True)
        for name in LIGHT:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, target / name)
        for probe in (run_dir / "probes").glob("*.parquet"):
            shutil.copy2(probe, target / "probes" / probe.name)
        copied.append(run_dir.name)
    return copied


def _frame(run_dirs: Mapping[str, Path]) -> pd.DataFrame:
    manifests = load_manifests(run_dirs.values())
    labels = {run_id: Path(m["_run_dir"]).name for run_id, m in manifests.items()}
    return load_runs(run_dirs.values(), labels=labels)


def _tables(frame: pd.DataFrame) -> list[str]:
    out = []
    for mode, title in (("zero_shot", "Zero-shot"), ("full", "After full fine-tuning")):
        part = frame[frame["mode"] == mode]
        if len(part):
            out += [f"### {title} (accuracy %, mean ± 1.96·σ/√n over episodes)", "", to_markdown(results_table(part)),
                    ""]
    return out


def _figure(outcomes: list[str], fig_dir: Path, make) -> None:
    try:
        result = make()
    except (figbase.NoData, ProbeMissing, KeyError, ValueError) as err:
        outcomes.append(f"*(figure skipped: {err})*")
        return
    outcomes += [f"![{result.name}](figures/{result.png.name})", "", result.caption, ""]


def _density_figure(run_dirs: Mapping[str, Path], fig_dir: Path) -> figbase.FigureResult:
    """Measured mask sparsity and router entropy against tasks, one line per SMAT-family run."""
    fig, (ax_s, ax_h) = figbase.new_figure(ncols=2)
    for label, run_dir in run_dirs.items():
        log = load_train_log(run_dir)
        if log.empty or "sparsity" not in log or "alpha_entropy" not in log:
            continue
        rows = log.dropna(subset=["sparsity"])
        ax_s.plot(rows["tasks"], rows["sparsity"], label=label)
        ax_h.plot(rows["tasks"], rows["alpha_entropy"], label=label)
    ax_s.set(xlabel="meta-training tasks", ylabel="measured sparsity (mean over experts)", title="mask sparsity")
    ax_h.set(xlabel="meta-training tasks", ylabel="router entropy (nats; log 8 = 2.08 uniform)", title="router")
    if ax_s.lines:
        ax_s.legend(fontsize=6)
    caption = ("Training dynamics from train_log.jsonl: the share of zero gates averaged over the experts (left) and "
               "the entropy of the router's merge weights α, mean over the meta-batch (right).")
    return figbase.save_figure(fig, fig_dir, "training_dynamics", caption)


def _usage_table(run_dir: Path) -> str:
    scores = load_probes(run_dir, "expert_scores")
    usage = scores.pivot_table(index="source", columns="expert", values="alpha", aggfunc="mean", sort=False)
    usage.columns = [f"α{c}" for c in usage.columns]
    return frame_to_markdown(usage.reset_index(), digits=3)


def _diagnostics(run_dirs: Mapping[str, Path]) -> list[str]:
    rows = []
    for label, run_dir in run_dirs.items():
        log = load_train_log(run_dir)
        if log.empty or "delta_norm" not in log:
            continue
        last = log.dropna(subset=["delta_norm"]).iloc[-1]
        densities = [last[c] for c in log.columns if c.startswith("density_")]
        rows.append({"run": label, "tasks": int(last["tasks"]), "sparsity": last["sparsity"],
                     "expert densities (min–max)": f"{min(densities):.3f}–{max(densities):.3f}",
                     "router entropy": last["alpha_entropy"], "largest mean α": last["alpha_max"],
                     "‖δ‖": last["delta_norm"]})
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]),
            *("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |"
              for r in rows)] if rows else ["*(no SMAT-family training logs yet)*"]


def _answers(answers: list[Answer]) -> list[str]:
    lines = ["| claim | answer | evidence |", "|---|---|---|"]
    lines += [f"| {a.claim} | **{a.verdict}** | {a.evidence} |" for a in answers]
    return lines


def _figures(frame: pd.DataFrame, run_dirs: Mapping[str, Path], fig_dir: Path) -> list[str]:
    out: list[str] = []
    sweep = {t: run_dirs[label] for t, label in SWEEP.items() if label in run_dirs}
    manifests = load_manifests(sweep.values())
    sweep_frame = frame[frame["label"].isin([SWEEP[t] for t in sweep])]
    _figure(out, fig_dir, lambda: plot_sparsity_tradeoff(
        sweep_summary(sweep_frame, manifests, key="learner.sparsity"), fig_dir, "learner.sparsity"))
    alignment = []
    for tau, run_dir in sweep.items():
        try:
            alignment.append(load_probes(run_dir, "grad_alignment").assign(sparsity=tau))
        except ProbeMissing:
            continue
    _figure(out, fig_dir, lambda: plot_alignment(pd.concat(alignment) if alignment else pd.DataFrame(), fig_dir))
    curves = learning_curves({label: load_train_log(d) for label, d in run_dirs.items()})
    _figure(out, fig_dir, lambda: plot_learning_curves(curves, fig_dir, baseline="pmf" if "pmf" in run_dirs else None))
    if MAIN in run_dirs:
        _figure(out, fig_dir, lambda: plot_dendrogram(load_probes(run_dirs[MAIN], "expert_scores"), fig_dir))
        _figure(out, fig_dir, lambda: plot_capacity(load_probes(run_dirs[MAIN], "mask_stats"), fig_dir))
    smat_family = {label: d for label, d in run_dirs.items() if label.startswith(("smat", "softmerge"))}
    _figure(out, fig_dir, lambda: _density_figure(smat_family, fig_dir))
    return out


def _extra_comparisons(frame: pd.DataFrame) -> list[str]:
    pairs = [(MAIN, "pmf"), (MAIN, "pre"), (MAIN, "softmerge"), (MAIN, "lora"), ("pmf", "pre"), ("lora", "pmf"),
             ("softmerge", "pmf"), ("smat-upstream-tau0.9", "pmf")]
    lines = ["| a − b | domain | mode | n | diff (points) | 95% CI | p (t) | p (Wilcoxon) |",
             "|---|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        for mode in ("zero_shot", "full"):
            for domain in ("ID", "OOD", "OOD near", "OOD far"):
                r = pooled(frame, a, b, domain, mode)
                if r is not None:
                    lines.append(f"| {a} − {b} | {domain} | {mode} | {int(r['n'])} | {r['diff']:+.2f} | "
                                 f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {r['p_t']:.2g} | "
                                 f"{r['p_wilcoxon']:.2g} |")
    return lines


def _recipes(frame: pd.DataFrame, run_dirs: Mapping[str, Path]) -> list[str]:
    """SMAT's study recipe against upstream's dynamics and the paper's options: accuracy and routing."""
    rows = recipe_rows(frame, run_dirs, MAIN, RECIPES)
    if len(rows) < 2:
        return ["*(the upstream-recipe runs have not finished)*"]

    def vs(row: dict, domain: str) -> str:
        r = row.get(f"{domain} vs {MAIN}")
        return "—" if r is None else f"{r['diff']:+.2f} (p = {r['p_t']:.2g})"

    lines = [f"| run | ID | OOD | ID − {MAIN} | OOD − {MAIN} | OOD near − {MAIN} | OOD far − {MAIN} | experts used | "
             "collapsed sources | by-source ratio (p) |", "|---|---:|---:|---|---|---|---|---:|---:|---|"]
    for row in rows:
        usage, clusters = row.get("usage"), row.get("clustering")
        routing = (f"{usage['effective_experts']:.2f} | {usage['collapsed_sources']} of {usage['sources']} | "
                   f"{clusters['ratio']:.3f} ({clusters['p']:.2g})" if usage and clusters else "— | — | —")
        means = " | ".join(f"{row.get(f'{d} mean', float('nan')):.2f}" for d in ("ID", "OOD"))
        diffs = " | ".join(vs(row, d) for d in ("ID", "OOD", "OOD near", "OOD far"))
        lines.append(f"| {row['run']} | {means} | {diffs} | {routing} |")
    n = {d: int(r["n"]) for d in ("ID", "OOD") if (r := rows[1].get(f"{d} vs {MAIN}")) is not None}
    lines += ["", f"Zero-shot accuracy (%); differences are paired over the same episodes (n = {n.get('ID')} ID, "
              f"{n.get('OOD')} OOD); experts used = exp(entropy) of the mean α over the 1,200 evaluation episodes; "
              "a source is collapsed when one expert takes over 90% of its mean α; ratio = within/between-source "
              "cosine distance of per-episode α (1 = no clustering), permutation p."]
    return lines


def write_report(docs: Path, header: str) -> Path:
    """Build ``docs/report.md`` (and figures/) from the run copies under ``docs/runs``."""
    run_dirs = {p.name: p for p in sorted((docs / "runs").iterdir()) if (p / "episodes.parquet").is_file()}
    fig_dir = docs / "figures"
    frame = _frame(run_dirs)
    sweep_dirs = {t: run_dirs[label] for t, label in SWEEP.items() if label in run_dirs}
    answers = [claim_a(frame, MAIN), claim_b(frame, SWEEP),
               claim_c(frame, MAIN, {k: v for k, v in FIXED.items()}), claim_d(run_dirs.get(MAIN), sweep_dirs),
               claim_e(run_dirs, SWEEP, MAIN)]
    missing = [name for name in ("pre", "pmf", "lora", *SWEEP.values(), "softmerge", *FIXED.values())
               if name not in run_dirs]
    lines = [header, "", "## The five claims", "", *_answers(answers), ""]
    if missing:
        lines += [f"Runs not finished yet: {', '.join(missing)} (the claims that need them say so).", ""]
    lines += ["## Results", "", *_tables(frame), "## Other paired comparisons", "", *_extra_comparisons(frame), "",
              "## SMAT's recipe: the study's, upstream's dynamics, the paper's options", "", *_recipes(frame, run_dirs),
              "", "## Why: training dynamics at the end of meta-training", "", *_diagnostics(run_dirs), ""]
    if MAIN in run_dirs:
        try:
            lines += [f"Mean router weight per expert and source ({MAIN}, evaluation episodes):", "",
                      _usage_table(run_dirs[MAIN]), ""]
        except ProbeMissing:
            pass
    lines += ["## Figures", "", *_figures(frame, run_dirs, fig_dir)]
    report = docs / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
