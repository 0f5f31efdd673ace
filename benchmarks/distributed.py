"""Meta-training tasks/s with 1 vs 2 processes under torchrun (gloo on CPU, NCCL on GPUs).

Both runs meta-train the same learner on the same seeded episode stream with the same meta-batch
(2 tasks per update); with 2 ranks each process takes one task of every update and gradients are
averaged after each backward pass (``metabench.distributed``). On a CPU, 1 process gets every core
and each of 2 processes gets half of them, so the ratio measures what splitting the work costs or
gains on the same hardware; on GPUs each rank has its own device. The two runs are launched back to
back in one invocation so the ratio is paired.

Each run is ``python -m torch.distributed.run --standalone --nproc_per_node=N -m benchmarks.distributed
--worker JSON``; rank 0 prints its timing as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    REPO,
    Mode,
    Target,
    device,
    print_table,
    print_targets,
    quiet_logs,
    requested_device,
    suite_result,
)

#: (backbone, tasks timed after one warm-up update) per mode
PLAN: dict[str, list[tuple[str, int]]] = {"smoke": [("vit_test", 4)], "quick": [("vit_test", 40), ("vit_small", 8)],
                                          "full": [("vit_test", 100), ("vit_small", 24)]}
LEARNER = "pmf"
TASKS_PER_UPDATE = 2


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One rank: build the learner, take this rank's tasks, time meta-training after a warm-up update."""
    import torch

    from episodes.configured import build_sources
    from episodes.episode import Split
    from episodes.loader import EpisodeSet
    from metabench.backbones import create_backbone
    from metabench.config import load_config
    from metabench.distributed import (
        attach_grad_averaging,
        broadcast_module,
        init_from_env,
        is_main,
        shutdown,
        world_size,
    )
    from metabench.engine import meta_train, select_device
    from metabench.learners import create_learner
    from metabench.training import rank_tasks

    quiet_logs()
    device = select_device(init_from_env(requested_device()))  # --device: gloo on cpu, NCCL on GPUs
    n = cfg["tasks"] + TASKS_PER_UPDATE
    per_rank = TASKS_PER_UPDATE // world_size()  # the same meta-batch with 1 and 2 ranks
    run_cfg = load_config(overrides=[f"train.episodes={n}", f"train.tasks_per_update={per_rank}",
                                     f"data.image_size={cfg['image_size']}"],
                          flags={"learner": {"name": LEARNER}, "backbone": {"name": cfg["backbone"]}, "preset": "cpu"})
    torch.manual_seed(0)
    learner = create_learner(LEARNER, create_backbone(cfg["backbone"]), run_cfg.learner).to(device)
    broadcast_module(learner)
    attach_grad_averaging(learner)
    episodes = EpisodeSet(list(build_sources(["noto"], None).values()), Split.TRAIN, run_cfg.data.train_sampler, n,
                          seed=0, image_size=run_cfg.data.image_size, per_source=False)
    mine = [episodes[i] for i in rank_tasks(run_cfg, 0)]  # decoded up front: only training is timed
    share = len(mine) // (n // TASKS_PER_UPDATE)
    meta_train(learner, mine[:share], n_tasks=TASKS_PER_UPDATE, tasks_per_update=TASKS_PER_UPDATE, device=device,
               progress=False)  # warm-up update
    start = time.perf_counter()
    meta_train(learner, mine[share:], n_tasks=cfg["tasks"], tasks_per_update=TASKS_PER_UPDATE, device=device,
               progress=False)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "tasks": cfg["tasks"], "tasks_per_s": cfg["tasks"] / seconds, "device": str(device)}
    main = is_main()
    shutdown()
    if main:
        print(json.dumps(result), flush=True)
    return result


def _launch(ranks: int, cfg: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    cores = os.cpu_count() or 1
    env["OMP_NUM_THREADS"] = str(max(1, cores // ranks))  # the same cores, split between the processes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "benchmarks.distributed", "--worker", json.dumps(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{ranks}-rank benchmark failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _two_rank_skip() -> str:
    """Why the 2-rank run cannot happen here ("" when it can): NCCL needs one GPU per rank."""
    import torch

    if device().type == "cuda" and torch.cuda.device_count() < 2:
        return f"not run: 2 ranks need 2 GPUs under NCCL, this machine has {torch.cuda.device_count()}"
    return ""


def run(mode: Mode, out: Path, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time meta-training with 1 and 2 ranks for each backbone of the mode's plan."""
    started, measurements, targets = time.perf_counter(), {}, []
    skip = _two_rank_skip()
    for backbone, tasks in PLAN[mode]:
        cfg = {"backbone": backbone, "tasks": tasks, "image_size": 32 if backbone == "vit_test" else 84}
        one = _launch(1, cfg)
        two = None if skip else _launch(2, cfg)
        speedup = None if two is None else two["tasks_per_s"] / one["tasks_per_s"]
        measurements[backbone] = {"learner": LEARNER, "tasks_per_update": TASKS_PER_UPDATE, "1_rank": one,
                                  "2_ranks": two, "speedup": speedup}
        targets.append(Target(f"{backbone}: 2-rank / 1-rank meta-training tasks/s ({LEARNER})", speedup, 1.0, "min",
                              note=skip or "informational on a CPU: both runs share the same cores"))
    return suite_result("distributed", mode, started, measurements, targets)


def report(result: dict[str, Any]) -> None:
    rows = [[name, m["1_rank"]["tasks_per_s"], (m["2_ranks"] or {}).get("tasks_per_s"), m["speedup"]]
            for name, m in result["measurements"].items()]
    print_table("distributed: meta-training tasks/s", ["backbone", "1 rank", "2 ranks", "2 / 1"], rows)
    print_targets("distributed", result["targets"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True, help="JSON config of one run (internal)")
    _worker(json.loads(parser.parse_args().worker))
