"""The generic part of `mpitrain inspect`: any HDF5 file as a tree of groups and datasets.

describe(h5file) -> nested dict (JSON-ready); format_tree(node) -> indented text; dumps(obj)
-> the strict JSON every `inspect --json` prints. Used for every file kind; the kind-specific
summaries (inspect_dataset, inspect_checkpoint) add to it.
"""
import json
import math

import h5py

from mpitrain.hdf5_damage import first_line, hdf5_failure, is_damage, safe_attribute
from mpitrain.h5attrs import plain

_FILTER_NAMES = {1: "gzip", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit",
                 6: "scaleoffset", 32001: "blosc", 32004: "lz4", 32015: "zstd"}


def _unreadable(e):
    return f"<unreadable: {first_line(e)}>"


def _attrs(obj):
    out = {}
    try:
        keys = sorted(obj.attrs, key=_label)
    except Exception as e:  # noqa: BLE001 - damaged attribute storage: say so, keep going
        if not hdf5_failure(e):
            raise
        return {"<attributes>": _unreadable(e)}
    for k in keys:
        try:
            if not safe_attribute(obj.attrs, k):   # may crash h5py if damaged: not read
                out[_label(k)] = "<not read: a datatype mpitrain never writes>"
                continue
            out[_label(k)] = plain(obj.attrs[k])
        except Exception as e:  # noqa: BLE001 - a type h5py cannot read, or damage
            if not (isinstance(e, TypeError) or is_damage(e)):
                raise
            out[_label(k)] = _unreadable(e)
    return out


def _label(name):
    """A member or attribute name as str (h5py hands back bytes for a name that is not valid
    UTF-8, e.g. in a damaged file)."""
    return name if isinstance(name, str) else plain(bytes(name))


def _filters(ds):
    dcpl = ds.id.get_create_plist()
    names = []
    for i in range(dcpl.get_nfilters()):
        code = dcpl.get_filter(i)[0]
        names.append(_FILTER_NAMES.get(code, f"filter {code}"))
    return names


def describe(node, name="/"):
    """Nested dict of a group/dataset/named datatype: kind, attributes, and for datasets
    shape, dtype, logical and stored bytes, layout (contiguous / chunked with chunk shape) and
    filters. A member HDF5 cannot open is kept as kind "unreadable" with the error, so a
    damaged file still shows the rest of its tree."""
    if isinstance(node, h5py.Dataset):
        return {
            "name": name, "kind": "dataset", "shape": list(node.shape), "dtype": str(node.dtype),
            "bytes": int(node.size * node.dtype.itemsize) if node.dtype.itemsize else 0,
            "stored_bytes": int(node.id.get_storage_size()),
            "layout": "chunked" if node.chunks else "contiguous",
            "chunks": list(node.chunks) if node.chunks else None,
            "filters": _filters(node), "attrs": _attrs(node),
        }
    if isinstance(node, h5py.Datatype):  # a named (committed) type: no data, no members
        return {"name": name, "kind": "datatype", "dtype": str(node.dtype),
                "attrs": _attrs(node)}
    children, damage = [], None
    try:
        keys = list(node)  # h5py lists members by name
    except Exception as e:  # noqa: BLE001 - a damaged group: show it and go on
        if not hdf5_failure(e):
            raise
        keys, damage = [], _unreadable(e)
    for key in keys:
        label = _label(key)
        try:
            link = node.get(key, getlink=True)
            if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
                children.append({"name": label, "kind": "link",
                                 "target": getattr(link, "path", ""), "attrs": {}})
                continue
            children.append(describe(node[key], label))
        except Exception as e:  # noqa: BLE001 - one damaged member: mark it, list the rest
            if not hdf5_failure(e):
                raise
            children.append({"name": label, "kind": "unreadable", "error": _unreadable(e),
                             "attrs": {}})
    out = {"name": name, "kind": "group", "attrs": _attrs(node), "children": children}
    if damage:
        out["error"] = damage
    return out


def _short(v, width=100):
    s = repr(v) if not isinstance(v, str) else v.replace("\n", "\\n")
    return s if len(s) <= width else s[:width - 3] + "..."


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


COMPACT_MAX = 8   # compact listing: a group of more datasets than this is one line


def format_tree(node, indent=0, compact=False):
    """Indented listing: one line per object, its attributes below it. compact: a group holding
    more than COMPACT_MAX datasets (and nothing else) is one line giving their count and size
    (a checkpoint's params/ and optimizer groups); `inspect --all` lists them."""
    pad = "  " * indent
    children = node.get("children", ())
    if (compact and node["kind"] == "group" and len(children) > COMPACT_MAX
            and all(c["kind"] == "dataset" for c in children)):
        dtypes = sorted({c["dtype"] for c in children})
        nbytes, stored = (sum(c[k] for c in children) for k in ("bytes", "stored_bytes"))
        name = node["name"] + ("" if node["name"].endswith("/") else "/")
        return [f"{pad}{name}  {len(children)} datasets ({', '.join(dtypes)}), "
                f"{_human(nbytes)} (stored {_human(stored)}); --all lists them"]
    if node["kind"] == "dataset":
        shape = "x".join(map(str, node["shape"])) or "scalar"
        layout = node["layout"] + (f" {tuple(node['chunks'])}" if node["chunks"] else "")
        filters = f", filters {'+'.join(node['filters'])}" if node["filters"] else ""
        lines = [f"{pad}{node['name']}  [{shape}] {node['dtype']}, {_human(node['bytes'])} "
                 f"(stored {_human(node['stored_bytes'])}), {layout}{filters}"]
    elif node["kind"] == "link":
        return [f"{pad}{node['name']} -> {node['target']}"]
    elif node["kind"] == "unreadable":
        return [f"{pad}{node['name']}  {node['error']}"]
    elif node["kind"] == "datatype":
        lines = [f"{pad}{node['name']}  named datatype {node['dtype']}"]
    else:
        lines = [f"{pad}{node['name']}{'' if node['name'].endswith('/') else '/'}"
                 + (f"  members {node['error']}" if node.get("error") else "")]
    for k, v in node["attrs"].items():
        lines.append(f"{pad}    @{k} = {_short(v)}")
    for child in children:
        lines += format_tree(child, indent + 1, compact)
    return lines


def _finite_json(x):
    """x with every non-finite float replaced by its JSON5/JavaScript name as a string, so the
    output is strict JSON (a diverged run's loss can be NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if x != x else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    return x


def dumps(obj):
    return json.dumps(_finite_json(obj), indent=1, ensure_ascii=False, allow_nan=False)
