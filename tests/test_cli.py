"""The command line's contract for prepare and inspect: --help everywhere, one-line errors."""
import pytest

from conftest import assert_user_error, run_cli


@pytest.mark.parametrize("args", [["--help"], ["prepare", "--help"], ["inspect", "--help"]])
def test_help_at_every_level(args):
    p = run_cli(*args)
    assert p.returncode == 0 and p.stderr == ""
    assert "usage: mpitrain" in p.stdout


def test_prepare_help_documents_every_option_and_default():
    out = run_cli("prepare", "--help").stdout
    for opt in ("--data", "--out", "--vocab-size", "--seq-len", "--val-fraction", "--force",
                "--quiet"):
        assert opt in out
    for default in ("hdf5_data/default.h5", "30000", "128", "0.01"):
        assert default in out


def test_top_level_lists_prepare_and_inspect():
    out = run_cli("--help").stdout
    assert "prepare" in out and "inspect" in out


@pytest.mark.parametrize("args,fragment", [
    (["prepare", "--no-such-option"], "unrecognized arguments"),
    (["prepare", "--seq-len", "x"], "invalid int value"),
    (["inspect", "a.h5", "--top", "-1"], "--top must be >= 0"),
])
def test_usage_mistakes_are_one_line(tmp_path, args, fragment):
    assert_user_error(run_cli(*args, cwd=tmp_path), fragment)
