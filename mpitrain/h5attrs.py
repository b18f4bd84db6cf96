"""HDF5 attribute values as plain Python, and member names as text: the one conversion every
reader of our files uses."""
import numpy as np


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
