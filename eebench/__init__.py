"""eebench: a fair, fast, plugin-based benchmark for early-exit neural networks."""

from eebench.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
