"""The layer contract of ../shared/DESIGN.md, checked by import-linter on the real import graph: core ->
registry -> inference -> training -> entry points -> viewer, each importing only from its own layer or below, and no
entry point importing another (`main` chains the steps)."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_every_module_imports_only_from_its_layer_or_below():
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint), "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout
