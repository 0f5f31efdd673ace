"""The SMAT CPU study: every run, evaluation and the report of docs/smat-cpu-study, from a fresh clone.

    python studies/smat_cpu.py train --jobs 2   # meta-train + zero-shot evaluate every learner, two at a time
                                                # (resumes, skips what finished)
    python studies/smat_cpu.py finetune --jobs 2   # full fine-tuning of the runs that claim (a) compares
    python studies/smat_cpu.py report     # tables, paired tests, the five answers and figures -> docs/
    python studies/smat_cpu.py report --from-docs   # the same from the run copies committed under docs/

Every run starts from ``studies/smat_cpu.yaml`` (EfficientNet-Lite0, 84 px, five noto scripts as training
domains, 1,000 meta-training tasks, the frozen ``smat-cpu-study`` suite); ``RUNS`` adds each learner's options.
Runs go to ``runs/smat-cpu-study/<name>/``; a killed command picks up where it stopped (``run --resume``).
Fashion-MNIST needs Debian's ``dataset-fashion-mnist`` package.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "studies" / "smat_cpu.yaml"
OUT = ROOT / "runs" / "smat-cpu-study"
DOCS = ROOT / "docs" / "smat-cpu-study"

#: SMAT's study recipe, shared by every SMAT-family run: the ``cpu`` preset's SMAT (AdamW delta, multiplier lr 10,
#: the target ramped over the first half; upstream's multiplier rate leaves the masks dense in 250 updates, see
#: the report) with the paper's elementwise masks and the router temperature reaching its floor after 36% of the
#: run, as upstream's 18k of 50k tasks.
SMAT_RECIPE: tuple[str, ...] = ("learner.structured=false", "learner.temperature_decay=80")
#: The upstream code's dynamics (the ``paper`` preset's SMAT options) on top of the study recipe.
UPSTREAM_DYNAMICS: tuple[str, ...] = ("learner.constraint_weighting=alpha", "learner.schedule=upstream_epochs",
                                      "learner.kd_direction=student_teacher", "learner.head_step=true")
TAUS: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)  # the sparsity sweep
MAIN_TAU = 0.9  # the paper's ViT-S target


def _smat(tau: float) -> tuple[str, tuple[str, ...]]:
    return "smat", (*SMAT_RECIPE, f"learner.sparsity={tau}", "train.probe_every=25")


#: name -> (learner, extra overrides). Order = training order (what the claims need first).
RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pre": ("pre", ("train.episodes=0",)),
    "pmf": ("pmf", ()),
    "lora": ("lora", ()),
    f"smat-tau{MAIN_TAU}": _smat(MAIN_TAU),
    "smat_random": ("smat_random", (*SMAT_RECIPE, f"learner.sparsity={MAIN_TAU}")),
    "smat_magnitude": ("smat_magnitude", (*SMAT_RECIPE, f"learner.sparsity={MAIN_TAU}")),
    # equal allocation: the fixed masks take the trained SMAT run's per-expert, per-tensor densities
    **{f"{kind}-alloc": (kind, (*SMAT_RECIPE, f"learner.sparsity={MAIN_TAU}", "learner.mask_allocation=ALLOCATION"))
       for kind in ("smat_random", "smat_magnitude")},
    **{f"smat-tau{t}": _smat(t) for t in (0.5, 0.99, 0.8, 0.95)},
    "softmerge": ("softmerge", SMAT_RECIPE),
    f"smat-upstream-tau{MAIN_TAU}": ("smat", (*_smat(MAIN_TAU)[1], *UPSTREAM_DYNAMICS)),
    # the paper's SMAT options unchanged (multiplier lr 2e-3, no target ramp, momentum-SGD delta, pretrained-model
    # distillation, the upstream dynamics) at this budget: does the paper recipe reach tau in 250 updates?
    "smat-paper-recipe": ("smat", (*_smat(MAIN_TAU)[1], *UPSTREAM_DYNAMICS, "learner.lambda_lr=2e-3",
                                   "learner.sparsity_warmup=0", "learner.delta_optimizer=sgd", "learner.delta_lr=1e-4",
                                   "learner.kd_pretrained=true")),
}
#: Full fine-tuning (claim (a) is out of domain, so the OOD sources): the baselines and SMAT at the paper's tau,
#: 10 steps at PMF's fixed rate (no rate is chosen on any labels), the first 30 episodes of each OOD source
#: (3-6 s per episode on one CPU core: 10-20 minutes per run).
FINETUNE_RUNS: tuple[str, ...] = ("pre", "pmf", f"smat-tau{MAIN_TAU}", "lora", "softmerge")
OOD_SOURCES = ("noto_telugu", "noto_greek", "noto_khmer", "noto_tamil", "digits", "mnist", "fashion_mnist")
FINETUNE: tuple[str, ...] = ("eval.steps=10", "eval.lr_selection=fixed", "eval.lr=1e-4", "eval.episodes=30",
                             f"data.eval_sources=[{','.join(OOD_SOURCES)}]")


def _status(run_dir: Path) -> str | None:
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        return None
    try:
        return json.loads(manifest.read_text()).get("status")
    except (OSError, ValueError):
        return None


def run_dir_of(name: str) -> Path:
    """A run's folder: under runs/ while it exists there, else its committed copy under docs/ (finished runs;
    no weights, so fine-tuning a copied run needs it trained again)."""
    local, copy = OUT / name, DOCS / "runs" / name
    return copy if _status(local) is None and _status(copy) == "finished" else local


def _metabench(*args: str, threads: int | None = None) -> None:
    cmd = [sys.executable, "-m", "metabench", *args]
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def _train_one(name: str, threads: int | None = None) -> None:
    """Meta-train and zero-shot evaluate run ``name`` unless it finished (resuming it if it was interrupted)."""
    learner, overrides = RUNS[name]
    run_dir = run_dir_of(name)
    status = _status(run_dir)
    if status == "finished":
        print(f"= {name}: finished", flush=True)
    elif status is not None:
        _metabench("run", "--resume", str(run_dir), threads=threads)
    else:
        if run_dir.exists():  # a folder without a manifest holds nothing to resume
            shutil.rmtree(run_dir)
        allocation = str(run_dir_of(f"smat-tau{MAIN_TAU}").relative_to(ROOT))  # the trained SMAT run's masks
        _metabench("run", "--config", str(CONFIG), "--learner", learner, f"out_dir={OUT}", f"run_name={name}",
                   *(o.replace("ALLOCATION", allocation) for o in overrides), threads=threads)


def _in_parallel(names: list[str], fn: Callable[[str, int | None], None], jobs: int,
                 waits_for: Callable[[str], str | None] = lambda name: None) -> None:
    """``fn(name, threads)`` for each name, ``jobs`` at a time (one torch thread each when more than one: on a
    2-core CPU two one-thread runs finish sooner than one after the other). A free worker takes the first name,
    in order, whose ``waits_for`` run is not among ``names`` or has finished. The first failure stops new starts
    (runs in flight finish; ``--resume`` continues) and is raised."""
    if jobs <= 1:
        for name in names:
            fn(name, None)
        return
    pending, done, errors = list(names), set(), []
    changed = threading.Condition()

    def ready() -> str | None:
        return next((n for n in pending if waits_for(n) not in names or waits_for(n) in done), None)

    def worker() -> None:
        while True:
            with changed:
                while pending and not errors and ready() is None:
                    changed.wait()
                if not pending or errors:
                    return
                name = ready()
                pending.remove(name)
            try:
                fn(name, 1)
            except BaseException as err:  # noqa: BLE001 - raised again in the calling thread
                errors.append(err)
            with changed:
                done.add(name)
                changed.notify_all()

    workers = [threading.Thread(target=worker) for _ in range(jobs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


def train(names: list[str], jobs: int = 1) -> None:
    """Meta-train and zero-shot evaluate each run that has not finished, ``jobs`` at a time; an equal-allocation
    run waits for the SMAT run whose masks it copies."""
    OUT.mkdir(parents=True, exist_ok=True)
    _in_parallel(names, _train_one, jobs, lambda name: f"smat-tau{MAIN_TAU}" if name.endswith("-alloc") else None)


def _finetune_one(name: str, threads: int | None = None) -> None:
    import pandas as pd

    run_dir = run_dir_of(name)
    rows = pd.read_parquet(run_dir / "episodes.parquet")
    if (rows["mode"] == "full").any():
        print(f"= {name}: fine-tuned", flush=True)
        return
    _metabench("eval", "--run", str(run_dir), "--mode", "full", *FINETUNE, threads=threads)


def finetune(names: list[str], jobs: int = 1) -> None:
    """Add full fine-tuning rows to finished runs that do not have them yet, ``jobs`` at a time."""
    _in_parallel(names, _finetune_one, jobs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["train", "finetune", "report"])
    parser.add_argument("--only", nargs="+", help="run names (default: all of the step's runs)")
    parser.add_argument("--from-docs", action="store_true", help="report: rebuild from the copies in docs/ only")
    parser.add_argument("--jobs", type=int, default=1, help="train, finetune: runs at a time, one torch thread "
                        "each (2 on a 2-core CPU)")
    args = parser.parse_args(argv)
    if args.step == "train":
        train(args.only or list(RUNS), jobs=args.jobs)
    elif args.step == "finetune":
        finetune(args.only or list(FINETUNE_RUNS), jobs=args.jobs)
    else:
        sys.path.insert(0, str(ROOT))
        from studies.smat_cpu_report import HEADER, collect, write_report

        if not args.from_docs:
            collect(OUT, DOCS)
        print(write_report(DOCS, HEADER))


if __name__ == "__main__":
    main()
