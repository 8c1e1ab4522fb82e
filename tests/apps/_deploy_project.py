"""Projects with pushed ONNX models for the deployment view and the inference routes of the tile server."""

from __future__ import annotations

import json
from pathlib import Path

from _deploy_models import Darkness, darkness_metadata
from slideloop_apps.deploy_state import DeployState

from al_core.deploy.config import InferenceConfig
from al_core.deploy.export import build_metadata, export_onnx
from al_core.deploy.registry import push_model
from al_core.project.project import Project

#: the tissue class in a colour that reads apart from H&E pink and purple
TISSUE_CLASSES = [{"index": 0, "name": "Background", "color": "#000000"},
                  {"index": 1, "name": "Tissue", "color": "#00c8ff"}]
TISSUE_RGB = (0, 200, 255)


def fixed_onnx(path: Path, size: int, meta: dict[str, str]) -> None:
    """A model with a fixed 1 x 3 x size x size input, carrying slideloop metadata that may not fit it."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], [0.1] * 6)
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["out"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, size, size])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, meta)
    onnx.save(model, str(path))


def push_tissue_finder(root: Path, work: Path) -> None:
    """Push the 'darkness' model (tissue = dark pixels, at 2 µm/px) as ``tissue-finder``."""
    export_onnx(Darkness(), work / "tissue-finder.onnx", darkness_metadata(classes=TISSUE_CLASSES))
    push_model(root, work / "tissue-finder.onnx")


def push_broken_models(root: Path, work: Path) -> None:
    """Three pushed models that cannot run on the sample: one too fine for the slide (0.1 µm/px), one whose
    input does not fit its settings, and a 'model' that is not ONNX."""
    export_onnx(Darkness(), work / "too-fine.onnx", darkness_metadata(target_mpp=0.1))
    fixed_onnx(work / "wrong-input.onnx", 64, build_metadata(InferenceConfig.from_dict(darkness_metadata())))
    for name in ("too-fine", "wrong-input"):
        push_model(root, work / f"{name}.onnx")
    broken = root / "deployed" / "not-onnx"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not a model\n")
    (broken / "model.json").write_text(json.dumps({"name": "not-onnx", "pushed_at": "2000-01-01T00:00:00+00:00",
                                                   "config": None}))


def finished_run(root: Path, model: str = "tissue-finder") -> str:
    """Run ``model`` over the project's first slide as the deployment view does; the registered run's id."""
    with Project.open(root) as proj:
        state = DeployState(proj)
        state.model_name = model
        assert state.run_now(), state.message
        return state.run_id


def deploy_project(base: Path, slide: Path) -> Path:
    """A project holding ``slide`` and four pushed models: the working 'tissue-finder' (listed first) and three
    that cannot run on it (too fine for the slide, an input that does not fit its settings, not ONNX)."""
    with Project.create(base / "proj") as proj:
        proj.add_slide(slide)
    root = (base / "proj").resolve()
    push_broken_models(root, base)
    push_tissue_finder(root, base)  # pushed last = listed first
    return root
