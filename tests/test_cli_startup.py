"""The CLI's start, help and data-config paths import no torch (they must answer in well under a second)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from metabench.cli import build_parser
from metabench.config import load_data_config
from episodes.sampler import SamplerConfig
from episodes.spec import DatasetSpec
build_parser().format_help()
load_data_config(None, ["data.root=/tmp"])
print("torch" in sys.modules)
"""


def test_parsing_help_and_data_config_do_not_import_torch() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
