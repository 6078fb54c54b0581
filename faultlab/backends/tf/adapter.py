"""The TensorFlow / Keras 3 adapter: a training session's whole state <-> {name: array} + meta.

    adapter = TFCheckpointAdapter(model, optimizer, generators={"noise": gen})
    state, meta = adapter.capture(step, data_position=pos)     # arrays + JSON meta
    adapter.save(engine, step)                                 # any checkpointer
    resume = adapter.resume(lambda: recover(path))             # Resume(step, position, extra)

What a capture holds: every variable of each model (`model.variables`: weights, non-trainable
BatchNorm statistics, Keras SeedGenerator states of dropout layers), every variable of each
optimizer (`optimizer.variables`: iteration count, learning rate, Adam moments), the states of
named extra generators (tf.random.Generator, keras.random.SeedGenerator, NumPy / Python ones),
the global TF generator if one was set, NumPy's and Python's global generators, the data
position, extras and the step.

Keys are positions plus the variable's own short name (`model/0003/moving_mean`,
`optimizer/0005`), never Keras paths: auto-generated layer and optimizer names change when a
process builds a second model. Under tf.distribute (MirroredStrategy) every variable has one
copy per replica: capture saves replica 0's copy under the key, and any other replica's copy
that differs from it as `replica{r}/key` (Keras BatchNorm moving statistics do differ in a
custom loop: each replica updates them from its own shard); restore writes the key's value to
every copy, then the saved diverged copies to theirs. Copies of replicas the restoring process
does not have are ignored (a checkpoint of 2 replicas restores into 1).
Variables are captured without a copy, as read-only NumPy views of the tensors a read returns:
TF's resource variables are copy-on-write, so a capture stays a snapshot while training goes
on (an update copies a buffer only while a capture still holds it). Dtypes NumPy lacks
(bfloat16, float8) travel as unsigned integers of the same width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from faultlab.backends.tf.runtime import tf  # noqa: I001  (before keras: see runtime.py)
import keras  # noqa: E402

from faultlab.errors import CheckpointError
from faultlab.backends.tf.variables import cached
from faultlab.backends.tf.variables import components as _components
from faultlab.checkpointing.adapter import (ADAPTER_FORMAT, AdapterBase, Resume,
                                            check_adapter_meta, check_meta_json, check_names,
                                            named)
from faultlab.checkpointing.codec import (Encoder, capture_generators, capture_python_numpy_rng,
                                          decode, generator_state, restore_python_numpy_rng,
                                          set_generator_state)

GLOBAL_GENERATOR = "rng/tf_global"


def _global_generator():
    """The global tf.random.Generator if one exists (tf.random.get_global_generator would
    create one from a non-deterministic state, or refuse under op determinism)."""
    from tensorflow.python.ops import stateful_random_ops
    return getattr(stateful_random_ops, "global_generator", None)


def _read(var) -> tuple[np.ndarray, str | None]:
    """Replica 0's copy of a variable as a read-only NumPy view of a snapshot (no copy: TF's
    resource variables are copy-on-write, so an update while the view lives copies the
    buffer first); dtypes NumPy lacks (bfloat16, float8) viewed as unsigned integers."""
    t = _components(var)[0].read_value()
    # (a 0-d bfloat16 tensor's __array__ returns a scalar: scalars are copied instead)
    arr = np.asarray(t) if t.shape.rank else np.array(t.numpy())
    if arr.dtype.isbuiltin != 1:            # ml_dtypes: bfloat16, float8_*
        return arr.view(f"u{arr.dtype.itemsize}"), arr.dtype.name
    return arr, None


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.reshape(-1).view(np.uint8),
                                                 b.reshape(-1).view(np.uint8))


def _tf_generator_var(gen):
    """The state variable of a tf.random.Generator or keras.random.SeedGenerator, or None."""
    if isinstance(gen, (tf.random.Generator, keras.random.SeedGenerator)):
        return gen.state
    return None


def _generator_state(gen) -> tuple[np.ndarray | None, Any]:
    """(array, JSON) state of a TF / Keras generator, or of one the codec knows."""
    var = _tf_generator_var(gen)
    if var is None:
        return generator_state(gen)
    info = {"kind": "tf", "alg": int(gen.algorithm)} if isinstance(gen, tf.random.Generator) \
        else {"kind": "keras"}
    return _read(var)[0], info


class TFCheckpointAdapter(AdapterBase):
    """A Keras 3 / TensorFlow training session as a flat checkpoint (see module docstring).

    model: a Keras model (or any object with `.variables`), or a dict of them. optimizer: a
    Keras optimizer or a dict of them (built by restore() if it is not built yet).
    data: an object with state_dict() / load_state_dict() (arrays and JSON values).
    generators: extra named generators (tf.random.Generator, keras.random.SeedGenerator,
    numpy Generator / RandomState, random.Random). rng: also save the global TF generator (if
    one was set), NumPy's and Python's.
    """

    def __init__(self, model=None, optimizer=None, *, data=None,
                 generators: Mapping[str, Any] | None = None, rng: bool = True):
        self.models = named(model, "model")
        self.optimizers = named(optimizer, "optimizer")
        self.data = data
        self.generators = dict(generators or {})
        self.rng = rng

    def _variables(self):
        """(group, key, variable) of every model and optimizer variable, in a stable order."""
        for name, m in self.models.items():
            for i, v in enumerate(m.variables):
                yield name, f"{name}/{i:04d}/{v.name.split('/')[-1].split(':')[0]}", v
        for name, opt in self.optimizers.items():
            for i, v in enumerate(opt.variables):
                yield name, f"{name}/{i:04d}", v

    # A capture's arrays are snapshots: a TF resource variable copies its buffer before an
    # update while a snapshot still shares it, so the engine writes them uncopied while
    # training goes on (tests/tf/test_tf_checkpointing.py holds the engine's writers while
    # training updates the variables).
    immutable_capture = True

    def capture(self, step: int, *, data_position: Any = None,
                extra: Mapping | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """The state after `step` steps as (arrays, JSON meta). Variables are read-only views
        of snapshots: training may go on while a checkpointer copies or writes them."""
        enc = Encoder(lambda path, v: (np.array(v), {"__ndarray__": path}))
        arrays: dict[str, np.ndarray] = {}
        groups: dict[str, list[str]] = {name: [] for name in (*self.models, *self.optimizers)}
        views: dict[str, str] = {}
        for group, key, var in self._variables():
            copies = _components(var)
            arrays[key], dtype = _read(copies[0])
            for r, copy in enumerate(copies[1:], 1):
                other = _read(copy)[0]
                if not _same_bits(other, arrays[key]):            # diverged (BatchNorm stats)
                    arrays[f"replica{r}/{key}"] = other
            groups[group].append(key)
            if dtype:
                views[key] = dtype
        meta: dict = {"faultlab_adapter": ADAPTER_FORMAT, "framework": "tf", "step": int(step),
                      "variables": groups, "views": views}
        if self.data is not None:
            meta["data_state"] = enc.encode(self.data.state_dict(), "data")
        meta["data_position"] = enc.encode(data_position, "position")
        meta["extra"] = enc.encode(dict(extra or {}), "extra")
        arrays.update(enc.arrays)
        if self.rng:
            py_np, rng_meta = capture_python_numpy_rng()
            arrays.update(py_np)
            gen = _global_generator()
            if gen is not None:
                arrays[GLOBAL_GENERATOR] = _read(gen.state)[0]
                rng_meta["tf_global"] = int(gen.algorithm)
            meta["rng"] = rng_meta
        meta["generators"] = capture_generators(self.generators, arrays, _generator_state)
        check_meta_json(meta)
        return arrays, meta

    # -- restore ----------------------------------------------------------------------------

    def restore(self, state: Mapping[str, np.ndarray], meta: Mapping) -> Resume:
        """Load a captured state into every replica's copy of the variables, the generators
        and the data; nothing changes unless the whole state fits."""
        check_adapter_meta(meta, "tf")
        try:
            saved = meta["variables"]
            check_names(saved, {**self.models, **self.optimizers}, "model/optimizer")
            missing = sorted(n for n in self._required_arrays(meta) if n not in state)
            if missing:
                raise CheckpointError(f"checkpoint lacks {len(missing)} array(s) its metadata "
                                      f"names: {missing[:5]}")
            self._check_fit(state, meta, saved, self.models)   # before building optimizers
            self._build_optimizers(saved)
            live, values = self._check_fit(state, meta, saved, saved)
            gen_values = self._check_generators(state, meta)

            def unpack(tree):
                return decode(tree, state, lambda arr, ref: arr)

            position = unpack(meta.get("data_position"))
            extra = unpack(meta.get("extra", {}))
            data_state = None
            if self.data is not None:
                if "data_state" not in meta:
                    raise CheckpointError("checkpoint holds no data loader state")
                data_state = unpack(meta["data_state"])
        except KeyError as e:
            raise CheckpointError(f"checkpoint is incomplete: missing {e}") from None
        # everything fits: change state from here on
        bulk = cached(self, "_bulk_vars", live.values())     # one traced assign of every copy
        bulk.assign([[values.get(f"replica{r}/{key}", values[key]) for r in range(len(copies))]
                     for key, copies in zip(live, bulk.copies)])
        for var, value in gen_values:
            for copy in _components(var):
                copy.assign(value)
        for name, gen in self.generators.items():
            if _tf_generator_var(gen) is None:
                set_generator_state(gen, state.get(f"generator/{name}"),
                                     meta["generators"][name])
        if data_state is not None:
            self.data.load_state_dict(data_state)
        if self.rng:
            restore_python_numpy_rng(state, meta["rng"])
            self._restore_global_generator(state, meta["rng"])
        return Resume(int(meta["step"]), position, extra)

    def _required_arrays(self, meta: Mapping) -> list[str]:
        """Arrays of the generators this adapter restores (variables are checked apart)."""
        names = []
        if self.rng:
            if "rng" not in meta:
                raise CheckpointError("checkpoint holds no random generator states")
            names += ["rng/python", "rng/numpy/keys", "rng/numpy/cached_gaussian"]
            if meta["rng"].get("tf_global") is not None:
                names.append(GLOBAL_GENERATOR)
        for name in self.generators:
            info = meta.get("generators", {}).get(name)
            if info is None:
                raise CheckpointError(f"checkpoint holds no state of generator {name!r}")
            if info.get("kind") != "numpy":
                names.append(f"generator/{name}")
        return names

    def _build_optimizers(self, saved: Mapping) -> None:
        """Build an unbuilt Keras optimizer (a fresh one has no moments yet) when the
        checkpoint holds more of its variables: over the models' trainable variables, under
        their distribution strategy."""
        for name, opt in self.optimizers.items():
            if getattr(opt, "built", True) or len(saved[name]) <= len(opt.variables):
                continue
            tvars = [v for m in self.models.values() for v in m.trainable_variables]
            first = getattr(tvars[0], "value", tvars[0]) if tvars else None
            if isinstance(first, tf.distribute.DistributedValues):
                with first.distribute_strategy.scope():
                    opt.build(tvars)
            else:
                opt.build(tvars)

    def _check_fit(self, state, meta, saved, groups) -> tuple[dict, dict[str, np.ndarray]]:
        """The live variables of `groups` and their values from the checkpoint, checked for
        presence, shape and dtype first."""
        problems, live, values = [], {}, {}
        views = meta.get("views", {})
        for group, key, var in self._variables():
            if group not in groups:
                continue
            live[key] = var
            if key not in saved[group] or key not in state:
                problems.append(f"{key} is not in the checkpoint")
                continue
            copies = _components(var)
            dtype = np.dtype(copies[0].dtype.as_numpy_dtype)
            for r in range(len(copies)):
                name = key if r == 0 else f"replica{r}/{key}"
                if name not in state:
                    continue
                arr = np.asarray(state[name])
                if key in views:
                    arr = arr.view(tf.as_dtype(views[key]).as_numpy_dtype)
                if tuple(arr.shape) != tuple(copies[0].shape) or arr.dtype != dtype:
                    problems.append(f"{name}: checkpoint {arr.dtype}{list(arr.shape)}, model "
                                    f"{dtype}{list(copies[0].shape)}")
                values[name] = arr
        problems += [f"{key} is not in the model" for group in groups
                     for key in saved[group] if key not in live]
        if problems:
            raise CheckpointError(f"checkpoint does not fit model: {len(problems)} "
                                  f"variable(s) differ: {'; '.join(problems[:4])}")
        return live, values

    def _check_generators(self, state, meta) -> list[tuple[Any, np.ndarray]]:
        """(state variable, value) of every TF / Keras generator, checked to fit."""
        out = []
        for name, gen in self.generators.items():
            info = meta["generators"][name]
            var = _tf_generator_var(gen)
            if var is None:
                continue
            arr = state[f"generator/{name}"]
            if info["kind"] not in ("tf", "keras") or tuple(arr.shape) != tuple(var.shape):
                raise CheckpointError(f"checkpoint's state of generator {name!r} does not "
                                      f"fit a {type(gen).__name__}")
            out.append((var, np.asarray(arr)))
        return out

    @staticmethod
    def _restore_global_generator(state, rng_meta) -> None:
        alg = rng_meta.get("tf_global")
        if alg is None:
            return
        value = np.asarray(state[GLOBAL_GENERATOR])
        gen = _global_generator()
        if gen is not None and int(gen.algorithm) == alg:
            for copy in _components(gen.state):       # traced functions keep this generator
                copy.assign(value)
        else:
            tf.random.set_global_generator(tf.random.Generator.from_state(value, alg))
