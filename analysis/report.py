"""``write_report``: every table and figure of a set of runs, as one self-contained HTML page and a Markdown page.

Written into ``out``: ``report.html`` (figures embedded as base64 PNG), ``report.md`` (relative links to
``figures/*.png``), ``figures/*.png|svg``, and the tables as files: ``results.{md,tex,csv}``, ``paired.csv``,
``breakdown_<by>.csv``, ``sweep_<learner>.csv``, ``speedup.csv``. Figures without data are skipped with a note.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import figures as figs
from analysis.compare import breakdown, paired_comparison
from analysis.load import ProbeMissing, load_manifests, load_probes, load_runs, load_train_log, run_labels
from analysis.render import frame_to_html, frame_to_markdown, to_csv, to_html, to_latex, to_markdown
from analysis.report_page import Section, Skipped, provenance_section, render_html, render_markdown
from analysis.tables import results_table
from episodes.atomic import atomic_write
from metabench.results import ResultsError

__all__ = ["Skipped", "write_report"]

log = logging.getLogger(__name__)
PAIRED_COLUMNS = ["level", "name", "mode", "steps", "n", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "p_t",
                  "p_wilcoxon"]
REPORT_BREAKDOWNS = ("way", "shots_per_class", "imbalance")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _attempt(name: str, make: Callable[[], figs.FigureResult]) -> figs.FigureResult | Skipped:
    try:
        return replace(make(), name=name)
    except (figs.NoData, ProbeMissing) as err:
        return Skipped(name, str(err))
    except ResultsError as err:  # a malformed probe file: say so, keep the rest of the report
        log.warning("Figure %s skipped: %s", name, err)
        return Skipped(name, f"unreadable input: {err}")


def _results_section(frame: pd.DataFrame, out: Path) -> Section:
    table = results_table(frame)
    for ext, text in (("md", to_markdown(table)), ("tex", to_latex(table)), ("csv", to_csv(table))):
        atomic_write(out / f"results.{ext}", text)
    return Section("Results", to_html(table), to_markdown(table))


def _paired_section(frame: pd.DataFrame, baseline: str, out: Path) -> Section:
    others = [lab for lab in dict.fromkeys(frame["label"]) if lab != baseline]
    if not others:
        return Section("Paired comparisons", "<p>One setting only: nothing to compare.</p>",
                       "One setting only: nothing to compare.\n")
    parts = [paired_comparison(frame, other, baseline).assign(a=other, b=baseline) for other in others]
    paired = pd.concat(parts, ignore_index=True)
    atomic_write(out / "paired.csv", paired.to_csv(index=False, float_format="%.6g"))
    intro = (f"Each setting minus <b>{baseline}</b> on the episodes both evaluated (joined on source, episode_id, "
             "mode, steps), in percent points: mean difference with its 95% t-interval, paired t-test p (p_t) and "
             "Wilcoxon signed-rank p (p_wilcoxon); domain and 'all' rows pool the episodes.")
    html, md = [f"<p>{intro}</p>"], [re.sub(r"</?b>", "**", intro) + "\n"]
    for other, part in zip(others, parts):
        html.append(f"<h3>{other} − {baseline}</h3>" + frame_to_html(part[PAIRED_COLUMNS], digits=3))
        md.append(f"### {other} − {baseline}\n\n" + frame_to_markdown(part[PAIRED_COLUMNS], digits=3))
    return Section("Paired comparisons", "".join(html), "\n".join(md))


def _breakdown_section(frame: pd.DataFrame, out: Path) -> Section:
    html, md = [], []
    for by in REPORT_BREAKDOWNS:
        table = breakdown(frame, by)
        atomic_write(out / f"breakdown_{by}.csv", table.to_csv(index=False, float_format="%.4f"))
        html.append(f"<h3>by {by}</h3>" + frame_to_html(table))
        md.append(f"### by {by}\n\n" + frame_to_markdown(table))
    note = ("Accuracy (%) ± 1.96·σ/√n over all evaluated episodes of each setting (all sources pooled). "
            "shots_per_class = support images / way; imbalance = max − min of the classes' shares of the "
            "support set (Meta-Dataset's analyze.py), 'balanced' when 0.")
    return Section("Breakdowns", f"<p>{note}</p>" + "".join(html), note + "\n\n" + "\n".join(md))


def _sweep_figures(frame: pd.DataFrame, manifests: dict[str, dict[str, Any]], fig_dir: Path, out: Path,
                   sweep_key: str | None, sweep_group: str | None = None) -> list[figs.FigureResult | Skipped]:
    by_learner: dict[str, dict[str, dict[str, Any]]] = {}
    for run_id, manifest in manifests.items():
        learner = str(manifest.get("config", {}).get("learner", {}).get("name", "?"))
        by_learner.setdefault(learner, {})[run_id] = manifest
    results: list[figs.FigureResult | Skipped] = []
    for learner, group in by_learner.items():
        if len(group) < 2:
            continue

        def make(group: dict = group, learner: str = learner) -> figs.FigureResult:
            key = sweep_key or figs.swept_key(group)
            summary = figs.sweep_summary(frame, group, key, group_key=sweep_group)
            atomic_write(out / f"sweep_{_slug(learner)}.csv", summary.to_csv(index=False, float_format="%.4f"))
            return figs.plot_sparsity_tradeoff(summary, fig_dir, key, name=f"sparsity_tradeoff_{_slug(learner)}")

        results.append(_attempt(f"sparsity trade-off ({learner})", make))
    return results or [Skipped("sparsity trade-off", "needs at least 2 runs of one learner that differ in one "
                                                     "numeric config key (a sweep).")]


def _probe_frames(run_dirs: dict[str, Path], name: str, title: str) -> tuple[dict[str, pd.DataFrame], list[Skipped]]:
    """Each run's probe frame; runs without the file are left out, unreadable files become notes."""
    found, notes = {}, []
    for label, run_dir in run_dirs.items():
        try:
            found[label] = load_probes(run_dir, name)
        except ProbeMissing:
            continue
        except ResultsError as err:
            log.warning("Figure %s (%s) skipped: %s", title, label, err)
            notes.append(Skipped(f"{title} ({label})", f"unreadable input: {err}"))
    return found, notes


def _expert_figures(run_dirs: dict[str, Path], fig_dir: Path) -> list[figs.FigureResult | Skipped]:
    plots = (("expert capacity", "mask_stats", figs.plot_capacity, "expert_capacity"),
             ("mask overlap", "mask_overlap", figs.plot_overlap, "mask_overlap"),
             ("task dendrogram", "expert_scores", figs.plot_dendrogram, "task_dendrogram"))
    results: list[figs.FigureResult | Skipped] = []
    for title, probe, plot, stem in plots:
        frames, notes = _probe_frames(run_dirs, probe, title)
        results += notes
        if not frames and not notes:
            results.append(Skipped(title, f"no run has probes/{probe}.parquet (learners without experts, e.g. "
                                          "pre or PMF, write none)."))
        for label, data in frames.items():
            results.append(_attempt(f"{title} ({label})",
                                    lambda d=data, s=stem, lab=label, p=plot: p(d, fig_dir, name=f"{s}_{_slug(lab)}")))
    return results


def _alignment_figure(run_dirs: dict[str, Path], fig_dir: Path) -> list[figs.FigureResult | Skipped]:
    found, notes = _probe_frames(run_dirs, "grad_alignment", "meta-gradient alignment")

    def make() -> figs.FigureResult:
        frames = [f if "label" in f.columns else f.assign(label=label) for label, f in found.items()]
        if not frames:
            raise figs.NoData("no run has probes/grad_alignment.parquet.")
        return figs.plot_alignment(pd.concat(frames, ignore_index=True), fig_dir)

    return [*notes, _attempt("meta-gradient alignment", make)]


def _curve_figure(run_dirs: dict[str, Path], baseline: str, fig_dir: Path, out: Path) -> figs.FigureResult | Skipped:
    def make() -> figs.FigureResult:
        curves = figs.learning_curves({label: load_train_log(d) for label, d in run_dirs.items()})
        has_base = bool((curves["label"] == baseline).any()) and curves["val_id"].notna().any()
        if has_base:
            atomic_write(out / "speedup.csv", figs.speedup(curves, baseline).to_csv(index=False, float_format="%.4f"))
        return figs.plot_learning_curves(curves, fig_dir, baseline=baseline if has_base else None)

    return _attempt("learning curves", make)


def write_report(run_dirs: Sequence[str | Path], out: str | Path, *, baseline: str | None = None,
                 sweep_key: str | None = None, sweep_group: str | None = None) -> Path:
    """Write the report of ``run_dirs`` into the folder ``out``; returns the path of ``report.html``.

    Args:
        run_dirs: run folders written by ``metabench run``.
        out: output folder (created; existing report files are replaced).
        baseline: run label that paired comparisons and the speed-up are measured against (default: first run).
        sweep_key: the config key a sweep varies (default: detected per learner, see ``figures.swept_key``).
        sweep_group: a second swept key; the trade-off figure draws one line per value of it.
    """
    out = Path(out)
    fig_dir = out / "figures"
    out.mkdir(parents=True, exist_ok=True)
    manifests = load_manifests(run_dirs)
    labels = run_labels(manifests)
    frame = load_runs(run_dirs)
    by_label = {labels[r]: Path(m["_run_dir"]) for r, m in manifests.items()}
    baseline = baseline or next(iter(by_label))
    if baseline not in by_label:
        raise ValueError(f'Baseline "{baseline}" is not one of the runs\' labels: {", ".join(by_label)}.')
    sections = []
    if not frame.empty:
        sections += [_results_section(frame, out), _paired_section(frame, baseline, out),
                     _breakdown_section(frame, out)]
    else:
        sections.append(Section("Results", "<p>No run has evaluated episodes.</p>", "No run has evaluated episodes.\n"))
    outcomes = [*_sweep_figures(frame, manifests, fig_dir, out, sweep_key, sweep_group),
                *_alignment_figure(by_label, fig_dir),
                *_expert_figures(by_label, fig_dir), _curve_figure(by_label, baseline, fig_dir, out)]
    sections.append(provenance_section(manifests, labels))
    atomic_write(out / "report.md", render_markdown(manifests, labels, sections, outcomes, out))
    path = out / "report.html"
    atomic_write(path, render_html(manifests, labels, sections, outcomes))
    log.info("Wrote %s", path)
    return path
