"""The trainer: Node Zero and the workers, the transport between them, and the two modes.

  plan.py           the run's plan, made by Node Zero's process and sent to every worker
  rundir.py         the run directory's lock, leftover temporaries, start-up space, vocab.txt
  memory.py         the memory a run will take, estimated and checked before allocating
  node_zero.py      Node Zero: schedule, evaluation, checkpoints, logs, the stop (both modes)
  runlog.py         train.log, metrics.jsonl, heartbeat.json and the terminal output
  saver.py          Node Zero's background checkpoint writer (space check, failures, pruning)
  sampling.py       the text sample at each evaluation
  peak.py           the SGEMM peak and FLOPs per token of the final statistics
  worker.py         the workers' command loop and evaluation (both modes)
  mpi_worker.py     MPI mode's worker: its share of the windows, sharded AdamW
  thread_worker.py  thread mode's worker: one replica whose kernel threads are the workers
  messages.py       the commands and reports, as fixed-size arrays
  comm.py           the WorkerLink interface and its MPI transport (WorkerLink, MPIWorkerComm)
  threads.py        thread mode's transport between Node Zero's and the worker's threads
  collectives.py    the workers' reduce-scatter and all-gather, point to point
  waiting.py        how every wait sleeps instead of spinning
  signals.py        SIGINT/SIGTERM: the first saves and stops, a second ends the run
  process.py        peak RSS and the test hooks (MPITRAIN_FAULT, MPITRAIN_NONFINITE,
                    MPITRAIN_TRACE_WINDOWS)
  mpi_runner.py     MPI mode: wiring the ranks, the plan's agreement, the abort path
  thread_runner.py  thread mode: Node Zero and the worker thread in one process
"""
