"""The performance harness runs end to end in its smoke mode and writes the JSON the README relies on.

Speeds are never asserted here (the machine may be busy); only the shape of the results: every
suite's keys, positive timings, and targets that carry a measured value and a pass flag.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # ``benchmarks`` is not an installed package
from benchmarks import SUITES  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses (CLI, torchrun, kills): `pytest -m "not slow"` skips them

TARGET_KEYS = {"name", "measured", "threshold", "kind", "unit", "note", "passed"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("bench")
    threads, env = torch.get_num_threads(), {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",
                                                                            "METABENCH_BENCH_THREADS_REASON",
                                                                            "METABENCH_BENCH_DEVICE")}
    try:
        assert main(["--mode", "smoke", "--out", str(out), "--threads", "1"]) == 0
    finally:  # the harness sets threads for its whole process: give the other tests theirs back
        torch.set_num_threads(threads)
        for key, value in env.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return {suite: json.loads((out / f"{suite}.json").read_text()) for suite in SUITES}


def test_every_suite_writes_machine_info_and_targets(results: dict[str, dict]) -> None:
    for suite in SUITES:
        r = results[suite]
        assert r["suite"] == suite and r["mode"] == "smoke" and r["seconds"] > 0
        assert {"cpus", "torch_threads", "device", "torch"} <= set(r["machine"])
        assert r["machine"]["torch_threads"] == 1
        for target in r["targets"]:
            assert set(target) == TARGET_KEYS
            assert target["passed"] in (True, False, None)


def test_pipeline_times_every_reader(results: dict[str, dict]) -> None:
    m = results["pipeline"]["measurements"]
    assert {r["reader"] for r in m["throughput"]} == {"tfrecord", "hdf5", "folder", "embedded"}
    assert all(r["images_per_s"] > 0 and r["episodes_per_s"] > 0 for r in m["throughput"])
    assert all(r["peak_rss_mib"] > 0 and r["rss_samples_mib"] for r in m["rss_over_episodes"])
    consumer = next(t for t in results["pipeline"]["targets"] if "SMAT consumption" in t["name"])
    assert consumer["measured"] > 0  # read from the training suite of the same run


def test_training_times_profiles_and_sizes_each_setting(results: dict[str, dict]) -> None:
    m = results["training"]["measurements"]
    settings = m["timing"]["vit_test"]["settings"]
    assert {"pmf", "lora", "smat_elementwise_teacher_off", "smat_structured_teacher_on"} <= set(settings)
    assert all(s["median_s"] > 0 and s["images_per_s"] > 0 for s in settings.values())
    assert all(r > 0 for r in m["timing"]["vit_test"]["ratio_to_pmf"].values())
    assert all(v["step_peak_mib"] >= 0 for v in m["memory"]["vit_test"].values())  # in-process: may be 0
    profile = m["profile"]
    assert profile["step_seconds"] > 0 and profile["top_ops"]
    assert {"router", "merge", "forward", "teacher", "backward"} <= set(profile["groups"])
    assert profile["groups"]["forward"] > 0 and profile["groups"]["teacher"] > 0


def test_evaluation_pairs_zero_shot_with_the_raw_forward(results: dict[str, dict]) -> None:
    m = results["evaluation"]["measurements"]
    rows = m["zero_shot"]["vit_test"]["learners"]
    assert {"pre", "pmf", "lora", "smat_elementwise", "smat_structured"} == set(rows)
    assert all(r["ratio"] > 0 and r["raw_images_per_s"] > 0 for r in rows.values())
    assert rows["smat_elementwise"]["limit"] == 0.75  # (S + Q) / (2S + Q) on 5-way 5-shot 10-query episodes
    shares = [t for t in results["evaluation"]["targets"] if "share of its limit" in t["name"]]
    assert len(shares) == 2 and all(t["threshold"] == 0.95 and "limit" in t["note"] for t in shares)
    modes = m["fine_tuning"]["vit_test"]["modes"]
    assert set(modes) == {"full", "lora"} and all(r["seconds_per_episode"] > 0 for r in modes.values())


def test_scaling_draws_its_figure(results: dict[str, dict]) -> None:
    m = results["scaling"]["measurements"]
    curve = m["curves"]["vit_test"]
    assert curve["support_sizes"] == [25, 50]
    assert all(t > 0 for t in curve["seconds"]["smat"]["train"] + curve["seconds"]["pre"]["zero_shot"])
    assert curve["seconds"]["pre"]["train"] == [None, None]  # pre has no meta-training phase
    assert Path(m["figure"]).is_file()


def test_distributed_times_one_and_two_ranks(results: dict[str, dict]) -> None:
    (m,) = results["distributed"]["measurements"].values()
    assert m["1_rank"]["tasks_per_s"] > 0 and m["2_ranks"]["tasks_per_s"] > 0
    assert m["speedup"] == pytest.approx(m["2_ranks"]["tasks_per_s"] / m["1_rank"]["tasks_per_s"])


def test_paper_times_the_paper_settings_and_runs_end_to_end(results: dict[str, dict]) -> None:
    m = results["paper"]["measurements"]
    assert m["skipped"] is None and set(m["timing"]) == {"32", "48"}  # smoke: vit_test at two sizes, on any device
    for t in m["timing"].values():
        assert set(t["settings"]) == {"pmf", "lora", "smat_elementwise", "smat_structured"}
        assert t["tasks_per_step"] == 4 and t["precision"] == "fp32"  # the paper preset's meta-batch; CPU: no autocast
        assert all(r["tasks_per_s"] > 0 and r["median_s"] > 0 for r in t["settings"].values())
        assert set(t["ratio_to_pmf"]) == {"lora", "smat_elementwise", "smat_structured"}
        assert all("peak_mib" not in r for r in t["settings"].values())  # GPU memory only on a GPU
    e = m["end_to_end"]
    assert e["status"] == 0 and e["wall_s"] > 0 and e["precision"] == "fp32"
    assert e["sources"] == ["dtd", "omniglot", "traffic_sign"] and e["rows"] == 3 and e["train_log_lines"] > 0
    run_dir = Path(e["run_dir"])
    assert (run_dir / "manifest.json").is_file() and (run_dir / "episodes.parquet").is_file()
    assert not (run_dir / "checkpoints").exists() and (run_dir.parent / "metabench-run.log").is_file()
    names = [t["name"] for t in results["paper"]["targets"]]
    assert "end-to-end paper run: exit status" in names and sum("peak GPU memory" in n for n in names) == 4
