"""What the MPI launcher told this process through its environment: the job's size, this
process's rank, and how many ranks run on this node. The one place that reads the launchers'
variables; nothing here imports MPI.

  world size      PMI_SIZE (MPICH's Hydra, and PMI launchers such as srun), OMPI_COMM_WORLD_SIZE
                  (Open MPI), PMIX_SIZE
  rank            PMI_RANK, OMPI_COMM_WORLD_RANK, PMIX_RANK
  ranks per node  MPI_LOCALNRANKS (Hydra), OMPI_COMM_WORLD_LOCAL_SIZE (Open MPI)

A per-node count is never taken for the world size: on several nodes it is smaller, and alone
(no world size set) it does not make this process launched. Without a launcher the world is one
process of rank 0, alone on its node; a launcher that gives no per-node count is taken to have
started every rank on this node. The first variable of each list that is set and reads
as an integer wins.
"""
import os
from dataclasses import dataclass

SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
ALL_VARS = SIZE_VARS + RANK_VARS + LOCAL_SIZE_VARS   # for a child that must not look launched


@dataclass(frozen=True)
class Launch:
    size: int         # ranks in the job; 1 when not launched by mpirun
    rank: int         # this process's rank; 0 when not launched
    local_size: int   # ranks on this node; the world size when the launcher does not say


def _first_int(environ, names):
    for name in names:
        try:
            return int(environ[name])
        except (KeyError, ValueError):
            continue
    return None


def detect(environ=None) -> Launch:
    """The launch described by `environ` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    size = _first_int(environ, SIZE_VARS) or 1
    rank = _first_int(environ, RANK_VARS) or 0
    local = min(_first_int(environ, LOCAL_SIZE_VARS) or size, size)
    return Launch(size=size, rank=rank, local_size=local)
