"""Lazy re-exports (PEP 562): the public modules name what lives elsewhere, imported on first
use, so that importing them imports no framework and little of faultlab."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(module_name: str, exports: Mapping[str, str | tuple[str, str | None]]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for module `module_name`. `exports` maps a public name
    to the module defining it (the same attribute name there) or to ``(module, attribute)``,
    where attribute None means the module itself. A name is imported once, then cached in
    the module's namespace."""

    def __getattr__(name: str):
        try:
            target = exports[name]
        except KeyError:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}") from None
        module, attr = (target, name) if isinstance(target, str) else target
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        setattr(sys.modules[module_name], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[module_name])) | set(exports))

    return __getattr__, __dir__
