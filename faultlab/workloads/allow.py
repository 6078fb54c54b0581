"""Which user code faultlab may import: the opt-in allow-list of user workloads and crash-loop
factories (framework-free; docs/workloads.md, "Allowing your code").

A campaign file or a command-line option that names ``module:function`` would make faultlab
import that module (running its import-time code) and call the function; a file must never
decide that on its own. A name coming from a file or the command line is therefore loaded
only when the person running faultlab allowed it, in one of three ways:

1. ``--allow-workload ENTRY`` on the command line (repeatable), or ``allow_workloads=[...]``
   where a campaign file is loaded through the Python API (``load_campaign``);
2. an installed package's entry point in the group ``faultlab.workloads``:
   ``name = "pkg.mod:factory"`` makes ``name`` a workload a campaign can name, and allows
   ``pkg.mod:factory`` itself;
3. ``[tool.faultlab] allow-workloads = [...]`` in the project's ``pyproject.toml``: the first
   ``pyproject.toml`` found from the current directory upwards, not above the repository root
   (the first directory holding ``.git``).

An ENTRY is ``pkg`` (the module ``pkg`` and every module under it, ``pkg.sub``, with any of
their functions), ``pkg.mod:function`` (that function only), or a path to a ``.py`` file
(crash-loop factories written ``file.py:function``). Allowing ``pkg.sub`` does not allow
``pkg`` or ``pkg.other``; importing ``pkg.sub`` does run ``pkg/__init__.py``, as any import
does.

Everything is decided from names and files: nothing is imported to check a name. Code that
builds a ``WorkloadConfig`` or passes a callable in Python has opted in by writing that code
and is not checked; so is a worker process (spawned or forked by faultlab), which only ever
receives names its parent process checked.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from faultlab.errors import FaultlabError, SpecError

#: the entry-point group of installed workloads
GROUP = "faultlab.workloads"

_MODULE = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_MODULE_RE = re.compile(_MODULE, re.ASCII)
_TARGET_RE = re.compile(rf"({_MODULE}):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", re.ASCII)
#: what an installed workload may be called in a campaign file (no ':': that is module:function)
_EP_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", re.ASCII)

HOW = ("pass --allow-workload {entry}, or list it under [tool.faultlab] allow-workloads in "
       "pyproject.toml")


# --- entries -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One allowed thing: a module tree, one module's function, or one Python file."""

    module: str | None = None      # "pkg": pkg and pkg.*; with attr: exactly that module
    attr: str | None = None        # "function": only module:function
    file: str | None = None        # a resolved path: file.py:function loop factories

    def allows(self, module: str, attr: str, file: str | None) -> bool:
        if self.file is not None:
            return file is not None and file == self.file
        if file is not None:
            return False
        if self.attr is not None:
            return module == self.module and attr == self.attr
        return module == self.module or module.startswith(self.module + ".")

    def __str__(self) -> str:
        if self.file is not None:
            return self.file
        return self.module + (f":{self.attr}" if self.attr else "")


def parse_entry(text: str, base: str | os.PathLike | None = None) -> Entry:
    """An allow-list entry from its text: ``pkg``, ``pkg.mod:function`` or ``path/file.py``
    (relative to `base`, default the current directory). A SpecError names a bad one."""
    t = str(text).strip()
    if t.endswith(".py"):
        return Entry(file=_real(os.path.join(base or os.getcwd(), t)))
    if _MODULE_RE.fullmatch(t):
        return Entry(module=t)
    m = _TARGET_RE.fullmatch(t)
    if m and "." not in m.group(2):
        return Entry(module=m.group(1), attr=m.group(2))
    raise SpecError(f"cannot allow {t[:80]!r}: expected a module (pkg or pkg.mod), "
                    f"pkg.mod:function, or a path to a .py file")


def split_name(name: str) -> tuple[str, str, str | None]:
    """(module, attribute, resolved file or None) of ``module:function`` /
    ``path/file.py:function``."""
    module, _, attr = name.rpartition(":")
    if module.endswith(".py"):
        return module, attr, _real(module)
    return module, attr, None


def _printable(text: str, limit: int = 200) -> str:
    """`text` for a one-line message: control characters escaped, clipped."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


def _real(path: str) -> str:
    """The absolute path with symbolic links resolved (as text, when it cannot be)."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return os.path.abspath(path)


# --- entry points -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def installed_workloads() -> dict[str, str]:
    """Installed workloads: entry-point name -> ``module:function``, from the entry points of
    group ``faultlab.workloads`` (read from the installed packages' metadata, nothing imported;
    cached: :func:`refresh` rereads them). Names that a campaign cell cannot hold, that shadow a
    built-in, or whose value is not ``module:function`` are left out."""
    from importlib.metadata import entry_points

    from faultlab.workloads.base import BUILTINS
    out: dict[str, str] = {}
    try:
        eps = entry_points(group=GROUP)
    except Exception:  # noqa: BLE001 - broken metadata of some package: no installed workloads
        return out
    for ep in eps:
        name, value = ep.name.strip(), ep.value.strip()
        m = _TARGET_RE.fullmatch(value)
        if (_EP_NAME_RE.fullmatch(name) and name.lower() not in BUILTINS and m
                and "." not in m.group(2)):
            out.setdefault(name, value)
    return out


def refresh() -> None:
    """Forget what was read (installed entry points): after installing a package in-process."""
    installed_workloads.cache_clear()


# --- the project's configuration ---------------------------------------------------------------

def find_pyproject(start: str | os.PathLike | None = None) -> Path | None:
    """The project's pyproject.toml: the first one from `start` (default the current directory)
    upwards, not above the first directory that holds ``.git`` (the repository root)."""
    d = Path(start or os.getcwd()).resolve()
    for p in (d, *d.parents):
        f = p / "pyproject.toml"
        if f.is_file():
            return f
        if (p / ".git").exists():
            return None
    return None


def config_entries(path: Path) -> tuple[Entry, ...]:
    """The entries of ``[tool.faultlab] allow-workloads`` in a pyproject.toml (relative paths
    are relative to its directory); a FaultlabError names the file and what is wrong."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise FaultlabError(f"{path}: reading [tool.faultlab] needs Python 3.11 or the "
                                f"tomli package (pip install tomli)") from None
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FaultlabError(f"{path}: cannot read it: {e.strerror or e}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FaultlabError(f"{path}: not valid TOML: {' '.join(str(e).split())}") from None
    tool = doc.get("tool", {})
    section = tool.get("faultlab", {}) if isinstance(tool, dict) else {}
    if not isinstance(section, dict):
        raise FaultlabError(f"{path}: [tool.faultlab] must be a table")
    items = section.get("allow-workloads", [])
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise FaultlabError(f"{path}: [tool.faultlab] allow-workloads must be a list of "
                            f"strings (modules, pkg.mod:function or .py paths)")
    out = []
    for x in items:
        try:
            out.append(parse_entry(x, path.parent))
        except SpecError as e:
            raise FaultlabError(f"{path}: [tool.faultlab] allow-workloads: {e}") from None
    return tuple(out)


# --- the policy ---------------------------------------------------------------------------------

@dataclass
class AllowList:
    """What may be imported: `entries` given in code or on the command line, the installed
    entry points and the project's pyproject.toml (read once, when a name is first checked)."""

    entries: tuple[Entry, ...] = ()
    use_config: bool = True
    _config: tuple[Entry, ...] | None = field(default=None, repr=False)

    def _config_entries(self) -> tuple[Entry, ...]:
        if not self.use_config:
            return ()
        if self._config is None:
            path = find_pyproject()
            self._config = config_entries(path) if path is not None else ()
        return self._config

    def allows(self, name: str, *, builtins: Iterable[str] = ()) -> bool:
        """Whether user code `name` (``module:function``, ``file.py:function`` or an installed
        workload's name) may be imported. `builtins`: faultlab's own names, always allowed."""
        if name in builtins or name in installed_workloads():
            return True
        module, attr, file = split_name(name)
        if file is None and f"{module}:{attr}" in installed_workloads().values():
            return True
        return any(e.allows(module, attr, file)
                   for e in (*self.entries, *self._config_entries()))

    def check(self, name: str, what: str = "workload", *, builtins: Iterable[str] = ()) -> None:
        """A SpecError naming `name` and how to allow it, unless it is allowed."""
        if self.allows(name, builtins=builtins):
            return
        module, _, file = split_name(name)
        if file is not None:
            entry = _printable(file)
        else:
            entry = module if _MODULE_RE.fullmatch(module) else "MODULE"
        raise SpecError(f"{what} {_printable(repr(name))} is not allowed: "
                        + HOW.format(entry=entry))


_CURRENT: contextvars.ContextVar[AllowList | None] = contextvars.ContextVar(
    "faultlab_allow", default=None)


def current() -> AllowList:
    """The allow-list in force: the innermost :func:`allowing`, else one with no entries of
    its own (installed entry points and pyproject.toml only)."""
    return _CURRENT.get() or AllowList()


@contextlib.contextmanager
def allowing(entries: Iterable[str | Entry] = (), *, use_config: bool = True
             ) -> Iterator[AllowList]:
    """Within the block, also allow `entries` (strings as for ``--allow-workload``), on top of
    any enclosing block's; the pyproject.toml is read at most once in it."""
    outer = _CURRENT.get()
    parsed = tuple(e if isinstance(e, Entry) else parse_entry(e) for e in entries)
    allow = AllowList((*(outer.entries if outer else ()), *parsed),
                      use_config and (outer.use_config if outer else True))
    token = _CURRENT.set(allow)
    try:
        yield allow
    finally:
        _CURRENT.reset(token)


def check_allowed(name: str, what: str = "workload", *, builtins: Iterable[str] = ()) -> None:
    """:meth:`AllowList.check` with the allow-list in force."""
    current().check(name, what, builtins=builtins)
