"""``precision=auto``: which autocast a run takes on each device and backbone (CUDA and CPU features mocked)."""

from __future__ import annotations

import pytest
import torch

from metabench import engine
from metabench.backbones import BACKBONES
from metabench.engine import resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_cpu_is_bf16_only_for_flagged_backbones_with_native_bf16(monkeypatch: pytest.MonkeyPatch,
                                                                          native: bool) -> None:
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", CPU, cpu_bf16=True) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", CPU, cpu_bf16=False) == "fp32"
    assert resolve_precision("auto", CPU) == "fp32"


def test_an_explicit_precision_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, CPU, cpu_bf16=True) == p


def test_auto_on_cuda_ignores_the_cpu_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", torch.device("cuda"), cpu_bf16=True) == "fp16"


def test_the_vits_are_flagged_and_convolutional_and_test_backbones_are_not() -> None:
    flagged = {name for name in BACKBONES.names() if BACKBONES.get(name).cpu_bf16}
    assert {"vit_small", "vit_tiny", "vit_base"} <= flagged
    assert not flagged & {"efficientnet_lite0", "vit_test"}  # depthwise convs ran slower in bf16; tests stay fp32


def test_native_bf16_detection_answers_a_bool() -> None:
    engine.cpu_has_native_bf16.cache_clear()
    assert isinstance(engine.cpu_has_native_bf16(), bool)
