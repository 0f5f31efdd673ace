"""``studies/smat_cpu.py train --jobs N``: every run once, one torch thread each, equal-allocation runs after the
SMAT run whose masks they copy (metabench itself replaced by a recorder)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from studies import smat_cpu


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, str, int | None]]:
    events: list[tuple[str, str, int | None]] = []
    lock = threading.Lock()

    def fake(*args: str, threads: int | None = None) -> None:
        name = next(a.split("=", 1)[1] for a in args if a.startswith("run_name="))
        with lock:
            events.append(("start", name, threads))
        time.sleep(0.2 if name == f"smat-tau{smat_cpu.MAIN_TAU}" else 0.01)
        with lock:
            events.append(("end", name, threads))

    monkeypatch.setattr(smat_cpu, "_metabench", fake)
    monkeypatch.setattr(smat_cpu, "OUT", tmp_path / "runs")
    monkeypatch.setattr(smat_cpu, "run_dir_of", lambda name: smat_cpu.ROOT / "runs" / "none" / name)
    monkeypatch.setattr(smat_cpu, "_status", lambda run_dir: None)
    monkeypatch.setattr(smat_cpu.shutil, "rmtree", lambda path: None)
    return events


def test_jobs_run_every_run_once_with_one_thread_and_alloc_after_its_source(recorded: list) -> None:
    main, names = f"smat-tau{smat_cpu.MAIN_TAU}", [f"smat-tau{smat_cpu.MAIN_TAU}", "smat_random-alloc", "pmf", "pre"]
    smat_cpu.train(names, jobs=2)
    starts = [name for kind, name, _ in recorded if kind == "start"]
    assert sorted(starts) == sorted(names) and {threads for *_, threads in recorded} == {1}
    order = [(kind, name) for kind, name, _ in recorded]
    assert order.index(("end", main)) < order.index(("start", "smat_random-alloc"))
    assert order.index(("start", "pmf")) < order.index(("end", main))  # the other worker did not wait


def test_one_job_runs_in_order_with_torch_threads(recorded: list) -> None:
    smat_cpu.train(["pre", "pmf"], jobs=1)
    assert recorded == [("start", "pre", None), ("end", "pre", None), ("start", "pmf", None), ("end", "pmf", None)]


def test_a_failed_run_stops_new_starts_and_is_raised(monkeypatch: pytest.MonkeyPatch, recorded: list) -> None:
    def failing(name: str, threads: int | None) -> None:
        recorded.append(("start", name, threads))
        if name == "pre":
            raise RuntimeError("pre failed")
        time.sleep(0.2)  # the failure is recorded while this one runs

    with pytest.raises(RuntimeError, match="pre failed"):
        smat_cpu._in_parallel(["pre", "a", "b", "c", "d"], failing, jobs=2)
    assert len(recorded) < 5  # the queue stopped behind the failure
