"""services/core stands without the lab: importing every core module loads no research code
(services.lab), no model definitions or training (models, torch) and no plotting (matplotlib)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCRIPT = """
import importlib, json, pkgutil, sys
import services.core
for info in pkgutil.walk_packages(services.core.__path__, "services.core."):
    if ".migrations" not in info.name:
        importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""
FORBIDDEN = ("models", "torch", "matplotlib")  # top-level packages, besides services.lab


def test_core_loads_no_lab_code() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    assert "services.core.codecs.jpeg2000" in loaded
    lab = [m for m in loaded if m.partition(".")[0] in FORBIDDEN or m.startswith("services.lab")]
    assert lab == []
