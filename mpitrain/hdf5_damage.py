"""Telling a damaged HDF5 file from a bug, and saying so in one line.

HDF5 reports damage inside a file (a metadata checksum that fails, an address past the end, a
message larger than its buffer) as OSError, KeyError, RuntimeError, ValueError or a decoding
error, depending on where it meets it. Every reader of our files (checkpoint, dataset,
tokenizer, inspect) uses these helpers, so such damage ends as a UserError (one line, exit 2)
or a reported problem, while an exception raised by mpitrain's own code keeps its traceback.

Some damage does not raise: it crashes the process. A string attribute whose datatype class
byte is flipped reads as a variable-length sequence, and reading it segfaults inside h5py
(measured with a byte-flip sweep of a dataset file). mpitrain writes only integer, float and
string attributes, so every reader opens our files with `open_ours`, which refuses a file
holding any other kind of attribute before anything is read.
"""
import os
from contextlib import contextmanager

import h5py

from mpitrain.errors import UserError
from mpitrain.h5attrs import plain, shown_name


def hdf5_failure(exc) -> bool:
    """True when `exc` was raised inside h5py or the HDF5 library (its innermost frame is in
    h5py), i.e. by what a file holds, not by mpitrain's code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    where = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
    return where.startswith("h5py/") or "/h5py/" in where


def is_damage(exc) -> bool:
    """An exception that reading a file can raise because of what the file holds: any OSError
    (truncated, unreadable) or anything raised inside h5py."""
    return isinstance(exc, OSError) or hdf5_failure(exc)


def first_line(exc) -> str:
    """The first line of an exception's message (h5py quotes KeyError messages), or its type."""
    text = str(exc).strip("'\"")
    return text.splitlines()[0] if text.strip() else type(exc).__name__


@contextmanager
def _damage_as(error_type, message):
    """Run the body; damage met in it becomes error_type(message(what HDF5 said)). error_type
    itself and exceptions of our own code pass through."""
    try:
        yield
    except error_type:
        raise
    except Exception as e:  # noqa: BLE001 - HDF5 reports damage under several types
        if not is_damage(e):
            raise
        raise error_type(message(first_line(e))) from None


def reading(path, advice=""):
    """Run the body; damage found while reading `path` becomes UserError("PATH is damaged
    (what HDF5 said)ADVICE"). UserError and exceptions of our own code pass through."""
    return _damage_as(UserError, lambda what: f"{os.fspath(path)} is damaged ({what}){advice}")


class DamagedFile(OSError):
    """Damage found by mpitrain's own checks; the message says what."""


def safe_attribute(attrs, name) -> bool:
    """Whether attribute `name` of `attrs` (an h5py AttributeManager) has a datatype mpitrain
    writes -- integer, float or string, scalar or array -- judged without reading it."""
    return attrs.get_id(name).get_type().get_class() in (h5py.h5t.INTEGER, h5py.h5t.FLOAT,
                                                         h5py.h5t.STRING)


def file_format(path):
    """The root `format` attribute of any HDF5 file (None without one), read only when it is a
    kind of attribute mpitrain writes: DamagedFile otherwise. h5py and HDF5 errors (a file
    that will not open) pass through."""
    with h5py.File(path, "r") as f:
        if "format" not in f.attrs:
            return None
        if not safe_attribute(f.attrs, "format"):
            raise DamagedFile("the file is damaged: its format attribute has a datatype "
                              "mpitrain never writes")
        return plain(f.attrs["format"])


def open_ours(path):
    """h5py.File(path, "r") for one of mpitrain's files, once every attribute in it has been
    found to be of a kind mpitrain writes (see the module docstring); DamagedFile (an OSError,
    which every reader takes as damage) otherwise, or when walking the file meets damage."""
    f = h5py.File(path, "r")
    try:
        _check_attribute_kinds(f)
    except BaseException:
        f.close()
        raise
    return f


def _check_attribute_kinds(f) -> None:
    with _damage_as(DamagedFile, lambda what: f"its HDF5 structure is damaged ({what})"):
        objects = [("", f)]
        f.visititems(lambda name, obj: objects.append(("/" + shown_name(name), obj)) and None)
        for where, obj in objects:
            for name in obj.attrs:
                if not safe_attribute(obj.attrs, name):
                    raise DamagedFile(f"the file is damaged: attribute {where or '/'}:{name} "
                                      f"has a datatype mpitrain never writes")
