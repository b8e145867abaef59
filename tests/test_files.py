"""The one atomic writer (`dynamic_llava.files`): results appear whole or not at all, with the permissions the umask
gives (temporary folders and files are created private), and `overwrite=False` never replaces a file."""

import os
import stat

import pytest

from dynamic_llava.files import (
    OutputExistsError,
    atomic_output_dir,
    atomic_write_bytes,
    atomic_write_text,
    current_umask,
    free_path,
)


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=["umask-022", "umask-027", "umask-077"])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_output_dir_gets_the_umask_permissions(tmp_path, umask):
    with atomic_output_dir(tmp_path / "out") as tmp:
        assert mode(tmp) == 0o700  # private while it is being written
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"x")
        (tmp / "config.json").write_text("{}")
        os.chmod(tmp / "config.json", 0o600)  # as a file made by mkstemp would be
    out = tmp_path / "out"
    assert mode(out) == mode(out / "sub") == 0o777 & ~umask
    assert mode(out / "config.json") == mode(out / "sub" / "weights.bin") == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_write_bytes_gets_the_umask_permissions(tmp_path, umask):
    path = atomic_write_bytes(tmp_path / "a" / "results.json", b"{}")
    assert path == tmp_path / "a" / "results.json" and path.read_bytes() == b"{}"
    assert mode(path) == 0o666 & ~umask
    free = atomic_write_bytes(tmp_path / "a" / "results.json", b"[]", overwrite=False)
    assert free.name == "results-1.json" and mode(free) == 0o666 & ~umask


def test_output_dir_refuses_a_non_empty_folder_and_cleans_up_on_error(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with atomic_output_dir(tmp_path / "taken"):
            pass
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "new") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    with atomic_output_dir(tmp_path / "taken", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_write_replaces_or_takes_the_next_free_name(tmp_path):
    target = tmp_path / "kept_patches.png"
    assert free_path(target) == target
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")  # overwrite=True (the default) replaces
    assert target.read_text() == "second"
    assert free_path(target) == tmp_path / "kept_patches-1.png"
    one = atomic_write_bytes(target, b"third", overwrite=False)
    two = atomic_write_bytes(target, b"fourth", overwrite=False)
    assert (one.name, two.name) == ("kept_patches-1.png", "kept_patches-2.png")
    assert target.read_text() == "second" and one.read_bytes() == b"third" and two.read_bytes() == b"fourth"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kept_patches-1.png",
        "kept_patches-2.png",
        "kept_patches.png",
    ]
