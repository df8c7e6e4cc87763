"""Atomic writes: all-or-nothing, normal permissions."""

from __future__ import annotations

import os

import pytest

from sr1step.fsio import atomic_path, atomic_write, atomic_write_text


def test_atomic_write_replaces_in_one_step(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as handle:
        handle.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left


def test_atomic_path_gives_normal_permissions_even_if_the_writer_does_not(tmp_path):
    target = tmp_path / "model.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o600)  # what safetensors does
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask
