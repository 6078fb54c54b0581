"""faultlab.torch.Checkpointer in a plain user loop: save every N steps through the engine,
resume in one call, bit-identical after a kill -9 in a real process.

The loop below is what a user writes (a GRU whose hidden state is carried across batches, SGD
with momentum, a StepLR schedule, dropout, a seeded shuffling sampler with state, NumPy and
Python randomness); the lines marked `# +ckpt` are all that checkpointing adds. Run as a
script it is the training process the kill test starts:

    python tests/torch/test_own_checkpointer.py PATH OUT --steps 40 --every 5 [--pause-after 15]
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from faultlab.backends.torch.own_checkpointer import Checkpointer     # +ckpt
from faultlab.checkpointing.api import SaveFuture
from faultlab.errors import CheckpointError

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]


class ShuffleSampler:
    """Batches of indices, reshuffled each epoch from a generator seeded by (seed, epoch)."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self.epoch, self.pos = 0, 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        idx = torch.randperm(self.n, generator=g)[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, sd):
        self.epoch, self.pos = sd["epoch"], sd["pos"]


class Net(torch.nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.rnn = torch.nn.GRU(4, width, batch_first=True)
        self.drop = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(width, 2)

    def forward(self, x, h):
        out, h = self.rnn(x, h)
        return self.head(self.drop(out[:, -1])), h


def train(path, steps: int, every: int, *, mode: str = "copy", plain: bool = False,
          pause_after: int | None = None, log=print):
    """The user's loop. Returns (model, optimizer, sampler, hidden, start step)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    data = torch.from_numpy(np.random.default_rng(7).standard_normal((48, 5, 4))
                            .astype(np.float32))
    labels = (data[:, :, 0].sum(1) > 0).long()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    sampler = ShuffleSampler(48, 8, seed=3)
    hidden = torch.zeros(1, 8, 16)

    ckpt = None if plain else Checkpointer(                                 # +ckpt
        path, every=every, model=model, optimizer=opt, scheduler=sched,    # +ckpt
        data=sampler, extra={"hidden": hidden}, mode=mode)                 # +ckpt
    start = 0 if plain else ckpt.resume()                                   # +ckpt
    log(f"start {start}")
    marked = None
    for step in range(start, steps):
        idx = sampler.next()
        x = data[idx] + 0.01 * torch.randn(8, 5, 4) \
            + 0.01 * float(np.random.randn()) + 0.01 * random.random()
        out, hidden = model(x, hidden)
        loss = torch.nn.functional.cross_entropy(out, labels[idx])
        hidden = hidden.detach()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if plain:
            continue
        future = ckpt.step(step + 1, extra={"hidden": hidden})             # +ckpt
        if pause_after is not None and future is not None:
            if future.step == pause_after:
                marked = future
            elif marked is not None:
                # a later save is in flight; the one at pause_after is durable: the parent
                # kills this process while it waits here
                marked.wait()
                log(f"durable {marked.step} at step {step + 1}")
                sys.stdin.readline()
                raise SystemExit("not killed")
    if ckpt is not None:
        ckpt.close()                                                        # +ckpt
    return model, opt, sampler, hidden, start


def fingerprint(model, opt, sampler, hidden) -> dict:
    """Everything that decides the future, as bytes (parameters, optimizer moments, the
    scheduler's lr, data position, hidden state, every global generator)."""
    out = {f"model/{k}": v.numpy().tobytes() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt/{i}/{k}"] = v.numpy().tobytes() if isinstance(v, torch.Tensor) else repr(v)
    out["lr"] = repr([g["lr"] for g in opt.param_groups])
    out["sampler"] = repr(sampler.state_dict())
    out["hidden"] = hidden.numpy().tobytes()
    out["rng/torch"] = torch.get_rng_state().numpy().tobytes()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out["rng/numpy"] = repr((kind, pos, has_gauss, cached)) + keys.tobytes().hex()
    out["rng/python"] = repr(random.getstate())
    return out


def _child(argv):
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--mode", default="copy")
    p.add_argument("--plain", action="store_true")
    p.add_argument("--pause-after", type=int)
    a = p.parse_args(argv)
    model, opt, sampler, hidden, _ = train(
        a.path, a.steps, a.every, mode=a.mode, plain=a.plain, pause_after=a.pause_after,
        log=lambda s: print(s, flush=True))
    Path(a.out).write_bytes(pickle.dumps(fingerprint(model, opt, sampler, hidden)))


def _run(*args, pause=False):
    """Start the loop in a fresh Python; with pause, kill -9 it once it reports a durable
    checkpoint (it waits for that on stdin, so the kill lands mid-run, never after it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(HERE), *map(str, args)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if pause and line.startswith("durable "):
            proc.send_signal(signal.SIGKILL)
            break
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    proc.stdin.close()
    proc.stdout.close()
    proc.stderr.close()
    return rc, lines, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the loop without any checkpointing."""
    d = tmp_path_factory.mktemp("reference")
    rc, lines, err = _run(d / "unused.ckpt", d / "ref.pt", "--plain")
    assert rc == 0, err
    return pickle.loads((d / "ref.pt").read_bytes())


@pytest.mark.parametrize("mode", ["copy", "overlap", "cow"])
def test_kill9_mid_run_then_resume_ends_bit_identical(tmp_path, reference, mode):
    path = tmp_path / "run.ckpt"
    rc, lines, err = _run(path, tmp_path / "killed.pt", "--mode", mode, "--pause-after", 15,
                          pause=True)
    assert rc == -signal.SIGKILL, (rc, lines, err)
    assert lines[0] == "start 0" and lines[-1].startswith("durable 15 at step 20"), lines
    assert not (tmp_path / "killed.pt").exists()

    rc, lines, err = _run(path, tmp_path / "resumed.pt", "--mode", mode)
    assert rc == 0, err
    start = int(lines[0].split()[1])
    assert start in (15, 20), lines          # the save of step 20 may have become durable too
    resumed = pickle.loads((tmp_path / "resumed.pt").read_bytes())
    assert resumed.keys() == reference.keys()
    assert [k for k in reference if resumed[k] != reference[k]] == []


def test_in_process_resume_matches_and_checkpointing_changes_nothing(tmp_path):
    ref = fingerprint(*train(None, 23, 5, plain=True, log=lambda s: None)[:4])
    path = tmp_path / "run.ckpt"
    train(path, 17, 5, log=lambda s: None)        # stops at 17; the newest save is of 15
    torch.manual_seed(123)                        # the resumed session's randomness differs
    np.random.seed(123)
    random.seed(123)
    model, opt, sampler, hidden, start = train(path, 23, 5, log=lambda s: None)
    assert start == 15
    got = fingerprint(model, opt, sampler, hidden)
    assert [k for k in ref if got[k] != ref[k]] == []


class StatefulBatches:
    """A batch sampler that resumes mid-epoch: batches of a per-epoch permutation seeded by
    (seed, epoch); an epoch ends when its batches are used up."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self.epoch, self.pos = 0, 0

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            self.seed * 1000 + self.epoch))
        while self.pos + self.batch <= self.n:
            self.pos += self.batch
            yield perm[self.pos - self.batch:self.pos].tolist()
        self.epoch, self.pos = self.epoch + 1, 0

    def __len__(self):
        return self.n // self.batch

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, sd):
        self.epoch, self.pos = sd["epoch"], sd["pos"]


class StatefulLoader(torch.utils.data.DataLoader):
    """A DataLoader whose position is its batch sampler's (torchdata's StatefulDataLoader
    does the same for any sampler)."""

    def state_dict(self):
        return self.batch_sampler.state_dict()

    def load_state_dict(self, sd):
        self.batch_sampler.load_state_dict(sd)


def _loader_run(path, stop, every, generator=False):
    """A loop over a torch DataLoader with dropout; returns what decides the future."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randn(40, 1))
    loader = StatefulLoader(ds, batch_sampler=StatefulBatches(40, 8, seed=1),
                            generator=torch.Generator().manual_seed(9) if generator else None)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3),
                                torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with Checkpointer(path, every=every, model=model, optimizer=opt, data=loader) as ckpt:
        step = ckpt.resume()
        while step < stop:
            for x, y in loader:
                loss = (model(x) - y).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                ckpt.step(step)
                if step == stop:
                    break
    gen_state = loader.generator.get_state() if generator else torch.tensor([])
    return ([p.detach().clone() for p in model.parameters()], loader.state_dict(),
            torch.get_rng_state(), gen_state)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1] \
        and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("generator", [False, True], ids=["global-rng", "loader-generator"])
@pytest.mark.parametrize("every", [4, 5])   # (5 batches an epoch) resumes at 16: mid-epoch;
def test_a_resumed_data_loader_draws_no_extra_seed(tmp_path, generator, every):   # 15: its end
    ref = _loader_run(tmp_path / "ref.ckpt", 23, every, generator)
    _loader_run(tmp_path / "run.ckpt", 17, every, generator)
    assert _same(_loader_run(tmp_path / "run.ckpt", 23, every, generator), ref)


def test_without_that_a_resumed_data_loader_would_be_a_draw_ahead(tmp_path, monkeypatch):
    import faultlab.backends.torch.own_checkpointer as own
    monkeypatch.setattr(own, "_first_iterator_draws_nothing", lambda loader: None)
    ref = _loader_run(tmp_path / "ref.ckpt", 23, 4)
    _loader_run(tmp_path / "run.ckpt", 17, 4)
    got = _loader_run(tmp_path / "run.ckpt", 23, 4)
    assert got[1] == ref[1] and not _same(got, ref)   # same batches, other dropout masks


def test_torchdata_stateful_dataloader_resumes_bit_identical(tmp_path):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")

    def run(path, stop):
        torch.manual_seed(0)
        ds = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
        loader = sdl.StatefulDataLoader(ds, batch_size=8, shuffle=True)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3),
                                    torch.nn.Linear(8, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        with Checkpointer(path, every=5, model=model, optimizer=opt, data=loader) as ckpt:
            step = ckpt.resume()
            while step < stop:
                for x, y in loader:
                    loss = (model(x) - y).square().mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    step += 1
                    ckpt.step(step)
                    if step == stop:
                        break
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()

    ref = run(tmp_path / "ref.ckpt", 37)
    run(tmp_path / "run.ckpt", 23)
    got = run(tmp_path / "run.ckpt", 37)
    assert all(torch.equal(a, b) for a, b in zip(got[0], ref[0]))
    assert torch.equal(got[1], ref[1])


def _session(width=16):
    torch.manual_seed(0)
    model = Net(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt


def _one_step(model, opt, hidden):
    out, hidden = model(torch.randn(8, 5, 4), hidden)
    opt.zero_grad()
    out.sum().backward()
    opt.step()
    return hidden.detach()


def test_fresh_path_resumes_at_0_and_stats_report_the_stall(tmp_path):
    model, opt = _session()
    position = {"epoch": 0, "batch": 0}
    hidden = torch.zeros(1, 8, 16)
    with Checkpointer(tmp_path / "new.ckpt", every=3, model=model, optimizer=opt,
                      data=position, extra={"hidden": hidden}) as ckpt:
        assert ckpt.resume() == 0
        futures = []
        for step in range(10):
            hidden = _one_step(model, opt, hidden)
            position["batch"] += 1
            futures.append(ckpt.step(extra={"hidden": hidden}))
        assert [f.step for f in futures if f is not None] == [3, 6, 9]
        final = ckpt.save()
        assert final.step == 10 and ckpt.save() is final
    s = ckpt.stats
    assert (s.saves, s.durable, s.failed, s.last_saved_step, s.last_durable_step) == \
        (4, 4, 0, 10, 10)
    assert len(s.stall_s) == 4 and all(t > 0 for t in s.stall_s)
    assert all(p is not None and p >= 0 for p in s.persist_s)
    assert s.total_stall_s == pytest.approx(sum(s.stall_s))
    assert "4 save(s), 4 durable" in str(s) and "ms per save" in str(s)

    # a new session: the user's own dict and the hidden tensor are restored in place
    model2, opt2 = _session()
    position2 = {"epoch": 5, "batch": 0, "mine": "kept"}
    hidden2 = torch.ones(1, 8, 16)
    with Checkpointer(tmp_path / "new.ckpt", every=3, model=model2, optimizer=opt2,
                      data=position2, extra={"hidden": hidden2}) as ckpt2:
        assert ckpt2.resume() == 10
        assert position2 == {"epoch": 0, "batch": 10, "mine": "kept"}
        assert torch.equal(hidden2, hidden) and ckpt2.extra["hidden"] is hidden2
        assert ckpt2.steps_done == 10 and ckpt2.step(11) is None
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_model_that_does_not_fit_names_the_keys_and_changes_nothing(tmp_path):
    model, opt = _session()
    with Checkpointer(tmp_path / "a.ckpt", every=1, model=model, optimizer=opt) as ckpt:
        ckpt.resume()
        _one_step(model, opt, torch.zeros(1, 8, 16))
        ckpt.step()

    class Other(Net):
        def __init__(self):
            super().__init__(width=12)
            self.extra_head = torch.nn.Linear(12, 2)
            del self.drop

    other = Other()
    other_opt = torch.optim.Adam(other.parameters())
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with Checkpointer(tmp_path / "a.ckpt", every=1, model=other, optimizer=other_opt) as bad:
        with pytest.raises(CheckpointError) as e:
            bad.resume()
    msg = str(e.value)
    assert "\n" not in msg and "does not fit model" in msg
    assert "missing key(s) extra_head.weight, extra_head.bias" in msg
    assert "rnn.weight_ih_l0 checkpoint [48, 4], model [36, 4]" in msg
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())

    # an optimizer over other parameters is refused before anything changes too
    model3, _ = _session()
    opt3 = torch.optim.Adam(list(model3.parameters())[:2])
    with Checkpointer(tmp_path / "a.ckpt", every=1, model=model3, optimizer=opt3) as bad:
        with pytest.raises(CheckpointError, match=r"parameter groups hold \[6\] parameters, "
                                                  r"the optimizer's \[2\]"):
            bad.resume()


class _NoState:
    pass


@pytest.mark.parametrize("kwargs, message", [
    ({"path": "/nonexistent-dir/run.ckpt"}, "directory /nonexistent-dir does not exist"),
    ({"path": "DIR"}, "is a directory; give a file in it"),
    ({"every": 0}, "every must be a whole number of steps, at least 1"),
    ({"every": 2.5}, "every must be a whole number"),
    ({"model": None}, "Checkpointer needs model="),
    ({"model": [torch.nn.Linear(2, 2)]}, "Checkpointer(model=...) must be a torch.nn.Module"),
    ({"model": {"a": "x"}}, "Checkpointer(model['a']=...) must be a torch.nn.Module"),
    ({"optimizer": "adam"}, "must be a torch.optim.Optimizer"),
    ({"scheduler": _NoState()}, "must be an object with state_dict()"),
    ({"data": _NoState()}, "a _NoState has no state_dict() / load_state_dict()"),
    ({"data": [1, 2]}, "a list has no state_dict()"),
    ({"extra": [1]}, "Checkpointer(extra=...) must be a dict"),
    ({"mode": "fast"}, "mode must be one of copy, overlap, cow"),
    ({"keep": 0}, "max_in_flight and keep must be at least 1"),
    ({"colour": 1}, "bad engine option"),
])
def test_misuse_is_a_one_line_error_at_construction(tmp_path, kwargs, message):
    args = {"path": tmp_path / "run.ckpt", "every": 5, "model": torch.nn.Linear(2, 2)}
    args.update(kwargs)
    if args["path"] == "DIR":
        args["path"] = tmp_path
    with pytest.raises(CheckpointError) as e:
        Checkpointer(args.pop("path"), args.pop("every"), **args)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run.ckpt").exists()


def test_misuse_in_the_loop_is_a_one_line_error(tmp_path):
    model, opt = _session()
    with Checkpointer(tmp_path / "run.ckpt", every=2, model=model, optimizer=opt) as ckpt:
        start = ckpt.resume()
        with pytest.raises(CheckpointError, match=r"ckpt.step\(0\) after 0 step\(s\).*"
                                                  r"ckpt.step\(step \+ 1\)"):
            ckpt.step(start)                        # the 0-based index, not steps done
        ckpt.step(1)
        ckpt.step(2).wait()
        with pytest.raises(CheckpointError, match="must come before the first step"):
            ckpt.resume()
    with pytest.raises(CheckpointError, match="is closed"):
        ckpt.step()
    # the file holds an earlier run: forgetting resume() is an error, not an overwrite
    with Checkpointer(tmp_path / "run.ckpt", every=2, model=model, optimizer=opt) as again:
        for _ in range(2):                         # (and not only the first time)
            with pytest.raises(CheckpointError, match=r"earlier run \(up to step 2\): call "
                                                      r"ckpt.resume\(\)"):
                again.step()
        assert again.resume() == 2 and again.step(np.int64(3)) is None
    # a second writer on the same file is refused
    with Checkpointer(tmp_path / "run.ckpt", every=2, model=model, optimizer=opt):
        with pytest.raises(CheckpointError, match="already open for writing"):
            Checkpointer(tmp_path / "run.ckpt", every=2, model=model, optimizer=opt)


def test_a_save_that_fails_in_the_background_is_raised_in_the_loop(tmp_path, monkeypatch):
    model, opt = _session()
    ckpt = Checkpointer(tmp_path / "run.ckpt", every=1, model=model, optimizer=opt)
    ckpt.resume()
    failing = SaveFuture(1)
    monkeypatch.setattr(ckpt.engine, "save", lambda *a, **k: failing)
    assert ckpt.step() is failing
    failing.finish(error=CheckpointError("cannot write checkpoint run.ckpt: disk full"))
    with pytest.raises(CheckpointError, match="disk full"):
        ckpt.step()
    s = ckpt.stats
    assert (s.saves, s.durable, s.failed) == (1, 0, 1)
    monkeypatch.undo()
    ckpt.close()                                   # reported once, not again


if __name__ == "__main__":
    _child(sys.argv[1:])
