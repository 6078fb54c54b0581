"""Power-loss torture with a disk model and an oracle of its own (power_harness.py): every
unsynced write at a random cut dropped, kept or torn at sector granularity, survivors in
random order; recovery through the public API must return a saved state, exactly, never
older than the newest save whose wait() had returned. Quick variant by default; the long
one is marked slow (FAULTLAB_TORTURE_IMAGES, default 1000; FAULTLAB_TORTURE_SEED;
FAULTLAB_TORTURE_REPORT collects the JSON summaries)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import power_harness  # noqa: E402
from torture_states import Tally, report  # noqa: E402


def _bad(out: dict) -> dict:
    return {k: out[k] for k in Tally.BAD if out[k]}


def test_power_cut_drops_keeps_and_tears_whole_sectors():
    durable = bytearray(8192)
    pending = [(512, b"\x01" * 2048), (4096, b"\x02" * 1536), (0, b"\x03" * 100)]
    seen = set()
    for seed in range(200):
        counts = power_harness.Counts()
        img = power_harness.power_cut(durable, pending, random.Random(seed), counts)
        assert counts.unsynced == 3 == counts.dropped + counts.kept + counts.torn
        # every sector holds the durable version or one of the writes to it, whole
        for lo in range(0, 8192, 512):
            sector = img[lo:lo + 512]
            versions = {bytes(512)}
            for off, b in pending:
                if off <= lo < off + len(b):
                    v = bytearray(bytes(512))
                    v[:min(512, off + len(b) - lo)] = b[lo - off:lo - off + 512]
                    versions.add(bytes(v))
            assert sector in versions or (lo == 0 and sector[100:] == bytes(412))
        seen.add((counts.dropped > 0, counts.kept > 0, counts.torn > 0))
    assert (True, True, True) in seen or len(seen) >= 3


def test_power_torture_quick(record_property):
    out = power_harness.run_images(200, seed=5)
    report("power_quick", out)
    record_property("power_torture", out["summary"])
    assert out["images"] == 200
    assert not _bad(out), "\n".join(out["failures"])
    assert out["recovered"] >= 100
    assert out["dropped"] and out["torn_writes"] and out["kept"]


@pytest.mark.slow
def test_power_torture_long(record_property):
    images = int(os.environ.get("FAULTLAB_TORTURE_IMAGES", "1000"))
    seed = int(os.environ.get("FAULTLAB_TORTURE_SEED", "1"))
    out = power_harness.run_images(images, seed=seed, progress=max(100, images // 10))
    report("power_long", out)
    record_property("power_torture", out["summary"])
    assert out["images"] == images
    assert not _bad(out), "\n".join(out["failures"])


def test_the_oracle_catches_a_disk_that_skips_syncs():
    # every other sync does nothing: commits reported durable are not, a power loss loses them
    out = power_harness.run_images(60, seed=3, lazy_sync=True)
    print(f"lazy sync: {out['summary']}")
    assert out["lost"] > 0, out["summary"]
