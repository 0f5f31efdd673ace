"""Evaluation cost: zero-shot images/s against the raw backbone forward, and fine-tuning seconds per episode.

Zero-shot: for each episode and learner, ``learner.adapt(support)`` + ``learner.predict(state, query)``
is timed back to back with ``learner.backbone`` run over the same images in batches of 128 (the
order alternates), so their ratio says what the protocol adds to pure feature extraction: task-model
construction (SMAT merges its experts into a dense copy), prototypes, the head, Python overhead.

Fine-tuning: ``adapt(support, mode="full"|"lora", steps=N)`` + ``predict`` on the ``finetune``
learner, paired with its zero-shot time on the same episode; the difference over N gives seconds per
step, from which seconds per episode at the presets' 10 and 50 steps follow.

    python -m benchmarks.evaluation [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    Mode,
    Target,
    abba,
    build_learners,
    device,
    fixed_episodes,
    image_size_of,
    paired_ratio,
    print_table,
    print_targets,
    quiet_logs,
    release_memory,
    run_standalone,
    standalone_parser,
    suite_result,
    summary,
    timed,
    zero_shot_episode,
)

#: label -> (learner, options); learners are untrained: the cost of a protocol does not depend on training
LEARNERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pre": ("pre", {}),
    "pmf": ("pmf", {}),
    "lora": ("lora", {}),
    "smat_elementwise": ("smat", {"structured": False}),
    "smat_structured": ("smat", {"structured": True}),
}
EPISODE = {"way": 5, "shot": 5, "query": 10}
BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"episodes": {"vit_test": 1}, "finetune": {"vit_test": (1, 1)}},
    "quick": {"episodes": {"vit_test": 6, "vit_small": 2}, "finetune": {"vit_test": (2, 5), "vit_small": (1, 2)}},
    "full": {"episodes": {"vit_test": 20, "vit_small": 6}, "finetune": {"vit_test": (4, 10), "vit_small": (2, 5)}},
}  # finetune: (episodes, steps)
ZERO_SHOT_FLOOR = 0.9  # zero-shot images/s over raw backbone-forward images/s
#: SMAT's zero-shot needs one pretrained forward over the support set (its router) besides the task model's forward
#: over support + query, so its ratio to a plain forward is at most (S + Q) / (2S + Q); it must reach this share of it.
SMAT_SHARE_OF_LIMIT = 0.95
PRESET_STEPS = (10, 50)  # eval.steps of the default/cpu presets and of the gpu/paper presets
BATCH = 128




def _raw(backbone: Any, images: Any) -> None:
    import torch

    with torch.no_grad():
        for chunk in images.split(BATCH):
            backbone(chunk)




def zero_shot(alias: str, n_episodes: int, dev: Any) -> dict[str, Any]:
    """Paired zero-shot vs raw-forward timings of every learner on ``n_episodes`` episodes."""
    import torch

    learners = {k: v.eval() for k, v in build_learners(alias, LEARNERS, dev).items()}
    episodes = [ep.to(dev) for ep in fixed_episodes(n_episodes + 1, image_size=image_size_of(alias), **EPISODE)]
    for learner in learners.values():  # warm-up: lazy init, allocator, (GPU) kernel selection
        zero_shot_episode(learner, episodes[-1])
        _raw(learner.backbone, episodes[-1].query_x)
    times: dict[str, dict[str, list[float]]] = {k: {"raw": [], "zero_shot": []} for k in learners}
    for r, order in enumerate(abba(list(learners), n_episodes)):
        ep = episodes[r]
        images = torch.cat([ep.support_x, ep.query_x])
        for label in order:
            pair = ("raw", "zero_shot") if r % 2 == 0 else ("zero_shot", "raw")
            for kind in pair:
                args = ((_raw, learners[label].backbone, images) if kind == "raw"
                        else (zero_shot_episode, learners[label], ep))
                times[label][kind].append(timed(dev, *args))
    n_images = int(episodes[0].support_x.shape[0] + episodes[0].query_x.shape[0])  # every episode has as many
    rows = {}
    for label, t in times.items():  # medians throughout: one preempted call must not move a row
        rows[label] = {"learner": LEARNERS[label][0], "options": LEARNERS[label][1],
                       "raw_images_per_s": round(n_images / summary(t["raw"])["median"], 1),
                       "zero_shot_images_per_s": round(n_images / summary(t["zero_shot"])["median"], 1),
                       "zero_shot_seconds_per_episode": summary(t["zero_shot"])["median"],
                       "ratio": round(paired_ratio(t["raw"], t["zero_shot"]), 3),
                       **({"limit": round(smat_limit(EPISODE), 3)} if LEARNERS[label][0] == "smat" else {})}
    return {"image_size": image_size_of(alias), "episode": EPISODE, "episodes": n_episodes, "learners": rows}


def fine_tuning(alias: str, n_episodes: int, steps: int, dev: Any) -> dict[str, Any]:
    """Seconds per episode of the ``full`` and ``lora`` protocols, paired with zero-shot on the same episode."""
    import torch

    from metabench.backbones import create_backbone
    from metabench.finetuning import FineTuneOptions
    from metabench.learners import create_learner

    learner = create_learner("finetune", create_backbone(alias, image_size=image_size_of(alias))).to(dev).eval()
    episodes = [ep.to(dev) for ep in fixed_episodes(n_episodes + 1, image_size=image_size_of(alias), **EPISODE)]
    options = FineTuneOptions()

    def protocol(mode: str, ep: Any, n: int) -> None:
        with torch.enable_grad() if n else torch.no_grad():
            state = learner.adapt(ep.support, mode=mode, steps=n, options=options)
        with torch.no_grad():
            learner.predict(state, ep.query_x)

    protocol("full", episodes[-1], 1)  # warm-up
    times: dict[str, list[float]] = {"zero_shot": [], "full": [], "lora": []}
    for r, order in enumerate(abba(list(times), n_episodes)):
        for mode in order:
            times[mode].append(timed(dev, protocol, mode, episodes[r], 0 if mode == "zero_shot" else steps))
    release_memory()
    rows = {}
    for mode in ("full", "lora"):
        per_step = max(0.0, sum(a - b for a, b in zip(times[mode], times["zero_shot"])) / (steps * n_episodes))
        base = summary(times["zero_shot"])["median"]
        rows[mode] = {"steps": steps, "seconds_per_episode": summary(times[mode])["median"],
                      "seconds_per_step": round(per_step, 4),
                      **{f"estimated_seconds_per_episode_at_{k}": round(base + k * per_step, 2) for k in PRESET_STEPS}}
    return {"learner": "finetune", "image_size": image_size_of(alias), "episode": EPISODE, "episodes": n_episodes,
            "zero_shot_seconds_per_episode": summary(times["zero_shot"])["median"], "modes": rows}


def smat_limit(episode: dict[str, int]) -> float:
    """The highest zero-shot / raw-forward ratio a router over the support set allows: (S + Q) / (2S + Q)."""
    support, query = episode["way"] * episode["shot"], episode["way"] * episode["query"]
    return (support + query) / (2 * support + query)


def _targets(zs: dict[str, Any]) -> list[Target]:
    targets = []
    for alias, z in zs.items():
        for label, row in z["learners"].items():
            note = f"{row['zero_shot_images_per_s']:.0f} vs {row['raw_images_per_s']:.0f} img/s"
            if row["learner"] != "smat":
                targets.append(Target(f"{alias}: {label} zero-shot / raw forward, images/s", row["ratio"],
                                      ZERO_SHOT_FLOOR, "min", "x", note))
                continue
            limit = smat_limit(z["episode"])
            targets.append(Target(f"{alias}: {label} zero-shot / raw forward, share of its limit", row["ratio"] / limit,
                                  SMAT_SHARE_OF_LIMIT, "min", "x",
                                  f"ratio {row['ratio']:.3f}, limit (S+Q)/(2S+Q) = {limit:.3f}; {note}"))
    return targets


def run(mode: Mode = "quick", out_dir: Path | None = None, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """The evaluation suite (see the module docstring)."""
    quiet_logs()
    started, dev, budget = time.perf_counter(), device(), BUDGETS[mode]
    zs = {}
    for alias, n in budget["episodes"].items():
        zs[alias] = zero_shot(alias, n, dev)
        release_memory()
    ft = {alias: fine_tuning(alias, n, steps, dev) for alias, (n, steps) in budget["finetune"].items()}
    return suite_result("evaluation", mode, started, {"zero_shot": zs, "fine_tuning": ft}, _targets(zs))


def report(result: dict[str, Any]) -> None:
    m = result["measurements"]
    for alias, z in m["zero_shot"].items():
        columns = ["learner", "raw forward img/s", "zero-shot img/s", "ratio (paired)", "s/episode"]
        print_table(f"evaluation: zero-shot on {alias} at {z['image_size']} px ({z['episodes']} paired episodes, "
                    "75 images each)", columns,
                    [[k, r["raw_images_per_s"], r["zero_shot_images_per_s"], r["ratio"],
                      r["zero_shot_seconds_per_episode"]] for k, r in z["learners"].items()])
    rows = [[alias, mode, r["steps"], r["seconds_per_episode"], r["seconds_per_step"],
             *[r[f"estimated_seconds_per_episode_at_{k}"] for k in PRESET_STEPS]]
            for alias, f in m["fine_tuning"].items() for mode, r in f["modes"].items()]
    print_table("evaluation: fine-tuning protocols (finetune learner)",
                ["backbone", "mode", "steps", "s/episode", "s/step", *[f"est. s/episode @{k}" for k in PRESET_STEPS]],
                rows)
    print_targets("evaluation", result["targets"])


def main(argv: list[str] | None = None) -> None:
    run_standalone("evaluation", standalone_parser(__doc__).parse_args(argv), run, report)


if __name__ == "__main__":
    main()
