"""mpitrain: a distributed-memory trainer for small GPT-style language models.

Public API (imported lazily so `import mpitrain` stays cheap):
  Tokenizer             mpitrain.tokenizer
  ModelConfig           mpitrain.config
  Model                 mpitrain.model      (Model.from_checkpoint(path, threads=...))
  Decoder               mpitrain.generate   (Decoder.from_file(path, threads=..., slots=...))
  Sampler               mpitrain.sampler
"""

__version__ = "0.1.0"

_LAZY = {
    "Tokenizer": "mpitrain.tokenizer",
    "ModelConfig": "mpitrain.config",
    "Model": "mpitrain.model",
    "Decoder": "mpitrain.generate",
    "Sampler": "mpitrain.sampler",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpitrain' has no attribute {name!r}")
