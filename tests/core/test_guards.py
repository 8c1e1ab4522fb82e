"""Output and disk guards (al_core._guards) on real files and a real, small file system: a 1 MB tmpfs mounted
for the test (skipped where mounting is not allowed)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from al_core._guards import check_free_space, check_output, human_bytes, managed_by_project, project_writes
from al_core.errors import DiskSpaceError, OutputError
from al_core.project.project import Project


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs, unmounted after the test."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def proj(tmp_path: Path, sample_svs: Path) -> Iterator[Project]:
    with Project.create(tmp_path / "P", ["Tissue:#c80000"]) as p:
        p.add_slide(sample_svs)
        p.build_grid(patch=64, overlap=16, target_mpp=2.0)
        yield p


@pytest.mark.parametrize("rel", ["project.db", "project.db-wal", "project.db-shm", "models/1/model.pt",
                                 "cache/grid-1/patches.npy", "predictions/1/probs.npy", "deployed/x/model.onnx",
                                 "snapshots/a.db", "models/../project.db", "inference/r/x.tiff", "."])
def test_managed_files_are_refused(proj: Project, rel: str) -> None:
    target = proj.root / rel
    assert managed_by_project(target) == proj.root.resolve()
    with pytest.raises(OutputError, match="managed by the project"):
        check_output(target)


def test_a_symlink_into_the_project_is_refused(proj: Project, tmp_path: Path) -> None:
    link = tmp_path / "innocent.geojson"
    link.symlink_to(proj.root / "project.db")
    with pytest.raises(OutputError, match="managed by the project"):
        proj.export_labels(link)
    assert (proj.root / "project.db").read_bytes()[:16] == b"SQLite format 3\x00"


def test_outputs_beside_the_project_are_fine(proj: Project, tmp_path: Path) -> None:
    assert managed_by_project(proj.root / "labels.geojson") is None
    assert managed_by_project(tmp_path / "out" / "x.tiff") is None
    with project_writes(proj.root):  # the project's own inference runs write into its folders
        check_output(proj.root / "inference" / "r" / "x.tiff")


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (512, 7.4e12, 70e9, 1500)] == ["512 B", "7.4 TB", "70.0 GB", "1.5 kB"]


def test_free_space_refusal_gives_both_numbers(small_disk: Path) -> None:
    check_free_space(small_disk / "x", 100_000, "a small file")
    with pytest.raises(DiskSpaceError, match=r"a big file needs 7\.4 TB, .* free on .*small"):
        check_free_space(small_disk / "sub" / "x", 7.4e12, "a big file")


def test_patch_cache_refuses_a_disk_too_small(proj: Project, small_disk: Path) -> None:
    from al_core.learn.dataset import PatchCache

    patches = proj.patches()
    with pytest.raises(DiskSpaceError, match="patch cache"):
        PatchCache(small_disk, 1, patches, lambda sid: proj.open_slide(sid))
    assert list(small_disk.iterdir()) == []


def test_checkpoint_refuses_a_disk_too_small(proj: Project, small_disk: Path) -> None:
    from al_core.learn.checkpoint import save_checkpoint
    from al_core.learn.model import config_for

    cfg = config_for(proj.classes(), proj.grid_spec(), encoder="resnet18")
    with pytest.raises(DiskSpaceError, match="checkpoint needs"):
        save_checkpoint(small_disk / "m.pt", torch.nn.Linear(1000, 1000), cfg)
    assert list(small_disk.iterdir()) == []


def test_inference_output_refuses_a_disk_too_small(unet_model: Path, sample_svs: Path, small_disk: Path) -> None:
    from al_core.deploy.infer import infer_slide

    with pytest.raises(DiskSpaceError, match=r"inference output needs .* free on"):
        infer_slide(unet_model, sample_svs, small_disk / "out.tiff", compression="none")
    assert list(small_disk.iterdir()) == []


def test_read_only_output_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes read-only files")
    f = tmp_path / "x.csv"
    f.write_text("old")
    f.chmod(0o444)
    with pytest.raises(OutputError, match="read-only"):
        check_output(f)
