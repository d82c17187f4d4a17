"""Shared start-up of the data_tools launchers (``python data_tools/<tool>.py ...``).

Running a script puts data_tools/ first on sys.path, where data_tools/inspect.py would shadow
the stdlib ``inspect`` module (imported by dataclasses, torch, ...). ``run_main`` drops that
entry before anything else is imported, makes the repository importable when the package is
not installed, and runs the named module's ``main``.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def run_main(module: str) -> int:
    """Import ``module`` (e.g. ``hybrid_megatron.data.preprocess``) and return its ``main()``."""
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    import importlib
    import importlib.util

    if importlib.util.find_spec("hybrid_megatron") is None:
        sys.path.insert(0, os.path.dirname(_HERE))
    return importlib.import_module(module).main()
