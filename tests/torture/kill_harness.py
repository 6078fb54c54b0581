"""Kill torture of the checkpoint engine with an oracle of its own (not faultlab's crash tooling).

    python tests/torture/kill_harness.py --kills 2000 --seed 1 --dir /tmp/kt [--report F.json]

A writer process (_writer.py) saves states that are a pure function of the step into one
checkpoint file, with engine settings drawn at random per file (1-4 saves in flight, keep
1-4, chunks of 4 KiB-8 MiB, 1-4 writers, a small or large staging pool, borrowed saves on or
off, block size 512-4096), and logs each step it begins and each step whose wait() returned
(fsync'ed). This process SIGKILLs it at a random moment -- on the k-th progress line it
prints (plus a short random spin), or after a random delay -- then recovers the file with
the engine's public API and judges the result (torture_states.judge): LOST (older than the
newest step logged durable, or recovery failed although one was), TORN / MIXED / WRONG (not
exactly make_state of the step it claims), NEVER-SAVED, RETENTION (fewer than keep verified
commits left), ERRORS. The writer is then restarted on the same file from the recovered
step + 1 (a reopen), several rounds per file; new files get new settings.

Prints one summary line: kills=N recovered=... empty=... lost=0 torn=0 mixed=0 ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from torture_states import Tally, judge, slot_bytes  # noqa: E402

from faultlab.checkpointing import list_commits, load_step, recover  # noqa: E402

WRITER = HERE / "_writer.py"
ROOT = HERE.parents[1]                     # the repository (faultlab importable from there)
KiB, MiB = 1024, 1024 * 1024


def draw_settings(rng: random.Random, max_bytes: int) -> dict:
    """Random engine settings for a new file."""
    chunk = int(2 ** rng.uniform(12, 23))                  # 4 KiB .. 8 MiB, log-uniform
    block = rng.choice((512, 1024, 4096, 4096, 4096))
    cfg = {
        "max_in_flight": rng.randint(1, 4),
        "keep": rng.randint(1, 4),
        "chunk_bytes": chunk,
        "writers": rng.randint(1, 4),
        "pool_bytes": chunk * rng.choice((1, 2, 3, 8, 64)),
        "block_size": block,
        "borrow_p": rng.choice((0.0, 0.5, 1.0)),
        "wait_p": rng.choice((0.0, 0.2, 0.6)),
        "max_bytes": max_bytes,
    }
    cfg["slot_bytes"] = slot_bytes(max_bytes, chunk, block)
    return cfg


def read_log(path: Path) -> tuple[set, list, list]:
    """(steps begun, steps durable, failure lines) from a durable-step log."""
    begun, durable, failed = set(), [], []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 2:              # a torn last line of an unsynced "begin"
                continue
            what, step = parts[0], int(parts[1])
            if what == "begin":
                begun.add(step)
            elif what == "durable":
                durable.append(step)
            elif what == "failed":
                failed.append(step)
    return begun, durable, failed


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the writer; True if it was still running."""
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout:
        proc.stdout.close()
    return alive


def run_writer_round(path: Path, log: Path, cfg: dict, salt: int, start: int,
                     rng: random.Random, trigger: str, broken: str | None,
                     max_lines: int) -> dict:
    """Start the writer, kill it at a random moment, return what happened."""
    cmd = [sys.executable, str(WRITER), "--file", str(path), "--log", str(log),
           "--salt", str(salt), "--start", str(start), "--seed", str(rng.getrandbits(32)),
           "--config", json.dumps(cfg)]
    if broken:
        cmd += ["--broken", broken]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1, env=env, cwd=ROOT)
    lines, stderr = 0, ""
    try:
        if trigger == "delay":
            # wait for "ready" most of the time (kills during start-up and reopen too)
            if rng.random() < 0.9:
                proc.stdout.readline()
            time.sleep(rng.uniform(0, 0.25) * rng.random())
        else:
            k = rng.randint(1, max_lines)
            while lines < k:
                line = proc.stdout.readline()
                if not line:
                    break
                lines += 1
            if rng.random() < 0.5:
                _spin(rng.uniform(0, 0.003))
        killed = _kill(proc)
    except BaseException:
        _kill(proc)
        raise
    if not killed:
        stderr = proc.stderr.read()
    proc.stderr.close()
    return {"killed": killed, "rc": proc.returncode, "lines": lines, "stderr": stderr}


def run_kills(kills: int, seed: int, directory: str | os.PathLike, *, trigger: str = "mixed",
              broken: str | None = None, max_bytes: int = 2 * MiB, rounds: tuple = (1, 8),
              max_lines: int = 40, keep_failures: bool = True, progress=None) -> dict:
    """Run `kills` SIGKILLs; return a summary dict (counts, settings seen, failures).

    trigger: "progress" (kill on the k-th progress line, plus a random spin of up to 3 ms:
    no sleeping), "delay" (kill after a random delay) or "mixed" (either, per kill)."""
    rng = random.Random(seed)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tally = Tally()
    t0 = time.perf_counter()
    files = kill_no = 0
    seen = {"max_in_flight": set(), "keep": set(), "writers": set(), "block_size": set()}
    chunk_range = [None, None]
    triggers = {"progress": 0, "delay": 0}
    landed = {"mid_save": 0, "idle": 0, "newer_than_log": 0}
    while kill_no < kills:
        files += 1
        cfg = draw_settings(rng, max_bytes)
        for k in seen:
            seen[k].add(cfg[k])
        chunk_range = [min(x for x in (chunk_range[0], cfg["chunk_bytes"]) if x is not None),
                       max(x for x in (chunk_range[1], cfg["chunk_bytes"]) if x is not None)]
        salt = rng.getrandbits(31)
        fdir = root / f"f{files:05d}"
        shutil.rmtree(fdir, ignore_errors=True)
        fdir.mkdir()
        path, log = fdir / "run.ckpt", fdir / "steps.log"
        next_step, file_ok = 0, True
        for rnd in range(rng.randint(*rounds)):
            if kill_no >= kills:
                break
            how = trigger if trigger != "mixed" else rng.choice(("progress", "delay"))
            triggers[how] += 1
            res = run_writer_round(path, log, cfg, salt, next_step, rng, how, broken,
                                   max_lines)
            kill_no += 1
            begun, durable, failed = read_log(log)
            context = (f"seed={seed} kill={kill_no} file={files} round={rnd} trigger={how} "
                       f"settings={json.dumps(cfg, sort_keys=True)} salt={salt} dir={fdir}")
            before = tally.bad()
            found = []
            if failed or (not res["killed"] and res["rc"] != 0):
                found.append(("errors", f"{context}: writer failed (rc={res['rc']}, failed "
                                        f"steps {failed}): {res['stderr'][-500:]}"))
            step = judge(tally, salt=salt, max_bytes=max_bytes, keep=cfg["keep"],
                         begun=begun, durable=durable,
                         recover_fn=lambda: recover(path), list_fn=lambda: list_commits(path),
                         load_fn=lambda s: load_step(path, s), context=context, found=found)
            # how the kill landed: saves begun but not durable (in flight), and a recovered
            # step newer than the log says (durable, killed before its log line)
            in_flight = len([s for s in begun if s >= next_step and s not in set(durable)])
            landed["mid_save"] += in_flight > 0
            landed["idle"] += in_flight == 0
            if step is not None and durable and step > max(durable):
                landed["newer_than_log"] += 1
            if tally.bad() > before:
                file_ok = False
            next_step = (step + 1) if step is not None else (max(begun) + 1 if begun else 0)
            if progress and kill_no % progress == 0:
                print(f"... {summary_line(tally, kill_no, time.perf_counter() - t0)}",
                      flush=True)
            if not file_ok:
                break                          # keep the evidence; start a new file
        if file_ok or not keep_failures:
            shutil.rmtree(fdir, ignore_errors=True)
    wall = time.perf_counter() - t0
    return {"kind": "kill", "seed": seed, "kills": kill_no, "files": files,
            "wall_s": round(wall, 1), "trigger": triggers, "landed": landed,
            "broken": broken,
            "settings_seen": {k: sorted(v) for k, v in seen.items()},
            "chunk_bytes_range": chunk_range, **tally.counts(), "findings": tally.findings,
            "failures": tally.failures, "summary": summary_line(tally, kill_no, wall)}


def summary_line(tally: Tally, kills: int, wall: float) -> str:
    c = tally.counts()
    return (f"kills={kills} recovered={c['recovered']} empty={c['empty']} lost={c['lost']} "
            f"torn={c['torn']} mixed={c['mixed']} wrong={c['wrong']} "
            f"never_saved={c['never_saved']} retention={c['retention']} "
            f"errors={c['errors']} wall={wall:.0f}s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", required=True, help="scratch directory (files of failures stay)")
    ap.add_argument("--trigger", choices=("mixed", "progress", "delay"), default="mixed")
    ap.add_argument("--broken", choices=("lie", "mutate", "drop"), default=None,
                    help="self-test: a deliberately broken writer the oracle must catch")
    ap.add_argument("--max-mib", type=float, default=2.0, help="largest state (MiB)")
    ap.add_argument("--report", help="write the JSON summary here")
    ap.add_argument("--progress", type=int, default=100, help="print counts every N kills")
    args = ap.parse_args(argv)
    out = run_kills(args.kills, args.seed, args.dir, trigger=args.trigger, broken=args.broken,
                    max_bytes=int(args.max_mib * MiB), progress=args.progress)
    for f in out["failures"][:20]:
        print(f)
    print(out["summary"])
    print("kills by trigger: " + " ".join(f"{k}={v}" for k, v in out["trigger"].items())
          + "; landed: " + " ".join(f"{k}={v}" for k, v in out["landed"].items()))
    if args.report:
        Path(args.report).write_text(json.dumps(out, indent=1))
    bad = sum(out[k] for k in Tally.BAD)
    return 1 if bad and not args.broken else 0


if __name__ == "__main__":
    sys.exit(main())
