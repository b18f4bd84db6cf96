"""`mpitrain serve`: an OpenAI-compatible completions service over the batched decoder.

    protocol.py   request validation and response shapes (OpenAI completions conventions)
    scheduler.py  the decode thread: continuous batching of sequences over Decoder slots
    metrics.py    counters, gauges and histograms in the Prometheus text format
    app.py        the HTTP routes (aiohttp), auth, errors, streaming

docs/SERVING.md describes the endpoints, limits and the batching design. The HTTP library is
an optional extra (`pip install 'mpitrain[serve]'`); `missing()` names what is absent.
"""

INSTALL_HINT = "pip install 'mpitrain[serve]'"


def missing():
    """None when the serve extra is importable, else a one-line message saying how to get it."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return f"serve needs the 'serve' extra (aiohttp): {INSTALL_HINT}"
    return None
