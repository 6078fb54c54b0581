"""Rank-kill torture of the multi-process runtime (issue 13): SIGKILL ranks of a real 4-rank,
2-node data-parallel job from OUTSIDE at random instants, wipe memory domains with them, and
check that the job still ends bit-identical to the uninterrupted one.

    python tests/torture/rank_torture.py --kills 1000 --report /tmp/rank_torture.json
    python tests/torture/rank_torture.py --kills 25 --seed 7 --per-job 25   # one job, seed 7

One job = ``mlp`` on 4 ranks, 2 nodes (width 32, per_replica_batch 16), a snapshot into peer
memory every step, the engine's file every 5 steps, 1 copy per snapshot, max_restarts =
2 * kills + 10 (a stall, below, uses a restart too). A killer thread in THIS process (never in the ranks) loops:

1. wait until all four pid files (run_dir/pids/rank{r}: "<pid> <attempt>") name the same
   attempt, newer than the one it last killed (the restarted ranks have joined);
2. with probability 1/4 ("early") sleep a random delay of 0-0.3 s (seeded RNG): the kill
   lands in the attempt's start (process-group setup, recovery agreement, fetches from memory
   or the file, the first steps); otherwise wait until the timeline shows a step of this
   attempt, then sleep 0-0.5 s (a step is ~15 ms: any phase of training, staging into
   memory, replication to the peer, the engine's persistence every 5 steps);
3. note the bounds the recovery must respect (below), then one of
   a. ``rank``  (50%): SIGKILL one random rank; its memory domain survives;
   b. ``pair``  (25%): SIGKILL a rank r and its copy holder placement.peers(r, 4, 2, 1)[0] at
      once and rmtree both memory domains (shm_root/node{n}/node{r}): r's and its holder's
      snapshots are gone from every memory, so the state must come from the engine's file
      (or from scratch before its first commit);
   c. ``node``  (25%): SIGKILL both ranks of a random node and rmtree shm_root/node{n}: their
      state must come from the copies on the other node (or the file).
   Only pids of the newest attempt are signalled, and a kill counts only if every pid it
   targeted was alive (in /proc, not a zombie) when signalled.
After N kills the killer stops and the job runs to its end.

Checks per job (each counter must be 0; a job with any is a failure and keeps its run
directory and seed for reproduction):

* ``failed``: the job did not end ok (rec.ok false, or no final.json);
* ``digest``: a rank's final state digest differs from the uninterrupted reference job's;
* ``loss``: for some step the LAST timeline record (the run that survived) has a loss or
  accuracy not bit-equal to the reference's, or a step is missing;
* ``torn``: a rank's log holds a verification error (SnapshotError, CheckpointError,
  FormatError, "checksum"): a recovery loaded a state that failed verification;
* ``mixed``: final.json's per-rank ``checksum`` (or ``digest``) fields are not all equal
  (under DDP every rank holds the same parameters and optimizer state);
* ``lost_committed``: a recovery went to a step older than a bound known before one of the
  kills preceding it: (i) the newest step committed on disk for ALL ranks
  (intersection of list_commits(run_dir/engine/rank{r}/<target>) over r, read just before
  the kill; engine files are never wiped, so this holds for every later recovery), and (ii)
  for a single-rank kill (nothing wiped), the newest step complete in memory = min over
  ranks of the newest own snapshot in the rank's own domain (ranks are at most one step
  apart and keep 2 snapshots, so that step is held by every owner; checked against the
  first recovery after the kill when no other kill came between). A ``scratch`` recovery after a disk commit counts here too;
* ``future``: a recovery step newer than any step the timeline shows completed by an earlier
  attempt (it would have loaded a state that was never complete).

Counted: kills by kind, kills that found a target already dead (``missed``, not counted as
kills), recoveries by source (memory / disk / scratch), attempts, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORLD, NODES, RPN, COPIES = 4, 2, 2, 1
PERSIST_EVERY = 5
KINDS = ("rank", "pair", "node")
BAD = ("failed", "digest", "loss", "torn", "mixed", "lost_committed", "future")
_VERIFY = re.compile(r"SnapshotError|CheckpointError|FormatError|checksum mismatch|"
                     r"does not verify|failed verification")


def make_config(steps: int):
    from faultlab.workloads.base import default_config
    epochs = max(1, -(-steps // 20))
    return default_config("mlp", processes=WORLD, nodes=NODES, epochs=epochs, width=32,
                          per_replica_batch=16, steps_per_epoch=20)


def make_job(cfg, run: Path, shm: Path, max_restarts: int):
    from faultlab.runner import ranks
    return ranks.RankJob(cfg, str(run), str(shm), (), (), snapshot_every=1,
                         persist_every=PERSIST_EVERY, copies=COPIES, max_restarts=max_restarts)


_REFS: dict = {}


def reference(cfg) -> dict:
    """The uninterrupted job of `cfg`: per-step loss/acc and the final digests (cached)."""
    key = cfg.total_steps
    if key not in _REFS:
        from faultlab.runner import ranks
        errors = []
        for _ in range(4):      # a start-up stall (docs/hardening.md) fails a 0-restart job
            run, shm = ranks._scratch("rank-ref")
            try:
                rec = ranks.run_job(make_job(cfg, run, shm, 0))
            finally:
                shutil.rmtree(run, ignore_errors=True)
                shutil.rmtree(shm, ignore_errors=True)
            if rec.ok and rec.final is not None:
                _REFS[key] = {"loss": dict(rec.loss), "acc": dict(rec.acc),
                              "digests": [r["digest"] for r in rec.final["ranks"]],
                              "wall_s": rec.wall_s, "failed_tries": errors}
                break
            errors.append(rec.error)
            if "DistStoreError" not in str(rec.error):
                break
        if key not in _REFS:
            raise RuntimeError(f"the reference job failed: {errors}")
    return _REFS[key]


# --- the killer --------------------------------------------------------------------------------

def _pids(run: Path) -> dict[int, tuple[int, int]]:
    out = {}
    for r in range(WORLD):
        try:
            pid, att = (run / "pids" / f"rank{r}").read_text().split()
            out[r] = (int(pid), int(att))
        except (FileNotFoundError, ValueError):
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _disk_common(run: Path) -> int | None:
    """The newest step committed in every rank's engine file (None: none)."""
    from faultlab.checkpointing.api import target_path
    from faultlab.checkpointing.recovery import list_commits
    common = None
    for r in range(WORLD):
        target = target_path("faultlab", run / "engine" / f"rank{r}")
        try:
            steps = {c.step for c in list_commits(target)} if target.exists() else set()
        except Exception:
            steps = set()
        common = steps if common is None else common & steps
    return max(common) if common else None


_SNAP = re.compile(r"owner(\d+)-step(\d+)\.snap$")


def _memory_complete(shm: Path) -> int | None:
    """min over ranks of the newest own snapshot in the rank's own domain (None: a rank has
    none)."""
    newest = []
    for r in range(WORLD):
        d = shm / f"node{r // RPN}" / f"node{r}"
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return None
        steps = [int(m.group(2)) for n in names if (m := _SNAP.match(n)) and int(m.group(1)) == r]
        if not steps:
            return None
        newest.append(max(steps))
    return min(newest)


class Killer(threading.Thread):
    def __init__(self, run: Path, shm: Path, kills: int, rng: random.Random,
                 done: threading.Event, early_p: float = 0.25):
        super().__init__(daemon=True, name="rank-killer")
        self.early_p = early_p
        self.run_dir, self.shm, self.target, self.rng, self.done = run, shm, kills, rng, done
        self.log: list[dict] = []          # one record per kill counted
        self.missed = 0
        self.error: str | None = None

    def _wait_attempt(self, after: int) -> tuple[int, dict] | None:
        while not self.done.is_set():
            p = _pids(self.run_dir)
            if len(p) == WORLD:
                atts = {a for _, a in p.values()}
                if len(atts) == 1 and (a := atts.pop()) > after:
                    return a, p
            time.sleep(0.005)   # polls files another process writes; no event to wait on
        return None

    def _wait_training(self, attempt: int) -> bool:
        """Until the timeline shows a step of `attempt` (or a newer attempt began)."""
        tl = self.run_dir / "timeline.jsonl"
        pos = 0
        while not self.done.is_set():
            try:
                with open(tl, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            cut = data.rfind(b"\n") + 1
            for ln in data[:cut].splitlines():
                try:
                    if json.loads(ln)["attempt"] >= attempt:
                        return True
                except (ValueError, KeyError):
                    pass
            pos += cut
            if any(a != attempt for _, a in _pids(self.run_dir).values()):
                return True
            time.sleep(0.005)   # polls files another process writes; no event to wait on
        return False

    def run(self) -> None:
        try:
            self._run()
        except BaseException:
            self.error = traceback.format_exc()

    def _run(self) -> None:
        from faultlab.distributed.placement import peers
        last = -1
        while len(self.log) < self.target and not self.done.is_set():
            got = self._wait_attempt(last)
            if got is None:
                return
            attempt, pids = got
            r = self.rng
            early = r.random() < self.early_p
            delay = r.uniform(0, 0.3) if early else r.uniform(0, 0.5)
            kind = r.choices(KINDS, weights=(2, 1, 1))[0]
            if kind == "rank":
                victims = [r.randrange(WORLD)]
            elif kind == "pair":
                a = r.randrange(WORLD)
                victims = [a, peers(a, WORLD, RPN, COPIES)[0]]
            else:
                n = r.randrange(NODES)
                victims = list(range(n * RPN, (n + 1) * RPN))
            if not early and not self._wait_training(attempt):
                return
            if self.done.wait(delay):
                return
            now = _pids(self.run_dir)
            if any(now.get(v, (0, -1))[1] != attempt for v in range(WORLD)):
                last = attempt          # a newer attempt began meanwhile: wait for it
                continue
            disk = _disk_common(self.run_dir)
            mem = _memory_complete(self.shm) if kind == "rank" else None
            alive = [_alive(now[v][0]) for v in victims]
            for v in victims:
                try:
                    os.kill(now[v][0], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if kind == "pair":
                for v in victims:
                    shutil.rmtree(self.shm / f"node{v // RPN}" / f"node{v}", ignore_errors=True)
            elif kind == "node":
                shutil.rmtree(self.shm / f"node{victims[0] // RPN}", ignore_errors=True)
            last = attempt
            if all(alive):
                self.log.append({"attempt": attempt, "kind": kind, "ranks": victims,
                                 "delay": round(delay, 4), "disk": disk, "mem": mem,
                                 "time": time.time()})
            else:
                self.missed += 1


# --- one job -----------------------------------------------------------------------------------

def _verify_errors(run: Path) -> list[str]:
    out = []
    for f in (run / "logs").rglob("*"):
        if f.is_file() and f.suffix in (".log", ".json"):
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if _VERIFY.search(line):
                    out.append(f"{f.relative_to(run)}: {line.strip()[:200]}")
                    break
    return out


def _attempts(run: Path) -> int:
    """The attempts the agent started (stalled ones included)."""
    return len({p.name for p in (run / "logs").glob("*/attempt_*")})


def _stalls(run: Path) -> int:
    """Attempts in which some rank gave up waiting in the store (a rank of the attempt
    never joined: see docs/hardening.md, "Rank kills")."""
    out = set()
    for f in (run / "logs").rglob("error.json"):
        try:
            if "DistStoreError" in f.read_text(errors="replace"):
                out.add(f.parent.parent.name)
        except OSError:
            pass
    return len(out)


def judge_recoveries(events: list[dict], kill_log: list[dict],
                     timeline: list[dict]) -> tuple[dict, int, int, list[str]]:
    """Recoveries by source, and the lost-committed and future counts (module docstring)
    of the restart recoveries in `events` against the kills in `kill_log` (the Killer's
    records: attempt, kind, disk and mem bounds) and the `timeline` records."""
    recs = [e for e in events if e["event"] == "recovery" and e["reason"] == "restart"]
    sources = {"memory": 0, "disk": 0, "scratch": 0}
    lost = future = 0
    why: list[str] = []
    for e in recs:
        sources[e["source"]] = sources.get(e["source"], 0) + 1
        b, s = e["attempt"], e["step"]
        before = [k for k in kill_log if k["attempt"] < b]
        disk = max((k["disk"] for k in before if k["disk"] is not None), default=None)
        # the memory bound of the last kill before b, if it wiped nothing and no recovery ran
        # between them (attempts in between only stalled before joining: memory untouched)
        last = before[-1] if before else None
        mem = None
        if last is not None and last["mem"] is not None and not any(
                last["attempt"] < x["attempt"] < b for x in recs):
            mem = last["mem"]
        bound = max((x for x in (disk, mem) if x is not None), default=None)
        if bound is not None and (s is None or s < bound):
            lost += 1
            why.append(f"attempt {b}: recovered {e['source']} step {s} < bound {bound} "
                       f"(disk {disk}, memory {mem})")
        ran = max((t["step"] for t in timeline if t["attempt"] < b), default=None)
        if s is not None and (ran is None or s > ran):
            future += 1
            why.append(f"attempt {b}: recovered step {s}, newer than any step run ({ran})")
    return sources, lost, future, why


def run_one(seed: int, kills: int, steps: int, *, keep: bool = False,
            verbose: bool = False, early_p: float = 0.25) -> dict:
    """One torture job with `kills` kills (seed: the killer's RNG); the judged summary."""
    from faultlab.runner import ranks
    cfg = make_config(steps)
    ref = reference(cfg)
    run, shm = ranks._scratch(f"rank-torture-{seed}")
    rng = random.Random(seed)
    done = threading.Event()
    killer = Killer(run, shm, kills, rng, done, early_p)
    killer.start()
    t0 = time.perf_counter()
    try:
        rec = ranks.run_job(make_job(cfg, run, shm, 2 * kills + 10))   # stalls use restarts too
    finally:
        done.set()
        killer.join()
    wall = time.perf_counter() - t0
    bad = {k: 0 for k in BAD}
    failures: list[str] = []
    if killer.error:
        failures.append(f"killer: {killer.error}")
    if not rec.ok or rec.final is None:
        bad["failed"] += 1
        failures.append(f"job failed: {rec.error}")
    end = cfg.total_steps
    if rec.final is not None:
        dig = [r["digest"] for r in rec.final["ranks"]]
        if dig != ref["digests"]:
            bad["digest"] += 1
            failures.append(f"digests {dig} != reference {ref['digests']}")
        sums = {r.get("checksum") for r in rec.final["ranks"]}
        if len(sums) != 1 or len(set(dig)) != 1:
            bad["mixed"] += 1
            failures.append(f"ranks disagree: checksums {sorted(map(str, sums))}, digests {dig}")
    for s in range(end):
        if s not in rec.loss:
            bad["loss"] += 1
            failures.append(f"step {s} missing from the timeline")
            break
        if rec.loss[s] != ref["loss"][s] or rec.acc[s] != ref["acc"][s]:
            bad["loss"] += 1
            failures.append(f"step {s}: loss {rec.loss[s]!r} != reference {ref['loss'][s]!r}")
            break
    torn = _verify_errors(run)
    if torn:
        bad["torn"] += len(torn)
        failures += [f"verification error: {t}" for t in torn[:5]]
    # recoveries against the bounds of the kills before them
    sources, lost, future, why = judge_recoveries(
        rec.events, killer.log, ranks.read_jsonl(run / "timeline.jsonl"))
    bad["lost_committed"] += lost
    bad["future"] += future
    failures += why
    kinds = {k: sum(1 for x in killer.log if x["kind"] == k) for k in KINDS}
    out = {"seed": seed, "steps": end, "kills_planned": kills, "kills": len(killer.log),
           "kinds": kinds, "missed": killer.missed, "recoveries": sources,
           "attempts": _attempts(run), "stalls": _stalls(run), "ok": rec.ok, "error": rec.error,
           "bit_identical": rec.ok and not bad["digest"] and not bad["loss"] and not bad["mixed"],
           "wall_s": round(wall, 2), **bad, "failures": failures}
    if failures or keep:
        out["run_dir"], out["shm_root"] = str(run), str(shm)
        (run / "torture.json").write_text(json.dumps({**out, "kill_log": killer.log}, indent=1))
    else:
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    if verbose:
        print(line(out), flush=True)
    return out


def line(o: dict) -> str:
    k, r = o["kinds"], o["recoveries"]
    return (f"seed={o['seed']} kills={o['kills']} (rank {k['rank']} pair {k['pair']} node "
            f"{k['node']}, missed {o['missed']}) recoveries memory={r['memory']} "
            f"disk={r['disk']} scratch={r['scratch']} attempts={o['attempts']} "
            f"stalls={o['stalls']} ok={o['ok']} "
            f"bit_identical={o['bit_identical']} "
            + " ".join(f"{b}={o[b]}" for b in BAD[1:]) + f" wall={o['wall_s']}s"
            + ("\n  FAIL: " + "\n  FAIL: ".join(o["failures"]) if o["failures"] else ""))


def steps_for(kills: int) -> int:
    """Enough steps to absorb `kills` kills (~30 steps of progress between two kills)."""
    return 40 * kills + 40


def run_kills(total: int, *, seed: int = 1, per_job: int = 25, report: str | None = None,
              verbose: bool = False, deadline_s: float | None = None) -> dict:
    """Jobs of up to `per_job` kills (job i's seed: seed * 1000 + i) until `total` kills."""
    t0 = time.perf_counter()
    jobs: list[dict] = []
    steps = steps_for(min(per_job, total))
    i = 0
    while sum(j["kills"] for j in jobs) < total:
        want = min(per_job, total - sum(j["kills"] for j in jobs))
        jobs.append(run_one(seed * 1000 + i, want, steps, verbose=verbose))
        i += 1
        summary = summarize(jobs, time.perf_counter() - t0, total)
        if report:
            tmp = Path(report + ".tmp")
            tmp.write_text(json.dumps(summary, indent=1))
            os.replace(tmp, report)
        if verbose:
            print(f"[{summary['kills']}/{total} kills, {len(jobs)} jobs, "
                  f"{summary['wall_s']:.0f}s] " + summary_line(summary), flush=True)
        if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
            break
        if i > 10 * (total // max(per_job, 1) + 1) + 20:
            break       # jobs keep ending before their kills: something is off, stop
        if len(jobs) >= 3 and all(j["kills"] == 0 and not j["ok"] for j in jobs[-3:]):
            print("3 jobs in a row failed before any kill: stopping", flush=True)
            break
    return summarize(jobs, time.perf_counter() - t0, total)


def summarize(jobs: list[dict], wall: float, total: int) -> dict:
    out = {"kills_requested": total, "jobs": len(jobs),
           "kills": sum(j["kills"] for j in jobs),
           "kinds": {k: sum(j["kinds"][k] for j in jobs) for k in KINDS},
           "missed": sum(j["missed"] for j in jobs),
           "stalls": sum(j["stalls"] for j in jobs),
           "recoveries": {s: sum(j["recoveries"].get(s, 0) for j in jobs)
                          for s in ("memory", "disk", "scratch")},
           "bit_identical_jobs": sum(1 for j in jobs if j["bit_identical"]),
           "wall_s": round(wall, 1),
           "reference_wall_s": {str(k): round(v["wall_s"], 2) for k, v in _REFS.items()},
           "reference_failed_tries": {str(k): v["failed_tries"] for k, v in _REFS.items()}}
    for b in BAD:
        out[b] = sum(j[b] for j in jobs)
    out["failed_seeds"] = [j["seed"] for j in jobs if j["failures"]]
    out["per_job"] = jobs
    return out


def summary_line(s: dict) -> str:
    k, r = s["kinds"], s["recoveries"]
    return (f"kills={s['kills']} (rank {k['rank']}, pair {k['pair']}, node {k['node']}; "
            f"missed {s['missed']}) recoveries memory={r['memory']} disk={r['disk']} "
            f"scratch={r['scratch']} stalls={s['stalls']} "
            f"bit_identical={s['bit_identical_jobs']}/{s['jobs']} "
            + " ".join(f"{b}={s[b]}" for b in BAD) + f" failed_seeds={s['failed_seeds']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-job", type=int, default=25)
    ap.add_argument("--report", default=None)
    ap.add_argument("--steps", type=int, default=None,
                    help="with --one: the job's steps (a report's per_job[i].steps)")
    ap.add_argument("--one", type=int, default=None,
                    help="run only the job with this seed (reproduce a failure); keeps its dirs")
    a = ap.parse_args(argv)
    if a.one is not None:
        out = run_one(a.one, a.kills, a.steps or steps_for(min(a.per_job, a.kills)), keep=True,
                      verbose=True)
        return 1 if out["failures"] else 0
    s = run_kills(a.kills, seed=a.seed, per_job=a.per_job, report=a.report, verbose=True)
    print("TOTAL " + summary_line(s) + f" wall={s['wall_s']}s", flush=True)
    return 1 if s["failed_seeds"] else 0


if __name__ == "__main__":
    sys.exit(main())
