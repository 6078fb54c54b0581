"""What is saved loads back bit for bit: any dtype, any shape, any layout, with its meta."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from ckpt_helpers import assert_same_state, random_state, same_bits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from faultlab.checkpointing import CheckpointEngine, SimDisk, list_commits, recover
from faultlab.errors import CheckpointError

DTYPES = (hnp.boolean_dtypes() | hnp.integer_dtypes(endianness="?")
          | hnp.unsigned_integer_dtypes(endianness="?") | hnp.floating_dtypes(endianness="?")
          | hnp.complex_number_dtypes(endianness="?") | hnp.datetime64_dtypes(endianness="?")
          | hnp.timedelta64_dtypes(endianness="?") | hnp.unicode_string_dtypes(max_len=4)
          | hnp.byte_string_dtypes(max_len=4) | hnp.array_dtypes(allow_subarrays=True)
          | st.just(np.dtype("V3")))
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)


@st.composite
def arrays(draw):
    """Arrays of any bit pattern (NaN payloads, NaT, ...), sometimes not C-contiguous."""
    dtype, shape = draw(DTYPES), draw(SHAPES)
    if dtype.hasobject:
        dtype = np.dtype("u1")
    n = math.prod(shape) * dtype.itemsize
    arr = np.frombuffer(draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8)
    arr = arr.view(dtype).reshape(shape) if dtype.itemsize else np.zeros(shape, dtype)
    layout = draw(st.sampled_from(["c", "fortran", "transposed", "strided"]))
    if layout == "fortran":
        arr = np.asfortranarray(arr)
    elif layout == "transposed" and arr.ndim > 1:
        arr = arr.T
    elif layout == "strided" and arr.ndim > 0:
        arr = np.repeat(arr, 2, axis=0)[::2]
    return arr


META = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
    max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(state=st.dictionaries(st.text(max_size=12), arrays(), max_size=6),
       meta=st.dictionaries(st.text(max_size=6), META, max_size=4),
       step=st.integers(-2**63, 2**63 - 1),
       chunk_blocks=st.integers(1, 3), pool_chunks=st.integers(1, 4), writers=st.integers(1, 3))
def test_any_state_round_trips_bit_exact(state, meta, step, chunk_blocks, pool_chunks, writers):
    disk = SimDisk(block_size=512)
    with CheckpointEngine(disk, block_size=512, chunk_bytes=512 * chunk_blocks,
                          pool_bytes=512 * chunk_blocks * pool_chunks, writers=writers) as eng:
        eng.save(step, state, meta).wait()
        got_step, got, got_meta = eng.load_latest()
    assert got_step == step and got_meta == meta
    assert_same_state(got, state)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=st.dictionaries(st.text(min_size=1, max_size=8), arrays(), min_size=1, max_size=4))
def test_round_trip_through_a_real_file(state):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run.ckpt"
        with CheckpointEngine(path, chunk_bytes=4096, pool_bytes=8192) as eng:
            eng.save(7, state, {"epoch": 1}).wait()
        step, got, meta = recover(path)
    assert (step, meta) == (7, {"epoch": 1})
    assert_same_state(got, state)


def test_state_much_larger_than_the_pool_streams_through_it(tmp_path):
    state = random_state(1, {"big": 300_000, "small": 10})      # ~1.2 MB, pool 16 KiB
    with CheckpointEngine(tmp_path / "c", chunk_bytes=4096, pool_bytes=16384) as eng:
        assert eng.settings.pool_bytes == 16384
        eng.save(1, state).wait()
    assert_same_state(recover(tmp_path / "c").state, state)


def test_loaded_arrays_are_independent_writable_arrays():
    disk = SimDisk()
    state = {"a": np.arange(10.0), "b": np.ones(3, np.int32)}
    with CheckpointEngine(disk) as eng:
        eng.save(0, state).wait()
    got = recover(disk).state
    got["a"][:] = -1
    assert same_bits(got["b"], state["b"])


def test_the_caller_may_change_its_arrays_as_soon_as_save_returns():
    disk = SimDisk(block_size=512)
    w = np.arange(4000, dtype=np.float64)
    with CheckpointEngine(disk, block_size=512, chunk_bytes=1024, pool_bytes=2048) as eng:
        h = eng.save(0, {"w": w})
        w[:] = 0                                              # training goes on
        h.wait()
    assert same_bits(recover(disk).state["w"], np.arange(4000, dtype=np.float64))


def test_commit_info_and_list_commits_describe_what_is_stored():
    disk = SimDisk()
    with CheckpointEngine(disk) as eng:
        info = eng.save(42, random_state(0)).wait()
        assert eng.committed() == [info]
    assert (info.counter, info.step) == (0, 42)
    assert list_commits(disk) == [info]
    assert recover(disk).commit == info


@pytest.mark.parametrize("state, words", [
    ({"x": np.array([object()], dtype=object)}, "Python objects"),
    ({"x": [1, 2]}, "not a numpy array"),
    ({1: np.zeros(2)}, "names must be strings"),
    ([np.zeros(2)], "must be a mapping"),
])
def test_unsupported_states_are_refused_with_a_clear_message(state, words):
    with CheckpointEngine(SimDisk()) as eng:
        with pytest.raises(CheckpointError, match=words):
            eng.save(0, state)


def test_meta_must_be_json_and_step_an_integer():
    with CheckpointEngine(SimDisk()) as eng:
        with pytest.raises(CheckpointError, match="JSON"):
            eng.save(0, {}, {"x": {1, 2}})
        with pytest.raises(CheckpointError, match="JSON"):
            eng.save(0, {}, {"x": float("nan")})
        with pytest.raises(CheckpointError, match="step"):
            eng.save(1.5, {})


def test_a_larger_state_than_the_slots_hold_is_a_clear_error():
    disk = SimDisk()
    with CheckpointEngine(disk) as eng:
        eng.save(0, {"w": np.zeros(1000)}).wait()
        with pytest.raises(CheckpointError, match="needs .* bytes per slot .* slot_bytes>="):
            eng.save(1, {"w": np.zeros(100_000)})
        eng.save(2, {"w": np.ones(900)}).wait()                # smaller states still fit
    assert recover(disk).step == 2


def test_slot_bytes_sizes_the_file_up_front():
    disk = SimDisk()
    with CheckpointEngine(disk, slot_bytes=1 << 20) as eng:
        assert eng.geometry.slot_bytes == 1 << 20
        eng.save(0, {"w": np.zeros(1000)}).wait()
        eng.save(1, {"w": np.zeros(100_000)}).wait()
    assert recover(disk).step == 1


def test_a_save_that_just_fits_its_slot_never_spills_into_the_next():
    disk = SimDisk(block_size=512)
    with CheckpointEngine(disk, block_size=512, slot_bytes=2048, keep=1,
                          max_in_flight=1) as eng:
        for step in range(11):                              # counters reach two digits
            eng.save(step, {"x": np.zeros(8)}).wait()
        neighbour = eng.committed()[-1]
        accepted = None
        for pad in range(1600, 0, -1):                      # the largest meta that fits
            try:
                accepted = eng.save(99, {"x": np.zeros(8)}, {"pad": "p" * pad}).wait()
                break
            except CheckpointError:
                continue
        assert accepted is not None and accepted.slot != neighbour.slot
    assert neighbour in list_commits(disk)
    assert recover(disk).commit == accepted
