"""Figure and JSON output shared by the analysis tools; matplotlib is the optional ``viz`` extra."""
from __future__ import annotations

import json
import os

from ..engine.checkpoint import atomic_write

VIZ_INSTALL = 'pip install -e ".[viz]"'
DPI = 100  # figure sizes are given in inches: a 6 x 4 figure is 600 x 400 pixels


class MissingExtraError(ImportError):
    """matplotlib is not installed; the message says which extra brings it."""


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or ``MissingExtraError``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtraError(f"plotting needs matplotlib, the 'viz' extra: {VIZ_INSTALL}") from None
    return plt


def save_figure(figure, path: str) -> None:
    """Write ``figure`` as PNG at ``DPI`` (atomically) and close it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=DPI))
    pyplot().close(figure)


def save_json(data, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))
