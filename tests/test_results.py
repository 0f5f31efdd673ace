from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from metabench.results import EPISODE_COLUMNS, EpisodeRow, ResultsError, RunWriter, load_run
from metabench.stats import ci95, summarize


def _row(source: str, acc: float, episode_id: str = "e", domain: str = "id") -> EpisodeRow:
    return EpisodeRow("r", "pre", "vit_test", source, "test", domain, episode_id, "zero_shot", 0, 5, 25, 50,
                      acc, 1.0, math.nan, 0.1)


def test_round_trip(tmp_path) -> None:
    writer = RunWriter(tmp_path / "run")
    writer.write_manifest({"run_id": "r", "backbone": {"pretrained": False}})
    writer.write_config("seed: 0\n")
    writer.add_rows([_row("noto", 0.5, "a"), _row("digits", 0.75, "b", "ood")])
    writer.flush()
    writer.log_train({"update": 1, "loss": 0.5})
    manifest, frame = load_run(tmp_path / "run")
    assert manifest["run_id"] == "r"
    assert list(frame.columns) == EPISODE_COLUMNS
    assert frame["accuracy"].tolist() == [0.5, 0.75]
    assert frame["domain"].tolist() == ["id", "ood"]
    assert json.loads((tmp_path / "run" / "train_log.jsonl").read_text())["loss"] == 0.5
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_append_replaces_reevaluated_episodes(tmp_path) -> None:
    writer = RunWriter(tmp_path)
    writer.write_manifest({"run_id": "r"})
    writer.add_rows([_row("noto", 0.5, "a"), _row("noto", 0.5, "b")])
    writer.flush()
    again = RunWriter(tmp_path, append=True)
    again.add_rows([_row("noto", 1.0, "b"), _row("noto", 0.0, "c")])
    again.flush()
    _, frame = load_run(tmp_path)
    assert frame.set_index("episode_id")["accuracy"].to_dict() == {"a": 0.5, "b": 1.0, "c": 0.0}


def test_ci95_is_meta_dataset_formula() -> None:
    values = np.array([0.2, 0.4, 0.9, 0.5])
    mean, half, n = ci95(values)
    assert mean == pytest.approx(values.mean())
    assert half == pytest.approx(1.96 * values.std(ddof=0) / np.sqrt(4))
    assert n == 4


def test_summarize_per_source() -> None:
    frame = pd.DataFrame([vars(_row("noto", a)) for a in (0.4, 0.6)] + [vars(_row("digits", 1.0, domain="ood"))])
    table = summarize(frame).set_index("source")
    assert table.loc["noto", "accuracy"] == pytest.approx(50.0)
    assert table.loc["noto", "ci95"] == pytest.approx(100 * 1.96 * 0.1 / np.sqrt(2))
    assert table.loc["digits", "n"] == 1


def test_missing_run_folder_is_clear(tmp_path) -> None:
    with pytest.raises(ResultsError, match="is not a metabench run folder"):
        load_run(tmp_path)


def test_console_domain_average_has_the_reports_half_width() -> None:
    from metabench.summary import domain_averages

    a, b = [1.0, 0.0, 1.0, 1.0], [0.5, 0.5, 1.0]
    frame = pd.DataFrame({"domain": "id", "mode": "zero_shot", "steps": 0,
                          "source": ["a"] * 4 + ["b"] * 3, "accuracy": a + b})
    row = domain_averages(frame).iloc[0]
    (ma, ha, _), (mb, hb, _) = ci95(a), ci95(b)
    assert row.accuracy == pytest.approx(100 * (ma + mb) / 2)
    assert row.ci95 == pytest.approx(100 * math.sqrt(ha**2 + hb**2) / 2) and row.sources == 2
