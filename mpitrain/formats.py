"""The names of mpitrain's file formats and of the files it writes: the one place each is
spelled. docs/FORMATS.md describes the formats, docs/TRAINING.md the run directory.
"""
import os
import re

# The root `format` attribute of each HDF5 file kind (and of the /vocab group inside them).
DATASET = "mpitrain-dataset"        # `mpitrain prepare`: hdf5_data/NAME.h5
CHECKPOINT = "mpitrain-checkpoint"  # RUN_DIR/checkpoint_step_N.h5, for resuming
WEIGHTS = "mpitrain-weights"        # `mpitrain export`: no optimizer state
VOCAB = "mpitrain-vocab"            # the /vocab group of each of them
VOCAB_TXT_MAGIC = "#mpitrain-vocab"  # the first word of a vocab.txt

# A run directory.
METRICS = "metrics.jsonl"
TRAIN_LOG = "train.log"
HEARTBEAT = "heartbeat.json"
RUN_VOCAB_TXT = "vocab.txt"
CHECKPOINT_GLOB = "checkpoint_step_*.h5"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_step_(\d+)\.h5$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step_{step}.h5"


def checkpoint_step(name: str):
    """N of a file name checkpoint_step_N.h5 (an int), None for any other name."""
    match = _CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def vocab_txt_path(dataset_path: str) -> str:
    """The vocab.txt `mpitrain prepare` writes beside a dataset: NAME.h5 -> NAME.vocab.txt
    (any other name gets .vocab.txt appended)."""
    root, ext = os.path.splitext(dataset_path)
    return (root if ext == ".h5" else dataset_path) + ".vocab.txt"
