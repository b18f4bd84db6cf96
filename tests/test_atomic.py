"""mpitrain.atomic: exclusive temporaries that skip a planted name, all-or-nothing replacement,
nothing left behind on failure."""
import os

import h5py
import pytest

from mpitrain import atomic


def _names(d):
    return sorted(p.name for p in d.iterdir())


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "a.txt"
    with atomic.replacing(path) as f:
        f.write("first\n")
    with atomic.replacing(path) as f:
        f.write("second\n")
    assert path.read_bytes() == b"second\n" and _names(tmp_path) == ["a.txt"]
    with atomic.replacing(tmp_path / "b.h5", atomic.hdf5(track_order=True)) as f:
        f["x"] = [1, 2, 3]
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert f["x"][()].tolist() == [1, 2, 3]
    assert _names(tmp_path) == ["a.txt", "b.h5"]


@pytest.mark.parametrize("opener", [atomic.text, atomic.binary, atomic.hdf5()],
                         ids=["text", "binary", "hdf5"])
def test_a_planted_temporary_is_skipped_not_followed(tmp_path, opener):
    # Documented choice: a taken temporary name (a file, a symlink -- dangling or not) is
    # never opened; the next candidate name is used and the planted entries stay as they were.
    path = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    first, second = atomic.temporary_name(path), atomic.temporary_name(path, 1)
    os.symlink(victim, first)
    os.symlink(tmp_path / "nowhere", second)
    third = atomic.temporary_name(path, 2)
    with open(third, "wb") as f:
        f.write(b"stale")
    used = []
    with atomic.replacing(path, lambda tmp: used.append(tmp) or opener(tmp)) as f:
        if isinstance(f, h5py.File):
            f["x"] = 1
        else:
            f.write("new" if opener is atomic.text else b"new")
    assert used == [first, second, third, atomic.temporary_name(path, 3)]
    assert victim.read_bytes() == b"precious" and not (tmp_path / "nowhere").exists()
    assert os.readlink(first) == str(victim) and open(third, "rb").read() == b"stale"
    assert path.exists() and not os.path.islink(path)
    assert not os.path.exists(atomic.temporary_name(path, 3))


def test_every_candidate_taken_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "ATTEMPTS", 2)
    path = tmp_path / "out"
    path.write_text("old")
    for k in range(2):
        os.symlink(tmp_path / "nowhere", atomic.temporary_name(path, k))
    with pytest.raises(FileExistsError, match="candidate temporary names"):
        with atomic.replacing(path) as f:
            f.write("new")
    assert path.read_text() == "old" and not (tmp_path / "nowhere").exists()
    assert len(_names(tmp_path)) == 3


@pytest.mark.parametrize("opener", [atomic.text, atomic.hdf5()], ids=["text", "hdf5"])
def test_failure_leaves_the_real_file_untouched_and_no_temporary(tmp_path, opener):
    path = tmp_path / "out"
    path.write_bytes(b"old contents")
    for error in (RuntimeError("simulated"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic.replacing(path, opener) as f:
                if isinstance(f, h5py.File):
                    f["x"] = list(range(1000))
                else:
                    f.write("half")
                raise error
        assert path.read_bytes() == b"old contents" and _names(tmp_path) == ["out"]


def test_several_files_all_or_nothing(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.h5"
    with pytest.raises(RuntimeError):
        with atomic.replacing_all([(a, atomic.text), (b, atomic.hdf5())]) as (fa, fb):
            fa.write("vocab")
            raise RuntimeError("the second file fails")
    assert _names(tmp_path) == []
    with atomic.replacing_all([(a, atomic.text), (b, atomic.hdf5())]) as (fa, fb):
        fa.write("vocab")
        fb["x"] = 1
    assert a.read_text() == "vocab" and _names(tmp_path) == ["a.txt", "b.h5"]


def test_a_failing_rename_removes_the_temporary(tmp_path):
    target = tmp_path / "dir"
    target.mkdir()
    (target / "keep").write_text("x")   # os.replace of a file over a non-empty directory fails
    with pytest.raises(OSError):
        with atomic.replacing(target) as f:
            f.write("new")
    assert _names(tmp_path) == ["dir"] and _names(target) == ["keep"]
