"""Atomic file writes (al_core._io): all or nothing under the real name, parents made, the umask honoured."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from al_core._io import atomic_path, atomic_write_bytes


def test_writes_through_a_temporary_name(tmp_path):
    target = tmp_path / "deep" / "er" / "out.bin"  # parent folders are made
    atomic_write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]  # no temporary file left
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.bin.") and tmp.suffix == ".tmp"
        assert tmp.exists() and target.read_bytes() == b"hello"  # the real name is untouched until the end
        tmp.write_bytes(b"world")
    assert target.read_bytes() == b"world" and not tmp.exists()


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    # a new file that fails is never created at all
    with pytest.raises(ValueError), atomic_path(tmp_path / "new.json"):
        raise ValueError
    assert not (tmp_path / "new.json").exists() and len(list(tmp_path.iterdir())) == 1


def test_replaces_by_rename_so_open_readers_keep_the_old_content(tmp_path):
    target = tmp_path / "index.json"
    target.write_bytes(b"old")
    inode = target.stat().st_ino
    with open(target, "rb") as reader:
        atomic_write_bytes(target, b"new")
        assert reader.read() == b"old"
    assert target.read_bytes() == b"new" and target.stat().st_ino != inode


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask, mode):
    """Outputs are shared (QuPath as another user, Dask workers): the usual umask applies. The umask is read
    once at import, so each case runs in a fresh interpreter."""
    code = (f"import os; os.umask({umask:#o})\n"
            "from al_core._io import atomic_write_bytes\n"
            "import sys; atomic_write_bytes(sys.argv[1], b'x')\n")
    out = tmp_path / "shared.tif"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=dict(os.environ))
    assert stat.S_IMODE(out.stat().st_mode) == mode
