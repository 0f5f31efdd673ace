"""Scaling: seconds per meta-training step and per zero-shot episode as the support set grows (25 -> 500).

Support sizes follow way x shot (5x5, 10x5, 10x10, 20x10, 50x10; 5 queries per class) on ``noto``
training episodes. At every size the learners are timed in alternating order on the same episodes;
the slope of log(seconds) on log(support size) says how each learner's cost grows (1.0 = linear).
The figure goes next to the JSON as ``scaling.png``.

    python -m benchmarks.scaling [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    Mode,
    abba,
    build_learners,
    device,
    fixed_episodes,
    image_size_of,
    print_table,
    quiet_logs,
    run_standalone,
    standalone_parser,
    suite_result,
    summary,
    timed,
    zero_shot_episode,
)

SHAPES: tuple[tuple[int, int], ...] = ((5, 5), (10, 5), (10, 10), (20, 10), (50, 10))  # (way, shot)
QUERY = 5
#: label -> (learner, options); smat uses structured masks, whose memory stays near PMF's at 500 images
LEARNERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pre": ("pre", {}),
    "pmf": ("pmf", {}),
    "lora": ("lora", {}),
    "smat": ("smat", {"structured": True}),
}
BUDGETS: dict[str, dict[str, Any]] = {  # backbone -> (rounds, largest support size, warm up at every size)
    "smoke": {"vit_test": (1, 50, False)},
    "quick": {"vit_test": (2, 500, True)},
    "full": {"vit_test": (3, 500, True), "vit_small": (1, 100, False)},
}
GPU_LARGEST = 500






def _zero_shot(learner: Any, ep: Any) -> None:
    learner.eval()
    zero_shot_episode(learner, ep)


def _train_step(learner: Any, ep: Any) -> None:
    learner.train()
    learner.meta_train_step([ep])


def _time_size(learners: dict[str, Any], episodes: list[Any], warmup: bool, dev: Any) -> dict[str, dict[str, float]]:
    """Median seconds of each learner's meta-train step and zero-shot episode at one support size."""
    jobs = [(label, kind) for label, learner in learners.items() for kind in ("train", "zero_shot")
            if kind == "zero_shot" or learner.meta_trainable]
    run = {"train": _train_step, "zero_shot": _zero_shot}
    if warmup:
        for label, kind in jobs:
            run[kind](learners[label], episodes[0])
    times: dict[tuple[str, str], list[float]] = {job: [] for job in jobs}
    for r, order in enumerate(abba(jobs, len(episodes))):
        for label, kind in order:
            times[(label, kind)].append(timed(dev, run[kind], learners[label], episodes[r]))
    found: dict[str, dict[str, float]] = {label: {} for label in learners}
    for (label, kind), ts in times.items():
        found[label][kind] = summary(ts)["median"]
    return found


def _slope(sizes: list[int], seconds: list[float]) -> float | None:
    """Least-squares slope of log(seconds) on log(size)."""
    pts = [(math.log(s), math.log(t)) for s, t in zip(sizes, seconds) if t and t > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / var, 3) if var else None


def scale(alias: str, rounds: int, largest: int, warmup: bool, dev: Any) -> dict[str, Any]:
    """Cost of every learner at each support size up to ``largest`` on backbone ``alias``."""
    learners = build_learners(alias, LEARNERS, dev)
    for learner in learners.values():
        learner.setup_training(1000)
    shapes = [(w, s) for w, s in SHAPES if w * s <= largest]
    curves: dict[str, dict[str, list[float | None]]] = {k: {"train": [], "zero_shot": []} for k in learners}
    for way, shot in shapes:
        episodes = [ep.to(dev) for ep in fixed_episodes(rounds, way=way, shot=shot, query=QUERY,
                                                          image_size=image_size_of(alias), seed=way * 1000 + shot)]
        found = _time_size(learners, episodes, warmup, dev)
        for label, kinds in found.items():
            for kind in ("train", "zero_shot"):
                curves[label][kind].append(kinds.get(kind))
    sizes = [w * s for w, s in shapes]
    slopes = {label: {kind: _slope(sizes, c[kind]) for kind in c} for label, c in curves.items()}
    return {"image_size": image_size_of(alias), "rounds": rounds, "query_per_class": QUERY,
            "shapes": [{"way": w, "shot": s, "support": w * s, "query": w * QUERY} for w, s in shapes],
            "support_sizes": sizes, "seconds": curves, "log_log_slope": slopes}


def plot(curves: dict[str, Any], path: Path) -> Path:
    """Two log-log panels (meta-train step, zero-shot episode), one line per learner and backbone."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ["-", "--", ":"]
    for (alias, c), style in zip(curves.items(), styles):
        for i, (label, kinds) in enumerate(c["seconds"].items()):
            for ax, kind in zip(axes, ("train", "zero_shot")):
                pts = [(s, t) for s, t in zip(c["support_sizes"], kinds[kind]) if t]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=f"C{i}", label=f"{label} ({alias})")
    sizes = sorted({s for c in curves.values() for s in c["support_sizes"]})
    for ax, title in zip(axes, ("meta-training step", "zero-shot episode (adapt + predict)")):
        ax.set(xscale="log", yscale="log", xlabel="support images (way x shot)", ylabel="seconds", title=title)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)  # the zero-shot panel has every learner (pre does not meta-train)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(mode: Mode = "quick", out_dir: Path | None = None, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """The scaling suite (see the module docstring); writes ``scaling.png`` into ``out_dir`` when given."""
    quiet_logs()
    started, dev = time.perf_counter(), device()
    curves = {}
    for alias, (rounds, largest, warmup) in BUDGETS[mode].items():
        curves[alias] = scale(alias, rounds, GPU_LARGEST if dev.type == "cuda" else largest, warmup, dev)
    measurements: dict[str, Any] = {"curves": curves}
    if out_dir is not None:
        measurements["figure"] = str(plot(curves, out_dir / "scaling.png"))
    return suite_result("scaling", mode, started, measurements, [])


def report(result: dict[str, Any]) -> None:
    for alias, c in result["measurements"]["curves"].items():
        rows = []
        for label, kinds in c["seconds"].items():
            for kind in ("train", "zero_shot"):
                if any(kinds[kind]):
                    rows.append([label, kind, *kinds[kind], c["log_log_slope"][label][kind]])
        print_table(f"scaling: {alias} at {c['image_size']} px, seconds (median of {c['rounds']})",
                    ["learner", "what", *[f"support {s}" for s in c["support_sizes"]], "log-log slope"], rows)
    if "figure" in result["measurements"]:
        print(f"figure: {result['measurements']['figure']}")


def main(argv: list[str] | None = None) -> None:
    run_standalone("scaling", standalone_parser(__doc__).parse_args(argv), run, report)


if __name__ == "__main__":
    main()
