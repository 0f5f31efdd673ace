"""Meta-training cost: step time and peak memory of smat, pmf and lora on the same episodes and backbone.

Timing: every setting gets its own copy of one backbone (same weights), a warm-up step on a small
episode (optimiser state, lazy init) and one on a full one (first-touch memory), then one step per round
on 5-way 5-shot 10-query ``noto`` episodes, settings in alternating order each round, so the SMAT/PMF
ratio is paired.

Memory: one fresh child process per setting runs one step; peak memory is the process's peak RSS
minus its RSS before the learner was built (the backbone and episodes already loaded), so it counts
the learner's own state, optimiser state and activations. The child runs with glibc's mmap threshold fixed at
128 KiB (``MALLOC_MMAP_THRESHOLD_``), so every large tensor is its own mapping, returned when freed: its RSS then
follows live tensors instead of what the allocator keeps (the default threshold grows after big frees, and freed
heap stays resident; on an elementwise ViT-S that retention added 0.1-0.8 GB). On a GPU it is
``max_memory_allocated``. SMAT's fused mask kernels are compiled before the baseline: the compiler's memory
(``compiler_mib``) is paid once per process, not per step.

Profile: one SMAT step (the paper's defaults: elementwise masks, teacher on) under ``torch.profiler``,
the step its memory child runs anyway; ``metabench/learners/smat/model.py`` labels its pieces
(``smat.router``, ``smat.merge``, ...).

    python -m benchmarks.training [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    Mode,
    Target,
    abba,
    device,
    fixed_episodes,
    image_size_of,
    paired_ratio,
    peak_rss_mib,
    print_table,
    print_targets,
    quiet_logs,
    release_memory,
    rss_mib,
    run_standalone,
    spawn,
    standalone_parser,
    suite_result,
    summary,
    timed,
)

_OFF = {"teacher_steps": 0, "kd_pretrained": False}  # no distillation at all: neither teacher runs
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "pmf": ("pmf", {}),
    "lora": ("lora", {}),
    "smat_elementwise_teacher_off": ("smat", {"structured": False, **_OFF}),
    "smat_elementwise_teacher_on": ("smat", {"structured": False}),
    # learner.mask_kernels=eager: the same masks without the fused kernels (the default fuses them on a ViT-S)
    "smat_elementwise_eager_teacher_off": ("smat", {"structured": False, "mask_kernels": "eager", **_OFF}),
    # learner.gate_memory=recompute: the eager path without M x |theta| gates or gate gradients kept through the
    # update (the fused kernels never keep them)
    "smat_elementwise_recompute_teacher_off": ("smat", {"structured": False, "gate_memory": "recompute",
                                                        "mask_kernels": "eager", **_OFF}),
    "smat_structured_teacher_off": ("smat", {"structured": True, **_OFF}),
    "smat_structured_teacher_on": ("smat", {"structured": True}),
}
PROFILED = "smat_elementwise_teacher_on"  # SMAT's defaults: every piece runs
EPISODE = {"way": 5, "shot": 5, "query": 10}
BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"rounds": {"vit_test": 1}, "memory": ("vit_test",), "isolate": False},
    "quick": {"rounds": {"vit_test": 4, "vit_small": 2}, "memory": ("vit_small",), "isolate": True},
    "full": {"rounds": {"vit_test": 10, "vit_small": 4}, "memory": ("vit_test", "vit_small"), "isolate": True},
}
TIME_TARGETS = {"teacher_off": 1.5, "teacher_on": 2.5}  # SMAT step / PMF step
# SMAT / PMF peak (teacher off)
MEMORY_TARGETS = {"elementwise": 2.0, "elementwise_eager": 2.0, "elementwise_recompute": 2.0, "structured": 1.3}
LIVE_RSS = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # glibc: large tensors are mappings, unmapped when freed
PROFILE_GROUPS = {"router": ("smat.router",), "merge": ("smat.merge", "smat.masks"),
                  "forward": ("smat.inner", "smat.forward"), "teacher": ("smat.teacher", "smat.teacher_pretrained"),
                  "backward": ("smat.backward",), "optimizer": ("smat.optimizer",)}


def build_learner(setting: str, backbone: Any, dev: Any) -> Any:
    """A fresh learner of ``setting`` on ``backbone`` (which it may modify: pass a copy)."""
    from metabench.learners import create_learner, learner_config_class

    name, options = SETTINGS[setting]
    learner = create_learner(name, backbone, learner_config_class(name)(name=name, **options)).to(dev)
    learner.setup_training(1000)
    return learner.train()


def _episodes(n: int, alias: str, dev: Any, **shape: int) -> list[Any]:
    return [ep.to(dev) for ep in fixed_episodes(n, image_size=image_size_of(alias), **{**EPISODE, **shape})]


def time_steps(alias: str, rounds: int, settings: list[str], dev: Any) -> dict[str, Any]:
    """Seconds per ``meta_train_step`` of each setting, interleaved (see the module docstring)."""
    from metabench.backbones import create_backbone

    backbone = create_backbone(alias, image_size=image_size_of(alias))
    learners = {s: build_learner(s, copy.deepcopy(backbone), dev) for s in settings}
    small = _episodes(1, alias, dev, shot=1, query=1)[0]
    episodes = _episodes(rounds, alias, dev)
    for learner in learners.values():  # optimiser state and lazy init; then a full episode: on a CPU its first
        learner.meta_train_step([small])  # full-size step pays first-touch page faults (PMF's measured 1.7x its
        learner.meta_train_step([episodes[0]])  # second on ViT-S), on a GPU autotuning
    seconds: dict[str, list[float]] = {s: [] for s in settings}
    for r, order in enumerate(abba(settings, rounds)):
        for s in order:
            seconds[s].append(timed(dev, learners[s].meta_train_step, [episodes[r]]))
    images = episodes[0].support_x.shape[0] + episodes[0].query_x.shape[0]
    rows = {s: {"setting": s, "learner": SETTINGS[s][0], "options": SETTINGS[s][1],
                "seconds": [round(t, 4) for t in ts], **{f"{k}_s": v for k, v in summary(ts).items() if k != "n"},
                "images_per_s": round(images / summary(ts)["median"], 2)} for s, ts in seconds.items()}
    ratios = {s: round(paired_ratio(seconds[s], seconds["pmf"]), 3) for s in settings if s != "pmf"}
    return {"image_size": image_size_of(alias), "episode": {**EPISODE, "images": images}, "rounds": rounds,
            "settings": rows, "ratio_to_pmf": ratios}


class _RssSampler:
    """Highest current RSS seen by a polling thread: a peak that works inside a long-lived process too
    (``ru_maxrss`` only ever reports the lifetime peak)."""

    def __init__(self, every: float = 0.002) -> None:
        self.every, self.peak, self._stop = every, rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(self.every)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def measure_memory(cfg: dict[str, Any]) -> dict[str, Any]:
    """One setting: a warm-up step on a small episode, then one full step; peak memory above the RSS before
    the learner existed (child-process entry)."""
    import torch

    from metabench.backbones import create_backbone

    quiet_logs()
    dev = device()
    backbone = create_backbone(cfg["alias"], image_size=image_size_of(cfg["alias"]))
    episode = _episodes(1, cfg["alias"], dev)[0]
    small = _episodes(1, cfg["alias"], dev, shot=1, query=1)[0]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compiler = _warm_compiler(cfg["setting"], dev)
    base_cuda = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    baseline = rss_mib()
    with _RssSampler() as sampler:
        learner = build_learner(cfg["setting"], backbone, dev)
        state = rss_mib() - baseline
        learner.meta_train_step([small])  # as in the timing: a first step pays for first-touch page faults
        if cfg.get("profile"):
            out: dict[str, Any] = {"profile": profile_step(learner, episode, dev)}
            out["step_seconds"] = out["profile"]["step_seconds"]
        else:
            out = {"step_seconds": round(timed(dev, learner.meta_train_step, [episode]), 3)}
    peak = max(sampler.peak, peak_rss_mib()) if cfg.get("isolated") else sampler.peak
    out.update({"setting": cfg["setting"], "alias": cfg["alias"], "baseline_rss_mib": round(baseline, 1),
                "learner_state_mib": round(state, 1), "compiler_mib": compiler, "peak_rss_mib": round(peak, 1),
                "step_peak_mib": round(peak - baseline, 1)})
    if dev.type == "cuda":
        out["cuda_step_peak_mib"] = round((torch.cuda.max_memory_allocated() - base_cuda) / 2**20, 1)
    return out


def _warm_compiler(setting: str, dev: Any) -> float:
    """Compile SMAT's fused mask kernels before the RSS baseline (MiB it took): the compiler's code and caches
    are paid once per process, not per step, so they are reported beside the step's peak instead of in it."""
    from metabench.learners import learner_config_class
    from metabench.learners.smat.config import FUSED_KERNELS_FROM

    name, options = SETTINGS[setting]
    cfg = learner_config_class(name)(name=name, **options)
    if name != "smat" or not cfg.fused_kernels(FUSED_KERNELS_FROM):  # as the learner decides for a ViT-S
        return 0.0
    from metabench.nn.hard_concrete import MaskKernels

    before = rss_mib()
    MaskKernels(cfg.mask_noise, cfg.n_experts).ready(dev)
    return round(rss_mib() - before, 1)


def profile_step(learner: Any, episode: Any, dev: Any) -> dict[str, Any]:
    """Profile one meta-training step: time per labelled piece of SMAT and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = timed(dev, learner.meta_train_step, [episode])
    events = prof.key_averages()
    labelled = {e.key: e.cpu_time_total / 1e6 for e in events if e.key.startswith("smat.")}
    groups = {g: round(sum(labelled.get(k, 0.0) for k in keys), 3) for g, keys in PROFILE_GROUPS.items()}
    groups["other"] = round(max(0.0, seconds - sum(groups.values())), 3)
    attr = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    ops = sorted((e for e in events if not e.key.startswith("smat.")), key=lambda e: -getattr(e, attr))[:12]
    return {"step_seconds": round(seconds, 3), "labels": {k: round(v, 3) for k, v in labelled.items()},
            "groups": groups, "group_share": {g: round(v / seconds, 3) for g, v in groups.items()},
            "top_ops": [{"name": e.key, "self_seconds": round(getattr(e, attr) / 1e6, 3), "calls": e.count}
                        for e in ops]}


def _memory(mode: Mode) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Peak memory of every setting, one child process each, and the profile of one SMAT step, taken in
    the child of ``PROFILED`` on the last (largest) backbone: it runs that step anyway."""
    budget, found, profile = BUDGETS[mode], {}, {}
    for alias in budget["memory"]:
        found[alias] = {}
        for setting in SETTINGS:
            cfg = {"alias": alias, "setting": setting, "isolated": budget["isolate"],
                   "profile": setting == PROFILED and alias == budget["memory"][-1]}
            got = spawn("training", cfg, extra_env=LIVE_RSS) if budget["isolate"] else measure_memory(cfg)
            if "profile" in got:
                profile = {"alias": alias, "setting": setting, **got.pop("profile")}
            found[alias][setting] = got
    return found, profile


def _label(masks: str) -> str:
    return masks.replace("_recompute", " (eager, gates recomputed)").replace("_eager", " (eager masks)")


def _step_note(timing: dict[str, Any], masks: str, teacher: str, ratio: float | None) -> str:
    """The pairing, and for elementwise masks the floor beneath them: the structured step is the same task work
    (router, inner step, query loss, teacher) with masks that cost almost nothing, so no elementwise kernel can
    bring the step below it; the difference is what the 8 x |theta| mask logits cost on this machine."""
    note = f"paired over {timing['rounds']} rounds"
    floor = timing["ratio_to_pmf"].get(f"smat_structured_{teacher}")
    if masks == "structured" or floor is None or ratio is None:
        return note
    return f"{note}; structured floor {floor:.2f}x, the elementwise masks add {ratio - floor:.2f}x"


def _targets(timing: dict[str, Any], memory: dict[str, Any]) -> list[Target]:
    targets = []
    for alias, t in timing.items():
        for masks in ("elementwise", "elementwise_eager", "elementwise_recompute", "structured"):
            for teacher, bound in TIME_TARGETS.items():
                if f"smat_{masks}_{teacher}" not in SETTINGS:
                    continue
                ratio = t["ratio_to_pmf"].get(f"smat_{masks}_{teacher}")
                targets.append(Target(f"{alias}: SMAT {_label(masks)} {teacher.replace('_', ' ')} / PMF, step time",
                                      ratio, bound, "max", "x", _step_note(t, masks, teacher, ratio)))
    for alias, m in memory.items():
        for masks, bound in MEMORY_TARGETS.items():
            key = "cuda_step_peak_mib" if "cuda_step_peak_mib" in m["pmf"] else "step_peak_mib"
            smat, pmf = m[f"smat_{masks}_teacher_off"][key], m["pmf"][key]
            targets.append(Target(f"{alias}: SMAT {_label(masks)} / PMF, peak memory (teacher off)",
                                  smat / pmf if pmf > 0 else None, bound, "max", "x",
                                  f"{smat:.0f} vs {pmf:.0f} MiB above the loaded backbone"))
    return targets


def run(mode: Mode = "quick", out_dir: Path | None = None, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training suite (see the module docstring)."""
    quiet_logs()
    started, dev = time.perf_counter(), device()
    timing = {}
    for alias, rounds in BUDGETS[mode]["rounds"].items():
        timing[alias] = time_steps(alias, rounds, list(SETTINGS), dev)
        release_memory()
    memory, profile = _memory(mode)
    measurements = {"timing": timing, "memory": memory, "profile": profile}
    return suite_result("training", mode, started, measurements, _targets(timing, memory))


def report(result: dict[str, Any]) -> None:
    m = result["measurements"]
    for alias, t in m["timing"].items():
        mem = m["memory"].get(alias, {})
        print_table(f"training: {alias} at {t['image_size']} px, 5-way 5-shot 10-query, {t['rounds']} paired rounds",
                    ["setting", "s/step (median)", "min", "images/s", "x PMF (paired)", "peak MiB", "state MiB"],
                    [[s, r["median_s"], r["min_s"], r["images_per_s"], t["ratio_to_pmf"].get(s, 1.0),
                      mem.get(s, {}).get("step_peak_mib"), mem.get(s, {}).get("learner_state_mib")]
                     for s, r in t["settings"].items()])
    p = m["profile"]
    print_table(f"training: where a SMAT step goes ({p['alias']}, {p['setting']}, {p['step_seconds']:.2f} s profiled)",
                ["piece", "seconds", "share"], [[g, v, p["group_share"][g]] for g, v in p["groups"].items()])
    print_table("training: top operators of the profiled step (self time)", ["operator", "seconds", "calls"],
                [[o["name"], o["self_seconds"], o["calls"]] for o in p["top_ops"]])
    print_targets("training", result["targets"])


def main(argv: list[str] | None = None) -> None:
    p = standalone_parser(__doc__)
    p.add_argument("--run-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_config:
        print(json.dumps(measure_memory(json.loads(args.run_config))))
        return
    run_standalone("training", args, run, report)


if __name__ == "__main__":
    main()
