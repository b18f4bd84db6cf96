"""HDF5 attribute values as plain Python: the one conversion every reader of our files uses."""
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
