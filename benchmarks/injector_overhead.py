#!/usr/bin/env python
"""Injector overhead: what faultlab's torch hooks cost per training step and per forward pass.

Usage:
    python benchmarks/injector_overhead.py [--workload resnet18] [--steps N] [--repeats R]
                                           [--infer-iters K] [--warmup W] [--threads T]
                                           [--max-minutes M] [--own-iters N] [--own-batch B]
                                           [--own-optimizer sgd|adam] [--own-only] [--json]

A default run takes about a minute on an idle 2-core machine; on a busy one --max-minutes
(default 5) cuts the number of repeats. With --threads 2 on 2 cores that other processes also
use, every parallel torch op waits for both of its threads to be scheduled: steps get ~10x
slower and far noisier than with --threads 1.

Reference workload: the small ResNet-18 the campaigns use (width 16, 32x32 digits, 4 emulated
replicas x 16 samples, seed 123). Variants, measured side by side in one process:

training (one `TorchTrainer.train_step`: 4 replica forward+backward passes, Adam step)
  train/none           faults=() -- no hooks at all. This is also what every step in which no
                       fault fires costs: the runner passes only the faults firing at a step and
                       the injector installs hooks for those only.
  train/idle-fwd       armed but idle: a fwd_output hook on basicblock_2_basic_0_conv2 that is
                       installed and called on every replica and whose replica check fails every
                       time. A second TorchInjector on the trainer's layers (replicas=4, so the
                       fault passes the injector's range check) is armed each step, around
                       train_step, with a fault on replica 1; the trainer drives only its own
                       injector, so this one's current replica stays 0 and the fault never
                       fires. This is exactly the cost a firing fault's hook adds while the
                       *other* replicas' shards are computed (the same hook, the same failing
                       check, installed and removed each step).
  train/idle-bwd       the same for a bwd_input fault on basicblock_4_basic_0_downsample (a full
                       backward hook).
  train/fire-fwd       a fwd_output bitflip (bit 22, the top mantissa bit: keeps training finite,
                       so no variant times NaN arithmetic) at one position of
                       basicblock_2_basic_0_conv2's output, replica 1, permanent (every step).
  train/fire-bwd       a bwd_input bitflip (bit 22) at one position of the dilated incoming
                       gradient of basicblock_4_basic_0_downsample, replica 1, every step: the hook
                       recomputes that layer's input gradient with a full convolution.

inference (one forward pass, eval mode, torch.no_grad, batch 16, NCHW 3x32x32)
  infer/plain          the model alone.
  infer/faultlab-idle  TorchInjector (replicas=4) hook installed for a fwd_output fault of
                       replica 1 while replica 0 is computed (injector.replica stays 0).
  infer/faultlab       TorchInjector fwd_output fault: value 1e4 SET at one position of
                       basicblock_2_basic_0_conv2's output.
  infer/pytorchfi      pytorchfi 0.6.0 `declare_neuron_fi` with the same value at the same
                       position (its corrupted deep copy of the model; forward hooks on all 20
                       Conv2d layers). pytorchfi 0.6.0 never resets its layer counter, so
                       `reset_current_layer()` is called before every forward (included).

own loop (faultlab.torch.Injector in a plain user training loop: the same ResNet-18, one fixed
batch of --own-batch samples, zero_grad / forward / cross-entropy / backward / optimizer step;
SGD with momentum 0.9 or Adam; each variant its own copy of model and optimizer; the RNG
re-seeded from the step index, untimed, before every step so dropout masks agree; measured
against the bounds of issue 12: armed-idle <= 1.005x, firing <= 1.05x the plain step)
  own/plain            the user's step, no faultlab.
  own/step-empty       `with injector.step(k):` around it, nothing armed.
  own/armed-later      armed-idle: a fwd_output and a fwd_weight fault armed for a later step
                       (no hook is installed in this step).
  own/armed-replica    armed-idle: a permanent fwd_output fault on replica 1 of
                       Injector(replicas=2) while replica 0 is computed: its hook is installed,
                       called and removed every step and never fires.
  own/fire-fwd-output  firing: a transient fwd_output fault (value SET 10 at one NCHW position of
                       basicblock_2.basic_0.conv2's output), armed for the coming step outside
                       the timed region.
  own/fire-fwd-weight  firing: a transient fwd_weight bitflip (bit 22) at one (out, in, kh, kw)
                       position of the same layer's weight, armed the same way.
  own/pytorchfi        pytorchfi's declare_neuron_fi, the same value at the same element, its
                       corrupted deep copy trained by the same loop with its own optimizer,
                       reset_current_layer() before every step (timed).
Printed with PASS/FAIL per bound (on the paired ratio, with its 95% CI), the injector's own
per-step work timed alone for the armed-idle rows, and checks: the idle rows train
bit-identically to the plain loop, the firing rows change the loss, faultlab's and pytorchfi's
corrupted forward are bit-identical. --own-only runs this group alone.

layer (one layer alone, forward -- or forward+backward for the backward site -- reported per
call): the per-call costs that a whole training step's noise hides. fwd-plain / fwd-idle /
fwd-fire on basicblock_2_basic_0_conv2, bwd-plain / bwd-idle / bwd-fire on
basicblock_4_basic_0_downsample; "idle" has the hooks of replica-1 faults installed once by a
TorchInjector(replicas=4) whose replica stays 0; "fire" runs begin_step, the call and end_step
each call, i.e. a firing fault's whole per-step cost on its layer (install, resolve, corrupt,
remove). From these the script predicts the training ratios: replicas x idle for an idle
fault, fire + (replicas - 1) x idle for a firing one.

Every training variant has its own TorchTrainer built from the same configuration (and every
inference or layer variant its own copy of the model), so a fault in one variant cannot change
what another computes. Each repeat runs --steps training rounds, --infer-iters inference
rounds and --infer-iters layer rounds; a round runs one iteration of every variant of the
group, its start rotating, so a burst of load from elsewhere on a shared machine hits
neighbouring variants alike. A repeat's value is the median ms of its iterations; the table
shows the median and the minimum of those over repeats, their ratios to the matching baseline
(training variants vs train/none, inference vs infer/plain, layer variants vs their plain
layer), and `paired`: the median over all rounds of iteration / baseline iteration of the same
round (`paired +ms`: the median difference).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from faultlab.faults import (Duration, FaultSpec, PositionSpec, Site,  # noqa: E402
                             ValueSpec)
from faultlab.backends.torch.injector import TorchInjector  # noqa: E402
from faultlab.workloads.base import default_config  # noqa: E402
from faultlab.backends.torch.models import layer_map  # noqa: E402
from faultlab.backends.torch.trainer import (TorchTrainer, build_workload,  # noqa: E402
                                              operand_shapes)

FWD_LAYER = "basicblock_2_basic_0_conv2"
BWD_LAYER = "basicblock_4_basic_0_downsample"
SET_VALUE = 1e4
LAYER_CALLS = 10     # layer-level variants: calls per timed iteration
FLIP_BIT = 22

REFERENCE = {
    "resnet18": dict(width=16, input_size=32, replicas=4, per_replica_batch=16, dataset="digits",
                     steps_per_epoch=20, epochs=6, lr=1e-3, seed=123),
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        from importlib.metadata import version
        pfi = version("pytorchfi")
    except Exception:
        pfi = None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
            "python": platform.python_version(), "torch": torch.__version__,
            "pytorchfi": pfi, "platform": platform.platform()}


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class Variant:
    """A measured variant: `one()` runs one iteration and returns its seconds."""

    def __init__(self, name: str, group: str, desc: str, one, baseline: str | None = None):
        self.name, self.group, self.desc, self.one = name, group, desc, one
        self.baseline = baseline or {"train": "train/none", "infer": "infer/plain",
                                     "own": "own/plain"}[group]
        self.samples: list[list[float]] = []   # per repeat: ms of each iteration


class TrainRun:
    """One trainer stepping through the same step indices as the other training variants.

    `idle`: faults armed, each step inside the timed region, on a second TorchInjector over the
    trainer's layers (replicas = the configuration's) that nobody tells which replica is being
    computed: its replica stays 0, so faults on other replicas have their hooks installed and
    called on every replica's shard, and never fire."""

    def __init__(self, config, faults, idle=()):
        self.trainer = TorchTrainer(config)
        self.faults = tuple(faults)
        self.idle = tuple(idle)
        self.side = (TorchInjector(self.trainer.layers, replicas=config.replicas)
                     if self.idle else None)
        if self.side is not None:
            self.side.validate(self.idle)
            assert all(f.replica != self.side.replica for f in self.idle), \
                "an idle fault must target a replica other than the side injector's"
        self.step = 0
        self.last = None

    def one(self) -> float:
        s = self.step
        firing = [f for f in self.faults if f.active(s)]   # as faultlab.runner does
        t0 = time.perf_counter()
        if self.side is not None:
            self.side.begin_step(self.idle, s)
        try:
            self.last = self.trainer.train_step(s, firing)
        finally:
            if self.side is not None:
                self.side.end_step()
        dt = time.perf_counter() - t0
        self.step += 1
        return dt


def forward_timer(model, x, before=None):
    """One timed forward pass (no_grad); `before` runs inside the timed region."""
    def one() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            if before is not None:
                before()
            model(x)
            return time.perf_counter() - t0
    return one


def build(args):
    cfg = default_config(args.workload, **REFERENCE[args.workload])
    shapes = operand_shapes(cfg)
    out_shape = shapes[FWD_LAYER][Site.FWD_OUTPUT][0]      # canonical NHWC
    bwd_shape = shapes[BWD_LAYER][Site.BWD_INPUT][0]       # (n, h_in, w_in, c_out)
    fpos = (0, out_shape[1] // 2, out_shape[2] // 2, out_shape[3] // 2)
    bpos = (0, bwd_shape[1] // 2, bwd_shape[2] // 2, bwd_shape[3] // 2)
    perm = Duration("permanent")
    flip = ValueSpec("bitflip", bit=FLIP_BIT)

    def fwd(replica, value=flip):
        return FaultSpec(Site.FWD_OUTPUT, value, PositionSpec("explicit", indices=(fpos,)),
                         layer=FWD_LAYER, replica=replica, duration=perm, seed=7)

    def bwd(replica):
        return FaultSpec(Site.BWD_INPUT, flip, PositionSpec("explicit", indices=(bpos,)),
                         layer=BWD_LAYER, replica=replica, duration=perm, seed=7)

    R = cfg.replicas
    if R < 2:
        raise SystemExit("the reference configuration needs at least 2 replicas (idle faults "
                         "target replica 1)")
    # (name, description, faults handed to train_step, idle faults on a second injector)
    train_specs = [
        ("train/none", "training step, no injector (faults=())", (), ()),
        ("train/idle-fwd", f"armed, idle: fwd_output hook on {FWD_LAYER}, replica 1 of a second "
                           f"injector whose replica stays 0 (never matches)", (), (fwd(1),)),
        ("train/idle-bwd", f"armed, idle: bwd_input full backward hook on {BWD_LAYER}, replica 1 "
                           f"of a second injector whose replica stays 0 (never matches)", (),
         (bwd(1),)),
        ("train/fire-fwd", f"firing: fwd_output bitflip bit {FLIP_BIT} at {fpos} of {FWD_LAYER},"
                           f" replica 1, every step", (fwd(1),), ()),
        ("train/fire-bwd", f"firing: bwd_input bitflip bit {FLIP_BIT} at {bpos} of {BWD_LAYER},"
                           f" replica 1, every step (recomputes the backward conv)", (bwd(1),), ()),
    ]
    runs, variants = {}, []
    for name, desc, faults, idle in train_specs:
        seed_everything(cfg.seed)
        runs[name] = TrainRun(cfg, faults, idle)
        variants.append(Variant(name, "train", desc, runs[name].one))

    # --- inference ------------------------------------------------------------------------------
    from pytorchfi.core import fault_injection
    pfi_version = machine()['pytorchfi']

    seed_everything(cfg.seed)
    model = build_workload(cfg, with_data=False).model.eval()
    b = cfg.per_replica_batch
    x = torch.rand((b, 3, cfg.input_size, cfg.input_size),
                   generator=torch.Generator().manual_seed(cfg.seed))
    set_fault = fwd(0, ValueSpec("set", values=(SET_VALUE,)))
    idle_fault = fwd(1, ValueSpec("set", values=(SET_VALUE,)))   # injector.replica stays 0

    conv_names = [n.replace(".", "_") for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Conv2d)]
    layer_num = conv_names.index(FWD_LAYER)
    pfi = fault_injection(model, b, input_shape=[3, cfg.input_size, cfg.input_size],
                          layer_types=[torch.nn.Conv2d], use_cuda=False)
    _, h, w, c = fpos
    pfi_model = pfi.declare_neuron_fi(batch=[0], layer_num=[layer_num], dim1=[c], dim2=[h],
                                      dim3=[w], value=[SET_VALUE])
    pfi_model.eval()

    # Each injector variant gets its own copy of the model with its hooks installed once for
    # the whole run (pytorchfi works on its own deep copy too), so iterations can interleave.
    fl_idle_model, fl_model = copy.deepcopy(model), copy.deepcopy(model)
    inj_idle = TorchInjector(layer_map(fl_idle_model), replicas=R)   # idle_fault: replica 1
    inj = TorchInjector(layer_map(fl_model))
    inj_idle.begin_step([idle_fault], 0)
    inj.begin_step([set_fault], 0)

    variants += [
        Variant("infer/plain", "infer", "forward pass, no injector", forward_timer(model, x)),
        Variant("infer/faultlab-idle", "infer",
                f"faultlab TorchInjector (replicas={R}), fwd_output hook on {FWD_LAYER} for "
                f"replica 1 while replica 0 is computed",
                forward_timer(fl_idle_model, x)),
        Variant("infer/faultlab", "infer",
                f"faultlab TorchInjector, fwd_output SET {SET_VALUE:g} at {fpos} (NHWC) of "
                f"{FWD_LAYER}", forward_timer(fl_model, x)),
        Variant("infer/pytorchfi", "infer",
                f"pytorchfi {pfi_version} declare_neuron_fi, value {SET_VALUE:g} at layer_num "
                f"{layer_num} (b,c,h,w)=(0,{c},{h},{w})",
                forward_timer(pfi_model, x, pfi.reset_current_layer)),
    ]

    # --- one layer alone: per-call hook costs, small enough to drown in a whole step's noise --
    def nchw(canon):
        n, hh, ww, cc = canon
        return (n, cc, hh, ww)

    def layer_timer(mod, shape, backward: bool, injector=None, fault=None):
        """LAYER_CALLS calls of one layer (forward, or forward+backward). With `fault`, each
        call is a whole step of that layer: begin_step (install; the fault is resolved on its
        first use), the call, end_step -- what a firing fault costs per training step."""
        xin = torch.rand(nchw(shape), generator=torch.Generator().manual_seed(cfg.seed),
                         requires_grad=True)
        state = {"step": 0}

        def one() -> float:
            t0 = time.perf_counter()
            for _ in range(LAYER_CALLS):
                if fault is not None:
                    injector.begin_step([fault], state["step"])
                    state["step"] += 1
                out = mod(xin)
                if backward:
                    out.sum().backward()
                if fault is not None:
                    injector.end_step()
            return (time.perf_counter() - t0) / LAYER_CALLS
        return one

    lmodel = build_workload(cfg, with_data=False).model.train()
    lmods = {}
    for tag in ("plain", "idle", "fire"):
        lm = layer_map(copy.deepcopy(lmodel))
        lmods[tag] = {FWD_LAYER: lm[FWD_LAYER], BWD_LAYER: lm[BWD_LAYER]}
    # idle: replica-1 faults on an injector of R replicas whose replica stays 0 (never fires)
    TorchInjector(lmods["idle"], replicas=R).begin_step([fwd(1), bwd(1)], 0)
    fire_inj = TorchInjector(lmods["fire"])                        # its replica stays 0
    fin, bin_ = shapes[FWD_LAYER][Site.FWD_INPUT][0], shapes[BWD_LAYER][Site.FWD_INPUT][0]
    variants += [
        Variant("layer/fwd-plain", "layer", f"{FWD_LAYER} alone, forward, input {nchw(fin)}",
                layer_timer(lmods["plain"][FWD_LAYER], fin, False), "layer/fwd-plain"),
        Variant("layer/fwd-idle", "layer", "the same, idle fwd_output hook installed",
                layer_timer(lmods["idle"][FWD_LAYER], fin, False), "layer/fwd-plain"),
        Variant("layer/fwd-fire", "layer", "the same, fwd_output bitflip firing: begin_step + "
                "call + end_step per call", layer_timer(lmods["fire"][FWD_LAYER], fin, False,
                                                        fire_inj, fwd(0)), "layer/fwd-plain"),
        Variant("layer/bwd-plain", "layer", f"{BWD_LAYER} alone, forward+backward, input "
                f"{nchw(bin_)}", layer_timer(lmods["plain"][BWD_LAYER], bin_, True),
                "layer/bwd-plain"),
        Variant("layer/bwd-idle", "layer", "the same, idle bwd_input full backward hook installed",
                layer_timer(lmods["idle"][BWD_LAYER], bin_, True), "layer/bwd-plain"),
        Variant("layer/bwd-fire", "layer", "the same, bwd_input bitflip firing: begin_step + "
                "call + end_step per call", layer_timer(lmods["fire"][BWD_LAYER], bin_, True,
                                                        fire_inj, bwd(0)), "layer/bwd-plain"),
    ]

    # --- correctness checks of the inference variants (untimed) ---------------------------------
    with torch.no_grad():
        plain, fl, fl_idle = model(x), fl_model(x), fl_idle_model(x)
        pfi.reset_current_layer()
        pf = pfi_model(x)
    checks = {
        "infer_faultlab_equals_pytorchfi": bool(torch.equal(fl, pf)),
        "infer_fault_changes_output": not bool(torch.equal(fl, plain)),
        "infer_idle_equals_plain": bool(torch.equal(fl_idle, plain)),
    }
    info = {"config": cfg.to_dict(), "fwd_position_nhwc": list(fpos),
            "bwd_position_nhwc": list(bpos), "pytorchfi_layer_num": layer_num,
            "pytorchfi_conv_layers": pfi.get_total_layers()}
    return variants, runs, checks, info


def train_checks(runs) -> dict:
    """Idle hooks must leave training bit-identical; firing faults must change it."""
    ref = runs["train/none"].trainer.model.state_dict()

    def same(name):
        sd = runs[name].trainer.model.state_dict()
        return all(torch.equal(ref[k], sd[k]) for k in ref)

    out = {f"{n}_bit_identical_to_none": same(n) for n in ("train/idle-fwd", "train/idle-bwd")}
    out.update({f"{n}_changed_training": not same(n) for n in ("train/fire-fwd", "train/fire-bwd")})
    out["all_losses_finite"] = all(r.last is not None and np.isfinite(r.last.loss)
                                   for r in runs.values())
    return out


def summarise(variants) -> list[dict]:
    by = {v.name: v for v in variants}
    rows = []
    for v in variants:
        bv = by[v.baseline]
        blocks = [statistics.median(b) for b in v.samples]       # per repeat
        bblocks = [statistics.median(b) for b in bv.samples]
        med, mn = statistics.median(blocks), min(blocks)
        bmed, bmn = statistics.median(bblocks), min(bblocks)
        # iteration i of a round ran right next to the baseline's iteration i
        pairs = [(a, b) for ra, rb in zip(v.samples, bv.samples) for a, b in zip(ra, rb)]
        paired = [a / b for a, b in pairs]
        rows.append({"variant": v.name, "group": v.group, "baseline": bv.name,
                     "description": v.desc, "median_ms": med, "min_ms": mn,
                     "ratio": med / bmed, "ratio_min": mn / bmn,
                     "paired_ratio": statistics.median(paired),
                     "paired_delta_ms": statistics.median([a - b for a, b in pairs]),
                     "blocks_ms": blocks, "samples_ms": v.samples})
    return rows


def table(rows) -> str:
    head = (f"{'variant':<22}{'median ms':>11}{'min ms':>10}{'ratio':>8}{'ratio(min)':>12}"
            f"{'paired':>8}{'paired +ms':>12}  baseline")
    lines = [head, "-" * len(head)]
    group = None
    for r in rows:
        if group is not None and r["group"] != group:
            lines.append("")
        group = r["group"]
        lines.append(f"{r['variant']:<22}{r['median_ms']:>11.3f}{r['min_ms']:>10.3f}"
                     f"{r['ratio']:>8.3f}{r['ratio_min']:>12.3f}{r['paired_ratio']:>8.3f}"
                     f"{r['paired_delta_ms']:>+12.3f}  {r['baseline']}")
    return "\n".join(lines)


def derived(rows, replicas: int) -> dict:
    """What the layer-level costs predict for a training step: an idle fault's hook runs on
    every replica; a firing fault fires on one replica and idles on the others."""
    by = {r["variant"]: r for r in rows}
    step = by["train/none"]["median_ms"]
    out = {}
    for tag in ("fwd", "bwd"):
        idle = by[f"layer/{tag}-idle"]["paired_delta_ms"]
        fire = by[f"layer/{tag}-fire"]["paired_delta_ms"]
        out[f"{tag}_idle_hook_us_per_call"] = round(idle * 1e3, 1)
        out[f"{tag}_firing_us_per_step"] = round(fire * 1e3, 1)
        out[f"train_idle_{tag}_predicted_ratio"] = round(1 + replicas * idle / step, 4)
        out[f"train_fire_{tag}_predicted_ratio"] = round(
            1 + (fire + (replicas - 1) * idle) / step, 4)
    return out



# --- own loop: faultlab.torch.Injector in a plain user training loop --------------------------

OWN_IDLE_BOUND = 1.005     # issue 12: armed-idle at most 1.005x the plain training step
OWN_FIRE_BOUND = 1.05      # issue 12: firing at most 1.05x
OWN_SET_VALUE = 10.0       # fwd_output value set by faultlab and by pytorchfi (stays finite)
OWN_LAYER = FWD_LAYER.replace("basicblock_2_basic_0_", "basicblock_2.basic_0.")   # torch path


def own_body(model, opt, x, y):
    """The user's training step: what every own-loop variant times."""
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


class OwnRun:
    """One copy of the user's model and optimizer stepping through the same step indices as
    the other own-loop variants. `wrap(step)` gives the context the step runs in (None: the
    plain loop); `rearm(step)` runs untimed before the step (arming a transient fault for
    it); `before()` runs inside the timed region (pytorchfi's layer-counter reset). The RNG
    is re-seeded from the step index (untimed) before every step, so the model's dropout
    draws the same masks in every variant."""

    def __init__(self, model, opt, x, y, seed, wrap=None, rearm=None, before=None):
        self.model, self.opt, self.x, self.y = model, opt, x, y
        self.seed, self.wrap, self.rearm, self.before = seed, wrap, rearm, before
        self.step = 0
        self.losses: list[float] = []

    def one(self) -> float:
        s = self.step
        if self.rearm is not None:
            self.rearm(s)
        torch.manual_seed(self.seed * 100003 + s)
        model, opt, x, y = self.model, self.opt, self.x, self.y
        t0 = time.perf_counter()
        if self.before is not None:
            self.before()
        if self.wrap is None:
            loss = own_body(model, opt, x, y)
        else:
            with self.wrap(s):
                loss = own_body(model, opt, x, y)
        dt = time.perf_counter() - t0
        self.losses.append(loss.item())
        self.step += 1
        return dt


def build_own(args, cfg):
    """The own-loop variants: the benchmark's ResNet-18 trained by a plain loop (a fixed
    batch, SGD with momentum or Adam), plain and under faultlab.torch.Injector, and
    pytorchfi's corrupted copy trained the same way."""
    import faultlab
    import faultlab.torch as ft

    seed_everything(cfg.seed)
    base = build_workload(cfg, with_data=False).model.train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    b = args.own_batch
    x = torch.rand((b, 3, cfg.input_size, cfg.input_size), generator=gen)
    with torch.no_grad():
        classes = base.eval()(x[:1]).shape[1]
    base.train()
    y = torch.randint(0, classes, (b,), generator=gen)

    def make_opt(params):
        if args.own_optimizer == "adam":
            return torch.optim.Adam(params, lr=1e-3)
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def copy_pair():
        m = copy.deepcopy(base).train()
        return m, make_opt(m.parameters())

    # positions in torch's layout: NCHW output, (out, in, kh, kw) weight
    mod = dict(base.named_modules())[OWN_LAYER]
    with torch.no_grad():
        shapes = {}
        h = mod.register_forward_hook(lambda m, a, o: shapes.update(out=tuple(o.shape)))
        base.eval()(x)
        h.remove()
        base.train()
    _, oc, oh, ow = shapes["out"]
    opos = (0, oc // 2, oh // 2, ow // 2)
    wpos = (mod.weight.shape[0] // 2, mod.weight.shape[1] // 2, 1, 1)

    runs, variants = {}, []

    def add(name, desc, run):
        runs[name] = run
        variants.append(Variant(name, "own", desc, run.one, "own/plain"))

    m, o = copy_pair()
    add("own/plain", f"plain user step: zero_grad, forward, cross-entropy, backward, "
        f"{args.own_optimizer} step (batch {b})", OwnRun(m, o, x, y, cfg.seed))

    m, o = copy_pair()
    inj = ft.Injector(m, o, example_input=x)
    add("own/step-empty", "with injector.step(k): around the step, nothing armed",
        OwnRun(m, o, x, y, cfg.seed, wrap=inj.step))
    injectors = {"own/step-empty": inj}

    m, o = copy_pair()
    inj = ft.Injector(m, o, example_input=x)
    inj.arm([faultlab.fault("fwd_output", OWN_LAYER, step=10 ** 9, bit=FLIP_BIT,
                            positions=[opos]),
             faultlab.fault("fwd_weight", OWN_LAYER, step=10 ** 9, bit=FLIP_BIT,
                            positions=[wpos])])
    add("own/armed-later", "armed-idle: fwd_output + fwd_weight faults armed for a later step "
        "(no hook installed this step)", OwnRun(m, o, x, y, cfg.seed, wrap=inj.step))
    injectors["own/armed-later"] = inj

    m, o = copy_pair()
    inj = ft.Injector(m, o, replicas=2, example_input=x)      # injector.replica stays 0
    inj.arm([faultlab.fault("fwd_output", OWN_LAYER, replica=1, duration="permanent",
                            bit=FLIP_BIT, positions=[opos])])
    add("own/armed-replica", f"armed-idle: permanent fwd_output fault on replica 1 of "
        f"Injector(replicas=2) while replica 0 is computed: hook on {OWN_LAYER} installed, "
        f"called, never fires", OwnRun(m, o, x, y, cfg.seed, wrap=inj.step))
    injectors["own/armed-replica"] = inj

    def transient(inj, **kw):
        def rearm(s):          # untimed: a transient fault armed for the step about to run
            inj.arm([faultlab.fault(step=s, **kw)])
        return rearm

    m, o = copy_pair()
    inj = ft.Injector(m, o, example_input=x)
    add("own/fire-fwd-output", f"firing: transient fwd_output SET {OWN_SET_VALUE:g} at "
        f"{opos} (NCHW) of {OWN_LAYER}, armed (untimed) for each step",
        OwnRun(m, o, x, y, cfg.seed, wrap=inj.step,
               rearm=transient(inj, site="fwd_output", layer=OWN_LAYER, value="set",
                               values=(OWN_SET_VALUE,), positions=[opos])))
    injectors["own/fire-fwd-output"] = inj

    m, o = copy_pair()
    inj = ft.Injector(m, o, example_input=x)
    add("own/fire-fwd-weight", f"firing: transient fwd_weight bitflip bit {FLIP_BIT} at "
        f"{wpos} (out, in, kh, kw) of {OWN_LAYER}, armed (untimed) for each step",
        OwnRun(m, o, x, y, cfg.seed, wrap=inj.step,
               rearm=transient(inj, site="fwd_weight", layer=OWN_LAYER, bit=FLIP_BIT,
                               positions=[wpos])))
    injectors["own/fire-fwd-weight"] = inj

    # pytorchfi: its constructor runs a profiling forward (global RNG, BN statistics in train
    # mode) on the model it is given, and declare_neuron_fi trains nothing of the user's: it
    # returns a deep copy with hooks. Give it its own copy in eval mode, train the corrupted
    # copy with its own optimizer, reset its layer counter before every step (timed).
    from pytorchfi.core import fault_injection
    conv_names = [n for n, mm in base.named_modules() if isinstance(mm, torch.nn.Conv2d)]
    layer_num = conv_names.index(OWN_LAYER)
    with torch.random.fork_rng():
        pfi = fault_injection(copy.deepcopy(base).eval(), b,
                              input_shape=[3, cfg.input_size, cfg.input_size],
                              layer_types=[torch.nn.Conv2d], use_cuda=False)
        pm = pfi.declare_neuron_fi(batch=[opos[0]], layer_num=[layer_num], dim1=[opos[1]],
                                   dim2=[opos[2]], dim3=[opos[3]], value=[OWN_SET_VALUE])
    pm.train()
    add("own/pytorchfi", f"pytorchfi {machine()['pytorchfi']} declare_neuron_fi: value "
        f"{OWN_SET_VALUE:g} at layer_num {layer_num} {opos} every step, its corrupted copy "
        f"trained by the same loop; reset_current_layer() per step (timed)",
        OwnRun(pm, make_opt(pm.parameters()), x, y, cfg.seed, before=pfi.reset_current_layer))

    # the same element, one forward each (untimed, fresh copies): faultlab == pytorchfi
    torch.manual_seed(cfg.seed)
    fm = copy.deepcopy(base).train()
    finj = ft.Injector(fm, example_input=x)
    finj.arm([faultlab.fault("fwd_output", OWN_LAYER, value="set", values=(OWN_SET_VALUE,),
                             positions=[opos])])
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        with finj.step(0):
            fl_out = fm(x)
        torch.manual_seed(0)
        pfi.reset_current_layer()
        pf_out = pm(x)
        torch.manual_seed(0)
        plain_out = copy.deepcopy(base).train()(x)
    checks = {"own_faultlab_fwd_output_equals_pytorchfi": bool(torch.equal(fl_out, pf_out)),
              "own_fault_changes_forward": not bool(torch.equal(fl_out, plain_out))}
    info = {"layer": OWN_LAYER, "output_position_nchw": list(opos),
            "weight_position": list(wpos), "batch": b, "optimizer": args.own_optimizer,
            "pytorchfi_layer_num": layer_num}
    return variants, runs, injectors, checks, info


def own_checks(runs) -> dict:
    """Idle variants train bit-identically to the plain loop; firing ones change the loss."""
    ref = runs["own/plain"]
    rsd = ref.model.state_dict()

    def same(name):
        r = runs[name]
        sd = r.model.state_dict()
        return r.losses == ref.losses and all(torch.equal(rsd[k], sd[k]) for k in rsd)

    out = {f"{n}_bit_identical_to_plain": same(n)
           for n in ("own/step-empty", "own/armed-later", "own/armed-replica")}
    for n in ("own/fire-fwd-output", "own/fire-fwd-weight", "own/pytorchfi"):
        out[f"{n}_changed_loss"] = runs[n].losses[0] != ref.losses[0]
    out["own_losses_finite"] = all(all(np.isfinite(v) for v in r.losses) for r in runs.values())
    return out


def own_isolated(injectors, plain_ms: float, n: int = 2000) -> dict:
    """The injector's own per-step work in the armed-idle variants, timed alone (`with
    injector.step(k): pass`, n times, median of 5 blocks), as a ratio to the plain step: an
    estimate far below the whole step's noise (it leaves out the call of an installed idle
    hook, which returns at its replica check). Not for the firing variants: their cost
    (resolving the fault, corrupting) is in the forward pass."""
    out = {}
    for name, inj in injectors.items():
        if name.startswith("own/fire"):
            continue
        blocks = []
        for _ in range(5):
            tot = 0.0
            for k in range(n):
                t0 = time.perf_counter()
                with inj.step(k):
                    pass
                tot += time.perf_counter() - t0
            blocks.append(tot / n)
        us = statistics.median(blocks) * 1e6
        out[name] = {"us_per_step": round(us, 2), "ratio": 1 + us / (plain_ms * 1e3)}
    return out


def median_ci(vals):
    """(median, 95% CI of the median by order statistics)."""
    v = sorted(vals)
    n = len(v)
    half = 0.98 * n ** 0.5
    lo, hi = max(0, int(n / 2 - half)), min(n - 1, int(np.ceil(n / 2 + half)))
    return statistics.median(v), v[lo], v[hi]


def own_verdicts(variants, rows) -> list[dict]:
    by = {v.name: v for v in variants}
    base = by["own/plain"]
    out = []
    for r in rows:
        if r["group"] != "own" or r["variant"] == "own/plain":
            continue
        v = by[r["variant"]]
        pairs = [a / b for ra, rb in zip(v.samples, base.samples) for a, b in zip(ra, rb)]
        med, lo, hi = median_ci(pairs)
        bound = OWN_FIRE_BOUND if r["variant"].startswith(("own/fire", "own/pytorchfi")) \
            else OWN_IDLE_BOUND
        out.append({"variant": r["variant"], "bound": bound, "paired": med, "ci": (lo, hi),
                    "ratio": r["ratio"], "n": len(pairs),
                    "verdict": "PASS" if med <= bound else "FAIL"})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="resnet18", choices=sorted(REFERENCE))
    p.add_argument("--steps", type=int, default=4,
                   help="timed training rounds per repeat (4)")
    p.add_argument("--repeats", type=int, default=5, help="repeats (5)")
    p.add_argument("--infer-iters", type=int, default=30,
                   help="timed inference rounds and layer rounds per repeat (30)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed training steps per variant before the first repeat (2)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--max-minutes", type=float, default=5.0,
                   help="start no further repeat that would end past this much wall time; at "
                        "least one repeat always runs; 0 = no limit (5)")
    p.add_argument("--own-iters", type=int, default=20,
                   help="timed own-loop rounds per repeat (20)")
    p.add_argument("--own-batch", type=int, default=32,
                   help="the own loop's fixed batch size (32)")
    p.add_argument("--own-optimizer", default="sgd", choices=("sgd", "adam"),
                   help="the own loop's optimizer: SGD with momentum 0.9 or Adam (sgd)")
    p.add_argument("--own-only", action="store_true",
                   help="run the own-loop group only (faultlab.torch.Injector in a plain loop)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    args = p.parse_args(argv)
    for k in ("steps", "repeats", "infer_iters", "threads", "own_iters", "own_batch"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.max_minutes < 0:
        p.error("--warmup and --max-minutes must be >= 0")

    torch.set_num_threads(args.threads)
    seed_everything(0)
    cli = list(sys.argv[1:] if argv is None else argv)
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [os.path.relpath(__file__, ROOT)] + cli)
    started = _dt.datetime.now(_dt.timezone.utc)
    load0 = loadavg()
    t_start = time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log("building trainers and models ...")
    if args.own_only:
        variants, runs, checks = [], {}, {}
        info = {"config": default_config(args.workload, **REFERENCE[args.workload]).to_dict()}
    else:
        variants, runs, checks, info = build(args)
    own_vars, own_runs, own_injectors, own_chk, own_info = build_own(
        args, default_config(args.workload, **REFERENCE[args.workload]))
    variants += own_vars
    checks.update(own_chk)
    info["own_loop"] = own_info
    train_v = [v for v in variants if v.group == "train"]
    infer_v = [v for v in variants if v.group == "infer"]
    layer_v = [v for v in variants if v.group == "layer"]
    own_v = [v for v in variants if v.group == "own"]

    log(f"warm-up: {args.warmup} training steps per training variant, 10 forwards per "
        f"inference variant")
    for _ in range(args.warmup):
        for v in train_v + own_v:
            v.one()
    for _ in range(10):
        for v in infer_v + layer_v:
            v.one()

    # Round-robin at the iteration level: one iteration of each variant per round, the start of
    # the round rotating, so a burst of load from elsewhere hits neighbouring variants alike.
    rnd = 0
    budget = args.max_minutes * 60
    last = 0.0
    for r in range(args.repeats):
        elapsed = time.perf_counter() - t_start
        if r and budget and elapsed + last > budget:
            log(f"time budget: stopping after {r} of {args.repeats} repeats "
                f"(--max-minutes {args.max_minutes:g})")
            break
        t_rep = time.perf_counter()
        for group, n in ((train_v, args.steps), (infer_v, args.infer_iters),
                         (layer_v, args.infer_iters), (own_v, args.own_iters)):
            if not group:
                continue
            for v in group:
                v.samples.append([])
            gc.collect()
            for _ in range(n):
                k = rnd % len(group)
                rnd += 1
                for v in group[k:] + group[:k]:
                    v.samples[-1].append(v.one() * 1e3)
        last = time.perf_counter() - t_rep
        log(f"repeat {r + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)")
    done = len(own_v[0].samples)

    if runs:
        checks.update(train_checks(runs))
    checks.update(own_checks(own_runs))
    rows = summarise(variants)
    pred = derived(rows, info["config"]["replicas"]) if runs else None
    own_plain_ms = next(r["median_ms"] for r in rows if r["variant"] == "own/plain")
    own_alone = own_isolated(own_injectors, own_plain_ms)
    verdicts = own_verdicts(variants, rows)
    load1 = loadavg()
    usable = machine()["usable_cores"] or 1
    busy = None
    if load0 and load1 and max(load0[0], load1[0]) > usable + 0.5:
        busy = (f"the machine was busy (1-min load average {load0[0]} -> {load1[0]} on {usable} "
                f"cores): other processes took CPU time, so absolute times are inflated and the "
                f"whole-step ratios are noisy; trust 'paired'"
                + (" and the layer-level predictions" if not args.own_only else "")
                + " more" + (", or rerun with --threads 1." if args.threads > 1 else "."))
    doc = {
        "benchmark": "injector_overhead", "command": command,
        "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "threads": args.threads,
        "loadavg_start": load0, "loadavg_end": load1, "busy_warning": busy,
        "steps": args.steps, "repeats": args.repeats, "repeats_done": done,
        "max_minutes": args.max_minutes, "infer_iters": args.infer_iters,
        "warmup": args.warmup, "wall_s": round(time.perf_counter() - t_start, 1),
        "workload": info, "checks": checks, "derived": pred, "results": rows,
        "own_loop": {"bounds": {"armed_idle": OWN_IDLE_BOUND, "firing": OWN_FIRE_BOUND},
                     "verdicts": verdicts, "injector_alone": own_alone,
                     "iters": args.own_iters, "batch": args.own_batch,
                     "optimizer": args.own_optimizer},
        "notes": [
            "train/idle-*: a fault on replica 1 armed each step on a second TorchInjector "
            "(replicas = the configuration's) over the trainer's layers, whose current replica "
            "stays 0 (the trainer drives only its own injector): its hook is installed and runs "
            "on all replicas but never fires; this is the per-replica cost of a firing fault's "
            "hook on the replicas it does not hit. Steps in which no fault fires install no "
            "hooks and cost train/none.",
            f"train/fire-*: bit {FLIP_BIT} (top mantissa bit) so every variant trains on finite "
            "values; the fault is resolved again every step (new hooks per step), as in a "
            "campaign.",
            f"layer/*: one layer alone, {LAYER_CALLS} calls per iteration, reported per call; "
            "idle = the hook of a replica-1 fault installed on an injector whose replica stays "
            "0, its replica check failing; fire = begin_step, call, end_step per call (a firing "
            "fault's whole per-step cost on its layer). The predicted training "
            "ratios add replicas x idle (idle) or fire + (replicas - 1) x idle (fire) to "
            "train/none.",
            "each repeat runs --steps rounds of training and --infer-iters rounds of inference "
            "and of the layer group; "
            "a round runs one iteration of every variant of the group (rotating start). A "
            "repeat's value is the median ms of its iterations; median ms / min ms are the median "
            "and minimum of those over repeats; ratio = median / baseline median; ratio(min) = "
            "min / baseline min; paired = median over all rounds of (iteration / the baseline's "
            "iteration in the same round), the estimate least sensitive to load from elsewhere.",
            "own/*: the benchmark's model trained by a plain user loop (fixed batch, "
            "zero_grad / forward / cross-entropy / backward / optimizer step), each variant on "
            "its own copy of the model and optimizer, the RNG re-seeded from the step index "
            "(untimed) before every step so dropout draws the same masks everywhere. "
            "own/fire-*: the transient fault is armed for the coming step outside the timed "
            "region (arming validates; a loop arms once), so the timed step is the per-step "
            "path of a step in which a transient fault fires. PASS/FAIL compares the paired "
            "ratio (median over rounds of step / plain step of the same round) with the "
            "bound; its 95% CI (order statistics) is printed beside it. 'injector alone' (armed-"
            "idle rows) is the injector's own work per step, `with injector.step(k): pass` "
            "timed by itself, as a ratio to the plain step.",
        ],
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    m = doc["machine"]
    print(f"faultlab injector overhead -- {args.workload}: width {info['config']['width']}, "
          f"{info['config']['input_size']}x{info['config']['input_size']} "
          f"{info['config']['dataset']}, {info['config']['replicas']} replicas x "
          f"{info['config']['per_replica_batch']}")
    print(f"date     {doc['date_utc']}")
    print(f"machine  {m['cpu']}; {m['cores']} cores ({m['usable_cores']} usable), "
          f"torch.set_num_threads({args.threads}); loadavg {load0} -> {doc['loadavg_end']}")
    print(f"software python {m['python']}, torch {m['torch']}, pytorchfi {m['pytorchfi']}")
    print(f"command  {command}")
    cut = "" if done == args.repeats else f" (of {args.repeats}: --max-minutes reached)"
    oi = info["own_loop"]
    own_desc = (f"{args.own_iters} own-loop rounds (batch {oi['batch']}, {oi['optimizer']})")
    if args.own_only:
        print(f"timing   {done} repeats{cut} x {own_desc}, interleaved round-robin; "
              f"{args.warmup} warm-up steps per variant excluded; wall {doc['wall_s']} s")
    else:
        print(f"timing   {done} repeats{cut} x ({args.steps} training rounds + "
              f"{args.infer_iters} inference rounds + {args.infer_iters} layer rounds + "
              f"{own_desc}), interleaved round-robin; {args.warmup} warm-up steps and 10 "
              f"warm-up iterations per variant excluded; wall {doc['wall_s']} s")
    print()
    print(table(rows))
    print()
    for r in rows:
        print(f"  {r['variant']:<20} {r['description']}")
    if pred is not None:
        print()
        print("layer-level costs (paired, per call of the layer):")
        for t, site in (("fwd", f"fwd_output on {FWD_LAYER}"),
                        ("bwd", f"bwd_input on {BWD_LAYER}")):
            print(f"  {site}: idle hook {pred[f'{t}_idle_hook_us_per_call']:+.1f} us, firing "
                  f"(install + resolve + corrupt + remove) "
                  f"{pred[f'{t}_firing_us_per_step']:+.1f} us")
        print(f"  => predicted training ratios: idle-fwd "
              f"{pred['train_idle_fwd_predicted_ratio']:.4f}, "
              f"idle-bwd {pred['train_idle_bwd_predicted_ratio']:.4f}, fire-fwd "
              f"{pred['train_fire_fwd_predicted_ratio']:.4f}, fire-bwd "
              f"{pred['train_fire_bwd_predicted_ratio']:.4f}")
    print()
    print(f"own loop vs the plain step ({own_plain_ms:.3f} ms; bounds: armed-idle "
          f"<= {OWN_IDLE_BOUND}x, firing <= {OWN_FIRE_BOUND}x):")
    for v in verdicts:
        alone = own_alone.get(v["variant"])
        extra = (f"; injector alone {alone['us_per_step']:.1f} us/step = "
                 f"{alone['ratio']:.5f}x" if alone else "")
        who = "pytorchfi, for comparison" if v["variant"] == "own/pytorchfi" else "faultlab"
        print(f"  {v['variant']:<20} paired {v['paired']:.4f}x (95% CI {v['ci'][0]:.4f}-"
              f"{v['ci'][1]:.4f}, n={v['n']}), ratio {v['ratio']:.4f}x  <= {v['bound']}x: "
              f"{v['verdict']} ({who}){extra}")
    print()
    if busy:
        print(f"WARNING: {busy}")
        print()
    for n in doc["notes"]:
        print(f"note: {n}")
    print("checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
