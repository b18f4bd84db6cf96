"""Where documents come from: a directory of text files, or the default standard-library corpus.

A document is one source: a file under the data directory (every regular file, recursively,
in sorted path order) or, for the default corpus, one standard-library module file or one
pydoc topic. A source whose bytes contain NUL is binary: skipped and counted. Invalid UTF-8 is
decoded with U+FFFD replacements, which are counted.
"""
import codecs
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass

from mpitrain.errors import UserError

# The default corpus (`mpitrain prepare` without --data): the source of these standard-library
# modules of the running Python — `NAME.py`, or every .py file of the package NAME except test
# directories (test, tests, idle_test) and test_*.py files — plus the text of every pydoc topic
# (pydoc_data.topics, the language reference sections `help()` shows). Modules this Python
# lacks are skipped. Nothing is read from site-packages. About 6.8 MB on CPython 3.11.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "calendar", "cmd",
    "codecs", "collections", "colorsys", "concurrent", "configparser", "contextlib",
    "contextvars", "copy", "csv", "dataclasses", "datetime", "difflib", "dis", "doctest",
    "email", "enum", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http", "imaplib", "importlib",
    "inspect", "io", "ipaddress", "json", "keyword", "linecache", "locale", "logging",
    "mailbox", "mimetypes", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "platform", "plistlib", "poplib", "pprint", "pydoc", "queue", "random", "re",
    "reprlib", "sched", "secrets", "selectors", "shlex", "shutil", "signal", "smtplib",
    "socket", "socketserver", "sqlite3", "stat", "statistics", "string", "struct",
    "subprocess", "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "token", "tokenize", "tomllib", "trace", "traceback", "tracemalloc",
    "types", "typing", "unittest", "urllib", "uuid", "warnings", "wave", "weakref",
    "webbrowser", "wsgiref", "xml", "xmlrpc", "zipapp", "zipfile", "zipimport", "zoneinfo",
)
_TEST_DIRS = {"test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Source:
    name: str          # stored name: path relative to the data directory (POSIX separators),
                       # "stdlib/<path>" or "pydoc_topics/<topic>"
    size: int          # bytes (from the file system; re-measured when read)
    path: str = ""     # file to read; "" for a pydoc topic
    topic: str = ""    # pydoc topic name, for the default corpus


def _display(rel: str) -> str:
    # File names that are not valid UTF-8 (kept by os as surrogate escapes) become \xHH, so
    # every name can be stored as UTF-8 text.
    return os.fsencode(rel).decode("utf-8", errors="backslashreplace")


def list_directory(data_dir: str):
    """Every regular file under data_dir, recursively, sorted by path components (as bytes).
    Links to files are read; links to directories are not followed (no cycles).

    Raises UserError when data_dir is missing, not a directory, or holds no files.
    """
    if not os.path.exists(data_dir):
        raise UserError(f"data directory does not exist: {data_dir}")
    if not os.path.isdir(data_dir):
        raise UserError(f"--data is not a directory: {data_dir}")
    found = []
    errors = []
    for root, dirs, files in os.walk(data_dir, onerror=errors.append):
        for f in files:
            full = os.path.join(root, f)
            if os.path.isfile(full):  # regular files (and links to them); no FIFOs or sockets
                rel = os.path.relpath(full, data_dir)
                found.append((tuple(rel.split(os.sep)), full))
    if errors:
        e = errors[0]
        raise UserError(f"cannot read directory {e.filename}: {e.strerror}")
    if not found:
        raise UserError(f"data directory has no files: {data_dir}")
    found.sort(key=lambda item: [os.fsencode(p) for p in item[0]])
    return [Source(_display("/".join(parts)), os.path.getsize(full), full)
            for parts, full in found]


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _module_files(std: str, name: str):
    single = os.path.join(std, name + ".py")
    if os.path.isfile(single):
        return [single]
    out = []
    for root, dirs, files in os.walk(os.path.join(std, name)):
        dirs[:] = [d for d in dirs if d not in _TEST_DIRS]
        out += [os.path.join(root, f) for f in files
                if f.endswith(".py") and not f.startswith("test_")]
    return out


def _pydoc_topics():
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package the documentation separately
        return {}
    return topics


def stdlib_sources():
    """The default corpus's sources for the running Python (see STDLIB_MODULES)."""
    std = stdlib_dir()
    files = set()
    for name in STDLIB_MODULES:
        files.update(_module_files(std, name))
    rels = sorted((os.path.relpath(f, std).split(os.sep), f) for f in files)
    out = [Source("stdlib/" + "/".join(parts), os.path.getsize(f), f) for parts, f in rels]
    topics = _pydoc_topics()
    out += [Source(f"pydoc_topics/{t}", len(topics[t].encode("utf-8")), "", t)
            for t in sorted(topics)]
    return out


def python_version() -> str:
    return "%d.%d.%d" % sys.version_info[:3]


def read_source(src: Source) -> bytes:
    """The raw bytes of a source. Raises UserError when the file cannot be read."""
    if src.topic:
        return _pydoc_topics()[src.topic].encode("utf-8")
    try:
        with open(src.path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {src.path}: {e.strerror}") from None


class _ReplacementCounter:
    """A codecs error handler that counts the U+FFFD replacements it makes."""

    def __init__(self):
        self.count = 0

    def __call__(self, err):
        self.count += 1
        return "\ufffd", err.end


_counter = _ReplacementCounter()
codecs.register_error("mpitrain-count-replace", _counter)


def decode(data: bytes):
    """(text, replacements) for a text source, or (None, 0) for a binary one (has a NUL byte).

    Replacements follow Python's errors='replace' (one U+FFFD per maximal invalid sequence).
    """
    if b"\x00" in data:
        return None, 0
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        before = _counter.count
        text = data.decode("utf-8", errors="mpitrain-count-replace")
        return text, _counter.count - before


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Reading a source in pieces (streaming `prepare`): a piece ends right after a "\n" that is
# followed by a printable, non-space ASCII byte (0x21-0x7E). No pre-token (tokenizer.PATTERN)
# and no UTF-8 sequence, valid or not, spans such a point: the "\n" ends a whitespace run (the
# next character is not whitespace) and the next character starts a pre-token of its own; "\n"
# is never part of a multi-byte sequence. So decoding and pre-tokenizing the pieces one by one
# gives exactly what the whole text gives. A source without such a point is one piece.
PIECE_BYTES = 1 << 21


def _cut_point(buf: bytes) -> int:
    """The last position p > 0 with buf[p-1] == "\\n" and buf[p] in 0x21..0x7E, else 0."""
    i = len(buf) - 1
    while i > 0:
        j = buf.rfind(b"\n", 0, i)
        if j < 0:
            return 0
        if 0x21 <= buf[j + 1] <= 0x7E:
            return j + 1
        i = j
    return 0


def scan_source(src: Source, piece_bytes: int = PIECE_BYTES):
    """(size in bytes, sha256 hex, binary?, the bytes or None) of a source, read once in
    blocks; the bytes are kept (to be used as the only piece) when there are at most
    piece_bytes of them. Raises UserError when the file cannot be read."""
    if src.topic:
        data = read_source(src)
        return len(data), sha256_hex(data), b"\x00" in data, data
    h, size, binary, first = hashlib.sha256(), 0, False, None
    try:
        with open(src.path, "rb") as f:
            while True:
                block = f.read(piece_bytes + 1 if first is None else piece_bytes)
                if not block:
                    break
                if first is None:
                    first = block
                h.update(block)
                size += len(block)
                binary = binary or b"\x00" in block
    except OSError as e:
        raise UserError(f"cannot read {src.path}: {e.strerror}") from None
    return size, h.hexdigest(), binary, (first or b"") if size <= piece_bytes else None


def source_pieces(src: Source, data=None, piece_bytes: int = PIECE_BYTES):
    """The bytes of a source as consecutive pieces of about piece_bytes (see PIECE_BYTES);
    `data`, when given, is the source's whole bytes (read already). Raises UserError when the
    file cannot be read."""
    if data is None and src.topic:
        data = read_source(src)
    if data is not None:
        while len(data) > piece_bytes:
            p = _cut_point(data[:piece_bytes])
            if not p:
                break
            yield data[:p]
            data = data[p:]
        yield data
        return
    try:
        with open(src.path, "rb") as f:
            buf = b""
            while True:
                block = f.read(piece_bytes)
                if not block:
                    break
                buf += block
                p = _cut_point(buf)
                if p:
                    yield buf[:p]
                    buf = buf[p:]
            yield buf
    except OSError as e:
        raise UserError(f"cannot read {src.path}: {e.strerror}") from None
