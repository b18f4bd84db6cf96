"""Dataset.open / split_tokens: the reader the trainer uses, and its refusals."""
import h5py
import numpy as np
import pytest

from conftest import ref_val_documents, run_cli, write_corpus
from mpitrain.dataset import Dataset
from mpitrain.errors import UserError
from mpitrain.h5attrs import attrs_crc
from mpitrain.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    files = {f"doc{i}.txt": f"Document number {i}. " + "alpha beta gamma " * (i + 3) + "\n"
             for i in range(10)}
    d = write_corpus(root / "corpus", files)
    out = root / "ds.h5"
    p = run_cli("prepare", "--data", d, "--out", out, "--seq-len", 16, "--val-fraction", 0.2,
                "--quiet")
    assert p.returncode == 0, p.stderr
    return out, [files[f"doc{i}.txt"] for i in range(10)]


def test_open_and_split_tokens(prepared):
    path, texts = prepared
    ds = Dataset.open(path)
    tok = ds.tokenizer
    assert ds.seq_len == 16 and ds.vocab_size == tok.vocab_size == ds.attrs["vocab_size"]
    assert ds.attrs["format"] == "mpitrain-dataset" and ds.num_documents == 10
    docs = [np.append(tok.encode(t), tok.eod_id) for t in texts]
    # 2 of 10 documents held out, one per block of 5
    held = ref_val_documents([len(d) for d in docs], 0.2)
    assert len(held) == 2 and held[0] < 5 <= held[1]
    val = ds.split_tokens("val")
    train = ds.split_tokens("train")
    assert val.dtype == np.uint16 and train.dtype == np.uint16
    np.testing.assert_array_equal(val, np.concatenate([docs[i] for i in held]))
    np.testing.assert_array_equal(train, np.concatenate([d for i, d in enumerate(docs)
                                                         if i not in held]))
    assert tok.decode(val).split("<|endoftext|>")[:2] == [texts[i] for i in held]
    assert ds.num_windows("train") == (train.size - 1) // 16
    assert ds.attrs["train_windows"] == ds.num_windows("train")
    with pytest.raises(ValueError, match="unknown split"):
        ds.split_tokens("test")


def test_tokenizer_from_dataset_file(prepared):
    path, texts = prepared
    tok = Tokenizer.from_file(path)
    assert tok.decode(tok.encode(texts[0])) == texts[0]


def test_refuses_missing_foreign_and_damaged(tmp_path, prepared):
    path, _ = prepared
    with pytest.raises(UserError, match="no such dataset file"):
        Dataset.open(tmp_path / "nothing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="is not an HDF5 file"):
        Dataset.open(tmp_path / "text.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["data"] = np.arange(4)
    with pytest.raises(UserError, match="not an mpitrain dataset .no format attribute"):
        Dataset.open(tmp_path / "foreign.h5")
    with h5py.File(tmp_path / "ckpt.h5", "w") as f:
        f.attrs["format"] = "mpitrain-checkpoint"
    with pytest.raises(UserError, match="format='mpitrain-checkpoint'"):
        Dataset.open(tmp_path / "ckpt.h5")

    def damaged(name, edit):
        p = tmp_path / name
        p.write_bytes(path.read_bytes())
        with h5py.File(p, "r+") as f:
            edit(f)
        return p

    p = damaged("v3.h5", lambda f: f.attrs.__setitem__("format_version", 3))
    with pytest.raises(UserError, match="format version 3 is not supported"):
        Dataset.open(p)
    p = damaged("notokens.h5", lambda f: f.__delitem__("tokens"))
    with pytest.raises(UserError, match="damaged or incomplete"):
        Dataset.open(p)
    p = damaged("offsets.h5", lambda f: f["documents/offsets"].__setitem__(3, 0))
    with pytest.raises(UserError, match="document offsets"):
        Dataset.open(p)

    def big_id(f):
        f["tokens"][5] = 65535
    with pytest.raises(UserError, match="token id 65535 >= vocabulary"):
        Dataset.open(damaged("bigid.h5", big_id)).split_tokens("train")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(UserError):
        Dataset.open(truncated)


def test_root_attributes_are_checksummed_and_format_1_still_reads(tmp_path, prepared):
    """Format 2: every root attribute Dataset.open reads back is under attrs_crc32; a file of
    format 1 (no checksum: made here by editing a format-2 file as the old writer left it)
    still opens."""
    path, _ = prepared
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 2
        assert int(f.attrs["attrs_crc32"]) == attrs_crc(f.attrs)
    for key, value in [("seq_len", 8), ("vocab_size", 7), ("val_fraction", 0.5),
                       ("tokens_sha256", "0" * 64), ("created_by", "someone")]:
        edited = tmp_path / f"{key}.h5"
        edited.write_bytes(path.read_bytes())
        with h5py.File(edited, "r+") as f:
            f.attrs[key] = value
        with pytest.raises(UserError, match="root attributes fail their checksum"):
            Dataset.open(edited)
    unsigned = tmp_path / "unsigned.h5"
    unsigned.write_bytes(path.read_bytes())
    with h5py.File(unsigned, "r+") as f:
        del f.attrs["attrs_crc32"]
    with pytest.raises(UserError, match="root attributes fail their checksum"):
        Dataset.open(unsigned)
    old = tmp_path / "format1.h5"
    old.write_bytes(path.read_bytes())
    with h5py.File(old, "r+") as f:
        del f.attrs["attrs_crc32"]
        f.attrs["format_version"] = np.int64(1)
    ds, new = Dataset.open(old), Dataset.open(path)
    assert ds.attrs["format_version"] == 1 and ds.seq_len == new.seq_len
    for s in ("train", "val"):
        np.testing.assert_array_equal(ds.split_tokens(s), new.split_tokens(s))


@pytest.mark.slow
def test_uint32_beyond_65536_ids(tmp_path):
    # more than 65,536 ids: tokens are stored as uint32
    words = " ".join("w" + "".join(chr(97 + int(c)) for c in str(i)) for i in range(66000))
    d = write_corpus(tmp_path / "c", {"a.txt": words, "b.txt": words})
    out = tmp_path / "big.h5"
    p = run_cli("prepare", "--data", d, "--out", out, "--vocab-size", 70000, "--quiet")
    assert p.returncode == 0, p.stderr
    ds = Dataset.open(out)
    # 66,000 distinct words ("wa" first, then " wXXX"): all fit
    assert ds.vocab_size == 257 + 66000 and ds.dtype == np.uint32
    train = ds.split_tokens("train")
    assert train.dtype == np.uint32 and int(train.max()) > 65535
    assert ds.tokenizer.decode(train[:-1]) == words
