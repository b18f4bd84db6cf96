"""Model and training configuration, and the preset table: the one source of truth for both.

Precedence when training (documented in README): preset < checkpoint (on resume, the model
architecture comes from the checkpoint) < command-line options and --set key=value. The
vocabulary size and the sequence length always come from the dataset.
"""
from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 30000      # total ids: special tokens + 256 bytes + pre-tokens
    max_seq_len: int = 256       # rows of the learned position table
    d_model: int = 384           # residual stream width
    n_layers: int = 6            # transformer blocks
    n_heads: int = 12            # attention heads (head_dim = d_model // n_heads)
    d_ff: int = 1536             # hidden width of the MLP

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelConfig.{f.name} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        return replace(cls(**PRESETS[_known(name)]["model"]), **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 128           # tokens per window (each window holds seq_len + 1 tokens)
    batch_size: int = 32         # windows per optimizer step, whatever the number of workers
    lr: float = 1e-4             # peak learning rate (after warmup)
    weight_decay: float = 0.01   # AdamW decoupled decay on parameters with 2+ dimensions
    beta1: float = 0.9           # AdamW first-moment decay
    beta2: float = 0.999         # AdamW second-moment decay
    eps: float = 1e-8            # AdamW denominator epsilon
    clip: float = 1.0            # global gradient-norm clip (0 disables)
    warmup: int = 1000           # steps of linear warmup from 0
    epochs: int = 30             # passes over the training windows
    max_steps: int = 0           # stop after this many steps (0: run all epochs)
    save_every: int = 1000       # checkpoint period in steps
    eval_every: int = 100        # evaluation (and sample) period in steps
    eval_windows: int = 64       # fixed validation windows per evaluation
    seed: int = 0                # initialisation and data-order seed
    keep_last: int = 0           # checkpoints kept besides step 0 (0: keep all)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        return replace(cls(**PRESETS[_known(name)]["train"]), **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# name -> {"model": ModelConfig fields, "train": TrainConfig fields}
PRESETS = {
    # The original design's configuration: 33.8M parameters at vocabulary 30,000.
    "seed": {
        "model": dict(vocab_size=30000, max_seq_len=256, d_model=384, n_layers=6, n_heads=12,
                      d_ff=1536),
        "train": dict(seq_len=128, batch_size=32, lr=1e-4, weight_decay=0.01, clip=1.0,
                      warmup=1000, epochs=30, save_every=1000, eval_every=100),
    },
    # Learns visibly on 2 cores within about 10 minutes on the default corpus.
    "small": {
        "model": dict(vocab_size=8192, max_seq_len=128, d_model=192, n_layers=4, n_heads=6,
                      d_ff=768),
        "train": dict(seq_len=64, batch_size=24, lr=1e-3, weight_decay=0.01, clip=1.0,
                      warmup=50, epochs=1, save_every=200, eval_every=50),
    },
    # For tests: a training step takes milliseconds.
    "tiny": {
        "model": dict(vocab_size=512, max_seq_len=32, d_model=32, n_layers=2, n_heads=4,
                      d_ff=64),
        "train": dict(seq_len=16, batch_size=12, lr=3e-3, weight_decay=0.01, clip=1.0,
                      warmup=2, epochs=1, save_every=10, eval_every=5, eval_windows=8),
    },
}


def _known(name: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return name
