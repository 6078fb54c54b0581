"""The value codec of the checkpoint adapters: nested Python values <-> JSON plus named arrays.

An adapter's state is a flat ``{name: numpy array}`` and one JSON document (the engine stores
nothing else). :class:`Encoder` turns the nested values a training session holds (optimizer
state dicts, data-loader states, extras) into JSON, moving every array into ``arrays`` under
the path it was found at; :func:`decode` is the inverse. Tagged JSON objects keep what plain
JSON would lose -- tuples, non-finite floats, non-string dict keys, bytes, and the
framework types the backends register -- so a value round-trips exactly:

| tag            | value                                                                    |
|----------------|--------------------------------------------------------------------------|
| `__ndarray__`  | a NumPy array or scalar (the array's name; `"scalar": true` for scalars)  |
| `__tensor__`   | a framework tensor (the array's name plus what the backend adds)         |
| `__tuple__`    | a tuple (its items)                                                      |
| `__float__`    | inf / -inf / nan (repr)                                                  |
| `__dict__`     | a dict whose keys are not all plain strings ([[key, value], ...])        |
| `__bytes__`    | bytes (hex)                                                              |
| `__dtype__`, `__device__` | reserved for the torch backend: a torch dtype, a torch device |

The tags are part of the on-disk format: a dict whose keys include one is stored as
``__dict__`` so that it never reads back as a tagged value.

Extension hooks (the torch backend registers its types in faultlab.backends.torch.adapter;
the codec itself imports no framework):

* :func:`register_array_type`: values of this type are arrays (handed to the encoder's
  ``to_array``, decoded by ``decode``'s ``from_array``);
* :func:`register_value_type`: a type stored as ``{tag: JSON}`` and decoded from it;
* :func:`register_generator`: a random generator kind for :func:`generator_state` /
  :func:`set_generator_state` (extra generators named by an adapter's ``generators=``).

The global generators of Python and NumPy are captured exactly by
:func:`capture_python_numpy_rng` and put back by :func:`restore_python_numpy_rng`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from faultlab.errors import CheckpointError

#: every tag the format uses (see the module docstring), registered ones included
TAGS: set[str] = {"__tensor__", "__ndarray__", "__tuple__", "__float__", "__dict__",
                  "__bytes__", "__dtype__", "__device__"}

_array_types: tuple[type, ...] = (np.ndarray,)
_value_types: list[tuple[type, str, Callable[[Any], Any]]] = []
_tag_decoders: dict[str, Callable[[Any], Any]] = {}
_generator_types: list[tuple[type, Callable[[Any], tuple[np.ndarray | None, dict]]]] = []
_generator_setters: dict[str, Callable[[Any, np.ndarray | None, Mapping], None]] = {}


def register_array_type(cls: type) -> None:
    """Encode values of `cls` (a framework's tensor type) as arrays: the Encoder hands them to
    its `to_array`, which turns them into (NumPy array, JSON reference)."""
    global _array_types
    if cls not in _array_types:
        _array_types = (*_array_types, cls)


def register_value_type(cls: type, tag: str, encode: Callable[[Any], Any],
                        decode: Callable[[Any], Any]) -> None:
    """Store values of `cls` as ``{tag: encode(value)}`` (JSON) and read them back with
    ``decode(json)``. A new tag joins :data:`TAGS` (and so the format)."""
    TAGS.add(tag)
    _value_types[:] = [(c, t, e) for c, t, e in _value_types if c is not cls]
    _value_types.append((cls, tag, encode))
    _tag_decoders[tag] = decode


def register_generator(cls: type, kind: str,
                       state_of: Callable[[Any], tuple[np.ndarray | None, dict]],
                       set_state: Callable[[Any, np.ndarray | None, Mapping], None]) -> None:
    """A generator type: ``state_of(gen)`` -> (array or None, JSON info whose "kind" is
    `kind`); ``set_state(gen, array, info)`` puts such a state back."""
    _generator_types[:] = [(c, f) for c, f in _generator_types if c is not cls]
    _generator_types.append((cls, state_of))
    _generator_setters[kind] = set_state


def is_array(value) -> bool:
    """Whether the codec stores `value` as an array (a NumPy array or a registered type)."""
    return isinstance(value, _array_types)


class Encoder:
    """Turns nested Python values into JSON, moving every array into `arrays`.

    to_array(path, value) -> (numpy array, JSON reference) is called for every NumPy array
    and every value of a registered array type; the array is stored under `path`, the
    reference (``{"__ndarray__": path}`` or ``{"__tensor__": path, ...}``) replaces the value.
    """

    def __init__(self, to_array: Callable[[str, Any], tuple[np.ndarray, dict]]):
        self.arrays: dict[str, np.ndarray] = {}
        self._to_array = to_array

    def encode(self, value, path: str):
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, _array_types):
            if path in self.arrays:
                raise CheckpointError(f"two values would be stored as {path!r}")
            arr, ref = self._to_array(path, value)
            self.arrays[path] = arr
            return ref
        if isinstance(value, np.generic):
            if path in self.arrays:
                raise CheckpointError(f"two values would be stored as {path!r}")
            self.arrays[path] = np.asarray(value)
            return {"__ndarray__": path, "scalar": True}
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            plain = all(isinstance(k, str) and k not in TAGS for k in value)
            if plain:
                return {k: self.encode(v, f"{path}/{k}") for k, v in value.items()}
            return {"__dict__": [[self.encode(k, f"{path}/key{i}"),
                                  self.encode(v, f"{path}/{_key_name(k, i)}")]
                                 for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": bytes(value).hex()}
        for cls, tag, encode in _value_types:
            if isinstance(value, cls):
                return {tag: encode(value)}
        raise CheckpointError(f"cannot checkpoint {path!r}: a {type(value).__name__} is not a "
                              "tensor, array, number, string, list, tuple or dict")


def _key_name(key, i: int) -> str:
    return str(key) if isinstance(key, (int, str)) else f"item{i}"


def decode(value, arrays: Mapping[str, np.ndarray],
           from_array: Callable[[np.ndarray, dict], Any]):
    """The inverse of Encoder.encode: `arrays` are the stored arrays by name; from_array(arr,
    ref) turns a ``__tensor__`` reference back into the framework's tensor."""
    if isinstance(value, list):
        return [decode(v, arrays, from_array) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value or "__ndarray__" in value:
        name = value.get("__tensor__", value.get("__ndarray__"))
        if name not in arrays:
            raise CheckpointError(f"checkpoint lacks array {name!r} that its metadata names")
        arr = arrays[name]
        if "__ndarray__" in value:
            return arr[()] if value.get("scalar") else writable(arr)
        return from_array(arr, value)
    if "__tuple__" in value:
        return tuple(decode(v, arrays, from_array) for v in value["__tuple__"])
    if "__float__" in value:
        return float(value["__float__"])
    if "__dict__" in value:
        return {decode(k, arrays, from_array): decode(v, arrays, from_array)
                for k, v in value["__dict__"]}
    if "__bytes__" in value:
        return bytes.fromhex(value["__bytes__"])
    for tag in TAGS:
        if tag in value:
            fn = _tag_decoders.get(tag)
            if fn is None:
                raise CheckpointError(f"checkpoint holds a {tag} value that no loaded backend "
                                      "decodes (restore it with the adapter that wrote it)")
            return fn(value[tag])
    return {k: decode(v, arrays, from_array) for k, v in value.items()}


def writable(arr: np.ndarray) -> np.ndarray:
    """`arr`, or a copy of it when it is read-only."""
    return arr if arr.flags.writeable else np.array(arr)


# -- global random number generators (Python's and NumPy's) -----------------------------------

def capture_python_numpy_rng() -> tuple[dict[str, np.ndarray], dict]:
    """Python's and NumPy's global generators, exactly (Mersenne Twister words and all)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    arrays = {"rng/python": np.array(words, dtype=np.uint32),
              "rng/numpy/keys": np.array(keys, dtype=np.uint32),
              "rng/numpy/cached_gaussian": np.array(cached, dtype=np.float64)}
    meta = {"python": {"version": version, "gauss_next": gauss},
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss)}}
    return arrays, meta


def restore_python_numpy_rng(state: Mapping[str, np.ndarray], meta: Mapping) -> None:
    py, npm = meta["python"], meta["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in state["rng/python"]),
                     py["gauss_next"]))
    np.random.set_state((npm["kind"], np.array(state["rng/numpy/keys"], dtype=np.uint32),
                         npm["pos"], npm["has_gauss"],
                         float(state["rng/numpy/cached_gaussian"])))


# -- extra named generators -----------------------------------------------------------------

def generator_state(gen) -> tuple[np.ndarray | None, Any]:
    """(array, JSON) state of an extra generator: a registered type (torch.Generator once the
    torch backend's adapter is loaded), numpy Generator / RandomState or random.Random."""
    for cls, state_of in _generator_types:
        if isinstance(gen, cls):
            return state_of(gen)
    if isinstance(gen, np.random.Generator):
        return None, {"kind": "numpy", "state": gen.bit_generator.state}
    if isinstance(gen, np.random.RandomState):
        kind, keys, pos, has_gauss, cached = gen.get_state(legacy=True)
        return np.array(keys, dtype=np.uint32), {"kind": "randomstate", "pos": int(pos),
                                                 "has_gauss": int(has_gauss),
                                                 "cached": float(cached).hex()}
    if isinstance(gen, random.Random):
        version, words, gauss = gen.getstate()
        return np.array(words, dtype=np.uint32), {"kind": "python", "version": version,
                                                  "gauss_next": gauss}
    raise CheckpointError(f"cannot checkpoint a generator of type {type(gen).__name__}")


def capture_generators(generators: Mapping[str, Any], arrays: dict,
                       state_of: Callable = generator_state) -> dict:
    """Add the named generators' array states to `arrays` (as `generator/NAME`); return their
    JSON states. state_of(gen) -> (array or None, JSON)."""
    out = {}
    for name, gen in generators.items():
        arr, info = state_of(gen)
        if arr is not None:
            arrays[f"generator/{name}"] = arr
        out[name] = info
    return out


def set_generator_state(gen, arr: np.ndarray | None, info: Mapping) -> None:
    """Put a state from generator_state back into `gen`."""
    kind = info["kind"]
    setter = _generator_setters.get(kind)
    if setter is not None:
        setter(gen, arr, info)
    elif kind == "numpy":
        gen.bit_generator.state = info["state"]
    elif kind == "randomstate":
        gen.set_state(("MT19937", np.array(arr, dtype=np.uint32), info["pos"],
                       info["has_gauss"], float.fromhex(info["cached"])))
    elif kind == "python":
        gen.setstate((info["version"], tuple(int(w) for w in arr), info["gauss_next"]))
    else:
        raise CheckpointError(f"unknown generator kind {kind!r} in checkpoint")
