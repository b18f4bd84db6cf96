"""Kissing-spheres placement: which worker computes which windows of a step (docs/DESIGN.md, "Placement"; docs/TOPOLOGY.md).

The 12 positions around Node Zero are the vertices of an icosahedron. Worker w (0-based here;
MPI rank w + 1) sits at vertex w. The global batch of a step is cut into 12 symmetry groups,
window j in group j % 12, and group g belongs to vertex g.

Rules this module fixes (published with tables in docs/TOPOLOGY.md):

* Vertex order. Vertex 0 is a pole, 1-5 its neighbours going round the upper ring, 6-10 the
  lower ring (vertex 6 + k touches upper vertices 1 + k and 1 + (k + 1) % 5), 11 the opposite
  pole. So the first k vertices always form a connected patch, and workers 0..k-1 are each
  other's neighbours wherever the icosahedron allows.
* Empty vertices are processed nearest first: by their distance on the sphere to the nearest
  occupied vertex (those with an occupied neighbour first), then by vertex index. The group of
  an empty vertex goes to the occupied neighbour holding the fewest groups so far (ties: lowest
  vertex index); if no neighbour is occupied, to the occupied vertex nearest on the sphere (ties
  the same way: fewest groups, then lowest index). Nearest-first balances better than plain
  index order (2 workers at batch 32: 17/15 windows instead of 18/14).
* Recursion beyond 12 workers. Worker m of a sphere of k > 12 workers sits at vertex m % 12 of
  that sphere, as worker m // 12 of the sub-sphere that vertex holds (so vertex v holds workers
  v, v + 12, v + 24, ...). The windows of group v, taken in step order, are numbered t = 0, 1,
  ... and cut by the same rule: window t in sub-group t % 12, sub-group h to sub-vertex h, empty
  sub-vertices by the rule above. This repeats while a sphere holds more than 12 workers; in
  base 12, the digits of the window index pick the group at each level and the digits of the
  worker index the vertex.
* Graph topology (for MPI on the workers' communicator): within a sphere of k <= 12 workers the
  icosahedron's edges among occupied vertices; in a sphere of k > 12 workers the icosahedron's
  edges among its first 12 workers (one per vertex, each the first worker of its sub-sphere) and,
  recursively, the edges inside every sub-sphere. The graph is connected for every k >= 1.

Everything here is a pure function of the worker count (and batch size).
"""
import argparse
import math
from functools import lru_cache

PHI = (1 + math.sqrt(5)) / 2
NUM_VERTICES = 12

# The icosahedron with edge length 2: every vertex is a cyclic permutation of (0, +-1, +-PHI).
VERTICES = (
    (0.0, 1.0, PHI),                                                        # 0: pole
    (0.0, -1.0, PHI), (PHI, 0.0, 1.0), (1.0, PHI, 0.0), (-1.0, PHI, 0.0), (-PHI, 0.0, 1.0),
    (1.0, -PHI, 0.0), (PHI, 0.0, -1.0), (0.0, 1.0, -PHI), (-PHI, 0.0, -1.0), (-1.0, -PHI, 0.0),
    (0.0, -1.0, -PHI),                                                      # 11: opposite pole
)


def _dist2(a: int, b: int) -> float:
    return sum((x - y) ** 2 for x, y in zip(VERTICES[a], VERTICES[b]))


@lru_cache(maxsize=None)
def _angle_rank(a: int, b: int) -> int:
    """Distance on the sphere between vertices a and b as a rank: 0 same, 1 neighbour (chord 2),
    2 second ring (chord 2*PHI), 3 opposite (chord 2*sqrt(1+PHI^2)); chord length is monotone in
    the great-circle angle, so ranking chords ranks sphere distances exactly."""
    d2 = _dist2(a, b)
    levels = (0.0, 4.0, 4 * PHI ** 2, 4 * (1 + PHI ** 2))
    return min(range(4), key=lambda i: abs(d2 - levels[i]))


def neighbours(vertex: int) -> tuple:
    """The 5 vertices touching `vertex` (sorted)."""
    if not 0 <= vertex < NUM_VERTICES:
        raise ValueError(f"vertex must be in [0, {NUM_VERTICES}), got {vertex!r}")
    return tuple(v for v in range(NUM_VERTICES) if _angle_rank(vertex, v) == 1)


@lru_cache(maxsize=None)
def group_owners(num_occupied: int) -> tuple:
    """owner[g] = the vertex that computes group g when vertices 0..num_occupied-1 are occupied
    (1 <= num_occupied <= 12). Length-12 tuple."""
    if not 1 <= num_occupied <= NUM_VERTICES:
        raise ValueError(f"occupied vertices must be 1..{NUM_VERTICES}, got {num_occupied!r}")
    occupied = range(num_occupied)
    owner = list(range(NUM_VERTICES))
    held = [1 if v < num_occupied else 0 for v in range(NUM_VERTICES)]
    def closest(vertex):
        return min(_angle_rank(vertex, v) for v in occupied)

    # Nearest first, then by index: the documented processing order.
    for empty in sorted(range(num_occupied, NUM_VERTICES), key=lambda e: (closest(e), e)):
        # Neighbours when any is occupied (rank 1), else the nearest occupied ring.
        near = [v for v in occupied if _angle_rank(empty, v) == closest(empty)]
        chosen = min(near, key=lambda v: (held[v], v))
        owner[empty] = chosen
        held[chosen] += 1
    return tuple(owner)


def _check_workers(num_workers: int) -> None:
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"need at least one worker, got {num_workers!r}")


def _split(windows: list, k: int) -> list:
    """Divide `windows` (one sphere's windows in step order) among the sphere's k workers."""
    groups = [windows[h::NUM_VERTICES] for h in range(NUM_VERTICES)]  # local index t % 12 == h
    if k <= NUM_VERTICES:
        out = [[] for _ in range(k)]
        for h, v in enumerate(group_owners(k)):
            out[v].extend(groups[h])
        return [sorted(w) for w in out]
    out = [None] * k
    for v in range(NUM_VERTICES):
        members = range(v, k, NUM_VERTICES)  # worker m sits at vertex m % 12 as sub-worker m // 12
        for m, share in zip(members, _split(groups[v], len(members))):
            out[m] = share
    return out


def assign_windows(num_workers: int, batch_size: int) -> list:
    """For worker w (0-based; MPI rank w + 1): the sorted window indices j in [0, batch_size) of
    a step that it computes. Every window goes to exactly one worker."""
    _check_workers(num_workers)
    if not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative integer, got {batch_size!r}")
    return _split(list(range(batch_size)), num_workers)


def assign_groups(num_workers: int) -> list:
    """For worker w: the top-level symmetry groups (window j in group j % 12) whose windows it
    computes. Beyond 12 workers, the workers at vertex v share group v (divided as documented)."""
    _check_workers(num_workers)
    if num_workers > NUM_VERTICES:
        return [[w % NUM_VERTICES] for w in range(num_workers)]
    owners = group_owners(num_workers)
    return [[g for g in range(NUM_VERTICES) if owners[g] == w] for w in range(num_workers)]


def vertex_path(worker: int, num_workers: int) -> tuple:
    """Where worker sits: (top vertex, sub-vertex, ...); one entry when num_workers <= 12."""
    _check_workers(num_workers)
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker must be in [0, {num_workers}), got {worker!r}")
    path, m, k = [], worker, num_workers
    while k > NUM_VERTICES:
        v = m % NUM_VERTICES
        path.append(v)
        k, m = len(range(v, k, NUM_VERTICES)), m // NUM_VERTICES
    path.append(m)
    return tuple(path)


def _edges(members: list, adj: list) -> None:
    k = len(members)
    heads = members[:NUM_VERTICES]  # worker at vertex v (the first of its sub-sphere when k > 12)
    for a in range(len(heads)):
        for b in neighbours(a):
            if b < len(heads):
                adj[heads[a]].add(heads[b])
    if k > NUM_VERTICES:
        for v in range(NUM_VERTICES):
            _edges(members[v::NUM_VERTICES], adj)


def graph_edges(num_workers: int) -> list:
    """adjacency[w] = sorted neighbour workers of worker w (symmetric, no self loops): pass it as
    sources and destinations to MPI.Comm.Create_dist_graph_adjacent on the workers' communicator
    (rank w there = worker w), or flatten it for Create_graph (index = running sums of lengths)."""
    _check_workers(num_workers)
    adj = [set() for _ in range(num_workers)]
    _edges(list(range(num_workers)), adj)
    return [sorted(a) for a in adj]


def _fmt_ids(ids: list, limit: int = 16) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"


def placement_table(num_workers: int, batch_size: int = 32) -> str:
    """Who sits where, which groups each worker takes, and its windows at this batch size."""
    windows = assign_windows(num_workers, batch_size)
    groups = assign_groups(num_workers)
    edges = graph_edges(num_workers)
    header = ["worker", "rank", "vertex", "position (x, y, z)", "groups", "windows",
              "window ids", "graph neighbours"]
    rows = []
    for w in range(num_workers):
        path = vertex_path(w, num_workers)
        x, y, z = VERTICES[path[0]]
        shared = sum(1 for u in range(num_workers) if vertex_path(u, num_workers)[0] == path[0])
        rows.append([str(w), str(w + 1), ".".join(map(str, path)),
                     f"({x:6.3f}, {y:6.3f}, {z:6.3f})",
                     " ".join(map(str, groups[w])) + (f" (1 of {shared})" if shared > 1 else ""),
                     str(len(windows[w])), _fmt_ids(windows[w]),
                     " ".join(map(str, edges[w])) or "-"])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    right = {0, 1, 5}  # numeric columns
    lines = [f"{num_workers} worker(s) (MPI ranks 1..{num_workers}; rank 0 is Node Zero), "
             f"batch {batch_size} windows, window j in group j mod 12"]
    for r in [header] + rows:
        cells = [c.rjust(wd) if i in right else c.ljust(wd)
                 for i, (c, wd) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def markdown_tables(max_workers: int = 12, batch_size: int = 32) -> str:
    """The generated part of docs/TOPOLOGY.md: one table per worker count 1..max_workers."""
    parts = []
    for n in range(1, max_workers + 1):
        parts.append(f"### {n} worker(s): `mpirun -n {n + 1}`\n\n```\n"
                     f"{placement_table(n, batch_size)}\n```\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpitrain.topology",
                                description="Print the kissing-spheres placement.")
    p.add_argument("--workers", type=int, default=None,
                   help="one table for this many workers (default: the docs' tables for 1..12)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per step")
    args = p.parse_args(argv)
    if args.workers is None:
        print(markdown_tables(12, args.batch_size), end="")
    else:
        print(placement_table(args.workers, args.batch_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
