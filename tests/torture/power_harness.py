"""Power-loss torture of the checkpoint engine with a disk model and an oracle of its own
(not faultlab's SimDisk or crash tooling).

    python tests/torture/power_harness.py --images 1000 --seed 1 [--report F.json]

The engine writes through `RecordingStorage`, a `faultlab.checkpointing.Storage` of this
file's own: every pwrite is logged with its bytes, every sync_data / sync_all is logged, and
each save's begin and the moment its wait() returned (its done-callback) are logged in the
same order. A power-loss image at cut point k (a random place in that log) is: the content
every write before the last sync before k left (durable), plus each write since that sync
(unsynced) independently dropped, kept, or torn -- a random non-empty proper subset of its
512-byte sectors -- with the survivors applied in random order (so a sector may end up with
any version written since the sync, as a drive's volatile cache and writeback allow). The
image is served read-only by `ImageStorage` to the engine's public `recover()`,
`list_commits()` and `load_step()`, and judged by torture_states.judge: LOST if older than the
newest step whose wait() had returned before the cut (or recovery failed although one had),
TORN / MIXED / WRONG unless exactly make_state of its step, NEVER-SAVED, RETENTION.

A session is a run of rounds on one file with random engine settings (1-4 in flight, keep
1-4, chunks 4 KiB-8 MiB, 1-4 writers, pool, borrowed saves, block size 512-4096): each round
saves a few states, images are drawn from its log, and the next round reopens the engine on
one of those images (a restart after the power loss) and goes on from its recovered step.

Prints: images=N recovered=... lost=0 torn=0 ... unsynced_writes=W dropped=D torn_writes=T
kept=K
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from torture_states import Tally, judge, make_state, slot_bytes  # noqa: E402

from faultlab.checkpointing import (CheckpointEngine, Storage, list_commits,  # noqa: E402
                                    load_step, recover)
from faultlab.errors import CheckpointError  # noqa: E402

SECTOR = 512
KiB, MiB = 1024, 1024 * 1024


class RecordingStorage(Storage):
    """An in-memory file that logs every operation: ("create", size, header),
    ("w", offset, bytes), ("sync",), plus the harness's ("begin", step) and
    ("durable", step). `base` is the durable content it starts from (None: no file)."""

    def __init__(self, name: str, base: bytes | None, *, lazy_sync: bool = False):
        self.name = name
        self._data = bytearray(base) if base is not None else None
        self.ops: list = []
        self.lock = threading.Lock()
        self._writer = False
        self._lazy = lazy_sync             # self-test: every other sync does nothing
        self._syncs = 0

    def event(self, *op) -> None:
        with self.lock:
            self.ops.append(op)

    def exists(self) -> bool:
        return self._data is not None

    def create(self, size: int, header: bytes) -> None:
        with self.lock:
            if self._data is not None:
                raise CheckpointError(f"checkpoint {self.name} already exists")
            self._data = bytearray(size)
            self._data[:len(header)] = header
            self.ops.append(("create", size, bytes(header)))
            self._writer = True

    def open(self, *, write: bool) -> None:
        if self._data is None:
            raise CheckpointError(f"no checkpoint file at {self.name}")
        if write:
            self._writer = True

    def pwrite(self, offset: int, data) -> None:
        b = bytes(memoryview(data).cast("B"))
        with self.lock:
            if self._data is None or not self._writer:
                raise CheckpointError(f"checkpoint {self.name} is not open for writing")
            if offset < 0 or offset + len(b) > len(self._data):
                raise CheckpointError(f"write beyond the end of {self.name}")
            self._data[offset:offset + len(b)] = b
            self.ops.append(("w", offset, b))

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        with self.lock:
            chunk = self._data[offset:offset + len(view)]
        view[:len(chunk)] = chunk
        return len(chunk)

    def reader(self) -> Storage:
        with self.lock:
            return ImageStorage(bytes(self._data) if self._data is not None else None,
                                self.name)

    def sync_data(self) -> None:
        with self.lock:
            self._syncs += 1
            if not (self._lazy and self._syncs % 2 == 0):
                self.ops.append(("sync",))

    def sync_all(self) -> None:
        self.sync_data()

    def size(self) -> int:
        return len(self._data) if self._data is not None else 0

    def close(self) -> None:
        self._writer = False


class ImageStorage(Storage):
    """A power-loss image, read-only (what recovery sees after the cut)."""

    def __init__(self, image: bytes | None, name: str = "image"):
        self._image = image
        self.name = name

    def exists(self) -> bool:
        return self._image is not None

    def create(self, size: int, header: bytes) -> None:
        raise CheckpointError("a power-loss image is read-only")

    def open(self, *, write: bool) -> None:
        if self._image is None:
            raise CheckpointError(f"no checkpoint file at {self.name}")
        if write:
            raise CheckpointError("a power-loss image is read-only")

    def pwrite(self, offset: int, data) -> None:
        raise CheckpointError("a power-loss image is read-only")

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        chunk = self._image[offset:offset + len(view)]
        view[:len(chunk)] = chunk
        return len(chunk)

    def reader(self) -> Storage:
        return ImageStorage(self._image, self.name)

    def sync_data(self) -> None:
        pass

    def sync_all(self) -> None:
        pass

    def size(self) -> int:
        return len(self._image) if self._image is not None else 0

    def close(self) -> None:
        pass


class Counts:
    def __init__(self):
        self.unsynced = self.dropped = self.torn = self.kept = 0


def power_cut(durable: bytearray | None, pending: list, rng: random.Random,
              counts: Counts) -> bytes | None:
    """The image a power loss leaves: durable content plus each unsynced write dropped,
    kept or torn (a random non-empty proper subset of its sectors), survivors in random
    order."""
    if durable is None:
        return None
    img = bytearray(durable)
    mode = rng.random()
    if mode < 0.1:
        p_drop, p_keep = 1.0, 0.0           # nothing unsynced survives
    elif mode < 0.2:
        p_drop, p_keep = 0.0, 1.0           # everything survives (the writer's view, maybe
    else:                                   # reordered)
        p_drop = rng.random()
        p_keep = (1 - p_drop) * rng.random()
    pieces = []
    for off, b in pending:
        counts.unsynced += 1
        bounds = list(range(off - off % SECTOR + SECTOR, off + len(b), SECTOR))
        sectors = list(zip([off] + bounds, bounds + [off + len(b)]))
        r = rng.random()
        if r < p_drop:
            counts.dropped += 1
        elif r < p_drop + p_keep or len(sectors) < 2:
            counts.kept += 1
            pieces.append((off, b))
        else:
            counts.torn += 1
            n = rng.randint(1, len(sectors) - 1)
            if rng.random() < 0.5:          # a prefix (a write cut short), else any subset
                chosen = sectors[:n]
            else:
                chosen = rng.sample(sectors, n)
            for lo, hi in chosen:
                pieces.append((lo, b[lo - off:hi - off]))
    rng.shuffle(pieces)
    for off, b in pieces:
        img[off:off + len(b)] = b
    return bytes(img)


def draw_settings(rng: random.Random, max_bytes: int) -> dict:
    # 4 KiB .. 8 MiB, log-uniform; half the files below 64 KiB, so that saves of these
    # small states take many writes
    chunk = int(2 ** (rng.uniform(12, 16) if rng.random() < 0.5 else rng.uniform(12, 23)))
    block = rng.choice((512, 1024, 4096, 4096))
    cfg = {"max_in_flight": rng.randint(1, 4), "keep": rng.randint(1, 4),
           "chunk_bytes": chunk, "writers": rng.randint(1, 4),
           "pool_bytes": chunk * rng.choice((1, 2, 3, 8, 64)), "block_size": block,
           "borrow_p": rng.choice((0.0, 0.5, 1.0)), "wait_p": rng.choice((0.0, 0.3, 0.7)),
           "max_bytes": max_bytes}
    cfg["slot_bytes"] = slot_bytes(max_bytes, chunk, block)
    return cfg


def draw_cuts(ops: list, n: int, rng: random.Random) -> list:
    """Cut points: a third uniform over the log, the rest where several writes are unsynced
    (right after a sync nothing is at stake)."""
    busy, pending = [], 0
    for i, op in enumerate(ops):
        if op[0] == "w":
            pending += 1
        elif op[0] in ("sync", "create"):
            pending = 0
        if pending >= 2:
            busy.append(i + 1)               # a cut after op i
    return [rng.choice(busy) if busy and rng.random() < 0.67 else rng.randint(0, len(ops))
            for _ in range(n)]


def run_round(storage: RecordingStorage, cfg: dict, salt: int, start: int, saves: int,
              rng: random.Random) -> None:
    """Save `saves` states through the engine, logging begins and durable callbacks."""
    engine = CheckpointEngine(storage, max_in_flight=cfg["max_in_flight"], keep=cfg["keep"],
                              chunk_bytes=cfg["chunk_bytes"], pool_bytes=cfg["pool_bytes"],
                              writers=cfg["writers"], slot_bytes=cfg["slot_bytes"],
                              block_size=cfg["block_size"])
    failures = []

    def on_done(handle):
        try:
            handle.wait()
        except CheckpointError as e:
            failures.append(f"step {handle.step}: {e}")
            return
        storage.event("durable", handle.step)

    try:
        for step in range(start, start + saves):
            state, meta = make_state(salt, step, cfg["max_bytes"])
            storage.event("begin", step)
            h = engine.save(step, state, meta, borrowed=rng.random() < cfg["borrow_p"])
            h.add_done_callback(on_done)
            if rng.random() < cfg["wait_p"]:
                h.join()
    finally:
        engine.close()
    if failures:
        raise AssertionError(f"a save failed on a healthy disk: {failures[0]}")


def run_images(images: int, seed: int, *, max_bytes: int = 1 * MiB,
               images_per_round: tuple = (4, 16), saves_per_round: tuple = (2, 10),
               rounds: tuple = (1, 4), lazy_sync: bool = False, progress=None) -> dict:
    """Draw `images` power-loss images; return a summary dict."""
    rng = random.Random(seed)
    tally, counts = Tally(), Counts()
    t0 = time.perf_counter()
    sessions = done = 0
    while done < images:
        sessions += 1
        cfg = draw_settings(rng, max_bytes)
        salt = rng.getrandbits(31)
        base, begun, floor_steps, next_step = None, set(), [], 0
        for rnd in range(rng.randint(*rounds)):
            if done >= images:
                break
            storage = RecordingStorage(f"session{sessions}.ckpt", base, lazy_sync=lazy_sync)
            run_round(storage, cfg, salt, next_step, rng.randint(*saves_per_round), rng)
            ops = storage.ops
            n_img = min(images - done, rng.randint(*images_per_round))
            cuts = sorted(draw_cuts(ops, n_img, rng))
            durable = bytearray(base) if base is not None else None
            pending, seen_begun, seen_durable = [], set(begun), list(floor_steps)
            i = 0
            last = None
            for cut in cuts:
                while i < cut:
                    op = ops[i]
                    i += 1
                    if op[0] == "create":
                        durable = bytearray(op[1])
                        durable[:len(op[2])] = op[2]
                        pending = []
                    elif op[0] == "w":
                        pending.append((op[1], op[2]))
                    elif op[0] == "sync":
                        for off, b in pending:
                            durable[off:off + len(b)] = b
                        pending = []
                    elif op[0] == "begin":
                        seen_begun.add(op[1])
                    elif op[0] == "durable":
                        seen_durable.append(op[1])
                image = power_cut(durable, pending, rng, counts)
                done += 1
                context = (f"seed={seed} image={done} session={sessions} round={rnd} "
                           f"cut={cut}/{len(ops)} settings={json.dumps(cfg, sort_keys=True)} "
                           f"salt={salt}")
                img = ImageStorage(image, f"image{done}")
                step = judge(tally, salt=salt, max_bytes=max_bytes, keep=cfg["keep"],
                             begun=seen_begun, durable=seen_durable,
                             recover_fn=lambda: recover(img), list_fn=lambda: list_commits(img),
                             load_fn=lambda s: load_step(img, s), context=context)
                last = (image, step, set(seen_begun))
                if progress and done % progress == 0:
                    print(f"... {summary_line(tally, counts, time.perf_counter() - t0)}",
                          flush=True)
            if last is None:
                break
            # restart after the last power loss: reopen its image and go on from what it holds
            base, step, begun = last
            if tally.bad():
                break
            floor_steps = [step] if step is not None else []
            next_step = step + 1 if step is not None else (max(begun) + 1 if begun else 0)
    wall = time.perf_counter() - t0
    return {"kind": "power", "seed": seed, "images": done, "sessions": sessions,
            "wall_s": round(wall, 1), "lazy_sync": lazy_sync, **tally.counts(),
            "findings": tally.findings, "unsynced_writes": counts.unsynced,
            "dropped": counts.dropped, "torn_writes": counts.torn, "kept": counts.kept,
            "failures": tally.failures, "summary": summary_line(tally, counts, wall)}


def summary_line(tally: Tally, counts: Counts, wall: float) -> str:
    c = tally.counts()
    return (f"images={c['crashes']} recovered={c['recovered']} empty={c['empty']} "
            f"lost={c['lost']} torn={c['torn']} mixed={c['mixed']} wrong={c['wrong']} "
            f"never_saved={c['never_saved']} retention={c['retention']} errors={c['errors']} "
            f"unsynced_writes={counts.unsynced} dropped={counts.dropped} "
            f"torn_writes={counts.torn} kept={counts.kept} wall={wall:.0f}s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-kib", type=int, default=1024, help="largest state (KiB)")
    ap.add_argument("--lazy-sync", action="store_true",
                    help="self-test: a disk that ignores every other sync (must be caught)")
    ap.add_argument("--report", help="write the JSON summary here")
    ap.add_argument("--progress", type=int, default=100, help="print counts every N images")
    args = ap.parse_args(argv)
    out = run_images(args.images, args.seed, max_bytes=args.max_kib * KiB,
                     lazy_sync=args.lazy_sync, progress=args.progress)
    for f in out["failures"][:20]:
        print(f)
    print(out["summary"])
    if args.report:
        Path(args.report).write_text(json.dumps(out, indent=1))
    bad = sum(out[k] for k in Tally.BAD)
    return 1 if bad and not args.lazy_sync else 0


if __name__ == "__main__":
    sys.exit(main())
