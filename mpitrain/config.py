"""Model and training configuration, and the preset table: the one source of truth for both.

Precedence when training (documented in README): preset < checkpoint (on resume, the model
architecture comes from the checkpoint) < command-line options and --set key=value. The
vocabulary size and the sequence length always come from the dataset.

Every field is typed data: its annotation is its type (int, float, bool, or str with a fixed
set of choices), and setting() gives its default and the values it accepts. Construction
checks each field by name, so a ModelConfig or TrainConfig that exists is valid. A stored
configuration (checkpoint, export) that lacks a field reads as the field's default, so a new
field is one line whose default reproduces what files written before it meant; a field this
version does not know is refused by name (docs/FORMATS.md, "Checkpoint").
"""
import math
from dataclasses import asdict, dataclass, field, fields, replace

TYPES = (int, float, bool, str)
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")   # --set spellings of a bool


def setting(default, *, min=None, above=None, below=None, choices=None, text=False,
            optional=False):
    """A configuration field: its default and the values it accepts besides its type.
    min: inclusive lower bound; above, below: exclusive bounds; choices: the values of a str
    field (required for str fields unless text=True: a str field that holds any text).
    optional: a field added after files were first written, stored (to_dict) only when it
    differs from its default, so a file that does not use it is byte for byte what it was."""
    return field(default=default, metadata={"min": min, "above": above, "below": below,
                                            "choices": choices, "text": text,
                                            "optional": optional})


def check(f, value):
    """`value` as field `f` holds it (an int given for a float becomes a float); ValueError
    naming the field when the type or the value is not accepted."""
    kind, rule, name = _kind(f), f.metadata, f.name
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    elif kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    elif not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    elif not rule.get("text") and value not in rule.get("choices"):
        raise ValueError(f"{name} must be one of {', '.join(rule['choices'])}, got {value!r}")
    if rule.get("min") is not None and not value >= rule["min"]:
        what = "not be negative" if rule["min"] == 0 else f"be at least {rule['min']}"
        raise ValueError(f"{name} must {what}, got {value!r}")
    if rule.get("above") is not None and not value > rule["above"]:
        what = "be positive" if rule["above"] == 0 else f"be greater than {rule['above']}"
        raise ValueError(f"{name} must {what}, got {value!r}")
    if rule.get("below") is not None and not value < rule["below"]:
        raise ValueError(f"{name} must be less than {rule['below']}, got {value!r}")
    return value


def parse(f, text: str):
    """Command-line text as field `f`'s value, checked; ValueError saying what was expected.
    Surrounding spaces are dropped, except from a text field's value (they are text)."""
    kind = _kind(f)
    text = text if f.metadata.get("text") else text.strip()
    if kind is bool:
        if text.lower() not in TRUE + FALSE:
            spellings = "/".join(yes + "/" + no for yes, no in zip(TRUE, FALSE))
            raise ValueError(f"expected a bool ({spellings})")
        value = text.lower() in TRUE
    elif kind is str:
        value = text
    else:
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"expected {kind.__name__}") from None
    return check(f, value)


def _kind(f):
    """The field's type as a class (annotations may be strings). TypeError for a field this
    module cannot check: a type other than TYPES, or a str without choices."""
    kind = {t.__name__: t for t in TYPES}.get(f.type, f.type)
    if kind not in TYPES:
        raise TypeError(f"configuration field {f.name} has type {f.type!r}, not one of "
                        f"int, float, bool, str")
    if kind is str and not f.metadata.get("choices") and not f.metadata.get("text"):
        raise TypeError(f"configuration field {f.name} is a str without choices")
    return kind


class _Config:
    """What ModelConfig and TrainConfig share: field checks, presets, the stored form."""
    PRESET_PART = None   # the key of this class's fields in a PRESETS entry

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, check(f, getattr(self, f.name)))

    @classmethod
    def preset(cls, name: str, **overrides):
        return replace(cls(**PRESETS[_known(name)][cls.PRESET_PART]), **overrides)

    def to_dict(self) -> dict:
        """The stored form: every field, except optional ones at their default."""
        d = asdict(self)
        for f in fields(self):
            if f.metadata.get("optional") and d[f.name] == f.default:
                del d[f.name]
        return d

    @classmethod
    def from_dict(cls, d: dict):
        """A stored configuration: missing fields take their defaults, unknown ones are
        refused by name (a file from a newer mpitrain must not be half understood)."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__} is stored as {type(d).__name__}, not an object")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}: written by a newer mpitrain?")
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig(_Config):
    PRESET_PART = "model"

    vocab_size: int = setting(30000, min=1)  # total ids: specials + 256 bytes + pre-tokens
    max_seq_len: int = setting(256, min=1)   # rows of the learned position table
    d_model: int = setting(384, min=1)       # residual stream width
    n_layers: int = setting(6, min=1)        # transformer blocks
    n_heads: int = setting(12, min=1)        # attention heads (head_dim = d_model // n_heads)
    d_ff: int = setting(1536, min=1)         # hidden width of the MLP
    # Options (docs/DESIGN.md, "The model"); the defaults are the GPT-2 model.
    position: str = setting("learned", choices=("learned", "rotary"),
                            optional=True)  # rotary: q, k turned, no wpe table
    init: str = setting("normal", choices=("normal", "lattice"),
                        optional=True)      # lattice: token/position tables by formula
    attention_pattern: str = setting("dense", choices=("dense", "ulam"), optional=True)
    attention_window: int = setting(16, min=0,
                                    optional=True)  # ulam: distances 0..w and primes

    def __post_init__(self):
        super().__post_init__()
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.position == "rotary" and self.head_dim % 2:
            raise ValueError(f"position rotary needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def inert_fields(self) -> set:
        """Fields whose value changes nothing in this configuration (the window of a dense
        pattern): an export need not represent them."""
        return {"attention_window"} if self.attention_pattern == "dense" else set()


@dataclass(frozen=True)
class TrainConfig(_Config):
    PRESET_PART = "train"

    seq_len: int = setting(128, min=1)          # tokens per window (a window holds seq_len + 1)
    batch_size: int = setting(32, min=1)        # windows per optimizer step, any worker count
    lr: float = setting(1e-4, above=0)          # peak learning rate (after warmup)
    weight_decay: float = setting(0.01, min=0)  # AdamW decoupled decay of 2+-dimensional params
    beta1: float = setting(0.9, min=0, below=1)    # AdamW first-moment decay
    beta2: float = setting(0.999, min=0, below=1)  # AdamW second-moment decay
    eps: float = setting(1e-8, above=0)         # AdamW denominator epsilon
    clip: float = setting(1.0, min=0)           # global gradient-norm clip (0 disables)
    warmup: int = setting(1000, min=0)          # steps of linear warmup from 0
    epochs: int = setting(30, min=1)            # passes over the training windows
    max_steps: int = setting(0, min=0)          # stop after this many steps (0: run all epochs)
    save_every: int = setting(1000, min=1)      # checkpoint period in steps
    eval_every: int = setting(100, min=1)       # evaluation (and sample) period in steps
    eval_windows: int = setting(64, min=1)      # fixed validation windows per evaluation
    seed: int = setting(0, min=0)               # initialisation and data-order seed
    keep_last: int = setting(0, min=0)          # checkpoints kept besides step 0 (0: keep all)
    max_bad_steps: int = setting(10, min=1, optional=True)   # steps in a row with a non-finite
                                                # loss or gradient norm (each skipped) before a stop
    # the text sample written at each evaluation (mpitrain/trainer/sampling.py)
    sample_tokens: int = setting(32, min=0, optional=True)   # tokens generated (0: no sample)
    sample_temperature: float = setting(0.8, min=0, optional=True)   # 0: greedy
    sample_prompt: str = setting("", text=True, optional=True)   # "": the validation split's start
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


for _cls in (ModelConfig, TrainConfig):   # every field checkable and its default accepted
    _cls()
