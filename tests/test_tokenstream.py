"""SplitStream: windows read in place equal windows cut from the concatenated split, whether
the token array is mapped (contiguous, as prepare writes it) or read through HDF5 (chunked,
compressed: a file made elsewhere)."""
import shutil

import h5py
import numpy as np
import pytest

from conftest import run_cli, write_corpus
from mpitrain import schedule
from mpitrain.dataset import Dataset
from mpitrain.errors import UserError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ts")
    files = {f"doc{i:02d}.txt": f"Document {i}. " + "alpha beta gamma delta " * (i % 7 + 2) + "\n"
             for i in range(40)}
    d = write_corpus(root / "corpus", files)
    out = root / "ds.h5"
    p = run_cli("prepare", "--data", d, "--out", out, "--seq-len", 8, "--val-fraction", 0.1,
                "--quiet")
    assert p.returncode == 0, p.stderr
    return out


def _rewrite_chunked(src, dst):
    """A copy of the dataset whose /tokens is chunked and compressed (not mappable)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        tokens = f["tokens"][()]
        del f["tokens"]
        f.create_dataset("tokens", data=tokens, chunks=(7,), compression="gzip")
    return dst


def _check_all_windows(ds, split, mapped):
    s = ds.stream(split)
    assert s.mapped is mapped
    ref = ds.split_tokens(split)
    assert len(s) == len(ref)
    for seq_len in (1, 3, 8, 13):
        n = schedule.window_count(len(ref), seq_len)
        ids = np.random.default_rng(seq_len).permutation(n)[:50]
        ids = np.concatenate([ids, [0, n - 1, ids[0]]])      # ends and a repeat
        x, y = s.windows(ids, seq_len)
        rx, ry = schedule.gather_windows(ref, ids, seq_len)
        assert x.dtype == np.int32 and x.flags.c_contiguous and y.flags.c_contiguous
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)
        with pytest.raises(IndexError):
            s.windows([n], seq_len)
    np.testing.assert_array_equal(s.read(0, len(ref)), ref)
    np.testing.assert_array_equal(s.read(5, 11), ref[5:11])
    assert s.read(len(ref), len(ref) + 3).size == 0
    np.testing.assert_array_equal(np.concatenate(list(s.chunks(7))), ref)
    s.close()


def test_mapped_windows_equal_concatenated_split(prepared):
    ds = Dataset.open(prepared)
    assert len(ds.ranges["train"]) > 1   # windows cross range boundaries
    for split in ("train", "val"):
        _check_all_windows(ds, split, mapped=True)


def test_chunked_file_falls_back_to_reading_pieces(prepared, tmp_path):
    ds = Dataset.open(_rewrite_chunked(prepared, tmp_path / "chunked.h5"))
    for split in ("train", "val"):
        _check_all_windows(ds, split, mapped=False)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_damaged_id_in_a_window_is_refused(prepared, tmp_path, chunked):
    path = tmp_path / "bad.h5"
    if chunked:
        _rewrite_chunked(prepared, path)
    else:
        shutil.copy(prepared, path)
    ds = Dataset.open(path)
    a = int(ds.ranges["train"][0][0])
    with h5py.File(path, "r+") as f:
        f["tokens"][a] = ds.vocab_size     # written after the open's check
    s = ds.stream("train")
    with pytest.raises(UserError, match="damaged: token id"):
        s.windows([0], 4)
    s.windows([5], 4)                       # other windows still read
