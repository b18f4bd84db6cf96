"""HDF5 attribute values as plain Python, and member names as text: the one conversion every
reader of our files uses; and the checksum over a group's attributes."""
import json
import zlib

import numpy as np

ATTRS_CRC = "attrs_crc32"   # the attribute that holds attrs_crc of its siblings


def plain(value):
    """An HDF5 attribute value as plain Python (str, int, float, bool, lists)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.dtype.kind in "OS" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def shown_name(name) -> str:
    """An HDF5 member's name for a message: h5py gives a name that does not decode as bytes."""
    return name if isinstance(name, str) else repr(name)


def attrs_crc(attrs) -> int:
    """CRC32 over a group's attributes except ATTRS_CRC, in a canonical JSON form (values as
    `plain` gives them, sorted keys): the /vocab group's (vocabulary format 2) and a dataset's
    root (dataset format 2)."""
    canon = {k: plain(v) for k, v in attrs.items() if k != ATTRS_CRC}
    return zlib.crc32(json.dumps(canon, sort_keys=True).encode()) & 0xFFFFFFFF
