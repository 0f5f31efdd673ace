"""The main results table: sources (ID, then OOD) × settings (run label × protocol), as in SMAT's Table 1.

A cell is the mean per-episode accuracy ± 1.96·σ/√n (population σ) over that source's episodes. After each
domain's sources comes its average row (the plain mean of the per-source means; its half-width is
1.96·√(Σ σᵢ²/nᵢ)/k, the CI of a mean of k independent means), then one "Average rank" row over all sources.

Ranks and bold (see ``metabench.stats``): within a row, entries tie when |Δ| ≤ 1.96·√(s₁²/n₁ + s₂²/n₂); tie
groups are anchored at their best entry and share the averaged rank. Bold marks the best tie group (the best
entry and all entries not significantly worse than it) in rows where at least one entry is significantly worse;
in the average-rank row, bold marks the lowest average rank (unless all are equal).

A setting's average (and average rank) is only shown when it has results on every source of the domain (all
sources, for the rank); otherwise the cell is empty, since averages over different sources do not compare.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd

from metabench.stats import Estimate, average_estimate, estimate, tie_aware_ranks, top_group

__all__ = ["Column", "ResultsTable", "TableRow", "protocol_label", "results_table", "setting_frame"]

Column = tuple[str, str, int]  # (run label, mode, steps)
DOMAIN_ORDER = {"id": 0, "ood": 1}


def protocol_label(mode: str, steps: int) -> str:
    """``zero_shot`` or ``full@50``: the protocol part of a column name."""
    return str(mode) if int(steps) == 0 else f"{mode}@{int(steps)}"


@dataclass
class TableRow:
    name: str
    kind: str  # "source" | "average" | "rank"
    domain: str  # "id" | "ood" | "" (rank row)
    cells: dict[Column, Estimate]
    ranks: dict[Column, float] = field(default_factory=dict)
    bold: set[Column] = field(default_factory=set)


@dataclass
class ResultsTable:
    """Rows in display order and columns in display order; the renderers live in ``analysis.render``."""

    columns: list[Column]
    rows: list[TableRow]
    not_pretrained: set[str]  # run labels whose backbone was not pretrained (random init)

    def column_name(self, col: Column, mark: str = " †") -> str:
        label, mode, steps = col
        return f"{label} · {protocol_label(mode, steps)}" + (mark if label in self.not_pretrained else "")

    def long(self) -> pd.DataFrame:
        """One row per (table row, column): the CSV form, accuracies in percent."""
        out = []
        for row in self.rows:
            for col in self.columns:
                est = row.cells.get(col)
                if est is None:
                    continue
                scale = 1.0 if row.kind == "rank" else 100.0
                out.append({"row": row.name, "kind": row.kind, "domain": row.domain, "label": col[0],
                            "mode": col[1], "steps": col[2], "mean": scale * est.mean,
                            "ci95": scale * est.half_width, "episodes": est.n, "rank": row.ranks.get(col, math.nan),
                            "bold": col in row.bold, "pretrained": col[0] not in self.not_pretrained})
        return pd.DataFrame(out)


def setting_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with a ``label`` column (falling back to ``learner``) and ints in ``steps``."""
    out = frame.copy()
    if "label" not in out.columns:
        out["label"] = out["learner"]
    out["steps"] = out["steps"].astype(int)
    return out


def _ordered_columns(frame: pd.DataFrame) -> list[Column]:
    labels = list(dict.fromkeys(frame["label"]))
    seen = list(dict.fromkeys(frame["mode"]))
    modes = sorted(seen, key=lambda m: (m != "zero_shot", seen.index(m)))
    keys = frame[["label", "mode", "steps"]].drop_duplicates()
    cols = [(str(r.label), str(r.mode), int(r.steps)) for r in keys.itertuples(index=False)]
    return sorted(cols, key=lambda c: (labels.index(c[0]), modes.index(c[1]), c[2]))


def _ordered_sources(frame: pd.DataFrame) -> list[tuple[str, str]]:
    pairs = list(dict.fromkeys(zip(frame["domain"].astype(str), frame["source"].astype(str))))
    return sorted(pairs, key=lambda p: (DOMAIN_ORDER.get(p[0], 2), p[0]))  # stable: keeps source order


def _source_rows(frame: pd.DataFrame, columns: list[Column]) -> list[TableRow]:
    rows = []
    groups = frame.groupby(["domain", "source", "label", "mode", "steps"], sort=False)["accuracy"]
    cells_by_key = {key: estimate(values) for key, values in groups}
    for domain, source in _ordered_sources(frame):
        cells = {c: cells_by_key[(domain, source, *c)] for c in columns if (domain, source, *c) in cells_by_key}
        rows.append(TableRow(source, "source", domain, cells, tie_aware_ranks(cells), top_group(cells)))
    return rows


def _average_row(domain: str, rows: list[TableRow], columns: list[Column]) -> TableRow:
    cells = {}
    for col in columns:
        parts = [r.cells.get(col) for r in rows]
        if all(p is not None for p in parts):
            cells[col] = average_estimate(parts)  # type: ignore[arg-type]
    name = f"{domain.upper()} average" if domain in DOMAIN_ORDER else f"{domain} average"
    return TableRow(name, "average", domain, cells, tie_aware_ranks(cells), top_group(cells))


def _rank_row(rows: list[TableRow], columns: list[Column]) -> TableRow:
    cells: dict[Column, Estimate] = {}
    for col in columns:
        ranks = [r.ranks.get(col) for r in rows]
        if rows and all(rk is not None for rk in ranks):
            cells[col] = Estimate(sum(ranks) / len(ranks), math.nan, len(ranks))  # type: ignore[arg-type]
    best = min((e.mean for e in cells.values()), default=math.nan)
    bold = {c for c, e in cells.items() if e.mean == best}
    bold = bold if len(bold) < len(cells) else set()  # everyone tied: nothing stands out
    return TableRow("Average rank", "rank", "", cells, {}, bold)


def results_table(frame: pd.DataFrame, columns: Iterable[Column] | None = None) -> ResultsTable:
    """Build the table from per-episode rows (``analysis.load.load_runs`` or ``metabench.results.load_run``).

    Args:
        frame: episode rows; uses label (else learner), mode, steps, domain, source, accuracy, pretrained.
        columns: the (label, mode, steps) columns to show, in order; default: all, run order then protocol.
    """
    frame = setting_frame(frame)
    cols = list(columns) if columns is not None else _ordered_columns(frame)
    source_rows = _source_rows(frame, cols)
    rows: list[TableRow] = []
    for domain in dict.fromkeys(r.domain for r in source_rows):
        in_domain = [r for r in source_rows if r.domain == domain]
        rows.extend(in_domain)
        rows.append(_average_row(domain, in_domain, cols))
    rows.append(_rank_row(source_rows, cols))
    not_pretrained: set[str] = set()
    if "pretrained" in frame.columns:
        not_pretrained = set(frame.loc[~frame["pretrained"].astype(bool), "label"].astype(str))
    return ResultsTable(cols, rows, not_pretrained)
