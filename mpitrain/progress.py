"""Progress bars: tqdm on stderr, shown only to a person watching.

A bar is disabled with quiet=True, when stderr is not a terminal (logs, pipes, CI, tests), or
on any MPI rank but 0 (pass enabled=False there), so output captured by programs stays clean.
"""
import sys

from tqdm import tqdm


def shown(quiet: bool = False, enabled: bool = True) -> bool:
    return enabled and not quiet and sys.stderr.isatty()


def bar(total=None, desc: str = "", unit: str = "it", *, quiet: bool = False,
        enabled: bool = True, unit_scale: bool = False, iterable=None, force: bool = False,
        **kw):
    """A tqdm bar (usable as a context manager or an iterable wrapper) on stderr.

    unit="B" with unit_scale=True shows bytes as kB/MB/GB. force: shown (when enabled and not
    quiet) even though stderr is not a terminal: the user asked for it (`train --progress bar`
    under mpirun, whose ranks never see a terminal).
    """
    show = shown(quiet, enabled) or (force and enabled and not quiet)
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                unit_divisor=1024 if unit == "B" else 1000, file=sys.stderr,
                disable=not show, dynamic_ncols=True, leave=False, **kw)
