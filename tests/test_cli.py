"""The command line's contract for prepare and inspect: --help everywhere, one-line errors."""
import pytest

from conftest import assert_user_error, run_cli
from test_train_support import tiny_dataset  # noqa: F401 (fixture)


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


def test_required_options_say_so_in_help():
    out = " ".join(run_cli("export", "--help").stdout.split())
    assert "usage: mpitrain export [-h] --out OUT" in out
    assert "new directory (--format hf); required" in out and "(default: None)" not in out


def test_top_level_lists_prepare_and_inspect():
    out = run_cli("--help").stdout
    assert "prepare" in out and "inspect" in out


@pytest.mark.parametrize("args,fragment", [
    (["prepare", "--no-such-option"], "unrecognized arguments"),
    (["prepare", "--seq-len", "x"], "invalid int value"),
    (["inspect", "a.h5", "--top", "-1"], "--top must be >= 0"),
    # a first word that is not an option names a command, never a misspelt one
    (["trian"], "argument COMMAND: invalid choice: 'trian' (choose from "),
    (["trian", "--preset", "tiny"], "invalid choice: 'trian'"),
    # a dataset is HDF5 with its vocabulary beside it as NAME.vocab.txt
    (["prepare", "--out", "x.txt"], "--out x.txt: a dataset file must end in .h5"),
    (["train", "--log-every", "0"], "--log-every must be at least 1"),
    (["train", "--progress", "fancy"], "invalid choice: 'fancy'"),
])
def test_usage_mistakes_are_one_line(tmp_path, args, fragment):
    assert_user_error(run_cli(*args, cwd=tmp_path), fragment)


def _run_in_terminal(args, cwd):
    """Run `python -m mpitrain ARGS` on a pseudo-terminal (120 columns); returns its output."""
    import fcntl
    import os
    import pty
    import struct
    import sys
    import termios

    from conftest import REPO

    pid, fd = pty.fork()
    if pid == 0:  # child: a terminal of known size, then the real command line
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.chdir(cwd)
        os.environ["PYTHONPATH"] = REPO
        os.execv(sys.executable, [sys.executable, "-m", "mpitrain", *map(str, args)])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out.decode("utf-8", "replace")


@pytest.mark.slow
def test_progress_bars_only_on_a_terminal_without_quiet(tmp_path, corpus_dir):
    shown = _run_in_terminal(["prepare", "--data", corpus_dir, "--out", tmp_path / "a.h5"],
                             tmp_path)
    for phase in ("count:", "encode:"):   # (streaming prepare reads while it counts)
        assert phase in shown
    quiet = _run_in_terminal(["prepare", "--data", corpus_dir, "--out", tmp_path / "b.h5",
                              "--quiet"], tmp_path)
    assert "count:" not in quiet and "wrote" in quiet


@pytest.mark.slow
def test_train_progress_choice_on_a_terminal(tmp_path, tiny_dataset):  # noqa: F811
    def train(run, *extra):
        return _run_in_terminal(["train", "--preset", "tiny", "--dataset", tiny_dataset,
                                 "--max-steps", 6, "--threads", 2, "--run-dir", tmp_path / run,
                                 *extra], tmp_path)
    bar = train("bar")                      # thread mode on a terminal: the bar by default
    assert "train: " in bar and "step/s" in bar and "step 6/6  loss" not in bar
    lines = train("lines", "--progress", "lines", "--log-every", 2)
    assert "step/s" not in lines
    assert [l.split()[1] for l in lines.splitlines() if l.startswith("step ") and "/" in
            l.split()[1]] == ["1/6", "2/6", "4/6", "6/6"]
    none = train("none", "--progress", "none")
    assert "step/s" not in none and "/6  loss" not in none and "val_loss" in none
