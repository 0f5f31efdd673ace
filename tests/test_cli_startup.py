"""The CLI's start, help, listings and config errors import no torch (they answer in well under a second)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import contextlib, io, sys
from metabench.cli import build_parser, main
build_parser().format_help()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    for what in ("learners", "backbones", "sources"):
        assert main(["ls", what]) == 0
    assert main(["run", "eval.episode=3"]) == 2  # an unknown key: one line, exit 2
print("torch" in sys.modules)
"""


def test_help_listings_and_config_errors_do_not_import_torch() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_learners_listed_from_source_equal_the_listing_after_import() -> None:
    from metabench.catalog import catalog
    from metabench.learners import LEARNERS

    static = catalog("learners")
    for name in LEARNERS.names():
        LEARNERS.get(name)  # imports every learner: the listing now comes from the classes
    assert catalog("learners") == static


def test_config_list_shows_every_key_with_its_help(capsys) -> None:
    from metabench.cli import main
    from metabench.config import RunConfig
    from metabench.config_help import config_keys

    keys = {r["key"]: r for r in config_keys(RunConfig())}
    assert keys["eval.episodes"]["help"] == "per evaluation source" and keys["eval.episodes"]["default"] == "40"
    assert "data.sampler.way" in keys and "train.tasks_per_update" in keys
    assert "meta-batch" in keys["train.tasks_per_update"]["help"]
    assert main(["config", "--list", "--learner", "smat"]) == 0
    out = capsys.readouterr().out
    assert "learner.sparsity" in out and "mask_allocation" in out
