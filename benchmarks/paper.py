"""The paper preset at its own scale: meta-training steps of ViT-S at 128 and 224 px, and a short ``paper`` run.

Steps: ``pmf``, ``lora``, ``smat`` elementwise and ``smat`` structured, each with the options a
``preset=paper`` run gives it (``load_config``: SMAT's upstream recipe, teacher on) and the
preset's meta-batch (``train.tasks_per_update``, 4 tasks per step), under the autocast a run of
the preset uses (``metabench.engine.resolve_precision``: bf16 on a GPU that has it, else fp16; fp32
on a CPU). As in the training suite, every learner gets its own copy of one backbone, warm-up steps,
then one step per round in alternating order on the same fixed 5-way 5-shot 10-query ``noto``
episodes (fixed shapes, so rounds compare; Meta-Dataset's variable episodes are larger on average).
Reported: tasks/s and, on a GPU, memory: ``state_mib`` (parameters, buffers and what the warm-up
left allocated, e.g. optimiser state), ``step_peak_mib`` (``torch.cuda.max_memory_allocated``,
reset before each step of the setting, above what was allocated before it) and their sum
``peak_mib``, what the setting holds at its peak on its own.

End to end: three small Meta-Dataset-format sources (``omniglot`` and ``dtd`` to train on, a
test-only ``traffic_sign``; ``noto`` glyphs written as per-class TFRecords) in a temporary folder,
then ``python -m metabench run --preset paper --learner smat`` on them with few training tasks,
validation and probe updates and test episodes; its wall time, exit status, result rows and run
folder (``<out>/paper_run/``, without its checkpoint) go to the JSON.

Budget: ``smoke`` runs anywhere (``vit_test`` at 32 and 48 px, tiny episodes; CI's smoke test).
``quick`` and ``full`` need CUDA; without it they skip and say so (targets measured ``None``),
because ViT-S at 224 px would take CPU hours and the CPU suites already time ViT-S at 84 px.

    python -m benchmarks --quick --device cuda --only paper
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from itertools import chain
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    REPO,
    Mode,
    Target,
    abba,
    build_learners,
    device,
    fixed_episodes,
    paired_ratio,
    png_bytes,
    print_table,
    print_targets,
    quiet_logs,
    release_memory,
    run_standalone,
    standalone_parser,
    suite_result,
    summary,
    timed,
    write_class_records,
)
from benchmarks.training import EPISODE, MEMORY_TARGETS, TIME_TARGETS

#: label -> (learner, overrides on top of ``preset=paper``)
SETTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pmf": ("pmf", ()),
    "lora": ("lora", ()),
    "smat_elementwise": ("smat", ("learner.structured=false",)),
    "smat_structured": ("smat", ("learner.structured=true",)),
}
_E2E_QUICK = {"tasks": 16, "every": 2, "val_episodes": 2, "episodes": 5, "workers": None, "timeout": 600}
BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"alias": "vit_test", "sizes": (32, 48), "rounds": 1, "episode": {"way": 5, "shot": 1, "query": 2},
              "e2e": {"alias": "vit_test", "size": 32, "tasks": 4, "every": 1, "val_episodes": 1, "episodes": 1,
                      "workers": 0, "timeout": 600, "wall_s": 300.0}},
    "quick": {"alias": "vit_small", "sizes": (128, 224), "rounds": 8, "episode": EPISODE,
              "e2e": {"alias": "vit_small", "size": 128, **_E2E_QUICK, "wall_s": 180.0}},
    "full": {"alias": "vit_small", "sizes": (128, 224), "rounds": 20, "episode": EPISODE,
             "e2e": {"alias": "vit_small", "size": 128, **_E2E_QUICK, "tasks": 40, "episodes": 20, "wall_s": 300.0}},
}
#: the generated sources: classes per split (train, valid, test); every class holds noto's 20 images
SOURCES: dict[str, tuple[int, int, int]] = {"omniglot": (10, 5, 5), "dtd": (10, 5, 5), "traffic_sign": (0, 0, 10)}


def paper_config(label: str) -> Any:
    """The ``RunConfig`` of a ``preset=paper`` run of setting ``label``."""
    from metabench.config import load_config

    name, extra = SETTINGS[label]
    return load_config(overrides=["preset=paper", *extra], flags={"learner": {"name": name}})


def precision_for(dev: Any) -> str:
    """The precision a ``preset=paper`` run takes on ``dev`` (bf16 autocast on a GPU that supports it)."""
    from metabench.engine import resolve_precision

    return resolve_precision(paper_config("pmf").precision, dev)


def _step(learner: Any, batch: list[Any], dev: Any, precision: str) -> None:
    from metabench.engine import autocast

    with autocast(dev, precision):
        learner.meta_train_step(batch)


def _allocated_mib(dev: Any) -> float:
    import torch

    return torch.cuda.memory_allocated() / 2**20 if dev.type == "cuda" else 0.0


def _tensor_mib(learner: Any, dev: Any) -> float:
    """Parameters and buffers the learner holds on ``dev`` (shared storages counted once)."""
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
             for t in chain(learner.parameters(), learner.buffers()) if t.device.type == dev.type}
    return sum(sizes.values()) / 2**20


def _prepare(alias: str, size: int, budget: dict[str, Any], dev: Any) -> tuple[dict[str, Any], list[list[Any]], int]:
    """Learners with the paper options (trained for the preset's updates), warmed up; the timed batches."""
    configs = {label: paper_config(label) for label in SETTINGS}
    tasks = configs["pmf"].train.tasks_per_update
    specs = {label: (c.learner.name, {f.name: getattr(c.learner, f.name) for f in fields(c.learner)
                                      if f.name != "name"}) for label, c in configs.items()}
    learners = build_learners(alias, specs, dev, image_size=size)
    shots = dict(budget["episode"])
    batches = [[ep.to(dev) for ep in fixed_episodes(tasks, image_size=size, seed=b, **shots)]
               for b in range(min(budget["rounds"], 4))]
    small = [ep.to(dev) for ep in fixed_episodes(tasks, image_size=size, **{**shots, "shot": 1, "query": 1})]
    precision, state = precision_for(dev), {}
    for label, learner in learners.items():
        learner.setup_training(math.ceil(configs[label].train.episodes / tasks))
        learner.train()
        before = _allocated_mib(dev)
        _step(learner, small, dev, precision)  # optimiser state and lazy init; a full batch on a GPU (autotuning)
        if dev.type == "cuda":
            _step(learner, batches[0], dev, precision)
        state[label] = _tensor_mib(learner, dev) + _allocated_mib(dev) - before if dev.type == "cuda" else None
    return {"learners": learners, "state": state, "precision": precision}, batches, tasks


def time_size(alias: str, size: int, budget: dict[str, Any], dev: Any) -> dict[str, Any]:
    """Seconds per meta-training step of every setting at ``size`` px, interleaved, and its GPU memory."""
    import torch

    built, batches, tasks = _prepare(alias, size, budget, dev)
    learners, precision = built["learners"], built["precision"]
    seconds: dict[str, list[float]] = {s: [] for s in learners}
    step_peak: dict[str, float] = dict.fromkeys(learners, 0.0)
    for r, order in enumerate(abba(list(learners), budget["rounds"])):
        batch = batches[r % len(batches)]
        for s in order:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            base = _allocated_mib(dev)
            seconds[s].append(timed(dev, _step, learners[s], batch, dev, precision))
            if dev.type == "cuda":
                step_peak[s] = max(step_peak[s], torch.cuda.max_memory_allocated() / 2**20 - base)
    images = sum(ep.support_x.shape[0] + ep.query_x.shape[0] for ep in batches[0])
    rows = {}
    for s, ts in seconds.items():
        median, state = summary(ts)["median"], built["state"][s]
        memory = {} if state is None else {"state_mib": round(state, 1), "step_peak_mib": round(step_peak[s], 1),
                                           "peak_mib": round(state + step_peak[s], 1)}
        rows[s] = {"learner": SETTINGS[s][0], "overrides": list(SETTINGS[s][1]), "seconds": [round(t, 4) for t in ts],
                   "median_s": median, "min_s": summary(ts)["min"], "tasks_per_s": round(tasks / median, 3),
                   "images_per_s": round(images / median, 1), **memory}
    ratios = {s: round(paired_ratio(seconds[s], seconds["pmf"]), 3) for s in seconds if s != "pmf"}
    del built, learners, batches
    release_memory()
    return {"alias": alias, "image_size": size, "precision": precision, "tasks_per_step": tasks,
            "episode": {**budget["episode"], "images_per_step": images}, "rounds": budget["rounds"],
            "settings": rows, "ratio_to_pmf": ratios}


def write_sources(root: Path, size: int) -> Path:
    """``SOURCES`` as Meta-Dataset folders under ``root`` (spec + one TFRecord per class), distinct noto classes."""
    from episodes.readers.embedded import NotoGlyphs
    from episodes.spec import DatasetSpec
    from episodes.split import Split

    noto, first = NotoGlyphs(), 0
    for name, per_split in SOURCES.items():
        folder, counts = root / name, {}
        folder.mkdir(parents=True, exist_ok=True)
        for c in range(sum(per_split)):
            images = noto.read(first + c, range(noto.spec.images_per_class[first + c]))[..., 0]
            write_class_records(folder / f"{c}.tfrecords", [png_bytes(image, size) for image in images], c)
            counts[c] = len(images)
        spec = DatasetSpec(name=name, classes_per_split=dict(zip(Split, per_split, strict=True)),
                           images_per_class=counts)
        spec.to_json(folder / "dataset_spec.json")  # last: its presence marks a complete source
        first += sum(per_split)
    return root


def _command(plan: dict[str, Any], data: Path, runs: Path, dev: Any) -> list[str]:
    train, evaluate = ",".join(list(SOURCES)[:2]), ",".join(SOURCES)
    workers = [] if plan["workers"] is None else [f"data.num_workers={plan['workers']}"]
    return [sys.executable, "-m", "metabench", "run", "--preset", "paper", "--learner", "smat",
            "--backbone", plan["alias"], "--quiet", "--out", str(runs), f"device={dev.type}",
            f"data.root={data}", f"data.image_size={plan['size']}", f"data.train_sources=[{train}]",
            f"data.eval_sources=[{evaluate}]", "train.val_ood_sources=[traffic_sign]",
            f"train.episodes={plan['tasks']}", f"train.val_every={plan['every']}",
            f"train.probe_every={plan['every']}", f"train.val_episodes={plan['val_episodes']}",
            f"eval.episodes={plan['episodes']}", "eval.episodes_random_init=0", *workers]


def end_to_end(mode: Mode, dev: Any, out_dir: Path | None) -> dict[str, Any]:
    """One short ``preset=paper`` run on generated Meta-Dataset records; what it did and where it wrote."""
    plan = BUDGETS[mode]["e2e"]
    with tempfile.TemporaryDirectory(prefix="metabench-paper-") as tmp:
        data = write_sources(Path(tmp) / "md", plan["size"])
        runs = out_dir / "paper_run" if out_dir is not None else Path(tmp) / "runs"
        shutil.rmtree(runs, ignore_errors=True)  # this suite's own folder: one run at a time
        runs.mkdir(parents=True)
        cmd = _command(plan, data, runs, dev)
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=plan["timeout"])
            status, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status, log = None, f"timed out after {plan['timeout']} s\n{_text(e.stdout)}{_text(e.stderr)}"
        wall = time.perf_counter() - start
        (runs / "metabench-run.log").write_text(log)
        found = _run_folder(runs, kept=out_dir is not None)
    return {"command": ["python", *cmd[1:]], "status": status, "wall_s": round(wall, 1), "budget_s": plan["wall_s"],
            **found, **({} if status == 0 else {"log_tail": log[-3000:]})}


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def _run_folder(runs: Path, kept: bool) -> dict[str, Any]:
    """The run folder's result rows and manifest; its checkpoint is dropped (hundreds of MB for SMAT on ViT-S)."""
    import json

    import pandas as pd

    dirs = [d for d in runs.iterdir() if (d / "manifest.json").is_file()]
    if not dirs:
        return {"run_dir": None}
    run_dir = dirs[0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = pd.read_parquet(run_dir / "episodes.parquet") if (run_dir / "episodes.parquet").is_file() else None
    checkpoints = run_dir / "checkpoints"
    dropped = sum(f.stat().st_size for f in checkpoints.rglob("*") if f.is_file()) / 2**20  # none: 0
    shutil.rmtree(checkpoints, ignore_errors=True)
    train_log = run_dir / "train_log.jsonl"
    return {"run_dir": str(run_dir) if kept else None, "device": manifest.get("device"),
            "precision": manifest.get("precision"), "checkpoint_dropped_mib": round(dropped, 1),
            "train_log_lines": len(train_log.read_text().splitlines()) if train_log.is_file() else 0,
            "rows": 0 if rows is None else len(rows),
            "sources": [] if rows is None else sorted(rows["source"].unique().tolist()),
            "mean_accuracy": None if rows is None or not len(rows) else round(float(rows["accuracy"].mean()), 4)}


def _targets(timing: dict[str, Any], e2e: dict[str, Any], mode: Mode, skipped: str) -> list[Target]:
    budget, targets = BUDGETS[mode], []
    for size in budget["sizes"]:
        t, where = timing.get(size, {}), f"{budget['alias']} {size} px"
        for masks in ("elementwise", "structured"):
            note = skipped or f"paper options (teacher on), paired over {t['rounds']} rounds"
            targets.append(Target(f"{where}: SMAT {masks} / PMF, step time (paper options)",
                                  t.get("ratio_to_pmf", {}).get(f"smat_{masks}"), TIME_TARGETS["teacher_on"], "max",
                                  note=note))
            rows = t.get("settings", {})
            smat, pmf = (rows.get(k, {}).get("peak_mib") for k in (f"smat_{masks}", "pmf"))
            targets.append(Target(f"{where}: SMAT {masks} / PMF, peak GPU memory (paper options)",
                                  smat / pmf if smat is not None and pmf else None, MEMORY_TARGETS[masks], "max",
                                  note=skipped or ("GPU only" if pmf is None else
                                                   f"{smat:.0f} vs {pmf:.0f} MiB; teacher on (training suite: off)")))
    status = e2e.get("status")
    measured = None if skipped else 124 if status is None else status  # None: it timed out (124, as timeout(1))
    targets.append(Target("end-to-end paper run: exit status", measured, 0, "max", "",
                          skipped or (e2e.get("run_dir") or "run folder not kept")))
    targets.append(Target("end-to-end paper run: wall time", None if skipped else e2e["wall_s"],
                          budget["e2e"]["wall_s"], "max", "s", skipped or f"{e2e.get('rows', 0)} result rows"))
    return targets


def run(mode: Mode = "quick", out_dir: Path | None = None, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """The paper suite (see the module docstring)."""
    quiet_logs()
    started, dev, budget = time.perf_counter(), device(), BUDGETS[mode]
    skipped = "" if mode == "smoke" or dev.type == "cuda" else f"skipped: {mode} mode needs CUDA (device {dev})"
    timing: dict[int, Any] = {}
    e2e: dict[str, Any] = {}
    if not skipped:
        for size in budget["sizes"]:
            timing[size] = time_size(budget["alias"], size, budget, dev)
        e2e = end_to_end(mode, dev, out_dir)
    measurements = {"skipped": skipped or None, "timing": {str(k): v for k, v in timing.items()}, "end_to_end": e2e}
    return suite_result("paper", mode, started, measurements, _targets(timing, e2e, mode, skipped))


def report(result: dict[str, Any]) -> None:
    m = result["measurements"]
    if m["skipped"]:
        print_table("paper: nothing measured", ["reason"], [[m["skipped"]]])
    for t in m["timing"].values():
        print_table(f"paper: {t['alias']} at {t['image_size']} px, {t['precision']}, {t['tasks_per_step']} tasks/step "
                    f"of {t['episode']['images_per_step']} images, {t['rounds']} paired rounds",
                    ["setting", "s/step (median)", "min", "tasks/s", "images/s", "x PMF (paired)", "peak MiB",
                     "state MiB"],
                    [[s, r["median_s"], r["min_s"], r["tasks_per_s"], r["images_per_s"], t["ratio_to_pmf"].get(s, 1.0),
                      r.get("peak_mib"), r.get("state_mib")] for s, r in t["settings"].items()])
    e = m["end_to_end"]
    if e:
        print_table("paper: end-to-end run (preset=paper, smat, generated Meta-Dataset records)",
                    ["status", "wall s", "precision", "rows", "sources", "run folder"],
                    [[e["status"], e["wall_s"], e.get("precision"), e.get("rows"), ",".join(e.get("sources", [])),
                      e.get("run_dir")]])
    print_targets("paper", result["targets"])


def main(argv: list[str] | None = None) -> None:
    run_standalone("paper", standalone_parser(__doc__).parse_args(argv), run, report)


if __name__ == "__main__":
    main()
