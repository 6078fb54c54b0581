"""The torture harnesses' oracle: states that are a pure function of (salt, step), and the
checks a recovered checkpoint must pass.

Nothing here comes from faultlab's crash tooling (faultlab.crash, SimDisk, tests/helpers): the
harnesses only use the engine's public API (CheckpointEngine, recover, list_commits,
load_step, Storage) and judge what comes back against `make_state`, which the writer and the
judge compute independently. Any state the engine returns must equal `make_state(salt, s)`
for a step `s` that was saved, byte for byte, dtype and shape included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: the kinds of array a state is drawn from (dtype factories; structured, big-endian, 0-d,
#: empty, datetime, unicode and non-contiguous inputs included)
_STRUCT = np.dtype([("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")])
_PADDED = np.dtype({"names": ["x", "y"], "formats": ["<i2", "<f4"], "offsets": [0, 8],
                    "itemsize": 16})
_NESTED = np.dtype([("n", [("p", "<u2"), ("q", "?")]), ("r", "<c8", (2, 2))])
KINDS = ("f4", "f8", "i1", "i2", "i8", "u1", "bool", ">f8", ">i4", "struct", "padded",
         "nested", "M8[ns]", ">m8[s]", "U", "S", "f2", ">c16", "V5", "scalar", "zero-d",
         "empty", "noncontig")
_PLAIN = {"f4": "<f4", "f8": "<f8", "i1": "i1", "i2": "<i2", "i8": "<i8", "u1": "u1",
          ">f8": ">f8", ">i4": ">i4", "struct": _STRUCT, "padded": _PADDED, "nested": _NESTED,
          "M8[ns]": "<M8[ns]", ">m8[s]": ">m8[s]", "S": "S7", "f2": "<f2", ">c16": ">c16",
          "V5": "V5"}
#: names are drawn from these (unicode and separators included; made unique by an index)
_NAMES = ("w", "layer1.weight", "opt/adam/m", "ω/权重", "bn.running_mean", "rng state", "x")
MAX_TENSORS = 12


def _rng(salt: int, step: int) -> np.random.Generator:
    return np.random.default_rng([salt & 0xFFFFFFFF, (step >> 32) & 0xFFFFFFFF,
                                  step & 0xFFFFFFFF, 0x70727475])


def _shape(rng: np.random.Generator, n: int) -> tuple[int, ...]:
    """A random shape holding n elements (1 to 3 dimensions)."""
    ndim = int(rng.integers(1, 4))
    dims = [n] + [1] * (ndim - 1)
    for i in range(1, ndim):                      # move small factors of n to other axes
        for f in (2, 3, 5, 7):
            if dims[0] % f == 0 and rng.random() < 0.5:
                dims[0] //= f
                dims[i] *= f
    rng.shuffle(dims)
    return tuple(int(d) for d in dims)


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=n, dtype=np.uint8)


def _array(rng: np.random.Generator, kind: str, nbytes: int):
    if kind == "scalar":                          # a NumPy scalar (np.generic), not an array
        return np.float64(rng.standard_normal())
    if kind == "zero-d":
        return np.array(rng.integers(-2**62, 2**62), dtype=">i8")
    if kind == "empty":
        shape = ((0,), (3, 0, 2), (0, 5))[int(rng.integers(3))]
        return np.empty(shape, dtype=str(rng.choice(["<f4", ">i2", "<U3"])))
    if kind == "bool":
        n = max(1, nbytes)
        return rng.random(n).reshape(_shape(rng, n)) < 0.5
    if kind == "U":
        width = int(rng.integers(1, 9))
        n = max(1, nbytes // (4 * width))
        codes = rng.integers(0x20, 0xD7FF, size=n * width).astype("<u4")
        return codes.view(f"<U{width}").reshape(_shape(rng, n))
    if kind == "noncontig":                       # a strided view: the engine copies it once
        n = max(2, nbytes // 16)
        base = rng.standard_normal((2, n)).astype("<f8")
        return base.T if rng.random() < 0.5 else base[:, ::2]
    dt = np.dtype(_PLAIN[kind])
    n = max(1, nbytes // dt.itemsize)
    # raw random bytes: floats get NaNs with payloads, infinities, -0.0 and denormals; dates NaT
    return _random_bytes(rng, n * dt.itemsize).view(dt).reshape(_shape(rng, n))


def make_state(salt: int, step: int, max_bytes: int) -> tuple[dict, dict]:
    """The state and meta saved at `step`: a pure function of (salt, step, max_bytes).

    Sizes change from step to step (most states small, some near max_bytes), so chunk
    boundaries fall in different places every time."""
    rng = _rng(salt, step)
    budget = int(max_bytes * rng.random() ** 2)
    n = int(rng.integers(1, MAX_TENSORS + 1))
    shares = rng.dirichlet(np.ones(n)) * budget
    state = {}
    for i in range(n):
        kind = str(rng.choice(KINDS))
        name = f"{rng.choice(_NAMES)}#{i}:{kind}"
        state[name] = _array(rng, kind, int(shares[i]))
    meta = {"step": int(step), "salt": int(salt), "tensors": n, "note": "ünïcødé ✓",
            "nested": {"budget": budget, "list": [1, 2.5, None, True]}}
    return state, meta


def max_data_bytes(max_bytes: int) -> int:
    """An upper bound of the data region of any make_state(..., max_bytes) state."""
    # each array may round its share up to one element (the widest: noncontig's 2 x 16 B,
    # unicode 4 x 8 B, the empty and 0-d ones) and starts at a multiple of 64
    return max_bytes + MAX_TENSORS * (64 + 64 + 32)


def slot_bytes(max_bytes: int, chunk_bytes: int, block_size: int) -> int:
    """A slot size that fits every state of max_bytes with its manifest (and the engine's
    reserve of twice the manifest plus a block)."""
    data = max_data_bytes(max_bytes)
    chunk = -(-chunk_bytes // block_size) * block_size
    chunks = math.ceil(data / chunk) + 1
    manifest = 4096 + chunks * 32 + MAX_TENSORS * 600
    total = data + 2 * manifest + 4096 + block_size
    return -(-total // block_size) * block_size


def same_array(expected, got) -> bool:
    exp = np.asarray(expected, order="C")
    if isinstance(got, np.generic):            # only when comparing two generated states
        got = np.asarray(got)
    return (isinstance(got, np.ndarray) and got.dtype == exp.dtype and got.shape == exp.shape
            and np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(exp).tobytes())


def state_diff(expected: dict, exp_meta: dict, got: dict, got_meta: dict) -> str | None:
    """None when the recovered state equals the expected one exactly; else why not."""
    if list(got) != list(expected):
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        if missing or extra:
            return f"names differ: missing {missing[:3]}, extra {extra[:3]}"
        return "names in another order"
    for name, exp in expected.items():
        if not same_array(exp, got[name]):
            g = got[name]
            return (f"{name}: expected {np.asarray(exp).dtype}{np.shape(exp)}, got "
                    f"{getattr(g, 'dtype', type(g))}{getattr(g, 'shape', '')} or other bytes")
    if got_meta != exp_meta:
        return f"meta differs: {got_meta!r} != {exp_meta!r}"
    return None


@dataclass
class Tally:
    """What happened to every crash: the counts the harnesses print and the tests assert on.

    Each crash counts once: recovered (every check passed), empty (nothing was durable and
    nothing came back: correct) or the first bad finding's category. `findings` counts every
    finding (a crash may have several: a lost commit is missing from recover() and from
    list_commits())."""

    crashes: int = 0
    recovered: int = 0
    empty: int = 0             # nothing durable and nothing recovered: correct
    lost: int = 0              # older than the newest durable commit, or recovery failed
    torn: int = 0              # an array equal to no saved state's
    mixed: int = 0             # arrays of several steps
    wrong: int = 0             # exactly another step's state, under this step's label
    never_saved: int = 0       # a step save() was never called for
    retention: int = 0         # fewer than min(keep, durable commits) verified commits left
    errors: int = 0            # anything else unexpected (an exception, a writer failure)
    failures: list = field(default_factory=list)
    findings: dict = field(default_factory=dict)

    BAD = ("lost", "torn", "mixed", "wrong", "never_saved", "retention", "errors")

    def bad(self) -> int:
        return sum(getattr(self, k) for k in self.BAD)

    def count(self, found: list) -> None:
        """Count one crash from its findings [(category, detail), ...] (none: recovered)."""
        self.crashes += 1
        if not found:
            self.recovered += 1
            return
        kind = found[0][0]
        setattr(self, kind, getattr(self, kind) + 1)
        if kind == "empty":
            return
        for k, detail in found:
            self.findings[k] = self.findings.get(k, 0) + 1
            if len(self.failures) < 50:
                self.failures.append(f"{k}: {detail}")

    def counts(self) -> dict:
        return {k: getattr(self, k) for k in ("crashes", "recovered", "empty", *self.BAD)}


def judge(tally: Tally, *, salt: int, max_bytes: int, keep: int, begun: set,
          durable: list, recover_fn, list_fn, load_fn, context: str,
          empty_ok: tuple = ("no committed checkpoint", "no checkpoint file"),
          found: list | None = None) -> int | None:
    """Recover after a crash, judge it and count it; return the recovered step (None if
    nothing came back).

    begun: every step save() was called for on this file; durable: the steps whose wait()
    had returned before the crash (each a distinct commit, in any order). recover_fn() /
    list_fn() / load_fn(step) read the crashed file through the engine's public API.
    found: findings the caller already has about this crash (a writer failure)."""
    found = list(found or [])
    step = _judge(found, salt=salt, max_bytes=max_bytes, keep=keep, begun=begun,
                  durable=durable, recover_fn=recover_fn, list_fn=list_fn, load_fn=load_fn,
                  context=context, empty_ok=empty_ok)
    tally.count(found)
    return step


def _judge(found, *, salt, max_bytes, keep, begun, durable, recover_fn, list_fn, load_fn,
           context, empty_ok) -> int | None:
    from faultlab.errors import CheckpointError

    def flag(kind: str, detail: str) -> None:
        found.append((kind, f"{context}: {detail}"))

    floor = max(durable) if durable else None
    try:
        step, state, meta = recover_fn()
    except CheckpointError as e:
        if floor is not None:
            flag("lost", f"recover() failed although step {floor} was durable: {e}")
        elif any(s in str(e) for s in empty_ok):
            if not found:
                found.append(("empty", ""))
        else:
            flag("errors", f"nothing durable, but recover() said: {e}")
        return None
    except Exception as e:                        # noqa: BLE001 - anything else is a finding
        flag("errors", f"recover() raised {type(e).__name__}: {e}")
        return None
    if step not in begun:
        flag("never_saved", f"recovered step {step}, never saved (saved: {sorted(begun)[-5:]})")
    else:
        if floor is not None and step < floor:
            flag("lost", f"recovered step {step} < {floor}, durable before the crash")
        exp, exp_meta = make_state(salt, step, max_bytes)
        why = state_diff(exp, exp_meta, state, meta)
        if why is not None:
            flag(_classify(salt, step, max_bytes, begun, state, meta), f"step {step}: {why}")
    # every commit the file still holds verifies and holds what was saved; at least
    # min(keep, durable commits) of them are there, the newest durable one included
    try:
        commits = list_fn()
        steps = [c.step for c in commits]
        if len(commits) < min(keep, len(durable)):
            flag("retention", f"{len(commits)} verified commits (steps {steps}), keep={keep}, "
                              f"{len(durable)} were durable")
        if floor is not None and (not steps or max(steps) < floor):
            flag("lost", f"list_commits lacks durable step {floor}: {steps}")
        for s in sorted(set(steps)):
            if s not in begun:
                flag("never_saved", f"list_commits holds step {s}")
                continue
            got = load_fn(s)
            exp, exp_meta = make_state(salt, s, max_bytes)
            why = state_diff(exp, exp_meta, got.state, got.meta)
            if why is not None:
                flag(_classify(salt, s, max_bytes, begun, got.state, got.meta),
                     f"load_step({s}): {why}")
    except CheckpointError as e:
        flag("errors", f"list_commits/load_step failed: {e}")
    return step


def _classify(salt, step, max_bytes, begun, state, meta) -> str:
    """torn (some array equals no saved state's), mixed (arrays of several saved steps) or
    wrong (another saved step's state exactly)."""
    candidates = sorted(begun, key=lambda s: abs(s - step))[:64]
    refs = {s: make_state(salt, s, max_bytes) for s in candidates}
    for s, (exp, exp_meta) in refs.items():
        if s != step and state_diff(exp, exp_meta, state, meta) is None:
            return "wrong"
    for name, arr in state.items():
        if not any(name in exp and same_array(exp[name], arr) for exp, _ in refs.values()):
            return "torn"
    return "mixed"


def report(name: str, out: dict) -> None:
    """Print a torture run's summary line (pytest shows it with -rA or -s) and, when the
    environment names a file in FAULTLAB_TORTURE_REPORT, merge its JSON summary into it
    under `name`."""
    import json
    import os
    from pathlib import Path

    print(f"{name}: {out['summary']}")
    for f in out.get("failures", [])[:10]:
        print(f"  {f}")
    path = os.environ.get("FAULTLAB_TORTURE_REPORT")
    if path:
        p = Path(path)
        try:
            data = json.loads(p.read_text()) if p.exists() else {}
        except ValueError:
            data = {}
        data[name] = out
        p.write_text(json.dumps(data, indent=1))
