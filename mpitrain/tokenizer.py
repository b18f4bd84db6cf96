"""The vocabulary and the byte-fallback pre-token tokenizer (docs/DESIGN.md, "The pipeline"; layout in docs/FORMATS.md).

Ids, in this order:
  0 .. S-1           special tokens (SPECIALS; S = 1: end of document)
  S .. S+255         the 256 single bytes (id = S + byte value)
  S+256 .. V-1       pre-tokens longer than one UTF-8 byte, by descending corpus count,
                     ties broken by their bytes (ascending)
Text is cut into pre-tokens by PATTERN; a pre-token in the vocabulary becomes its id, any other
becomes the ids of its UTF-8 bytes. So decode(encode(s)) == s for every valid Unicode string,
and no input text ever becomes a special token (specials are never looked up from text).

The vocabulary is stored two ways, both exact:
  - in HDF5 (`to_hdf5` / `from_hdf5`): a group (named `vocab` at the root of datasets and
    checkpoints) holding every token's bytes, see docs/FORMATS.md;
  - as text (`save_txt` / `from_txt`): a header line, then one escaped token per line.
"""
import json
import os
import re

import numpy as np

from mpitrain import atomic, formats
from mpitrain.h5attrs import attrs_crc

SPECIALS = ("<|endoftext|>",)

# The count-only baseline's pre-token regex (docs/BENCHMARKS.md, "prepare") plus ` ?_+`: the benchmark's alternatives match
# every code point except "_" (a word character that is neither letter nor digit), and a
# tokenizer must lose nothing. `\s+` stays last so " word" keeps its leading space.
PATTERN = r" ?[^\W\d_]+| ?\d+| ?[^\s\w]+| ?_+|\s+"

# The pre-token patterns mpitrain writes. A stored vocabulary names its pattern, and a reader
# compiles it: any other is refused (a tampered pattern can make the regex engine run for
# hours on a line of text).
KNOWN_PATTERNS = (PATTERN,)

# 2: the /vocab group's attributes carry a CRC32 (attrs_crc32); version 1 (without) is read too.
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
MAX_VOCAB_SIZE = 1_000_000


def min_vocab_size(specials=SPECIALS) -> int:
    """The smallest --vocab-size: the specials, the 256 bytes and room for one pre-token."""
    return len(specials) + 257


def is_multibyte(pretoken: str) -> bool:
    """True when the pre-token's UTF-8 form is longer than one byte (a vocabulary candidate)."""
    return len(pretoken) > 1 or ord(pretoken) > 0x7F


def select_pretokens(counts, n):
    """The n vocabulary pre-tokens from a {pre-token: count} mapping, in id order.

    Descending count, ties by UTF-8 bytes ascending. UTF-8 preserves code point order, so
    comparing the str itself gives the same order as comparing its bytes (and is cheaper).
    """
    candidates = [(-c, t) for t, c in counts.items() if is_multibyte(t)]
    candidates.sort()
    return [t for _, t in candidates[:max(n, 0)]]


class Tokenizer:
    """Special tokens + 256 bytes + `pretokens` (a list of str, each > 1 UTF-8 byte)."""

    def __init__(self, pretokens, specials=SPECIALS, pattern=PATTERN):
        self.specials = tuple(specials)
        self.pattern = pattern
        self.pretokens = list(pretokens)
        self.num_specials = len(self.specials)
        self.byte_offset = self.num_specials  # id of byte b is byte_offset + b
        self.vocab_size = self.num_specials + 256 + len(self.pretokens)
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise ValueError(f"vocabulary of {self.vocab_size} ids exceeds {MAX_VOCAB_SIZE}")
        self.eod_id = self.specials.index("<|endoftext|>")
        self._regex = re.compile(pattern)
        # id -> bytes, for decoding (specials decode to their names)
        self._bytes = ([s.encode() for s in self.specials]
                       + [bytes([b]) for b in range(256)]
                       + [t.encode("utf-8") for t in self.pretokens])
        # pre-token (str) -> id, for encoding: the vocabulary's pre-tokens and the one-byte
        # characters (ASCII). Specials are deliberately absent.
        first = self.num_specials + 256
        self.ids = {chr(b): self.byte_offset + b for b in range(128)}
        for i, t in enumerate(self.pretokens):
            if not is_multibyte(t):
                raise ValueError(f"pre-token {t!r} is a single byte; bytes have their own ids")
            if self.ids.setdefault(t, first + i) != first + i:
                raise ValueError(f"pre-token {t!r} appears twice in the vocabulary")

    # ----------------------------------------------------------------- building
    @classmethod
    def from_counts(cls, counts, vocab_size, specials=SPECIALS, pattern=PATTERN):
        """The vocabulary of at most `vocab_size` ids for a {pre-token: count} mapping.

        Smaller when the corpus has fewer distinct multi-byte pre-tokens than there is room for.
        """
        lo = min_vocab_size(specials)
        if not lo <= vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be in [{lo}, {MAX_VOCAB_SIZE}], got {vocab_size}")
        return cls(select_pretokens(counts, vocab_size - len(specials) - 256), specials, pattern)

    # ----------------------------------------------------------------- encode / decode
    def split(self, text: str):
        """The pre-tokens of `text` (their concatenation is `text`)."""
        return self._regex.findall(text)

    def pretoken_ids(self, pretoken: str):
        """The ids of one pre-token: its own id, or its UTF-8 bytes' ids."""
        i = self.ids.get(pretoken)
        if i is not None:
            return [i]
        return [self.byte_offset + b for b in pretoken.encode("utf-8")]

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int32, 1-D) of `text`. A lone surrogate raises ValueError."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        check_encodable(text)
        out = []
        ids, off = self.ids, self.byte_offset
        for t in self._regex.findall(text):
            i = ids.get(t)
            if i is None:
                out.extend(off + b for b in t.encode("utf-8"))
            else:
                out.append(i)
        return np.array(out, dtype=np.int32)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def decode_bytes(self, ids) -> bytes:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} outside the vocabulary [0, {self.vocab_size})")
        table = self._bytes
        return b"".join([table[i] for i in ids.tolist()])

    def decode(self, ids) -> str:
        """Text of `ids`. Specials read as their names; byte ids that do not form valid UTF-8
        (possible only for sequences encode() never makes) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_str(self, token_id: int) -> str:
        """One token as readable, escaped text (for listings)."""
        return escape_token(self._bytes[token_id])

    # ----------------------------------------------------------------- HDF5
    def to_hdf5(self, group):
        """Write the vocabulary into the (empty) h5py group `group`; see docs/FORMATS.md."""
        lengths = np.fromiter((len(b) for b in self._bytes), dtype=np.int64, count=self.vocab_size)
        offsets = np.zeros(self.vocab_size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.frombuffer(b"".join(self._bytes), dtype=np.uint8)
        group.attrs["format"] = formats.VOCAB
        group.attrs["format_version"] = FORMAT_VERSION
        group.attrs["vocab_size"] = self.vocab_size
        group.attrs["num_specials"] = self.num_specials
        group.attrs["specials"] = json.dumps(list(self.specials))
        group.attrs["eod_id"] = self.eod_id
        group.attrs["byte_offset"] = self.byte_offset
        group.attrs["pattern"] = self.pattern
        group.attrs["order"] = ("specials, then the 256 bytes (id = byte_offset + byte), then "
                                "pre-tokens longer than one byte by descending count, ties by bytes")
        group.attrs["attrs_crc32"] = np.uint32(attrs_crc(group.attrs))
        # track_times=False: identical inputs give byte-identical files.
        group.create_dataset("token_bytes", data=data, track_times=False)
        group.create_dataset("token_offsets", data=offsets, track_times=False)

    @classmethod
    def from_hdf5(cls, group, where="vocabulary"):
        """Read a vocabulary written by `to_hdf5`. Raises ValueError naming what is wrong."""
        try:
            if group.attrs.get("format") != formats.VOCAB:
                raise ValueError(f"the vocab group has no format={formats.VOCAB!r} attribute")
            version = int(group.attrs["format_version"])
            if version not in READS_VERSIONS:
                raise ValueError(f"vocabulary format version {version} is not supported "
                                 f"(this mpitrain reads versions "
                                 f"{', '.join(map(str, READS_VERSIONS))})")
            if version >= 2 and ("attrs_crc32" not in group.attrs
                                 or attrs_crc(group.attrs) != int(group.attrs["attrs_crc32"])):
                raise ValueError(f"{where} is damaged: its attributes fail their checksum")
            specials = json.loads(group.attrs["specials"])
            pattern = str(group.attrs["pattern"])
            data = group["token_bytes"][()].tobytes()
            offsets = group["token_offsets"][()]
            vocab_size = int(group.attrs["vocab_size"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where} is incomplete or damaged ({e})") from None
        if offsets.shape != (vocab_size + 1,) or offsets[0] != 0 or offsets[-1] != len(data) \
                or np.any(np.diff(offsets) <= 0):
            raise ValueError(f"{where} is damaged: token offsets do not match the token bytes")
        tokens = [data[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        return cls._from_token_bytes(tokens, specials, pattern, where)

    @classmethod
    def _from_token_bytes(cls, tokens, specials, pattern, where):
        s = len(specials)
        if len(tokens) < s + 256:
            raise ValueError(f"{where} has {len(tokens)} tokens, fewer than {s} specials + 256 bytes")
        if [t.decode("utf-8", "replace") for t in tokens[:s]] != list(specials):
            raise ValueError(f"{where} is damaged: its first tokens are not the specials {specials}")
        if tokens[s:s + 256] != [bytes([b]) for b in range(256)]:
            raise ValueError(f"{where} is damaged: ids {s}..{s + 255} are not the 256 bytes in order")
        try:
            pretokens = [t.decode("utf-8") for t in tokens[s + 256:]]
        except UnicodeDecodeError:
            raise ValueError(f"{where} is damaged: a pre-token is not valid UTF-8") from None
        if pattern not in KNOWN_PATTERNS:   # never compiled: see KNOWN_PATTERNS
            raise ValueError(f"{where} is damaged or not mpitrain's: its pre-token pattern is "
                             f"not one mpitrain writes")
        return cls(pretokens, specials, pattern)

    # ----------------------------------------------------------------- vocab.txt
    def save_txt(self, path):
        """Write the vocab.txt `path` atomically (mpitrain.atomic); see write_txt."""
        with atomic.replacing(path) as f:
            self.write_txt(f)

    def write_txt(self, f):
        """Into the text file `f` (UTF-8, "\\n" line ends): a header line, then line k+2
        holds token id k, escaped (see escape_token)."""
        header = json.dumps({"format_version": FORMAT_VERSION, "vocab_size": self.vocab_size,
                             "specials": list(self.specials), "pattern": self.pattern},
                            ensure_ascii=True)
        f.write(f"{formats.VOCAB_TXT_MAGIC} {header}\n")
        for b in self._bytes:
            f.write(escape_token(b))
            f.write("\n")

    @classmethod
    def from_txt(cls, path):
        where = os.fspath(path)
        with open(path, "r", encoding="utf-8", newline="\n") as f:
            lines = f.read().split("\n")
        if not lines or not lines[0].startswith(formats.VOCAB_TXT_MAGIC + " "):
            raise ValueError(f"{where} is not an mpitrain vocab.txt "
                             f"(no '{formats.VOCAB_TXT_MAGIC}' header)")
        try:
            header = json.loads(lines[0][len(formats.VOCAB_TXT_MAGIC) + 1:])
            specials, pattern, n = header["specials"], header["pattern"], int(header["vocab_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: damaged header ({e})") from None
        if header.get("format_version") not in READS_VERSIONS:
            raise ValueError(f"{where}: vocab format version {header.get('format_version')} "
                             f"is not supported (this mpitrain reads "
                             f"{', '.join(map(str, READS_VERSIONS))})")
        body = lines[1:]
        if body and body[-1] == "":
            body = body[:-1]  # the final newline
        if len(body) != n:
            raise ValueError(f"{where}: header says {n} tokens, file has {len(body)} lines")
        return cls._from_token_bytes([unescape_token(l) for l in body], specials, pattern, where)

    @classmethod
    def from_file(cls, path):
        """Read the vocabulary of a dataset or checkpoint (.h5, group `vocab`) or a vocab.txt.

        Raises mpitrain.errors.UserError with one line naming the problem.
        """
        from mpitrain.errors import UserError
        from mpitrain.hdf5_damage import open_ours, reading

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"no such vocabulary file: {path}")
        with open(path, "rb") as f:
            magic = f.read(8)
        try:
            if magic == b"\x89HDF\r\n\x1a\n":
                # reading(): damage HDF5 meets (any exception type) -> UserError
                with reading(path), open_ours(path) as h5:
                    if "vocab" not in h5:
                        raise ValueError(f"{path} has no 'vocab' group (not an mpitrain dataset "
                                         "or checkpoint)")
                    return cls.from_hdf5(h5["vocab"], where=f"{path}: vocabulary")
            return cls.from_txt(path)
        except (ValueError, OSError) as e:
            raise UserError(str(e).replace("\n", " ")) from None


def check_encodable(text: str):
    """Refuse text UTF-8 cannot represent (lone surrogates), naming the first position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text contains a lone surrogate U+{ord(text[e.start]):04X} at "
                         f"position {e.start}; only valid Unicode can be encoded") from None


# vocab.txt escaping: a token's bytes as UTF-8 text on one line. Backslash, newline, carriage
# return and tab become \\ \n \r \t; bytes that are not part of valid UTF-8 and characters
# that are not printable (other than the space) become \xHH per UTF-8 byte. Everything else
# is written as is, so words read naturally (including a leading space).
_ESC = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESC = re.compile(r"\\(\\|n|r|t|x[0-9a-f]{2})")
_UNESC_MAP = {"\\": b"\\", "n": b"\n", "r": b"\r", "t": b"\t"}


def escape_token(b: bytes) -> str:
    out = []
    for ch in b.decode("utf-8", errors="surrogateescape"):
        if ch in _ESC:
            out.append(_ESC[ch])
        elif "\udc80" <= ch <= "\udcff":  # an undecodable byte
            out.append(f"\\x{ord(ch) - 0xdc00:02x}")
        elif ch == " " or ch.isprintable():
            out.append(ch)
        else:
            out.append("".join(f"\\x{x:02x}" for x in ch.encode("utf-8")))
    return "".join(out)


def unescape_token(s: str) -> bytes:
    out, pos = [], 0
    for m in _UNESC.finditer(s):
        out.append(s[pos:m.start()].encode("utf-8"))
        g = m.group(1)
        out.append(bytes([int(g[1:], 16)]) if g[0] == "x" else _UNESC_MAP[g])
        pos = m.end()
    out.append(s[pos:].encode("utf-8"))
    return b"".join(out)
