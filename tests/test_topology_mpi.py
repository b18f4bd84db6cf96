"""graph_edges builds a valid MPI graph topology on a workers' communicator (12 ranks)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from mpitrain import topology as t

pytestmark = pytest.mark.slow  # MPI multi-rank runs

MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep
                      + os.environ.get("PATH", ""))

CODE = textwrap.dedent("""
    import json
    from mpi4py import MPI
    from mpitrain.topology import graph_edges
    world = MPI.COMM_WORLD
    workers = world.Split(0 if world.rank > 0 else MPI.UNDEFINED, world.rank)
    if workers != MPI.COMM_NULL:
        adj = graph_edges(workers.size)[workers.rank]
        graph = workers.Create_dist_graph_adjacent(adj, adj, reorder=False)
        ins, outs, _ = graph.Get_dist_neighbors()
        # Each worker sends its rank to its neighbours and records whom it heard from. No
        # assert here (a raising rank could leave the others waiting): the test checks.
        got = graph.neighbor_allgather(workers.rank)
        seen = workers.gather([list(ins), list(outs), sorted(got)], root=0)
        if workers.rank == 0:  # one printer: ranks' stdout can interleave
            print(json.dumps(seen), flush=True)
""")


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found")
@pytest.mark.parametrize("ranks", [2, 4, 12])
def test_graph_topology_under_mpirun(ranks):
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([MPIRUN, "-n", str(ranks), sys.executable, "-c", CODE],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    want = t.graph_edges(ranks - 1)
    assert json.loads(r.stdout) == [[adj, adj, adj] for adj in want]
