"""Every checkpointer -- the engine and the baselines -- behind one interface: saves round-trip
bit for bit, retention keeps the newest `keep`, phase hooks fire in protocol order, damaged or
foreign files are refused with one line, and I/O errors leave earlier checkpoints intact."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest
from ckpt_helpers import assert_same_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from faultlab import backends
from faultlab.checkpointing.api import (COMPARED, Checkpointer, checkpointer_framework,
                                        checkpointer_names, open_checkpointer,
                                        recover_checkpoint, target_path)
from faultlab.errors import CheckpointError, FaultlabError

#: the compared checkpointers and the negative control whose framework is installed (the
#: framework-free ones everywhere; the torch baselines where torch is)
ALL = [n for n in list(COMPARED) + ["naive"]
       if checkpointer_framework(n) is None or backends.installed(checkpointer_framework(n))]
TORCH = pytest.mark.framework("torch")
SMALL = {"faultlab": {"chunk_bytes": 4096, "pool_bytes": 16384},
         "faultlab+cow": {"chunk_bytes": 4096, "pool_bytes": 16384}}


def state_for(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((20, 7)).astype(np.float32),
            "opt/m": rng.standard_normal(33),
            "big_endian": rng.standard_normal(4).astype(">f8"),
            "flags": rng.random(5) > 0.5,
            "step": np.array(step, dtype=np.int64),
            "words": np.array(["ab", "cde"]),
            "empty": np.zeros((0, 3), dtype=np.int16),
            "u32": rng.integers(0, 2**32, 6, dtype=np.uint32)}


def open_(name, directory, **kw):
    return open_checkpointer(name, directory, **{**SMALL.get(name, {}), **kw})


@pytest.mark.parametrize("name", ALL)
def test_saves_round_trip_and_the_newest_is_recovered(tmp_path, name):
    ckpt = open_(name, tmp_path)
    for step in range(4):
        ckpt.save(step, state_for(step), {"step": step, "note": "x"})
    ckpt.wait_all()
    ckpt.close()
    step, state, meta = recover_checkpoint(name, tmp_path)
    assert (step, meta) == (3, {"step": 3, "note": "x"})
    assert_same_state(state, state_for(3))


@TORCH
@pytest.mark.parametrize("name", ["sync", "checkfreq", "dcp-async"])
def test_baselines_keep_the_newest_keep_checkpoints(tmp_path, name):
    ckpt = open_(name, tmp_path, keep=2)
    for step in range(5):
        ckpt.save(step, state_for(step)).wait()
    ckpt.close()
    kept = sorted(p.name for p in target_path(name, tmp_path).iterdir()
                  if p.name.startswith("step-"))
    assert len(kept) == 2 and kept[-1].startswith("step-000000000004")


@pytest.mark.parametrize("name", [n for n in COMPARED if n in ALL])
def test_handles_report_durability_and_in_flight_drains(tmp_path, name):
    ckpt = open_(name, tmp_path)
    done = []
    h = ckpt.save(7, state_for(7))
    h.add_done_callback(lambda hh: done.append(hh.step))
    h.wait()
    ckpt.wait_all()
    assert h.done() and h.error is None and done == [7]
    assert ckpt.in_flight == 0
    ckpt.close()
    ckpt.close()                                       # idempotent


@pytest.mark.parametrize("name", ALL)
def test_phase_hooks_fire_in_protocol_order(tmp_path, name):
    order = {"staging": 0, "writing": 1, "committing": 2}
    events, lock = [], threading.Lock()

    def hook(phase, point, step):
        with lock:
            events.append((phase, point))

    ckpt = open_(name, tmp_path, phase_hook=hook)
    ckpt.save(1, state_for(1)).wait()
    ckpt.wait_all()
    ckpt.close()
    phases = [order[p] for p, _ in events]
    assert phases == sorted(phases), events            # one save: never back to an earlier phase
    assert phases[0] == 0 and 1 in phases
    if name != "naive":
        assert 2 in phases                             # the naive control commits nothing


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(ALL),
       arrays=st.dictionaries(st.text("abcxyz/_", min_size=1, max_size=6),
                              hnp.arrays(st.sampled_from(["<f4", ">i4", "<f8", "|u1", "?",
                                                          "<c8", "<u2", "<U3"]),
                                         hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)),
                              max_size=4))
def test_any_array_state_round_trips_bit_exact(tmp_path_factory, name, arrays):
    directory = tmp_path_factory.mktemp(name)
    ckpt = open_(name, directory)
    ckpt.save(5, arrays, {"k": [1, 2]}).wait()
    ckpt.close()
    step, state, meta = recover_checkpoint(name, directory)
    assert step == 5 and meta == {"k": [1, 2]}
    assert_same_state(state, arrays)


def test_every_checkpointer_offers_the_same_interface(tmp_path):
    members = [m for m in dir(Checkpointer) if not m.startswith("_")]
    for name in ALL:
        ckpt = open_(name, tmp_path / name)
        for m in members:
            assert hasattr(ckpt, m), (name, m)
        assert ckpt.name == name
        ckpt.close()


# -- damaged, truncated and foreign checkpoints ------------------------------------------------

def corrupt(path, at: int = 200):
    data = bytearray(path.read_bytes())
    data[min(at, len(data) - 1)] ^= 0xFF
    path.write_bytes(bytes(data))


@TORCH
@pytest.mark.parametrize("name", ["sync", "checkfreq"])
def test_a_damaged_newest_file_falls_back_to_the_one_before(tmp_path, name):
    ckpt = open_(name, tmp_path, keep=2)
    for step in (1, 2):
        ckpt.save(step, state_for(step)).wait()
    ckpt.close()
    newest = target_path(name, tmp_path) / "step-000000000002.pt"
    newest.write_bytes(newest.read_bytes()[:len(newest.read_bytes()) // 2])     # torn write
    step, state, _ = recover_checkpoint(name, tmp_path)
    assert step == 1
    assert_same_state(state, state_for(1))
    older = target_path(name, tmp_path) / "step-000000000001.pt"
    older.write_bytes(b"PK\x03\x04" + os.urandom(300))
    with pytest.raises(CheckpointError) as e:
        recover_checkpoint(name, tmp_path)
    assert "\n" not in str(e.value) and "no valid checkpoint" in str(e.value)


@TORCH
def test_a_dcp_checkpoint_without_its_metadata_is_not_committed(tmp_path):
    ckpt = open_("dcp-async", tmp_path, keep=3)
    for step in (1, 2):
        ckpt.save(step, state_for(step)).wait()
    ckpt.close()
    (target_path("dcp-async", tmp_path) / "step-000000000002.dcp" / ".metadata").unlink()
    assert recover_checkpoint("dcp-async", tmp_path).step == 1
    data = target_path("dcp-async", tmp_path) / "step-000000000001.dcp" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        recover_checkpoint("dcp-async", tmp_path)
    assert "\n" not in str(e.value)


@TORCH
@pytest.mark.parametrize("name", ["sync", "checkfreq"])
def test_a_foreign_file_is_refused_not_loaded(tmp_path, name):
    import torch
    d = target_path(name, tmp_path)
    d.mkdir(parents=True)
    torch.save({"weights": torch.ones(3)}, d / "step-000000000009.pt")
    with pytest.raises(CheckpointError) as e:
        recover_checkpoint(name, tmp_path)
    assert "not a faultlab baseline checkpoint" in str(e.value) and "\n" not in str(e.value)


@TORCH
def test_a_pickle_in_a_torch_file_is_never_executed(tmp_path):
    import torch
    d = target_path("sync", tmp_path)
    d.mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"info": Evil()}, d / "step-000000000001.pt")
    with pytest.raises(CheckpointError):
        recover_checkpoint("sync", tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_nothing_to_recover_is_a_one_line_error_for_every_engine(tmp_path):
    for name in ALL:
        with pytest.raises(CheckpointError) as e:
            recover_checkpoint(name, tmp_path / name)
        assert "\n" not in str(e.value)


# -- I/O errors -----------------------------------------------------------------------------

@TORCH
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_a_sync_save_that_hits_an_io_error_fails_clearly_and_keeps_earlier_ones(
        tmp_path, monkeypatch, err):
    ckpt = open_("sync", tmp_path)
    ckpt.save(1, state_for(1)).wait()
    real = os.fsync

    def failing(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(CheckpointError) as e:
        ckpt.save(2, state_for(2))
    monkeypatch.setattr(os, "fsync", real)
    msg = str(e.value)
    assert "\n" not in msg and ("no space" in msg or "I/O error" in msg)
    assert not [p for p in target_path("sync", tmp_path).iterdir() if ".tmp" in p.name]
    step, state, _ = recover_checkpoint("sync", tmp_path)
    assert step == 1
    assert_same_state(state, state_for(1))


@TORCH
def test_a_checkfreq_persist_that_fails_stops_the_checkpointer(tmp_path, monkeypatch):
    ckpt = open_("checkfreq", tmp_path)
    ckpt.save(1, state_for(1)).wait()

    def failing(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing)
    h = ckpt.save(2, state_for(2))
    with pytest.raises(CheckpointError, match="I/O error"):
        h.wait()
    with pytest.raises(CheckpointError, match="stopped after an earlier error"):
        ckpt.save(3, state_for(3))
    monkeypatch.undo()
    assert recover_checkpoint("checkfreq", tmp_path).step == 1


# -- the registry ------------------------------------------------------------------------------

@TORCH
def test_unknown_engines_are_one_line_errors_and_tensorflow_ones_are_registered(tmp_path):
    with pytest.raises(FaultlabError, match="unknown checkpoint engine 'nope'"):
        open_checkpointer("nope", tmp_path)
    assert set(checkpointer_names()) >= {"tf-sync", "tf-async"}
    with pytest.raises(FaultlabError, match="bad settings for engine sync"):
        open_checkpointer("sync", tmp_path, writers=3)


def test_the_engine_refuses_a_second_writer_through_the_interface(tmp_path):
    first = open_("faultlab", tmp_path)
    first.save(0, state_for(0)).wait()
    with pytest.raises(CheckpointError, match="already open for writing"):
        open_("faultlab", tmp_path)
    first.close()
