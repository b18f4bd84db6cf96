"""Shared fixtures: small corpora made on the fly, and running the real command line.

Tests never read ../shared/; they make their own data here.
"""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few documents with the hard cases: CRLF, tabs, control characters, emoji, CJK, combining
# marks, underscores, text that spells the special token, digits, long whitespace runs.
CORPUS_FILES = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\r\nThe dog sleeps; the fox runs.\n",
    "b/c.txt": "def snake_case(x_1, __y):\n\treturn x_1 + 42 * __y  # 😀 emoji\n",
    "b/d.md": "日本語のテキスト、中文文本。 Ünïcödé e\u0301 \x07bell\x1b[0m <|endoftext|> end\n",
    "b/e/f.txt": "the the the the fox fox dog " * 20 + "\n    indented\n\n\n",
    "g.txt": "Numbers 123 4567 89; punctuation!?... (parens) [brackets] {braces}\n",
}


def write_corpus(root, files=None):
    """Create files (name -> str or bytes) under root; returns root as str."""
    for name, content in (CORPUS_FILES if files is None else files).items():
        path = os.path.join(root, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = content.encode("utf-8") if isinstance(content, str) else content
        with open(path, "wb") as f:
            f.write(data)
    return str(root)


@pytest.fixture
def corpus_dir(tmp_path):
    """A small text corpus (CORPUS_FILES) in a fresh directory."""
    return write_corpus(tmp_path / "corpus")


def ref_val_documents(doc_tokens, val_fraction):
    """Held-out documents by the rule docs/FORMATS.md states, in plain Python."""
    d, total = len(doc_tokens), sum(doc_tokens)
    n_val = min(max(1, round(d * val_fraction)), d - 1)
    target = val_fraction * total / n_val
    chosen = []
    for b in range(n_val):
        block = [i for i in range(d) if i * n_val // d == b]
        chosen.append(min(block, key=lambda i: (abs(doc_tokens[i] - target), i)))
    return chosen


def run_cli(*args, cwd=None, timeout=120, launcher=()):
    """Run `python -m mpitrain ARGS` in a subprocess; returns CompletedProcess (text)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([*launcher, sys.executable, "-m", "mpitrain", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def mpirun_path():
    """The mpirun of this Python's environment (the mpich wheel), or None."""
    candidate = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return candidate if os.path.exists(candidate) else shutil.which("mpirun")


@pytest.fixture
def mpirun():
    path = mpirun_path()
    if path is None:
        pytest.skip("mpirun not available")
    return path


def assert_user_error(proc, fragment):
    """Exit 2, exactly one line of our own on stderr containing fragment, no traceback."""
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mpitrain: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
