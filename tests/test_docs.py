"""The README documents the interface the code declares, and every command explains itself."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from meissonic_export.graphs import interface_markdown

README = Path(__file__).parents[1] / "README.md"


def test_readme_graph_table_is_generated_from_the_declarations():
    text = README.read_text()
    table = re.search(r"<!-- graph-interface:begin[^>]*-->\n(.*?)\n<!-- graph-interface:end -->", text, re.DOTALL).group(1)
    assert table == interface_markdown(), "regenerate with `python -m meissonic_export.graphs`"


def test_ci_runs_the_readme_test_command():
    command = re.search(r"\*\*Tests\*\*.*?```bash\n(.*?)\n```", README.read_text(), re.DOTALL).group(1)
    assert command in (README.parent / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    "command",
    [
        ["meissonic_export.cli", "--help"],
        ["meissonic_export.cli", "export", "--help"],
        ["meissonic_export.cli", "make-checkpoint", "--help"],
        ["meissonic_export.cli", "sensitivity", "--help"],
        ["meissonic_export.cli", "reference", "--help"],
        ["meissonic.runtimes.cli", "--help"],
    ],
)
def test_help(command):
    run = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "usage:" in run.stdout and len(run.stdout) > 300
