"""Power-loss campaigns: the engine on a SimDisk in this process; at chosen crash points every
power-loss image drawn there is recovered and classified, and some are resumed to the end."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from faultlab.checkpointing.engine import CheckpointEngine
from faultlab.checkpointing.format import FormatError, decode_header, decode_record
from faultlab.checkpointing.recovery import recover
from faultlab.checkpointing.simdisk import CrashChoice, SimDisk
from faultlab.crash.kill import EngineReport
from faultlab.crash.loops import factory_name, final_state, load_factory, loop_maker
from faultlab.crash.verdicts import CrashVerdict, Reference, classify, fingerprint, same_state
from faultlab.errors import CheckpointError

#: the checkpointers a power-loss campaign models (the engine on one simulated file): name ->
#: whether it saves through the torch adapter's copy-on-write mode
POWER_LOSS_ENGINES = {"faultlab": False, "faultlab+cow": True}

#: engine settings of a power-loss campaign unless told otherwise
POWER_LOSS_SETTINGS = {"max_in_flight": 2, "keep": 2, "chunk_bytes": 2048, "pool_bytes": 8192,
                       "writers": 2}


def _commit_log(log) -> tuple[list[tuple[int, int, int, int | None]], Any]:
    """(counter, step, op index of its record write, op index of the sync after it) for every
    commit record written, read from a SimDisk operation log."""
    geom, out, unsynced = None, [], []
    for i, op in enumerate(log):
        if op[0] == "create":
            geom = decode_header(op[2])
        elif op[0] == "write" and geom is not None:
            offset, data = op[1], op[2]
            if geom.records_offset <= offset < geom.slots_offset:
                try:
                    rec = decode_record(data, geom, (offset - geom.records_offset)
                                        // geom.block_size)
                except FormatError:
                    continue
                unsynced.append((rec.counter, rec.step, i))
        elif op[0] == "sync":
            out.extend((c, s, w, i) for c, s, w in unsynced)
            unsynced = []
    out.extend((c, s, w, None) for c, s, w in unsynced)
    return out, geom


def power_loss_report(engine: str, factory: str | Callable, **kw) -> EngineReport:
    """power_loss_campaign for checkpointer `engine`, or an empty report noting that the
    engine is not modeled (SimDisk simulates one file, not a file system)."""
    if engine not in POWER_LOSS_ENGINES:
        return EngineReport(engine, mode="power-loss",
                            note="not modeled (SimDisk simulates one file, not a file system)")
    return power_loss_campaign(factory, cow=POWER_LOSS_ENGINES[engine], **kw)


def power_loss_campaign(factory: str | Callable, *, steps: int = 12, every: int = 1,
                        settings: Mapping | None = None, points: int | None = 60,
                        images_per_point: int = 12, resumes: int = 8, seed: int = 0,
                        block_size: int = 512, progress: Callable[[], None] | None = None,
                        cow: bool = False) -> EngineReport:
    """Run the loop with the engine on a SimDisk, then check power-loss images at `points`
    crash points (None: every operation) and resume `resumes` of them to the end. cow: save
    through the torch adapter's copy-on-write mode (engine "faultlab+cow")."""
    t0 = time.perf_counter()
    make = loop_maker(load_factory(factory_name(factory)) if isinstance(factory, str)
                      else factory, steps)
    settings = dict(POWER_LOSS_SETTINGS if settings is None else settings)
    rep = EngineReport("faultlab+cow" if cow else "faultlab", mode="power-loss")
    disk = SimDisk(block_size=block_size, sector_size=min(512, block_size))
    loop = make()
    ref_steps: dict[int, dict[str, str]] = {}
    trained_at_op: list[tuple[int, int]] = []          # (ops logged so far, steps trained)
    with CheckpointEngine(disk, block_size=block_size, **settings) as eng:
        for k in range(steps):
            loop.step(k)
            trained_at_op.append((len(disk.log), k + 1))
            if (k + 1) % every == 0 or k + 1 == steps:
                state, meta = loop.capture(k + 1)
                ref_steps[k + 1] = fingerprint(state, meta)
                if cow:
                    loop.adapter.cow_min_bytes, loop.adapter.cow_policy = 1, "redirect"
                    loop.adapter.save(eng, k + 1, data_position=k + 1, cow=True)
                else:
                    eng.save(k + 1, state, meta)
    end_state, end_meta = final_state(loop, steps)
    final = {k: np.array(v) for k, v in end_state.items()}
    final_fp = fingerprint(end_state, end_meta)
    ref = Reference(ref_steps)
    timeline, _ = _commit_log(disk.log)
    rng = random.Random(seed)
    total = len(disk.log) + 1
    chosen = set(range(total) if points is None or points >= total else
                 rng.sample(range(total), points))
    candidates = []
    for k, state in disk.crash_states():
        if k not in chosen:
            continue
        rep.crash_points += 1
        durable = [s for c, s, _, sy in timeline if sy is not None and sy < k]
        newest = max(durable, default=None)
        trained = max((t for n, t in trained_at_op if n <= k), default=0)
        images = [img for _, img in state.enumerate_images(images_per_point, seed=k)]
        if state.exists():
            images.insert(0, state.crash_image(choice=CrashChoice((0,) * len(state.pending()))))
        for image in images:
            rep.images += 1
            try:
                got = recover(image)
                recovered = (got.step, got.state, got.meta)
            except CheckpointError as e:
                recovered = e
            verdict, detail = classify(recovered, ref, newest)
            rep.verdicts[verdict.value] += 1
            rec_step = None if isinstance(recovered, BaseException) else recovered[0]
            rep.steps_lost.append(trained - (rec_step or 0))
            if verdict.ok:
                rep.recoveries += 1
                if verdict is CrashVerdict.EXACT:
                    candidates.append((k, recovered))
            else:
                rep.problems.append(f"crash point {k}: {verdict.value}: {detail}")
        if progress:
            progress()
    # Resume some recovered images to the end; the final state must equal the reference's.
    by_step: dict[int, tuple] = {}
    for k, rec in candidates:
        by_step.setdefault(rec[0], rec)
    picks = list(by_step.values())
    rng.shuffle(picks)
    for step, state, meta in picks[:resumes]:
        fresh = make()
        fresh.restore(state, meta)
        for k in range(step, steps):
            fresh.step(k)
        s2, m2 = final_state(fresh, steps)
        rep.resumes += 1
        if fingerprint(s2, m2) == final_fp and not same_state(s2, final):
            rep.resumes_identical += 1
        else:
            rep.problems.append(f"resume from step {step}: final state differs")
    rep.runs = rep.runs_identical = 0
    rep.wall_s = time.perf_counter() - t0
    return rep
