"""README's "Use it from Python" script runs as printed (from a folder holding the sample, as the repository does)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_script() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use it from Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's 'Use it from Python' section has no python block"
    return match.group(1)


@pytest.mark.slow
def test_readme_script_runs(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sample").symlink_to(ROOT / "data" / "sample")
    script = readme_script()
    assert len(script.strip().splitlines()) <= 14  # the promise is a short script
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "pred.tiff").is_file() and (tmp_path / "pred.geojson").is_file()
    assert (tmp_path / "proj" / "deployed" / "epi-v1" / "model.onnx").is_file()
