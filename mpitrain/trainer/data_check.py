"""Every node reads the dataset itself: before training, check that each node has the file and
that it holds the tokens Node Zero planned with.

A shared file system is the usual case (every node opens the same file); without one, the
dataset must be copied to the same path on every node. Either way a node where the file is
missing, unreadable or different would train on other tokens, or fail later with a worker's
traceback; here it ends the job at once with one line naming that node.

Only the first rank of every node other than Node Zero's reads its file (one node: nothing to
check): it computes the SHA-256 of the token array (dataset.tokens_sha256) and compares it with
Node Zero's -- the file's `tokens_sha256` attribute, or for files written before it the checksum
Node Zero computes.
"""
import os

from mpitrain.trainer.hierarchy import host_name


def _checksum(path: str, stored_only: bool):
    """(sha256 hex, None) of the file's tokens, or (None, why not)."""
    import h5py

    from mpitrain.dataset import tokens_sha256
    from mpitrain.h5attrs import plain

    if not os.path.isfile(path):
        return None, "no such file"
    try:
        with h5py.File(path, "r") as f:
            stored = plain(f.attrs.get("tokens_sha256"))
            if stored_only and stored:
                return stored, None
            return tokens_sha256(f["tokens"]), None
    except Exception as e:  # noqa: BLE001 - any failure to read it is this node's problem
        return None, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def check_dataset_on_nodes(world, path: str):
    """Collective over `world`: None when every node holds the same dataset at `path`, else the
    one-line error (the same on every rank) naming the first node where it is missing or
    differs."""
    from mpi4py import MPI

    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    lead = node.Get_rank() == 0
    first = node.allreduce(world.Get_rank(), op=MPI.MIN)
    node.Free()
    nodes = world.allreduce(1 if lead else 0)
    if nodes == 1:
        return None
    checksum, why = (None, None)
    if world.Get_rank() == 0:
        checksum, why = _checksum(path, stored_only=True)
    elif lead and first != 0:
        checksum, why = _checksum(path, stored_only=False)
    reference = world.bcast(checksum, root=0)
    rows = world.allgather((lead and first != 0, host_name(), world.Get_rank(), checksum, why))
    for is_lead, host, rank, sum_, why in rows:
        if not is_lead:
            continue
        if why is None and sum_ != reference:
            why = (f"differs from Node Zero's (tokens sha256 {sum_[:12]}... against "
                   f"{str(reference)[:12]}...)")
        if why is not None:
            return (f"dataset {path} on node {host} (rank {rank}): {why}; every node needs the "
                    "same file at the same path (a shared file system, or a copy on each node)")
    return None
