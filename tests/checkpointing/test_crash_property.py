"""The central property: a power loss at any instant recovers exactly one committed checkpoint.

For random save sequences on a SimDisk, every crash point (after every write and sync the
engine issued) and many power-loss images at each (unsynced block writes dropped, kept or
torn, in any order) must recover bit-exactly to a checkpoint whose commit record had been
written, never older than the newest commit that was durable before the crash. Which commits
were written / durable is read from the disk's operation log, not from recovery.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from ckpt_helpers import (HookedDisk, assert_data_durable_before_records, commit_timeline,
                          same_bits)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultlab.checkpointing import CheckpointEngine, CrashChoice, SimDisk, recover
from faultlab.errors import CheckpointError

NAMES = ["w", "b", "m", "opt/exp_avg"]
DTYPES = [np.float32, np.int8, np.float64, np.uint16]


@st.composite
def save_sequences(draw):
    saves = []
    for _ in range(draw(st.integers(1, 5))):
        names = draw(st.lists(st.sampled_from(NAMES), min_size=0, max_size=4, unique=True))
        sizes = {n: draw(st.integers(0, 400)) for n in names}
        saves.append((sizes, draw(st.integers(0, 2**31)), draw(st.booleans())))
    return saves


def make_state(sizes, seed):
    rng = np.random.default_rng(seed)
    return {n: np.frombuffer(rng.bytes(k * np.dtype(DTYPES[NAMES.index(n)]).itemsize),
                             dtype=DTYPES[NAMES.index(n)]).copy() for n, k in sizes.items()}


def run(saves, keep, max_in_flight, chunk_blocks, pool_chunks, writers,
        disk_geometry=(512, 128)):
    """Run the saves; return the disk and {counter: (step, state, meta)}."""
    block, sector = disk_geometry
    disk = SimDisk(block_size=block, sector_size=sector)
    expected = {}
    with CheckpointEngine(disk, keep=keep, max_in_flight=max_in_flight, block_size=block,
                          chunk_bytes=block * chunk_blocks, pool_bytes=block * chunk_blocks
                          * pool_chunks, writers=writers, slot_bytes=16384) as eng:
        for step, (sizes, seed, wait) in enumerate(saves):
            state = make_state(sizes, seed)
            h = eng.save(step, state, {"seed": seed})
            expected[h.counter] = (step, state, {"seed": seed})
            if wait:
                h.wait()
    return disk, expected


def check_all_crash_points(disk, expected, images_per_point, seed=0):
    """Assert the property at every crash point; return how many images were checked."""
    log = disk.log
    assert assert_data_durable_before_records(log) == len(expected)   # every save committed
    timeline = commit_timeline(log)
    rng, checked = random.Random(seed), 0
    for k, state in disk.crash_states():
        written = {c for c, w, _ in timeline if w < k}
        durable = [c for c, _, s in timeline if s is not None and s < k]
        newest_durable = max(durable, default=None)
        images = [img for _, img in state.enumerate_images(images_per_point, seed=k)]
        images += [state.crash_image(rng) for _ in range(2)]
        if state.exists():
            nothing_survived = state.crash_image(choice=CrashChoice((0,) * len(state.pending())))
        else:
            nothing_survived = state
        for i, image in enumerate([nothing_survived] + images):
            checked += 1
            try:
                r = recover(image)
            except CheckpointError:
                assert newest_durable is None, f"lost durable commit {newest_durable} at op {k}"
                continue
            counter = r.commit.counter
            assert counter in written, f"recovered uncommitted counter {counter} at op {k}"
            if newest_durable is not None:
                assert counter >= newest_durable, f"older than durable at op {k}"
            if i == 0:                     # with every unsynced write lost: exactly the newest
                assert counter == newest_durable
            step, state_exp, meta = expected[counter]
            assert (r.step, r.meta) == (step, meta)
            assert list(r.state) == list(state_exp)
            assert all(same_bits(r.state[n], state_exp[n]) for n in state_exp)
    return checked


CONFIGS = dict(saves=save_sequences(), keep=st.integers(1, 3), max_in_flight=st.integers(1, 3),
               chunk_blocks=st.integers(1, 2), pool_chunks=st.integers(1, 3),
               writers=st.integers(1, 3),
               disk_geometry=st.sampled_from([(512, 128), (4096, 512)]))   # block, sector


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CONFIGS)
def test_every_power_loss_image_recovers_a_committed_checkpoint_bit_exact(
        saves, keep, max_in_flight, chunk_blocks, pool_chunks, writers, disk_geometry):
    disk, expected = run(saves, keep, max_in_flight, chunk_blocks, pool_chunks, writers,
                         disk_geometry)
    check_all_crash_points(disk, expected, images_per_point=30)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CONFIGS)
def test_every_power_loss_image_recovers_many_more_sequences(
        saves, keep, max_in_flight, chunk_blocks, pool_chunks, writers, disk_geometry):
    disk, expected = run(saves, keep, max_in_flight, chunk_blocks, pool_chunks, writers,
                         disk_geometry)
    check_all_crash_points(disk, expected, images_per_point=100)


def test_exhaustive_images_for_a_small_fixed_run():
    """More images per crash point (every keep/drop subset where there are few writes)."""
    saves = [({"w": 400, "b": 300}, 1, False), ({"w": 300}, 2, False), ({"m": 200}, 3, True),
             ({"w": 10, "b": 5}, 4, False), ({"opt/exp_avg": 300, "w": 100}, 5, False)]
    disk, expected = run(saves, keep=2, max_in_flight=2, chunk_blocks=1, pool_chunks=2,
                         writers=2)
    assert check_all_crash_points(disk, expected, images_per_point=400) > 2000


def test_power_loss_around_an_older_commit_that_finishes_late():
    """Save A is held mid-write while B (newer) commits; then A commits. No crash point may
    recover A once B's commit is durable."""
    release, held = threading.Event(), threading.Event()
    disk = HookedDisk(block_size=512, sector_size=128)
    eng = CheckpointEngine(disk, keep=2, max_in_flight=2, block_size=512, chunk_bytes=512,
                           pool_bytes=8192, writers=2, slot_bytes=16384)
    slot0 = range(eng.geometry.slot_offset(0), eng.geometry.slot_offset(1))

    def hold_a(offset, data):
        if offset in slot0 and not release.is_set():
            held.set()
            release.wait()

    disk.before_write = hold_a
    expected = {}
    a_state, b_state = make_state({"w": 100}, 1), make_state({"w": 90, "b": 300}, 2)
    a = eng.save(0, a_state, {"seed": 1})
    expected[a.counter] = (0, a_state, {"seed": 1})
    held.wait()
    b = eng.save(1, b_state, {"seed": 2})
    expected[b.counter] = (1, b_state, {"seed": 2})
    b.wait()
    release.set()
    a.wait()
    eng.close()
    order = [c for c, _, _ in commit_timeline(disk.log)]
    assert order == [b.counter, a.counter]                      # A really committed late
    assert check_all_crash_points(disk, expected, images_per_point=200) > 200
