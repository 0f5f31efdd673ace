"""Plugin for the resume tests: learners that kill their own process (SIGKILL, so no clean-up runs).

``METABENCH_TEST_CRASH=train:N`` kills after the N-th meta-update of this process (before its
checkpoint hook runs); ``eval:N`` kills after the N-th prediction. Unset, they are plain pmf / smat.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from baselines.pmf import PMF, PMFConfig
from metabench.learners import LEARNERS
from metabench.learners.smat import SMAT
from metabench.learners.smat.config import SMATConfig


def _maybe_crash(phase: str, count: int) -> None:
    where, _, at = os.environ.get("METABENCH_TEST_CRASH", "").partition(":")
    if where == phase and count == int(at):
        os.kill(os.getpid(), signal.SIGKILL)


class _Crashing:
    _updates_here = 0
    _predictions_here = 0

    def meta_train_step(self, episodes):  # type: ignore[no-untyped-def]
        metrics = super().meta_train_step(episodes)  # type: ignore[misc]
        type(self)._updates_here += 1
        _maybe_crash("train", type(self)._updates_here)
        return metrics

    def predict(self, state, query_x):  # type: ignore[no-untyped-def]
        logits = super().predict(state, query_x)  # type: ignore[misc]
        type(self)._predictions_here += 1
        _maybe_crash("eval", type(self)._predictions_here)
        return logits


@dataclass
class CrashPMFConfig(PMFConfig):
    name: str = "pmf_crash"


@dataclass
class CrashSMATConfig(SMATConfig):
    name: str = "smat_crash"


@LEARNERS.register("pmf_crash")
class CrashingPMF(_Crashing, PMF):
    Config = CrashPMFConfig


@LEARNERS.register("smat_crash")
class CrashingSMAT(_Crashing, SMAT):
    Config = CrashSMATConfig
