"""The project's registry of deployed models (al_core.deploy.registry): push, list, external weights."""

from __future__ import annotations

import shutil

import pytest
from _deploy_models import SHELL_DIR, SHELL_MODEL

from al_core.deploy.config import InferenceConfig
from al_core.deploy.registry import list_deployed, push_model
from al_core.errors import ModelConfigError, ProjectError
from al_core.project.project import Project


def test_push_and_list(tmp_path, exported):
    path, _, _ = exported
    root = tmp_path / "proj"
    Project.create(root).close()
    assert list_deployed(root) == []
    m = push_model(root, path, "tumour-v7")
    assert m.path == root / "deployed" / "tumour-v7" / "model.onnx" and m.path.is_file()
    assert m.config.model_version == "7" and m.info["sha256"]
    with pytest.raises(ProjectError, match="already deployed"):
        push_model(root, path, "tumour-v7")
    push_model(root, path, "tumour-v7", overwrite=True)
    assert [d.name for d in list_deployed(root)] == ["tumour-v7"]
    with pytest.raises(ValueError, match="model name"):
        push_model(root, path, "../escape")
    # a folder, not a project.db: a project on a shared PostgreSQL has none
    with pytest.raises(ProjectError, match="nowhere: no such project folder"):
        push_model(tmp_path / "nowhere", path)


@pytest.mark.skipif(not SHELL_MODEL.is_file(), reason="shared SHELL model not present")
def test_push_copies_external_weights(tmp_path):
    src = tmp_path / "shell"
    shutil.copytree(SHELL_DIR, src)
    root = tmp_path / "proj"
    Project.create(root).close()
    with pytest.raises(ModelConfigError, match="no slideloop metadata"):  # a model made elsewhere needs its config
        push_model(root, src / "model_v1.onnx", "shell")
    cfg = InferenceConfig.from_dict({"input_size": 256, "target_mpp": 1.0, "activation": "sigmoid",
                                     "output_classes": [1, 2, 0], "classes": [
                                         {"index": 0, "name": "Background"}, {"index": 1, "name": "Epithelium"},
                                         {"index": 2, "name": "Stroma"}]})
    m = push_model(root, src / "model_v1.onnx", "shell", config=cfg)
    assert (m.path.parent / "model_v1.onnx.data").is_file() and m.info["config"]["input_size"] == [256, 256]
    (src / "model_v1.onnx.data").unlink()
    with pytest.raises(ModelConfigError, match="external weights file 'model_v1.onnx.data' is missing"):
        push_model(root, src / "model_v1.onnx", "shell2", config=cfg)
