"""The trainer's roles: Node Zero (node_zero.py) and the workers (worker.py), the transport
between them (comm.py, messages.py), the run's plan (plan.py), and the MPI wiring (runner.py)."""
