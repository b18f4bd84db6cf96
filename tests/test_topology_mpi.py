"""graph_edges builds a valid MPI graph topology on a workers' communicator (12 ranks)."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from mpitrain import topology as t

MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep
                      + os.environ.get("PATH", ""))

CODE = textwrap.dedent("""
    from mpi4py import MPI
    from mpitrain.topology import graph_edges
    world = MPI.COMM_WORLD
    workers = world.Split(0 if world.rank > 0 else MPI.UNDEFINED, world.rank)
    if workers != MPI.COMM_NULL:
        adj = graph_edges(workers.size)[workers.rank]
        graph = workers.Create_dist_graph_adjacent(adj, adj, reorder=False)
        ins, outs, _ = graph.Get_dist_neighbors()
        # Each worker sends its rank to its neighbours; it must hear back from exactly them.
        got = graph.neighbor_allgather(workers.rank)
        assert list(ins) == adj and list(outs) == adj and sorted(got) == adj, (ins, outs, got)
        print(workers.rank, " ".join(map(str, got)), flush=True)
""")


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found")
@pytest.mark.parametrize("ranks", [2, 4, 12])
def test_graph_topology_under_mpirun(ranks):
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([MPIRUN, "-n", str(ranks), sys.executable, "-c", CODE],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.split("\n")[:-1], key=lambda s: int(s.split()[0]))
    want = t.graph_edges(ranks - 1)
    assert len(lines) == ranks - 1
    for w, line in enumerate(lines):
        assert sorted(map(int, line.split()[1:])) == want[w]
