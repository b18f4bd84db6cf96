"""The trainer's roles: Node Zero (node_zero.py) and the workers (worker.py), the transport
between them (comm.py, messages.py; how it waits: waiting.py; the workers' reduce-scatter and
all-gather: collectives.py), the run's plan (plan.py), the MPI wiring (runner.py), and thread
mode (thread_runner.py, threads.py)."""
