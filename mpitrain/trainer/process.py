"""What a trainer process measures about itself, and the test hooks its environment may set;
used by Node Zero and the workers alike.

  MPITRAIN_FAULT=RANK:STEP        that rank raises at that step (tests/test_abort.py)
  MPITRAIN_STALL=RANK:STEP        that worker hangs (sleeps for good) when it receives that
                                  step's first command (thread mode's stall test; rank 1 is
                                  the worker thread)
  MPITRAIN_NONFINITE=STEPS        the workers' loss of those steps (comma-separated, or A-B)
                                  is NaN, as if the model had diverged (tests/test_safety.py)
  MPITRAIN_TRACE_WINDOWS=DIR      each worker appends the windows it trains every step to
                                  DIR/worker_W.jsonl (tests of the placement)
"""
import os


def peak_rss_kib() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def injected_fault(rank: int, step: int) -> bool:
    """Test hook: MPITRAIN_FAULT=RANK:STEP makes that rank raise at that step."""
    spec = os.environ.get("MPITRAIN_FAULT", "")
    return spec == f"{rank}:{step}"


def injected_nonfinite(step: int) -> bool:
    """Test hook: MPITRAIN_NONFINITE=STEPS makes those steps' loss NaN."""
    for part in filter(None, os.environ.get("MPITRAIN_NONFINITE", "").split(",")):
        a, _, b = part.partition("-")
        if int(a) <= step <= int(b or a):
            return True
    return False


def trace_files(workers) -> dict:
    """Test hook: {worker index: its open, line-buffered trace file} under
    MPITRAIN_TRACE_WINDOWS, or {} when that is not set."""
    trace_dir = os.environ.get("MPITRAIN_TRACE_WINDOWS")
    if not trace_dir:
        return {}
    return {w: open(os.path.join(trace_dir, f"worker_{w}.jsonl"), "a", buffering=1)
            for w in workers}


def injected_stall(rank: int, step: int) -> None:
    """Test hook: MPITRAIN_STALL=RANK:STEP makes that worker sleep for good at that step."""
    if os.environ.get("MPITRAIN_STALL", "") == f"{rank}:{step}":
        import time

        while True:
            time.sleep(3600)
