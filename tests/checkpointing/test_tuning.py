"""`auto` settings come from a short probe of the storage and give a working engine."""

from __future__ import annotations

from ckpt_helpers import assert_same_state, random_state

from faultlab.checkpointing import CheckpointEngine, SimDisk, recover, tuning


def test_auto_probes_a_real_directory_and_the_engine_works(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "_PROBE_BYTES", 1 << 20)          # keep the test light
    monkeypatch.setattr(tuning, "_cache", {})
    with CheckpointEngine(tmp_path / "c", chunk_bytes="auto", pool_bytes="auto",
                          writers="auto") as eng:
        s = eng.settings
        assert s.chunk_bytes in (4 << 20, 8 << 20, 16 << 20) and s.writers in (1, 2, 4)
        assert s.pool_bytes >= 2 * s.chunk_bytes
        eng.save(1, random_state(1)).wait()
    assert_same_state(recover(tmp_path / "c").state, random_state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]     # probe files cleaned up
    assert str(tmp_path.resolve()) in tuning._cache


def test_auto_on_a_simulated_disk_uses_the_defaults():
    with CheckpointEngine(SimDisk(), chunk_bytes="auto", writers="auto") as eng:
        assert eng.settings.chunk_bytes == tuning.DEFAULT_CHUNK_BYTES
        assert eng.settings.writers == tuning.DEFAULT_WRITERS


def test_chunk_size_is_rounded_up_to_whole_blocks():
    with CheckpointEngine(SimDisk(), chunk_bytes=5000, block_size=4096) as eng:
        assert eng.settings.chunk_bytes == 8192
