"""``probe.extract(...)`` and ``probe.predict(...)`` as a notebook user types them.

``probe.extract`` is both a submodule and the function that module defines. Once the submodule is imported, Python
binds the package attribute ``probe.extract`` to the module, whatever the package had set; so the module itself
is made callable, calling its function. ``probe.extract.ExtractConfig`` keeps working as a module attribute.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable


def make_module_callable(module_name: str, fn: Callable) -> None:
    """Calling the module ``module_name`` calls ``fn``."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule
