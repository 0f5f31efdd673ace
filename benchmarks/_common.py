"""Shared pieces of the benchmark suites: targets, paired timing, memory, child processes, tables, JSON.

Every suite returns one JSON-ready dict (``suite_result``) holding the machine it ran on, its raw
measurements and its targets. A target compares a *ratio of two things measured in the same
process, interleaved* whenever it can (SMAT vs PMF steps, zero-shot vs raw forward), because on a
shared 2-core machine absolute speeds swing by 2x within minutes while such ratios hold.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Mode = Literal["smoke", "quick", "full"]
MODES: tuple[str, ...] = ("smoke", "quick", "full")
REPO = Path(__file__).resolve().parent.parent
GIB = 1024.0  # MiB


@dataclass
class Target:
    """One requirement: ``measured`` must be at least (``kind="min"``) or at most (``"max"``) ``threshold``.

    ``measured=None`` means the suite could not measure it in this run (e.g. a setting skipped by
    ``--quick``); it then neither passes nor fails.
    """

    name: str
    measured: float | None
    threshold: float
    kind: Literal["min", "max"]
    unit: str = "x"
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.threshold if self.kind == "min" else self.measured <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "measured": None if self.measured is None else round(self.measured, 4),
                "passed": self.passed}


# -- machine ----------------------------------------------------------------------------------------

DEVICE_ENV = "METABENCH_BENCH_DEVICE"  # set by ``--device``; child processes inherit it
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def use_device(name: str) -> None:
    """Make ``name`` (auto, cpu or cuda) the device of every suite and of the children they start.

    Raises ValueError with one sentence when CUDA is asked for and this PyTorch sees none.
    """
    import torch

    if name not in DEVICES:
        raise ValueError(f'Device "{name}" is unknown; choose from {", ".join(DEVICES)}.')
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but this PyTorch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu or --device auto.")
    os.environ[DEVICE_ENV] = name


def requested_device() -> str:
    """The ``--device`` choice (auto when none was made, e.g. a suite run on its own)."""
    return os.environ.get(DEVICE_ENV, "auto")


def device() -> Any:
    """The device the suites time on: ``--device``; auto is the GPU when there is one, else the CPU."""
    import torch

    name = requested_device()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def machine_info() -> dict[str, Any]:
    """What the numbers depend on; the load average says how busy the machine was."""
    import torch

    dev = device()
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "threads_reason": os.environ.get("METABENCH_BENCH_THREADS_REASON", "torch default"),
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def configure_threads(threads: int | None = None) -> str:
    """Set torch's intra-op threads (inherited by child processes through OMP_NUM_THREADS); returns why.

    None chooses: one thread when the 1-minute load average already fills every core. On a busy
    machine, OpenMP threads spin at each barrier waiting for a descheduled sibling: measured here,
    a vit_test SMAT step took 0.07 s with 1 thread and 0.7-6 s with 2, and a vit_small PMF step
    7 s with 1 and 8-21 s with 2, so two threads would mostly time the other jobs.
    """
    import torch

    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        if env:
            threads, why = int(env), "OMP_NUM_THREADS"
        elif os.getloadavg()[0] >= (os.cpu_count() or 1):
            threads, why = 1, f"busy machine (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
        else:
            threads, why = torch.get_num_threads(), "torch default"
    else:
        why = "--threads"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["METABENCH_BENCH_THREADS_REASON"] = why
    torch.set_num_threads(threads)
    return why


def sync(dev: Any) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers what was launched in it."""
    import torch

    if getattr(dev, "type", str(dev)) == "cuda":
        torch.cuda.synchronize()


# -- memory -----------------------------------------------------------------------------------------

def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """High-water mark of this process's resident set since it started its program (VmHWM).

    Not ``getrusage().ru_maxrss``: Linux carries that across fork and exec, so a child started by a
    parent holding 8 GB reported 8 GB whatever it did (and RUSAGE_CHILDREN inherits the same value).
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def release_memory() -> None:
    """Drop dead learners and hand freed heap pages back to the OS, so the large RSS one suite leaves
    behind does not stay with the parent (and with the children it forks) for the next suites."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # and cached GPU blocks, so the next setting's peak starts from its own


# -- timing -----------------------------------------------------------------------------------------

def timed(dev: Any, fn: Callable[..., Any], *args: Any) -> float:
    """Wall-clock seconds of ``fn(*args)``, GPU work included."""
    sync(dev)
    start = time.perf_counter()
    fn(*args)
    sync(dev)
    return time.perf_counter() - start


def abba(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Orders for ``rounds`` rounds, alternating forward and reversed (A B C, C B A, ...), so a slow
    drift of the machine's load costs every contender the same on average."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of per-round ratios: each round's two values were measured back to back."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


# -- child processes --------------------------------------------------------------------------------

def spawn(module: str, cfg: Mapping[str, Any], timeout: float = 1800,
          extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m benchmarks.<module> --run-config JSON`` in a fresh process; its last stdout line
    is the JSON answer. A fresh process makes peak RSS that configuration's own."""
    env = {**os.environ, **(extra_env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--run-config", json.dumps(dict(cfg))],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"benchmarks.{module} child failed ({cfg}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- episodes ---------------------------------------------------------------------------------------

def fixed_episodes(n: int, *, way: int = 5, shot: int = 5, query: int = 10, image_size: int = 84,
                   seed: int = 0) -> list[Any]:
    """``n`` fixed way/shot training episodes of the embedded ``noto`` source (as metabench runs build them)."""
    from episodes.loader import EpisodeSet
    from episodes.readers.embedded import NotoGlyphs
    from episodes.sampler import SamplerConfig

    config = SamplerConfig(mode="fixed", way=way, shot=shot, query=query, use_bilevel_hierarchy=False)
    es = EpisodeSet([NotoGlyphs()], "train", config, n, seed=seed, image_size=image_size, per_source=False)
    return [es[i] for i in range(n)]


def png_bytes(image: Any, size: int) -> bytes:
    """One uint8 image (H x W, or H x W x 3) as PNG bytes, resized (bilinear) to ``size`` x ``size``."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image)).resize((size, size), Image.Resampling.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def write_class_records(path: Path, pngs: Sequence[bytes], label: int) -> None:
    """One class of a Meta-Dataset source: a TFRecord file of ``tf.train.Example`` (image, label) records."""
    from tfrecord.writer import TFRecordWriter

    writer = TFRecordWriter(str(path))
    for png in pngs:
        writer.write({"image": (png, "byte"), "label": (label, "int")})
    writer.close()


def image_size_of(alias: str) -> int:
    """vit_test is built for 32 px; every other backbone is timed at 84 px (the cpu preset's size)."""
    return 32 if alias == "vit_test" else 84


def quiet_logs() -> None:
    """Random-init warnings (vit_small offline) are expected here: timing does not need weights."""
    import logging
    import warnings

    logging.getLogger("metabench").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


# -- results ----------------------------------------------------------------------------------------

def suite_result(suite: str, mode: Mode, started: float, measurements: dict[str, Any],
                 targets: Sequence[Target]) -> dict[str, Any]:
    return {"suite": suite, "mode": mode, "machine": machine_info(),
            "seconds": round(time.perf_counter() - started, 1), "measurements": measurements,
            "targets": [t.to_dict() for t in targets]}


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write to a temporary file, then rename: an interrupted run never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    Console(width=160).print(table)


def print_targets(suite: str, targets: Sequence[Mapping[str, Any]]) -> None:
    rows = []
    for t in targets:
        verdict = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]n/a[/]"}[t["passed"]]
        bound = (">= " if t["kind"] == "min" else "<= ") + _fmt(t["threshold"]) + (f" {t['unit']}" if t["unit"] else "")
        rows.append([t["name"], _fmt(t["measured"]), bound, verdict, t.get("note", "")])
    print_table(f"{suite}: targets", ["target", "measured", "required", "", "note"], rows)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


# -- learners and entry points shared by the suites -------------------------------------------------

def build_learners(alias: str, specs: Mapping[str, tuple[str, dict[str, Any]]], dev: Any,
                   image_size: int | None = None) -> dict[str, Any]:
    """One learner per ``label -> (registry name, options)``, each on its own copy of one backbone
    (built for ``image_size``, by default ``image_size_of(alias)``)."""
    from metabench.backbones import create_backbone
    from metabench.learners import create_learner, learner_config_class

    backbone = create_backbone(alias, image_size=image_size or image_size_of(alias))
    return {label: create_learner(name, copy.deepcopy(backbone), learner_config_class(name)(name=name, **options)
                                  ).to(dev)
            for label, (name, options) in specs.items()}


def zero_shot_episode(learner: Any, ep: Any) -> None:
    """The zero-shot protocol on one episode: prototypes of the support set, logits of the queries."""
    import torch

    with torch.no_grad():
        learner.predict(learner.adapt(ep.support), ep.query_x)


def standalone_parser(doc: str) -> argparse.ArgumentParser:
    """``python -m benchmarks.<suite>``'s options (a suite may add its own)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 on a busy machine, else torch's)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto (the GPU when there is one), cpu or cuda")
    return p


def run_standalone(suite: str, args: argparse.Namespace, run: Callable[[Mode, Path], dict[str, Any]],
                   report: Callable[[dict[str, Any]], None]) -> None:
    """Run one suite on its own, print its tables and write ``<out>/<suite>.json``."""
    try:
        use_device(getattr(args, "device", "auto"))
    except ValueError as e:
        print(f"python -m benchmarks.{suite}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_threads(args.threads)
    result = run("quick" if args.quick else "full", Path(args.out))
    report(result)
    print(f"wrote {write_json(Path(args.out) / f'{suite}.json', result)}")
