"""The workers across several nodes: who owns which slice, and the two-level exchange.

A node is the set of workers MPI's COMM_TYPE_SHARED split puts together (one host). On every node
the workers share one parameter arena and read each other's gradient arenas in place (comm.py);
between nodes only messages go. The "sphere of spheres": Node Zero at the centre, each node a
sphere of workers that first agree among themselves through shared memory, then exchange with the
other nodes only what one replica's all-reduce needs.

Ownership (ZeRO-1 slices). The parameter arena is cut into one contiguous slice per node (equal
up to one float, nodes in the order of their first worker), and each node's slice into one per
worker of that node (in worker order). So every node owns 1/nodes of the parameters whatever its
number of workers, and sends per step

    reduction:   its partial sums of the slices it does not own   (nodes - 1)/nodes x P
    publication: its own slices, once to each other node           (nodes - 1)/nodes x P

that is at most 2 (nodes - 1)/nodes x P bytes (P: the parameter bytes), one replica's
all-reduce; the flat exchange among all workers sends about that much per *worker*. On one node
the slices are today's: worker w of k holds n // k floats (+1 for the first n % k).

The exchange, for worker w (owner of slice s_w) on node n:
  1. reduction: for every slice s_v owned on another node, one worker of n (its `partner`) sums
     the node's gradients of s_v in shared memory and sends that node sum to v; w sums its own
     node's gradients of s_w, then adds the node sums received from the other nodes in a fixed
     order (n - 1, n - 2, ... modulo the nodes). The order is fixed by the host layout, so a run
     is deterministic for a layout; against one node only the order of the float sums differs.
  2. publication: w updates s_w in the node's shared parameter arena, and sends it to its partner
     on every other node, which receives it straight into that node's shared arena.
The partner of s_v on node n is the node's workers in turn over the slices it does not own, so
the summing, sending and receiving are spread over the node's workers (and cores) instead of
one leader's: the same bytes on the node's link, computed and fed by L cores instead of one. On
this 2-CPU machine the two cannot be told apart (compute-bound), so the choice rests on that
reasoning (docs/SCALING.md).
"""
import os
import socket

import numpy as np


def host_name() -> str:
    """This process's host as the MPI launcher named it (MPICH's Hydra sets PMI_HOSTNAME: the
    name in -hosts or the hosts file), else the machine's name."""
    return os.environ.get("PMI_HOSTNAME") or socket.gethostname()


def hosts_table(world) -> str:
    """Collective over `world`: which ranks share a node (COMM_TYPE_SHARED) and its host, one
    line per node (rank 0 is Node Zero, rank r > 0 worker r - 1); the text on rank 0, else None."""
    from mpi4py import MPI

    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    first = node.allreduce(world.Get_rank(), op=MPI.MIN)
    node.Free()
    rows = world.gather((first, host_name()), root=0)
    if rows is None:
        return None
    layout = NodeLayout.from_keys([f for f, _ in rows])
    lines = [f"{layout.num_nodes} node(s):"]
    for q, ranks in enumerate(layout.nodes):
        names = ", ".join(("0 (Node Zero)" if r == 0 else f"{r} (worker {r - 1})")
                          for r in ranks)
        lines.append(f"  node {q} on {rows[ranks[0]][1]}: ranks {names}")
    return "\n".join(lines)


def split(n: int, k: int) -> list:
    """n floats in k contiguous pieces, equal up to one (the first n % k one longer)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


class NodeLayout:
    """The workers' nodes: `nodes` is a list of lists of worker indices, one per node."""

    def __init__(self, nodes: list):
        self.nodes = sorted((sorted(m) for m in nodes), key=lambda m: m[0])
        self.num_nodes = len(self.nodes)
        self.num_workers = sum(len(m) for m in self.nodes)
        self.node_of = [0] * self.num_workers
        for q, members in enumerate(self.nodes):
            for w in members:
                self.node_of[w] = q

    @classmethod
    def from_keys(cls, keys: list) -> "NodeLayout":
        """keys[w]: any value naming worker w's node (e.g. its host)."""
        groups = {}
        for w, key in enumerate(keys):
            groups.setdefault(key, []).append(w)
        return cls(list(groups.values()))

    def slices(self, n: int) -> tuple:
        """(counts, displs) of every worker's slice of an arena of n floats, by worker index."""
        counts, displs = [0] * self.num_workers, [0] * self.num_workers
        start = 0
        for members, size in zip(self.nodes, split(n, self.num_nodes)):
            for w, c in zip(members, split(size, len(members))):
                counts[w], displs[w] = c, start
                start += c
        return counts, displs

    def partner(self, node: int, v: int) -> int:
        """The worker of `node` that sends the node's sum of slice v to v and receives v's
        updated slice (v owned on another node)."""
        members = self.nodes[node]
        foreign = [u for u in range(self.num_workers) if self.node_of[u] != node]
        return members[foreign.index(v) % len(members)]

    def partnered(self, w: int) -> list:
        """The slices (their owners) for which worker w is its node's partner."""
        node = self.node_of[w]
        return [v for v in range(self.num_workers)
                if self.node_of[v] != node and self.partner(node, v) == w]

    def sum_order(self, node: int) -> list:
        """The other nodes in the order their sums are added on `node`."""
        return [(node - i) % self.num_nodes for i in range(1, self.num_nodes)]

    def remote_bytes_per_node(self, n: int, itemsize: int = 4) -> list:
        """Bytes each node sends to the others per step (reduction + publication)."""
        counts, _ = self.slices(n)
        out = []
        for q, members in enumerate(self.nodes):
            own = sum(counts[w] for w in members)
            out.append(itemsize * ((n - own) + own * (self.num_nodes - 1)))
        return out

    def describe(self, hosts: list = None) -> str:
        """One line per node: its workers (and host)."""
        lines = []
        for q, members in enumerate(self.nodes):
            host = f" ({hosts[members[0]]})" if hosts else ""
            lines.append(f"node {q}{host}: workers {', '.join(map(str, members))}")
        return "\n".join(lines)


def node_sum(arrays: list, r: int, out: np.ndarray, lo: int, hi: int, piece: int) -> None:
    """out = arrays[r][lo:hi] + arrays[r-1][lo:hi] + ... (that order, modulo len(arrays)):
    `piece` floats at a time, so that the piece of `out` stays in cache; the pages read from the
    others' arrays are released from this process (collectives._release)."""
    from mpitrain.trainer.collectives import _release

    k = len(arrays)
    own = arrays[r]
    for a in range(lo, hi, piece):
        b = min(a + piece, hi)
        o = out[a - lo:b - lo]
        if not np.may_share_memory(o, own):   # the sum may be made in place in our own array
            o[...] = own[a:b]
        for i in range(1, k):
            part = arrays[(r - i) % k][a:b]
            np.add(o, part, out=o)
            _release(part)


def traffic_statistics(counters: np.ndarray, steps: int) -> tuple:
    """From the gathered counters (columns 3 and 4: bytes sent to other nodes by the steps,
    the worker's node; Node Zero's node -1): ({"bytes_to_other_nodes_per_step": by rank,
    "bytes_to_other_nodes_per_step_by_node": by node}, its line for train.log, None on one node); ({}, None) when the counters have no such
    columns (thread mode)."""
    if counters.shape[1] < 5:
        return {}, None
    per = max(steps, 1)
    by_rank = [int(b) // per for b in counters[:, 3].tolist()]
    nodes = counters[:, 4].tolist()
    by_node = [sum(b for b, q in zip(by_rank, nodes) if q == node)
               for node in range(max(nodes) + 1)]
    if len(by_node) < 2:   # one node: nothing crosses a network; the metrics still say 0
        return ({"bytes_to_other_nodes_per_step": by_rank,
                 "bytes_to_other_nodes_per_step_by_node": by_node}, None)
    line = ("bytes sent to other nodes per step (MB): by node "
            + ", ".join(f"{q}: {b / 1e6:.2f}" for q, b in enumerate(by_node))
            + "; by rank " + ", ".join(f"{r}: {b / 1e6:.2f}" for r, b in enumerate(by_rank)))
    return ({"bytes_to_other_nodes_per_step": by_rank,
             "bytes_to_other_nodes_per_step_by_node": by_node}, line)
