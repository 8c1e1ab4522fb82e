"""The layering of al_core: no web or widget stack, and a cheap, lazy ``import al_core``."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_core_imports_no_web_or_widget_stack() -> None:
    """al_core (tiles and the app command included) must import without tornado, Jupyter or widgets."""
    code = ("import sys, al_core, al_core.tiles.source, al_core.cli, al_core.cli.app_cmds, al_core.project.project, "
            "al_core.learn.train, al_core.deploy.infer\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tornado', 'jupyter_server', 'ipywidgets', 'ipyleaflet', 'voila', 'slideloop_apps'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_top_level_names_are_lazy_and_light():
    """``import al_core`` and the facade's names load neither torch nor ONNX Runtime (the CLI starts fast)."""
    code = ("import sys, al_core\n"
            "assert 'al_core.project.project' not in sys.modules\n"
            "al_core.Project, al_core.GridSpec, al_core.open_slide, al_core.LabelError, al_core.InferenceConfig\n"
            "print(','.join(sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'distributed') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_every_public_name_resolves():
    import al_core

    for name in al_core.__all__:
        assert getattr(al_core, name) is not None, name
    assert set(dir(al_core)) == set(al_core.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        al_core.nope  # noqa: B018
    from al_core.errors import SlideloopError

    for name in ("SlideError", "ScaleError", "ProjectError", "NoGridError", "NoModelError", "SchemaError",
                 "LabelError", "TrainingError", "CheckpointError", "ModelConfigError", "ExportError",
                 "InferenceError"):
        assert issubclass(getattr(al_core, name), SlideloopError), name
