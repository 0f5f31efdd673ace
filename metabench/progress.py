"""Progress of long phases: a tqdm bar on a terminal, a log line every ~30 s elsewhere (a cluster job, ``| tee``).

tqdm hides itself when stderr is not a terminal, so a piped run used to show nothing between its start and its
final table. ``progress`` keeps the bar where it helps and otherwise logs what the bar would show: count, share,
rate, time left and the latest metrics.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from tqdm.auto import tqdm

__all__ = ["LogProgress", "progress"]

log = logging.getLogger("metabench.progress")
T = TypeVar("T")
EVERY_SECONDS = float(os.environ.get("METABENCH_LOG_SECONDS", "30"))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class LogProgress(Generic[T]):
    """The part of tqdm's interface the loops use (update, set_postfix, iteration, close), as log lines."""

    def __init__(self, iterable: Iterable[T] | None = None, *, total: int | None = None, initial: int = 0,
                 desc: str = "", unit: str = "it", every: float = EVERY_SECONDS) -> None:
        self.iterable, self.total, self.n = iterable, total, initial
        self.desc, self.unit, self.every = desc, unit, every
        self._start_n, self._start = initial, time.monotonic()
        self._last = self._start
        self._postfix: dict[str, Any] = {}

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)

    def set_postfix(self, values: Mapping[str, Any] | None = None, **more: Any) -> None:
        self._postfix = {**(values or {}), **more}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every or (self.total is not None and self.n >= self.total):
            self._last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """What the bar would show: ``meta-train: 120/1000 task (12%), 0.45 task/s, 32m10s left, loss=0.43``."""
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
                                             if self.total else f" {self.unit}")]
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"{_duration(max(self.total - self.n, 0) / rate)} left")
        parts += [f"{k}={v}" for k, v in self._postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self.n != self._start_n and time.monotonic() - self._last > 1:
            log.info("%s (done)", self.line())


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, initial: int = 0, desc: str = "",
             unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar when stderr is a terminal, a ``LogProgress`` otherwise, a silent tqdm when not ``enabled``."""
    if not enabled:
        return tqdm(iterable, total=total, initial=initial, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return LogProgress(iterable, total=total, initial=initial, desc=desc, unit=unit)
