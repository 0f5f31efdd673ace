"""The harness's device choice and the autocast its paper suite times under, checked on a CPU (CUDA mocked).

CI has no GPU: these pin what ``python -m benchmarks --device ...`` selects before any suite runs, and that the
paper suite takes the precision a ``preset=paper`` run takes (bf16 autocast on a GPU that supports it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # ``benchmarks`` is not an installed package
from benchmarks import __main__ as bench_main  # noqa: E402
from benchmarks import _common, distributed, paper  # noqa: E402
from metabench.engine import autocast  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_common.DEVICE_ENV, "auto")  # the harness sets it for its whole process; undone after


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, *, bf16: bool = True, count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _chosen(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, list[str]]:
    """``main(argv)`` with the suites replaced by a probe: its exit status and the device the suites would get."""
    seen: list[str] = []

    def fake_run(args: Any) -> dict:
        seen.append(str(_common.device()))
        return {}

    monkeypatch.setattr(bench_main, "run", fake_run)
    return bench_main.main(argv), seen


def test_device_cpu_forces_the_cpu_even_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch)
    assert _chosen(monkeypatch, ["--device", "cpu"]) == (0, ["cpu"])
    assert _chosen(monkeypatch, ["--device", "auto"]) == (0, ["cuda"])  # today's default: the GPU when there is one


def test_device_cuda_without_cuda_is_one_sentence_and_status_2(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _chosen(monkeypatch, ["--device", "cuda", "--only", "paper"]) == (2, [])  # no suite ran
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m benchmarks: --device cuda was requested") and err.count(". ") == 0
    assert "\n" not in err and err.endswith("use --device cpu or --device auto.")
    assert _chosen(monkeypatch, ["--device", "auto"]) == (0, ["cpu"])


def test_standalone_suite_refuses_cuda_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        paper.main(["--device", "cuda"])
    assert exc.value.code == 2


def test_paper_suite_times_under_bf16_autocast_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, bf16=True)
    cuda = torch.device("cuda")
    assert paper.precision_for(cuda) == "bf16"
    assert autocast(cuda, paper.precision_for(cuda)).fast_dtype == torch.bfloat16
    _fake_cuda(monkeypatch, bf16=False)
    assert paper.precision_for(cuda) == "fp16"  # what a run takes on a GPU without bf16
    assert paper.precision_for(torch.device("cpu")) == "fp32"


def test_paper_settings_carry_the_paper_preset() -> None:
    elementwise, structured = paper.paper_config("smat_elementwise"), paper.paper_config("smat_structured")
    assert elementwise.preset == "paper" and elementwise.train.tasks_per_update == 4
    assert not elementwise.learner.structured and structured.learner.structured
    assert elementwise.learner.schedule == "upstream_epochs" and elementwise.learner.teacher_steps == 1
    assert paper.paper_config("lora").learner.name == "lora"


def test_quick_paper_suite_without_cuda_measures_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = paper.run("quick", None)
    assert result["measurements"]["skipped"].startswith("skipped: quick mode needs CUDA")
    assert result["targets"] and all(t["measured"] is None and t["passed"] is None for t in result["targets"])


def test_distributed_skips_two_ranks_on_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, count=1)
    assert "2 GPUs" in distributed._two_rank_skip()
    _common.use_device("cpu")
    assert distributed._two_rank_skip() == ""  # gloo: two processes share the CPU
