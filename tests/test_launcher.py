"""launcher.detect: the job's size, this rank and the ranks on this node, from the variables
each launcher sets (given as env dicts; nothing is launched)."""
import pytest

from mpitrain import launcher
from mpitrain.launcher import Launch


@pytest.mark.parametrize("env, want", [
    ({}, Launch(size=1, rank=0, local_size=1)),
    # MPICH's Hydra, as this machine's mpirun -n 3 sets them
    ({"PMI_SIZE": "3", "PMI_RANK": "2", "MPI_LOCALNRANKS": "3", "MPI_LOCALRANKID": "2"},
     Launch(size=3, rank=2, local_size=3)),
    # Open MPI, 8 ranks on 2 nodes
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, Launch(size=8, rank=5, local_size=4)),
    ({"PMIX_SIZE": "4", "PMIX_RANK": "1"}, Launch(size=4, rank=1, local_size=4)),
    # no per-node count: every rank is taken to be on this node
    ({"PMI_SIZE": "6", "PMI_RANK": "0"}, Launch(size=6, rank=0, local_size=6)),
    # an unreadable value is as if unset
    ({"PMI_SIZE": "8", "MPI_LOCALNRANKS": "junk"}, Launch(size=8, rank=0, local_size=8)),
    ({"PMI_SIZE": "", "OMPI_COMM_WORLD_SIZE": "5"}, Launch(size=5, rank=0, local_size=5)),
])
def test_detect(env, want):
    assert launcher.detect(env) == want


@pytest.mark.parametrize("local", ["1", "2", "12"])
def test_a_per_node_count_is_never_the_world_size(local):
    """MPI_LOCALNRANKS counts the ranks of one node: alone it says nothing of the world (a
    launcher that sets it also sets PMI_SIZE), and this process is not taken to be launched."""
    launch = launcher.detect({"MPI_LOCALNRANKS": local, "OMPI_COMM_WORLD_LOCAL_SIZE": local})
    assert launch == Launch(size=1, rank=0, local_size=1)
    # on one node of several, the world is the launcher's size, not the node's count
    launch = launcher.detect({"PMI_SIZE": "24", "MPI_LOCALNRANKS": local})
    assert (launch.size, launch.local_size) == (24, int(local))


def test_defaults_to_this_process_environment(monkeypatch):
    for name in launcher.ALL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_SIZE", "7")
    monkeypatch.setenv("PMI_RANK", "3")
    assert launcher.detect() == Launch(size=7, rank=3, local_size=7)
