"""Hostile input around runs through the real command line: unknown names, weights and checkpoints
that are not what they claim, full or read-only output, damaged run folders, Ctrl-C.

Every case ends with exit code 2 (130 for Ctrl-C), one stderr line that names the file, source or key
and says what to do, and no half-written run folder: a folder created before the problem showed up is
removed when it holds nothing but its config and manifest, and kept, marked "failed" or "interrupted",
when it holds results worth resuming.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers_hostile import CHECKPOINT, FAST, TRAIN, _fails, _md, _toy
from safetensors.torch import save_file, save_model

from metabench.cli import main

# --------------------------------------------------------------------------- unknown names and keys
# (unknown learner, backbone, evaluation source and key=value key: tests/test_cli.py)


def _plugin(tmp_path: Path) -> str:
    (tmp_path / "bad_plugin.py").write_text("raise RuntimeError('boom')\n")
    return str(tmp_path / "bad_plugin.py")


def _yaml(tmp_path: Path, text: str) -> str:
    (tmp_path / "c.yaml").write_text(text)
    return str(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t: ["--config", _yaml(t, "eval:\n  episods: 3\n")],
         r'Unknown config key "eval\.episods" in .*c\.yaml; did you mean "eval\.episodes"\?'),
        (lambda t: ["--config", _yaml(t, "eval: [unclosed\n")], r"Config file .*c\.yaml is not valid YAML"),
        (lambda t: ["learner.scael=3"],
         r'Unknown config key "learner\.scael" in the key=value overrides; did you mean "learner\.scale"\?'),
        (lambda t: ["data.train_sources=[notoo]", "train.episodes=2"],
         r'Unknown source "notoo"\. Did you mean "noto"\?'),
        (lambda t: ["--preset", "gpuu"],
         r'Config key "preset" in the command-line flags must be one of auto, cpu, gpu, paper, not "gpuu"; '
         r'did you mean "gpu"\?'),
        (lambda t: ["eval.modes=[zero_shot,lorra]"], r'Config key "eval\.modes" .*not "lorra"; did you mean "lora"\?'),
        (lambda t: ["data.sampler.mode=weird"],
         r'Config key "data\.sampler\.mode" in the key=value overrides must be one of variable, fixed, any, not "weird"\.'),
        (lambda t: ["eval.episodes=many"], r'Bad value for config key "eval\.episodes"'),
        (lambda t: ["--plugin", "no_such_plugin_module"],
         r"Plugin no_such_plugin_module cannot be imported \(No module named .*\); install it"),
        (lambda t: ["--plugin", _plugin(t)], r"Plugin .*bad_plugin\.py failed while loading \(RuntimeError: boom\)"),
    ],
    ids=["yaml-key", "yaml-syntax", "learner-option", "train-source", "preset", "eval-mode", "sampler-mode",
         "bad-value", "plugin-module", "plugin-raises"],
)
def test_unknown_names_and_keys(make_args: Callable[[Path], list[str]], message: str, tmp_path: Path,
                                capsys) -> None:
    _fails(["run", *FAST, *make_args(tmp_path)], tmp_path / "runs", capsys, message)


# --------------------------------------------------------------------------- weights and checkpoints


class _Boom:
    """Unpickling this runs code (it creates a file): it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _vit_test_state(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    from metabench.backbones import create_backbone

    return {**create_backbone("vit_test").model.state_dict(), **changes}


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_bytes(b"\x00\x01junk" * 500),
         r"is neither a safetensors file nor a torch state dict; pass a"),
        (lambda p: p.write_bytes(pickle.dumps({"w": _Boom(p.parent / "code_ran")})), r"is neither a safetensors file"),
        (lambda p: torch.save({"w": torch.ones(1), "x": _Boom(p.parent / "code_ran")}, p),
         r"holds Python objects other than tensors, which metabench never unpickles"),
        (lambda p: p.write_bytes(_safetensors_bytes(p)[:-50]), r"is a damaged safetensors file .*; copy or save it"),
        (lambda p: p.mkdir(), r"is a folder; pass the file itself"),
        (lambda p: save_file(_vit_test_state(cls_token=torch.zeros(1, 1, 64)), str(p)),
         r"does not fit this backbone: key 'cls_token' has shape \(1, 1, 64\) in the file but \(1, 1, 48\)"),
    ],
    ids=["random-bytes", "pickle", "torch-pickle", "cut-safetensors", "folder", "other-backbone"],
)
def test_weights_file_that_is_not_what_it_claims(write: Callable[[Path], object], message: str, tmp_path: Path,
                                                 capsys) -> None:
    weights = tmp_path / "w" / "weights.safetensors"
    weights.parent.mkdir()
    write(weights)
    _fails(["run", *FAST, "data.eval_sources=[digits]", "--weights", str(weights)], tmp_path / "runs", capsys,
           rf"Weights file {re.escape(str(weights))} {message}")
    assert not (weights.parent / "code_ran").exists()


def _safetensors_bytes(p: Path) -> bytes:
    save_file({"w": torch.ones(100)}, str(p))
    return p.read_bytes()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run folders of two meta-trained learners on the test ViT (a few seconds each)."""
    base = tmp_path_factory.mktemp("trained")
    src = _toy(base / "toy")
    runs = {}
    for learner in ("pmf", "smat"):
        assert main(["run", *FAST, "--learner", learner, *_md(src), *TRAIN, "--out", str(base / learner)]) == 0
        (runs[learner],) = (base / learner).iterdir()
        assert (runs[learner] / CHECKPOINT).is_file()
    return runs


def _checkpoint_of_another_backbone(path: Path) -> None:
    from metabench.backbones import create_backbone
    from metabench.learners import create_learner

    save_model(create_learner("pmf", create_backbone("vit_tiny", allow_download=False)), str(path))


def _wrong_checkpoint(kind: str, path: Path, runs: dict[str, Path]) -> None:
    if kind == "other-learner":
        shutil.copy(runs["smat"] / CHECKPOINT, path)
    elif kind == "other-backbone":
        _checkpoint_of_another_backbone(path)
    elif kind == "random-bytes":
        path.write_bytes(os.urandom(3000))
    elif kind == "cut":
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "torch-pickle":
        torch.save({"x": _Boom(path.parent / "code_ran")}, path)


CHECKPOINT_CASES = {
    "other-learner": r'does not fit learner "pmf" on backbone vit_test: key .*; evaluate it with the learner and '
                     r"backbone it was trained with",
    "other-backbone": r"does not fit learner \"pmf\" on backbone vit_test: key '.*' has shape \(.*\) in the file",
    "random-bytes": r"is not a safetensors file, so metabench did not write it",
    "cut": r"is a damaged safetensors file",
    "torch-pickle": r"is not a safetensors file",
}


@pytest.mark.parametrize("kind", list(CHECKPOINT_CASES))
def test_learner_checkpoint_checks(kind: str, trained: dict[str, Path], tmp_path: Path) -> None:
    """The check ``eval --run`` needs: another learner's or backbone's checkpoint, or a file that is not one."""
    from metabench.backbones import create_backbone
    from metabench.learners import create_learner
    from metabench.weights import WeightsError, load_checkpoint_into

    path = tmp_path / "learner.safetensors"
    shutil.copy(trained["pmf"] / CHECKPOINT, path)
    _wrong_checkpoint(kind, path, trained)
    learner = create_learner("pmf", create_backbone("vit_test"))
    with pytest.raises(WeightsError, match=CHECKPOINT_CASES[kind]):
        load_checkpoint_into(learner, path, 'learner "pmf" on backbone vit_test')
    assert not (tmp_path / "code_ran").exists()
    load_checkpoint_into(learner, trained["pmf"] / CHECKPOINT, 'learner "pmf" on backbone vit_test')  # its own fits


@pytest.mark.parametrize("kind", list(CHECKPOINT_CASES))
def test_eval_of_a_run_whose_checkpoint_was_swapped(kind: str, trained: dict[str, Path], tmp_path: Path,
                                                    capsys) -> None:
    run = shutil.copytree(trained["pmf"], tmp_path / "run")
    _wrong_checkpoint(kind, run / CHECKPOINT, trained)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code = main(["eval", "--run", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert re.search(rf"Checkpoint {re.escape(str(run / CHECKPOINT))} {CHECKPOINT_CASES[kind]}", err), err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # the run is untouched


# --------------------------------------------------------------------------- output folder full or read-only


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="chmod does not stop root from writing")
def test_read_only_output_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        code = main(["run", *FAST, "data.eval_sources=[digits]", "--out", str(out / "runs")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "permission denied; choose an output folder (--out) you can write to" in err
        assert not list(out.iterdir())
    finally:
        out.chmod(0o755)


def test_read_only_file_system(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "runs"
    mkdir = Path.mkdir

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        if self == out or out in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    _fails(["run", *FAST, "data.eval_sources=[digits]"], out, capsys,
           rf"Cannot write {out}/?\S*: the file system is read-only; choose an output folder \(--out\) you can write")


def test_disk_full_before_any_result(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the first file of the run folder cannot be written
    _fails(["run", *FAST, "data.eval_sources=[digits]"], tmp_path / "runs", capsys,
           r"Cannot write .*runs/\S+: the disk is full; free some space or choose an output folder \(--out\) on "
           r"another disk")


def test_disk_full_after_training_keeps_the_results_marked_failed(tmp_path: Path, capsys,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)  # training went through; the results table does not
    src = _toy(tmp_path / "toy")
    out = tmp_path / "runs"
    code = main(["run", *FAST, "--learner", "pmf", *_md(src), *TRAIN, "--out", str(out)])
    err = capsys.readouterr().err
    (run,) = out.iterdir()
    assert code == 2 and err.count("\n") == 1, err
    assert "the disk is full" in err and f'The unfinished run {run} keeps its results so far (status "failed")' in err
    assert f"metabench run --resume {run}" in err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "the disk is full" in manifest["stop_reason"]
    assert (run / "train_log.jsonl").is_file() and not list(run.rglob("*.tmp"))


# --------------------------------------------------------------------------- damaged run folders


def test_damaged_run_folder(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{oops")
    assert main(["eval", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run / 'manifest.json'} is not valid JSON" in err, err
    (run / "manifest.json").write_text("{}")
    (run / "episodes.parquet").write_bytes(b"PAR1 not really")
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run / 'episodes.parquet'} cannot be read" in err, err


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_during_training_stops_cleanly(tmp_path: Path) -> None:
    src = _toy(tmp_path / "toy")
    out = tmp_path / "runs"
    args = ["run", *FAST, "--learner", "pmf", *_md(src), *TRAIN, "train.episodes=100000", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # A shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # give the child the default disposition a terminal would, however the test suite was started.
    proc = subprocess.Popen([sys.executable, "-m", "metabench", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while sum(len(p.read_text().splitlines()) for p in out.glob("*/train_log.jsonl")) < 2:  # in the loop
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    ours = [line for line in stderr.splitlines() if not line.startswith(("INFO ", "WARNING ", "DEBUG "))]
    (run,) = out.iterdir()
    assert ours == [f'metabench: interrupted (Ctrl-C); the unfinished run is kept in {run} (status "interrupted"); '
                    f"continue it with `metabench run --resume {run}`."], stderr
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    assert not list(run.rglob("*.tmp")) and not (run / "episodes.parquet").exists()
    for line in (run / "train_log.jsonl").read_text().splitlines():
        json.loads(line)  # whole lines only
