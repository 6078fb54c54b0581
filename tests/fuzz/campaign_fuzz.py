#!/usr/bin/env python
"""Campaign-file fuzzer (issue 11, item 6): mutated campaign files against faultlab's loader.

Every case is a file (or a path that is not a file) fed to what `faultlab validate` runs:
``faultlab.campaigns.load_campaign`` (parse level) then ``validate_trials`` (validate level:
layers and operand shapes, through the torch backend on the meta device; a TF file is checked
against the same canonical shapes from torch, so TF is never imported). A sample also goes
through the real command, ``python -m faultlab validate FILE``, in a child process.

The oracle, for each case:

* the outcome is a clean acceptance or a ``FaultlabError`` whose message is one line (the
  command: exit 0, or exit 2 with exactly one line on stderr and no traceback). Any other
  exception, exit code, a multi-line message or a hang (a child past its timeout, or an
  in-process case past ``CASE_TIMEOUT`` seconds) is a failure;
* an accepted file is checked by this module's own reading of docs/formats.md: every field of
  every trial in range (replica < replicas, step within the run, bits within the layout and,
  at validate level, within the operand's dtype, positions within the operand, ...), the digest
  is the file's SHA-256, a second load gives the same digest and trials, and
  ``format_columnar`` writes trials that read back equal;
* a *targeted* case differs from a valid file (its twin, checked to be accepted) by one
  invalid value in a known cell; accepting it counts as ``invalid_accepted``. Mutations that
  the format promises to ignore (BOM, CRLF, trailing commas, consistent column swaps, ...)
  must give the seed's trials.

Checks that depend on fixes in progress are labelled *pending* and counted apart:
``item3-size`` (issue 11 item 3: sizes a machine cannot hold must be refused, not overflow)
and ``item4-workload`` (item 4: a ``module:function`` workload named by a file is refused
unless allowed, and nothing it names is imported).

Run:   python tests/fuzz/campaign_fuzz.py --cases 3000 --seed 1
       python tests/fuzz/campaign_fuzz.py --seed 1 --case 417 --cli     # re-run one case
Every failure prints its case number, its mutation and where its bytes were saved; a case is a
pure function of (seed, case number, the seed files present).
"""

from __future__ import annotations

import argparse
import codecs
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from faultlab.errors import FaultlabError

REPO = Path(__file__).resolve().parents[2]
ISCA_AE = REPO.parent / "shared" / "reference" / "isca_ae"

CASE_TIMEOUT = 20.0       # seconds an in-process case may take before it counts as a hang
CLI_TIMEOUT = 120.0       # seconds for one `python -m faultlab validate` (imports torch)
PATH_TIMEOUT = 20.0       # seconds per path case in the loader child

PENDING_SIZE = "item3-size"
PENDING_WORKLOAD = "item4-workload"

# --- what docs/formats.md promises (this oracle's own reading, not faultlab's code) -----------

MAX_INT = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_DIMS = 8
MAX_NAME = 200
WORKLOAD_RANGES = {"replicas": (1, 65536), "per_replica_batch": (1, MAX_INT),
                   "width": (1, MAX_INT), "input_size": (1, MAX_INT),
                   "steps_per_epoch": (1, MAX_INT), "epochs": (1, MAX_INT),
                   "eval_samples": (1, MAX_INT), "checkpoint_every": (0, MAX_INT),
                   "seed": (0, MAX_SEED)}
BUILTINS = ("resnet18", "mlp", "transformer")
SITES = ("fwd_input", "fwd_weight", "fwd_output", "grad_out", "bwd_input", "bwd_weight",
         "grad_in", "grad_wt", "param", "opt_state", "host_state")
TENSORS = {"param": ("weight", "bias"), "opt_state": ("m", "v"),
           "host_state": ("weight", "bias", "m", "v", "transit", "grad")}
VALUE_MODELS = ("bitflip", "random", "zero", "copy", "nan", "inf", "-inf", "stuck_at", "scale",
                "set", "degrade")
LAYOUT_WIDTH = {"native": 64, "fp32": 32, "fp16": 16, "bf16": 16, "fp64": 64, "int8": 8}
POSITION_MODES = ("explicit", "random", "consecutive", "groups")
DURATIONS = ("transient", "intermittent", "permanent", "steps")
FRAMEWORKS = ("torch", "tf")
#: dtypes a value can be corrupted in, and their width (an int64 token id cannot)
DTYPE_WIDTH = {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64, "int8": 8}
_LAYER_CHARS = re.compile(r"[A-Za-z0-9_.:/\[\]-]+")
_DATASET_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
_TRIAL_CHARS = re.compile(r"[A-Za-z0-9_.:-]+")
_USER_WORKLOAD = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)

#: a configuration whose lower-bound memory estimate is above this cannot be held anywhere
#: this runs: accepting it, or crashing on it, is issue 11 item 3
CERTAINLY_TOO_BIG = 2**40


def installed_workloads() -> set:
    """Names installed packages register (entry point group faultlab.workloads)."""
    global _INSTALLED
    if _INSTALLED is None:
        from importlib.metadata import entry_points
        try:
            _INSTALLED = {e.name for e in entry_points(group="faultlab.workloads")}
        except Exception:      # noqa: BLE001 - a broken distribution: none
            _INSTALLED = set()
    return _INSTALLED


_INSTALLED = None


def memory_lower_bound(cfg) -> int:
    """Bytes that one replica of a built-in workload certainly needs (one weight or one
    activation tensor, float32); 0 for a user workload (unknown)."""
    w, b, s = cfg.width, cfg.per_replica_batch, cfg.input_size
    name = cfg.workload
    if name == "mlp":
        n = max(s * s * w, w * w, b * w, b * s * s)
    elif name == "resnet18":
        n = max(9 * w * w, 49 * 3 * w, b * (s // 2) ** 2 * w, b * s * s * 3)
    elif name == "transformer":
        n = max(3 * w * w, b * s * w, b * 4 * s * s)
    else:
        return 0
    return 4 * n


# --- seeds ---------------------------------------------------------------------------------------

COLUMNS = ("trial", "framework", "workload", "replicas", "per_replica_batch", "width",
           "input_size", "dataset", "steps_per_epoch", "epochs", "eval_samples",
           "checkpoint_every", "lr", "seed", "horizon", "site", "layer", "tensor", "replica",
           "epoch", "step", "value", "bit", "bits", "stuck", "factor", "values", "ramp", "layout",
           "positions", "position_mode", "count", "groups", "duration", "duration_steps",
           "probability", "fault_seed", "stage", "fmodel", "offload")
CFG_COLUMNS = ("framework", "workload", "replicas", "per_replica_batch", "width", "input_size",
               "dataset", "steps_per_epoch", "epochs", "eval_samples", "checkpoint_every", "lr",
               "seed", "horizon", "offload")

#: small configurations of the built-ins (every workload column explicit in generated files)
TEMPLATES = {
    "mlp": dict(workload="mlp", replicas=2, per_replica_batch=8, width=16, input_size=8,
                dataset="digits", steps_per_epoch=5, epochs=4, eval_samples=64,
                checkpoint_every=0, lr="0.01", seed=7, horizon=3),
    "resnet18": dict(workload="resnet18", replicas=2, per_replica_batch=4, width=8,
                     input_size=16, dataset="digits", steps_per_epoch=5, epochs=3,
                     eval_samples=64, checkpoint_every=0, lr="0.001", seed=123, horizon=""),
    "transformer": dict(workload="transformer", replicas=2, per_replica_batch=4, width=32,
                        input_size=8, dataset="corpus", steps_per_epoch=5, epochs=3,
                        eval_samples=32, checkpoint_every=2, lr="0.001", seed=0, horizon=5),
}
#: layers used by generated files: (dimensions of the output, of the weight, has a bias);
#: every dimension of these operands is at least 2 in the templates' configurations
LAYERS = {
    "mlp": {"dense_1": (2, 2, True), "dense_2": (2, 2, True), "dense_3": (2, 2, True)},
    "resnet18": {"conv1": (4, 4, False), "basicblock_1_basic_0_conv1": (4, 4, False),
                 "basicblock_2_basic_0_conv2": (4, 4, False), "dense": (2, 2, True)},
    "transformer": {"block_0_mlp_fc1": (3, 2, True), "block_1_attn_qkv": (3, 2, True),
                    "lm_head": (3, 2, True)},
}
#: a layer of each workload without a weight-gradient kernel operand (bwd_weight)
NO_BWD_WEIGHT = {"resnet18": "bn1", "transformer": "block_0_ln1"}


@dataclass
class Seed:
    name: str
    data: bytes
    fmt: str              # "columnar" | "isca"
    generated: bool = False


def _pos(ndims: int, k: int = 0) -> str:
    return "/".join([str(k)] * ndims)


def _fault_cells(rng: random.Random, wl: str) -> dict:
    """Cells of one valid fault on a template workload (fault columns only)."""
    cfg = TEMPLATES[wl]
    layer, (od, wd, bias) = rng.choice(sorted(LAYERS[wl].items()))
    c: dict = {"layer": layer, "replica": rng.randrange(cfg["replicas"]),
               "epoch": rng.randrange(cfg["epochs"]), "step": rng.randrange(cfg["steps_per_epoch"])}
    if rng.random() < 0.3:
        c["fault_seed"] = rng.randrange(MAX_SEED + 1)
    recipe = rng.randrange(12)
    if recipe == 0:
        c.update(site="fwd_output", value="bitflip", bit=rng.randrange(32), position_mode="random",
                 count=1)
    elif recipe == 1:
        c.update(site="fwd_output", value="zero", positions=_pos(od) + ";" + _pos(od, 1))
    elif recipe == 2:
        site, tensor = (("param", "bias") if bias else ("param", "weight"))
        c.update(site=site, tensor=tensor, value="nan", position_mode="random", count=2,
                 duration="steps", duration_steps=2)
    elif recipe == 3:
        c.update(site="opt_state", tensor=rng.choice(["m", "v"]), value="stuck_at", bit=30,
                 stuck=rng.randrange(2), duration="permanent")
    elif recipe == 4:
        c.update(site="grad_wt", value="scale", factor="1000.0", position_mode="random", count=4)
    elif recipe == 5:
        c.update(site="fwd_weight", value="set", values="1e10;-2.5",
                 positions=_pos(wd) + ";" + _pos(wd, 1))
    elif recipe == 6:
        c.update(site="fwd_output", value="degrade", ramp="0.5", position_mode="consecutive",
                 count=2, duration="steps", duration_steps=3)
    elif recipe == 7:
        c.update(site="grad_out", value="random", layout="bf16", position_mode="groups", count=2,
                 groups=3, duration="intermittent", probability="0.25")
    elif recipe == 8:
        c.update(site="fwd_input", value="bitflip", bits=3, layout="fp16")
    elif recipe == 9:
        c.update(stage="fwrd_inject", fmodel=rng.choice(["RD", "INPUT", "WT_16", "ZERO",
                                                         "RD_CORRECT"]))
    elif recipe == 10:
        c.update(stage="bkwd_inject", fmodel="INPUT", layer=layer + "_grad_in",
                 positions=_pos(od), values="1.5")
    else:
        c.update(site="bwd_input", value="inf", position_mode="random", count=1)
    return {k: str(v) for k, v in c.items()}


def _host_cells(rng: random.Random, wl: str) -> dict:
    """Cells of one valid host_state fault (docs/offload.md) on a template workload trained
    with offload (the row's offload cell is the caller's): every host tensor, the shared
    copies (weight, bias, m, v) on replica 0, one random element."""
    cfg = TEMPLATES[wl]
    layer, (_, _, bias) = rng.choice(sorted(LAYERS[wl].items()))
    tensor = rng.choice(["weight", "m", "v", "transit", "grad"] + (["bias"] if bias else []))
    shared = tensor in ("weight", "bias", "m", "v")
    c: dict = {"site": "host_state", "layer": layer, "tensor": tensor,
               "replica": 0 if shared else rng.randrange(cfg["replicas"]),
               "epoch": rng.randrange(cfg["epochs"]),
               "step": rng.randrange(cfg["steps_per_epoch"]),
               "position_mode": "random", "count": 1}
    c.update(rng.choice([dict(value="bitflip", bit=rng.randrange(32)), dict(value="nan"),
                         dict(value="zero"), dict(value="scale", factor="-2.0")]))
    return {k: str(v) for k, v in c.items()}


def template_row(wl: str, trial: str = "x1", framework: str = "") -> dict:
    row = {k: str(v) for k, v in TEMPLATES[wl].items()}
    row.update(trial=trial, framework=framework)
    return row


def columnar_text(rows: list[dict], columns=COLUMNS, eol: str = "\n") -> str:
    lines = [",".join(columns)]
    lines += [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    return eol.join(lines) + eol


def isca_text(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"{k},{v}\n" for k, v in pairs)


def template_isca(rng: random.Random, wl: str) -> list[tuple[str, str]]:
    cfg = TEMPLATES[wl]
    layer = rng.choice(sorted(LAYERS[wl]))
    pairs = [("model", wl)]
    if rng.random() < 0.5:
        pairs += [("stage", "fwrd_inject"), ("fmodel", rng.choice(["RD", "WT", "INPUT_16"])),
                  ("target_layer", layer)]
    else:
        pairs += [("stage", "bkwd_inject"), ("fmodel", "INPUT"),
                  ("target_layer", layer + "_grad_in")]
    od = _isca_dims(pairs, wl)
    pairs += [("target_worker", str(rng.randrange(cfg["replicas"]))),
              ("target_epoch", str(rng.randrange(cfg["epochs"]))),
              ("target_step", str(rng.randrange(cfg["steps_per_epoch"])))]
    if rng.random() < 0.7:
        pairs += [("inj_pos", _pos(od) + "," + _pos(od, 1)), ("inj_values", "2.87e+24")]
    pairs += [("learning_rate", str(cfg["lr"])), ("seed", str(cfg["seed"]))]
    pairs += [(k, str(cfg[k])) for k in ("replicas", "per_replica_batch", "width",
                                         "input_size", "dataset", "steps_per_epoch", "epochs")]
    if rng.random() < 0.5:
        pairs += [("framework", "torch"), ("horizon", "4")]
    if rng.random() < 0.3:
        pairs += [("duration", "steps"), ("duration_steps", "2")]
    return pairs


def generated_seeds(seed: int) -> list[Seed]:
    """Small valid files of both formats (a pure function of the seed)."""
    rng = random.Random(f"faultlab-fuzz-seeds:{seed}")
    out = []
    for i in range(6):
        wls = [rng.choice(BUILTINS)] + ([rng.choice(BUILTINS)] if i % 2 else [])
        rows = []
        for j in range(rng.randint(2, 6)):
            wl = rng.choice(wls)
            explicit = rng.random() < 0.8
            row = template_row(wl, trial=f"t{j}" if explicit else "")
            r = rng.random()
            if r < 0.15:
                row.update({k: "" for k in ("site", "layer")})   # control trial
            elif r < 0.3 and explicit:       # offloaded training, a host-resident fault
                row.update(offload=rng.choice(["window:1", "window:2"]),
                           **_host_cells(rng, wl))
            else:
                row.update(_fault_cells(rng, wl))
            rows.append(row)
            faulty = row.get("site") or row.get("stage")
            if explicit and faulty and rng.random() < 0.3:   # a second fault, same trial
                twin = dict(row)
                twin.update({k: "" for k in COLUMNS if k not in CFG_COLUMNS and k != "trial"})
                twin.update(_host_cells(rng, wl) if row.get("offload") else
                            _fault_cells(rng, wl))
                rows.append(twin)
        out.append(Seed(f"gen-columnar-{i}", columnar_text(rows).encode(), "columnar", True))
    for i, wl in enumerate(BUILTINS):
        pairs = template_isca(rng, wl)
        head = "# generated ISCA key/value file\n\n" if i == 0 else ""
        out.append(Seed(f"gen-isca-{wl}", (head + isca_text(pairs)).encode(), "isca", True))
    return out


def file_seeds() -> tuple[list[Seed], bool]:
    """The repository's campaign files and, when ../shared is there, the ISCA artifact's."""
    seeds = []
    for p in sorted((REPO / "campaigns").glob("*.csv")):
        seeds.append(Seed(f"campaigns/{p.name}", p.read_bytes(), _sniff(p.read_bytes())))
    shared = (ISCA_AE / "injections").is_dir()
    if shared:
        for p in sorted((ISCA_AE / "injections").glob("*.csv")):
            seeds.append(Seed(f"isca_ae/{p.name}", p.read_bytes(), _sniff(p.read_bytes())))
    return seeds, shared


def _sniff(data: bytes) -> str:
    first = next((ln for ln in data.decode("utf-8", "replace").splitlines()
                  if ln.strip() and not ln.strip().startswith("#")), "")
    return "columnar" if "workload" in [c.strip().lower() for c in first.split(",")] else "isca"


# --- cases ---------------------------------------------------------------------------------------

@dataclass
class Case:
    number: int
    kind: str                  # seed | mutation | targeted | workload | path
    desc: str
    data: bytes | None = None
    expect: str = "any"        # any | accept | refuse | same
    pending: str | None = None
    twin: bytes | None = None  # targeted: the valid file this one differs from by one cell
    same_as: bytes | None = None
    path_kind: str | None = None
    module: str | None = None  # workload: the module the file names
    validate_level: bool = False   # targeted: only validation (layers, shapes) can refuse it


INTERESTING = [
    "2147483647", "2147483648", "-2147483648", "9223372036854775807", "9223372036854775808",
    "18446744073709551616", "1e308", "1e309", "-1e308", "1e-400", "4.9e-324", "1" + "0" * 400,
    "-1", "-0", "+0", "0", "00", "+3", " 7 ", "nan", "NaN", "NAN", "-nan", "inf", "-inf",
    "Infinity", "INF", "1.5", "1e3", "0x10", "1_000", "true", "None", "", "  ", "\u0661\u0662",
    "\uff11\uff12", "\u00b2", "1/0", "0/0/0/0", "0;0", "1e10;nan", "\u202e1", "1\u0301", "\U0001F642",
    "\x00", "a" * 201, "0" * 30 + "1", "9" * 25, ".5", "5.", "e5", "-.e1", "--1", "+-1", "0/-1",
    "0//0", "/", ";", "1e+308", "2**31", "${HOME}", "$(id)", "=cmd|' /C calc'!A0", "os:getcwd",
    "RESNET18", "tf", "jax", "bitflip", "set", "explicit", "groups", "bkwd_inject", "N64_WT_GLB",
    "\t", "\x0b", "\x1c", "\u2028", "\x85", "\xa03", "3\xa0", "\ufeff1",
]
UNICODE_BITS = ["\u0301", "\u0301\u0302\u0303", "\u202e", "\u200f", "\u200b", "\U0001F4A5",
                "\U0001F469\u200d\U0001F52C", "\x00", "\ufeff", "\u2028", "\ud7ff", "\U0010FFFF",
                "\u0663", "\uff10", "\x1b[31m", "\x7f", "\u00e9", "e\u0301", "\u05d0", "\u0627"]
WORKLOAD_MODULES = ("os:getcwd", "json:dumps", "subprocess:run", "builtins:eval",
                    "tabnanny:check", "colorsys:rgb_to_hsv", "CANARY:build")
PATH_KINDS = ("directory", "fifo", "fifo_symlink", "missing", "nul_in_path", "symlink_loop",
              "dangling_symlink", "unreadable", "dev_null", "dev_zero", "too_big",
              "not_a_dir_component", "name_too_long", "empty_path", "newline_in_name",
              "escape_in_name", "missing_newline_in_name")


#: values at or near the edge of each column's range (most are valid: the oracle then checks
#: what they became)
BOUNDARY = {
    "replicas": ["1", "2", "65536", "65535", "+4", "04"],
    "per_replica_batch": ["1", "2", "3", "4096", "+8", "0008"],
    "width": ["1", "2", "3", "4", "4096", "+8"],
    "input_size": ["1", "2", "3", "4096", "+8"],
    "steps_per_epoch": ["1", "2", "1000000", "2147483647"],
    "epochs": ["1", "2", "2147483647"],
    "eval_samples": ["1", "2147483647"],
    "checkpoint_every": ["0", "1", "2147483647"],
    "lr": ["1e-300", "4.9e-324", "1e308", "1.7976931348623157e308", "0.5", "+.5", "5e-1", "1E3"],
    "seed": ["0", "-0", "9223372036854775807", "+1"],
    "fault_seed": ["0", "-0", "9223372036854775807", "+1"],
    "horizon": ["0", "2147483647"],
    "replica": ["0", "1", "+0", "-0", "00"],
    "epoch": ["0", "1", "+0", "-0"],
    "step": ["0", "1", "+0", "-0"],
    "bit": ["0", "31", "63", "+7", "15"],
    "bits": ["1", "16", "32", "64"],
    "count": ["1", "2", "16", "2147483647"],
    "groups": ["1", "64", "2147483647"],
    "duration_steps": ["1", "2147483647"],
    "probability": ["1", "1.0", "1e-300", "4.9e-324", "0.9999999999999999"],
    "factor": ["0", "-0", "1e308", "-1e308", "4.9e-324"],
    "ramp": ["1e-300", "-1e308", "4.9e-324"],
    "values": ["nan", "-inf", "1e400", "-1e400", "NaN", "-0", "4.9e-324"],
    "inj_values": ["nan", "-inf", "1e400", "-1e400", "NaN", "-0", "4.9e-324"],
    "positions": ["0/0", "2147483647/0", "0", "0/0/0/0", "1/1/1/1"],
    "inj_pos": ["0/0", "2147483647/0", "0", "0/0/0/0", "1/1/1/1"],
    "target_worker": ["0", "1", "7", "+0"],
    "target_epoch": ["0", "1", "79", "-0"],
    "target_step": ["0", "1", "48", "+0"],
    "learning_rate": ["1e-300", "4.9e-324", "1e308", "0.5"],
    "layout": ["native", "FP32", "fp16", "bf16", "fp64", "int8"],
    "value": ["bitflip", "zero", "copy", "nan", "inf", "-inf", "random", "STUCK_AT"],
    "position_mode": ["random", "consecutive", "groups", "explicit"],
    "duration": ["transient", "permanent", "Permanent"],
    "framework": ["torch", "TORCH", "tf"],
    "site": ["fwd_input", "fwd_weight", "grad_out", "bwd_input", "bwd_weight", "grad_in",
             "grad_wt", "param", "opt_state", "host_state"],
    "offload": ["window:1", "WINDOW:2", "window:999999", "window:0", "none", "off", "",
                "windows:2"],
    "tensor": ["weight", "bias", "m", "v", "transit", "grad", "TRANSIT"],
}


def _boundary(rng, data: bytes, fmt: str):
    lines = _lines(data)
    idx = _data_idx(lines)
    if fmt == "isca":
        cand = [i for i in idx if lines[i].split(",")[0].strip().lower() in BOUNDARY]
        if not cand:
            return data, "no boundary key"
        i = rng.choice(cand)
        cells = lines[i].split(",")
        key = cells[0].strip().lower()
        old = cells[1] if len(cells) > 1 else ""
        cells[1:] = [rng.choice(BOUNDARY[key])]
        lines[i] = ",".join(cells)
        return _join(lines), f"{key} {old!r} -> {cells[1]!r} (line {i + 1})"
    names = [c.strip().lower() for c in lines[idx[0]].split(",")]
    cols = [j for j, n in enumerate(names) if n in BOUNDARY]
    if not cols or len(idx) < 2:
        return data, "no boundary column"
    i = rng.choice(idx[1:])
    cells = lines[i].split(",")
    filled = [j for j in cols if j < len(cells) and cells[j].strip()]
    j = rng.choice(filled if filled and rng.random() < 0.8 else cols)
    if j >= len(cells):
        return data, "short row"
    old = cells[j]
    cells[j] = rng.choice(BOUNDARY[names[j]])
    lines[i] = ",".join(cells)
    return _join(lines), f"{names[j]} {old!r} -> {cells[j]!r} (line {i + 1})"


def _lines(data: bytes) -> list[str]:
    return data.decode("utf-8", "surrogateescape").split("\n")


def _join(lines: list[str]) -> bytes:
    return "\n".join(lines).encode("utf-8", "surrogateescape")


def _data_idx(lines: list[str]) -> list[int]:
    return [i for i, ln in enumerate(lines) if ln.strip() and not ln.strip().startswith("#")]


def _cell_edit(rng, data: bytes, fmt: str, new, header_too: bool = False):
    """Replace one cell (a data row's cell; for ISCA a value) by `new(old)`."""
    lines = _lines(data)
    idx = _data_idx(lines)
    if fmt == "columnar" and not header_too:
        idx = idx[1:]
    if not idx:
        return data, "no cell"
    i = rng.choice(idx)
    cells = lines[i].split(",")
    j = rng.randrange(1, len(cells)) if fmt == "isca" and len(cells) > 1 else rng.randrange(len(cells))
    old = cells[j]
    cells[j] = new(old)
    lines[i] = ",".join(cells)
    return _join(lines), f"line {i + 1} field {j + 1}: {old[:30]!r} -> {cells[j][:60]!r}"


def _columns_op(rng, data: bytes, op):
    """Apply op(cells, i, j) to the header and every data row of a columnar file."""
    lines = _lines(data)
    idx = _data_idx(lines)
    if not idx:
        return data, (0, 0)
    n = len(lines[idx[0]].split(","))
    i, j = rng.randrange(n), rng.randrange(n)
    for k in idx:
        cells = lines[k].split(",")
        if len(cells) == n:
            lines[k] = ",".join(op(cells, i, j))
    return _join(lines), (i, j)


def mutate(rng: random.Random, seed: Seed) -> tuple[bytes, str, str]:
    """One random mutation of a seed: (bytes, description, expectation)."""
    data, fmt = seed.data, seed.fmt
    text = data.decode("utf-8", "surrogateescape")
    m = rng.choice(MUTATIONS)
    if not _data_idx(_lines(data)):
        m = rng.choice(["flip_bytes", "truncate", "insert_junk", "bom", "crlf", "empty",
                        "binary_file", "extra_delimiters"])
    if m == "flip_bytes":
        b = bytearray(data)
        where = []
        for _ in range(rng.randint(1, 8)):
            if not b:
                break
            p = rng.randrange(len(b))
            b[p] = b[p] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
            where.append(p)
        return bytes(b), f"flip bytes at {where}", "any"
    if m == "truncate":
        cut = rng.randrange(len(data) + 1)
        return data[:cut], f"truncate at {cut}/{len(data)}", "any"
    if m == "insert_junk":
        p = rng.randrange(len(data) + 1)
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        return data[:p] + junk + data[p:], f"insert {len(junk)} random bytes at {p}", "any"
    if m == "binary_file":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096))), "binary junk", "any"
    if m == "empty":
        return b"", "empty file", "refuse"
    if m == "header_only":
        lines = _lines(data)
        idx = _data_idx(lines)
        return _join(lines[:idx[0] + 1]) + b"\n", "first data line only", "refuse"
    if m == "bom":
        return codecs.BOM_UTF8 + data, "UTF-8 BOM", "same"
    if m == "double_bom":
        return codecs.BOM_UTF8 * 2 + data, "two UTF-8 BOMs", "any"
    if m == "utf16":
        enc = rng.choice(["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
        return text.encode(enc, "surrogatepass"), f"encoded {enc}", "refuse"
    if m == "crlf":
        return text.replace("\n", "\r\n").encode("utf-8", "surrogateescape"), "CRLF", "same"
    if m == "lone_cr":
        return text.replace("\n", "\r").encode("utf-8", "surrogateescape"), "lone CR ends", "any"
    if m == "mixed_eol":
        lines = text.split("\n")
        out = "".join(ln + rng.choice(["\n", "\r\n"]) for ln in lines[:-1]) + lines[-1]
        return out.encode("utf-8", "surrogateescape"), "mixed LF/CRLF", "same"
    if m == "no_final_eol":
        return data.rstrip(b"\n"), "no final newline", "same"
    if m == "cr_inside":
        p = rng.randrange(len(data) + 1)
        return data[:p] + b"\r" + data[p:], f"CR inserted at {p}", "any"
    if m == "long_cell":
        n = rng.choice([1000, 10**4, 10**5, 10**6])
        ch = rng.choice(["A", "9", "\u00e9", ",", "/", "0/", "1;", "\u0301"])
        d, desc = _cell_edit(rng, data, fmt, lambda old: ch * (n // len(ch)))
        return d, f"long cell ({n} x {ch!r}) {desc}", "any"
    if m == "long_line":
        lines = _lines(data)
        i = rng.randrange(len(lines))
        lines[i] += "," * rng.choice([10, 1000, 10**5])
        return _join(lines), f"many commas after line {i + 1}", "any"
    if m == "many_rows":
        lines = _lines(data)
        idx = _data_idx(lines)
        i = rng.choice(idx)
        k = rng.choice([10, 100, 2000])
        lines[i + 1:i + 1] = [lines[i]] * k
        return _join(lines), f"line {i + 1} repeated {k} times", "any"
    if m == "replace_cell":
        v = rng.choice(INTERESTING)
        d, desc = _cell_edit(rng, data, fmt, lambda old: v)
        return d, f"cell {desc}", "any"
    if m == "boundary_cell":
        d, desc = _boundary(rng, data, fmt)
        return d, f"boundary {desc}", "any"
    if m == "number_cell":
        v = rng.choice(["2147483647", str(2**63), "1e308", "1" + "0" * 400, "-1", "-0", "nan",
                        "NaN", "inf", "-inf", "0", "65536", "65537", str(2**31)])
        d, desc = _cell_edit(rng, data, fmt, lambda old: v if old.strip().lstrip("+-").replace(".", "").isdigit() or not old.strip() else old)
        return d, f"number {desc}", "any"
    if m == "unicode_cell":
        u = rng.choice(UNICODE_BITS)
        where = rng.choice(["pre", "post", "mid", "all"])
        def ins(old):
            if where == "pre":
                return u + old
            if where == "post":
                return old + u
            if where == "mid":
                k = len(old) // 2
                return old[:k] + u + old[k:]
            return u
        d, desc = _cell_edit(rng, data, fmt, ins, header_too=rng.random() < 0.2)
        return d, f"unicode {u!r} {where}: {desc}", "any"
    if m == "quote_cell":
        d, desc = _cell_edit(rng, data, fmt, lambda old: f'"{old}"')
        return d, f"quoted {desc}", "same" if fmt == "columnar" else "any"
    if m == "quote_junk":
        q = rng.choice(['"', '""', '"a"b', 'a"', '"\n', "'", '"""', '"a,b"'])
        d, desc = _cell_edit(rng, data, fmt, lambda old: old + q if rng.random() < 0.5 else q + old)
        return d, f"quote {q!r}: {desc}", "any"
    if m == "extra_delimiters":
        p = rng.randrange(len(data) + 1)
        dl = rng.choice([b",", b",,", b";", b"\t", b"/", b",\n,"])
        return data[:p] + dl + data[p:], f"delimiter {dl!r} at {p}", "any"
    if m == "trailing_commas":
        lines = _lines(data)
        for i in _data_idx(lines):
            lines[i] += ",,,"
        return _join(lines), "',,,' after every data line", "same"
    if m == "spaces":
        lines = _lines(data)
        for i in _data_idx(lines):
            lines[i] = ", ".join(c.strip() for c in lines[i].split(","))
        return _join(lines), "a space after every comma", "same"
    if m == "header_case":
        lines = _lines(data)
        idx = _data_idx(lines)
        rows = idx[:1] if fmt == "columnar" else idx
        for i in rows:
            cells = lines[i].split(",")
            if fmt == "columnar":
                lines[i] = ",".join(f" {c.upper()} " for c in cells)
            else:
                lines[i] = ",".join([cells[0].upper()] + cells[1:])
        return _join(lines), "names upper-cased (and padded)", "same"
    if m == "comment_end":
        return data + rng.choice([b"\n# trailing comment\n", b"\n\n   \n", b"#,x,y\n"]), \
            "comment/blank lines at the end", "same"
    if m == "comment_insert":
        lines = _lines(data)
        p = rng.randrange(len(lines) + 1)
        lines.insert(p, rng.choice(["# comment", "", "   ", "#", " # indented"]))
        return _join(lines), f"comment/blank line inserted at line {p + 1}", "any"
    if m == "nul_byte":
        p = rng.randrange(len(data) + 1)
        return data[:p] + b"\x00" + data[p:], f"NUL at {p}", "refuse"
    if m == "invalid_utf8":
        p = rng.randrange(len(data) + 1)
        bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
        return data[:p] + bad + data[p:], f"invalid UTF-8 {bad!r} at {p}", "refuse"
    if m == "delete_row":
        lines = _lines(data)
        i = rng.choice(_data_idx(lines))
        del lines[i]
        return _join(lines), f"line {i + 1} deleted", "any"
    if m == "duplicate_row":
        lines = _lines(data)
        i = rng.choice(_data_idx(lines))
        lines.insert(i, lines[i])
        return _join(lines), f"line {i + 1} duplicated", "refuse" if fmt == "isca" else "any"
    if m == "shuffle_rows":
        lines = _lines(data)
        idx = _data_idx(lines)
        body = idx[1:] if fmt == "columnar" else idx
        moved = [lines[i] for i in body]
        rng.shuffle(moved)
        for i, ln in zip(body, moved):
            lines[i] = ln
        return _join(lines), "data rows shuffled", "same" if fmt == "isca" else "any"
    if fmt == "isca":
        if m == "swap_columns":   # key <-> value
            lines = _lines(data)
            i = rng.choice(_data_idx(lines))
            cells = lines[i].split(",")
            lines[i] = ",".join(cells[1:2] + cells[:1] + cells[2:])
            return _join(lines), f"key and value swapped on line {i + 1}", "any"
        if m == "duplicate_column":
            lines = _lines(data)
            i = rng.choice(_data_idx(lines))
            lines[i] += "," + lines[i].split(",")[-1]
            return _join(lines), f"last value repeated on line {i + 1}", "any"
        # the other column operations make no sense for key/value lines: swap two lines
        lines = _lines(data)
        idx = _data_idx(lines)
        a, b = rng.choice(idx), rng.choice(idx)
        lines[a], lines[b] = lines[b], lines[a]
        return _join(lines), f"lines {a + 1} and {b + 1} swapped", "same"
    if m == "swap_columns":
        d, (i, j) = _columns_op(rng, data, lambda c, i, j: _swapped(c, i, j))
        return d, f"columns {i + 1} and {j + 1} swapped (header and rows)", "same"
    if m == "swap_header_names":
        lines = _lines(data)
        h = _data_idx(lines)[0]
        cells = lines[h].split(",")
        i, j = rng.randrange(len(cells)), rng.randrange(len(cells))
        lines[h] = ",".join(_swapped(cells, i, j))
        return _join(lines), f"header names {i + 1} and {j + 1} swapped", "any"
    if m == "duplicate_column":
        d, (i, _j) = _columns_op(rng, data, lambda c, i, j: c[:i + 1] + [c[i]] + c[i + 1:])
        return d, f"column {i + 1} duplicated", "refuse"
    if m == "delete_column":
        d, (i, _j) = _columns_op(rng, data, lambda c, i, j: c[:i] + c[i + 1:])
        return d, f"column {i + 1} deleted", "any"
    raise AssertionError(m)


def _swapped(cells, i, j):
    cells = list(cells)
    cells[i], cells[j] = cells[j], cells[i]
    return cells


MUTATIONS = ("flip_bytes", "truncate", "insert_junk", "binary_file", "empty", "header_only",
             "bom", "double_bom", "utf16", "crlf", "lone_cr", "mixed_eol", "no_final_eol",
             "cr_inside", "long_cell", "long_line", "many_rows", "replace_cell", "replace_cell",
             "boundary_cell", "boundary_cell", "boundary_cell", "boundary_cell", "boundary_cell",
             "replace_cell", "number_cell", "number_cell", "unicode_cell", "unicode_cell",
             "quote_cell", "quote_junk", "extra_delimiters", "trailing_commas", "spaces",
             "header_case", "comment_end", "comment_insert", "nul_byte", "invalid_utf8",
             "delete_row", "duplicate_row", "shuffle_rows", "swap_columns", "swap_header_names",
             "duplicate_column", "delete_column")


# --- targeted invalid cases ----------------------------------------------------------------------

def _targeted_columnar(rng: random.Random, kind: str):
    """(twin rows, bad rows, description, validate_level, pending, columns) for one kind: the
    twin is a valid file, the bad one differs from it by one invalid value in a known cell."""
    wl = rng.choice(sorted(NO_BWD_WEIGHT) if kind == "site_not_on_layer" else BUILTINS)
    cfg = TEMPLATES[wl]
    layer, (od, wd, bias) = rng.choice(sorted(LAYERS[wl].items()))
    row = template_row(wl)
    row.update(site="fwd_output", layer=layer, replica=str(rng.randrange(cfg["replicas"])),
               epoch=str(rng.randrange(cfg["epochs"])),
               step=str(rng.randrange(cfg["steps_per_epoch"])), value="bitflip", bit="3",
               position_mode="random", count="1")
    explicit = {"positions": _pos(od) + ";" + _pos(od, 1), "position_mode": "", "count": ""}
    isca = {"site": "", "value": "", "bit": "", "position_mode": "", "count": "",
            "stage": "fwrd_inject", "fmodel": "RD"}
    ctx: dict = {}
    bad: dict = {}
    vlevel, pending = False, None
    pick = rng.choice
    if kind == "replica_eq_replicas":
        bad = {"replica": cfg["replicas"]}
    elif kind == "replica_negative":
        bad = {"replica": pick(["-1", "-0000001", "-2147483648"])}
    elif kind == "step_eq_steps_per_epoch":
        bad = {"step": cfg["steps_per_epoch"]}
    elif kind == "step_negative":
        bad = {"step": pick(["-1", "-5"])}
    elif kind == "epoch_eq_epochs":
        bad = {"epoch": cfg["epochs"]}
    elif kind == "bit_99":
        ctx = {"value": pick(["bitflip", "stuck_at"])}
        bad = {"bit": pick(["99", "64", "-1"])}
    elif kind == "bit_outside_layout":
        lay = pick(["fp16", "bf16", "int8", "fp32"])
        ctx = {"layout": lay}
        bad = {"bit": str(LAYOUT_WIDTH[lay] + rng.randrange(3))}
    elif kind == "bits_zero":
        ctx = {"bit": "", "bits": "2"}
        bad = {"bits": pick(["0", "-1"])}
    elif kind == "bits_outside_layout":
        lay = pick(["fp16", "bf16", "int8", "fp32", "native"])
        ctx = {"bit": "", "bits": "2", "layout": lay}
        bad = {"bits": str(LAYOUT_WIDTH[lay] + 1)}
    elif kind == "bit_and_bits":
        bad = {"bits": "2"}
    elif kind == "stuck_not_binary":
        ctx = {"value": "stuck_at", "stuck": "1"}
        bad = {"stuck": pick(["2", "-1", "01x"])}
    elif kind == "bit_with_zero":
        ctx = {"value": "zero", "bit": ""}
        bad = {"bit": "3"}
    elif kind == "factor_nonfinite":
        ctx = {"value": "scale", "bit": "", "factor": "2.0"}
        bad = {"factor": pick(["nan", "inf", "-inf", "1e309", "NaN", "", "2,0"])}
    elif kind == "ramp_bad":
        ctx = {"value": "degrade", "bit": "", "ramp": "0.5"}
        bad = {"ramp": pick(["0", "-0", "0.0", "inf", "nan", "1e999"])}
    elif kind == "set_without_values":
        ctx = {"value": "set", "bit": "", "values": "1.5"}
        bad = {"values": ""}
    elif kind == "set_value_count":
        ctx = dict(explicit, value="set", bit="", values="1.0;2.0")
        bad = {"values": pick(["1.0;2.0;3.0", "1;2;3;4"])}
    elif kind == "set_value_syntax":
        ctx = {"value": "set", "bit": "", "values": "1.5"}
        bad = {"values": pick(["1.5;", ";1.5", "abc", "0x1p3", "1.5.5", "1e", "1;;2", "--1"])}
    elif kind == "lr_bad":
        bad = {"lr": pick(["0", "-0.001", "nan", "inf", "1e309", "-inf", "0.0", "-0"])}
    elif kind == "probability_bad":
        ctx = {"duration": "intermittent", "probability": "0.5"}
        bad = {"probability": pick(["0", "1.5", "nan", "-0.1", "inf", "1.0000001", "1e-400"])}
    elif kind == "probability_without_intermittent":
        ctx = {"duration": "permanent"}
        bad = {"probability": "0.5"}
    elif kind == "duration_steps_bad":
        ctx = {"duration": "steps", "duration_steps": "2"}
        bad = {"duration_steps": pick(["0", "-1", ""])}
    elif kind == "seed_out_of_range":
        bad = {"seed": pick([str(2**63), "-1", "1" + "0" * 30])}
    elif kind == "fault_seed_out_of_range":
        ctx = {"fault_seed": "5"}
        bad = {"fault_seed": pick([str(2**63), "-1", "99999999999999999999999999"])}
    elif kind == "replicas_bad":
        ctx = {"replica": "0"}
        bad = {"replicas": pick(["0", "65537", "-2"])}
    elif kind == "size_zero":
        bad = {pick(["per_replica_batch", "width", "input_size", "steps_per_epoch", "epochs",
                     "eval_samples"]): pick(["0", "-1"])}
    elif kind == "checkpoint_every_negative":
        bad = {"checkpoint_every": "-1"}
    elif kind == "horizon_negative":
        bad = {"horizon": pick(["-1", "-100"])}
    elif kind == "int_syntax":
        bad = {pick(["replica", "epoch", "step"]): pick(
            ["1.5", "1e0", "0x1", "1_0", "true", "\uff11", "\u0663", "1 0", "--1", "+-1",
             "\u00bd", "0.0", "1.0", "0o1", "0b1"])}
    elif kind == "framework_bad":
        bad = {"framework": pick(["jax", "pytorch", "tensorflow", "t orch", "torch;tf"])}
    elif kind == "workload_unknown":
        bad = {"workload": pick(["resnet19", "effnet", "densenet", "nfnet", "resnet18_sgd",
                                 "mlp2", "res net18", "resnet18;", "os.getcwd", ":build",
                                 "a:b:c", "1mod:fn", "mod:"])}
    elif kind == "tensor_wrong_for_param":
        ctx = {"site": "param", "tensor": "weight"}
        bad = {"tensor": pick(["m", "v", "weights", "grad"])}
    elif kind == "tensor_on_activation":
        bad = {"tensor": "weight"}
    elif kind == "tensor_wrong_for_opt_state":
        ctx = {"site": "opt_state", "tensor": "m"}
        bad = {"tensor": pick(["weight", "bias", "w"])}
    elif kind == "site_unknown":
        bad = {"site": pick(["fwd_outptu", "fwd output", "grad", "bwd_out", "param;", "fwd-output"])}
    elif kind == "value_unknown":
        bad = {"value": pick(["bitflop", "nan2", "+inf", "stuck", "flip"])}
    elif kind == "layout_unknown":
        bad = {"layout": pick(["fp8", "int4", "float32", "bf-16", "native64"])}
    elif kind == "position_mode_unknown":
        bad = {"position_mode": pick(["rand", "all", "explicit!", "consec"])}
    elif kind == "count_bad":
        ctx = {"count": "2"}
        bad = {"count": pick(["0", "-1", "2147483648"])}
    elif kind == "groups_without_groups_mode":
        bad = {"groups": "2"}
    elif kind == "count_with_explicit":
        ctx = explicit
        bad = {"count": "1"}
    elif kind == "positions_with_random":
        ctx = explicit
        bad = {"position_mode": pick(["random", "groups", "consecutive"])}
    elif kind == "explicit_without_positions":
        ctx = {"count": ""}
        bad = {"position_mode": "explicit"}
    elif kind == "position_syntax":
        ctx = explicit
        bad = {"positions": pick([
            "-1/" + _pos(od - 1) if od > 1 else "-1", "/".join(["0"] * 9),
            _pos(od) + ";" + _pos(od), _pos(od) + ";0", _pos(od) + ";", "2147483648" +
            ("/" + _pos(od - 1) if od > 1 else ""), "0//0", "a/b", "1.0/2", " ; ", "0;;1"])}
    elif kind == "trial_id_bad":
        ctx = {"trial": "x1"}
        bad = {"trial": pick(["x 1", 'x"1', "x'1", "a" * 201, "x/1", "x;1", "x\u00e91"])}
    elif kind == "layer_name_bad":
        bad = {"layer": pick(["dense 1", "l'x", "a" * 201, "dense_1;", "l\u0301", "(x)"])}
    elif kind == "dataset_bad":
        bad = {"dataset": pick(["dig its", "digits/x", "a" * 201, "d:x"])}
    elif kind == "site_and_fmodel":
        bad = {"stage": "fwrd_inject", "fmodel": "RD"}
    elif kind == "fmodel_unknown":
        ctx = isca
        bad = {"fmodel": pick(["RDX", "N32_RD", "rd_glb2", "INPUT_32"])}
    elif kind == "stage_unknown":
        ctx = isca
        bad = {"stage": pick(["fwd_inject", "fwrd", "bkwd", "inject"])}
    elif kind == "fwrd_with_grad_layer":
        ctx = isca
        bad = {"layer": layer + pick(["_grad_in", "_grad_wt"])}
    elif kind == "bkwd_without_suffix":
        ctx = dict(isca, stage="bkwd_inject", layer=layer + "_grad_in")
        bad = {"layer": layer}
    elif kind == "operand_fmodel_on_grad_wt":
        ctx = dict(isca, stage="bkwd_inject", layer=layer + "_grad_wt")
        bad = {"fmodel": pick(["INPUT", "WT", "N64_INPUT", "WT_16"])}
    elif kind == "fmodel_with_value_column":
        ctx = isca
        bad = pick([{"bit": "3"}, {"layout": "fp16"}, {"count": "2"}, {"tensor": "weight"}])
    elif kind == "isca_values_without_positions":
        ctx = isca
        bad = {"values": "1.0"}
    elif kind == "control_with_fault_column":
        ctx = {k: "" for k in ("site", "layer", "replica", "epoch", "step", "value", "bit",
                               "position_mode", "count")}
        bad = pick([{"layer": layer}, {"bit": "3"}, {"replica": "0"}, {"duration": "permanent"}])
    elif kind == "nul_in_cell":
        bad = {pick(["layer", "trial", "lr", "workload"]): pick(["\x00", "a\x00b"])}
    elif kind == "control_char_in_cell":
        bad = {pick(["layer", "trial", "workload", "dataset"]): pick(
            ["a\x1bb", "a\x7fb", "a\x0cb", "a\u202eb", "\u200bdense_1"])}
    # --- validate level: only the workload's layers and operand shapes can refuse these -----
    elif kind == "unknown_layer":
        bad = {"layer": pick(["no_such_layer", layer + "x", layer.upper(), layer + "/0",
                              "conv99", "block_9_mlp_fc1"])}
        vlevel = True
    elif kind == "position_outside_operand":
        ctx = explicit
        bad = {"positions": str(cfg["per_replica_batch"]) + "/" + _pos(od - 1)}
        vlevel = True
    elif kind == "position_dimensions":
        ctx = explicit
        bad = {"positions": _pos(od + 1) if od < MAX_DIMS else "0"}
        vlevel = True
    elif kind == "random_count_over_operand":
        ctx = {"count": "2"}
        bad = {"count": pick(["1000000000", "2147483647"])}
        vlevel = True
    elif kind == "consecutive_over_last_dim":
        ctx = {"position_mode": "consecutive", "count": "2"}
        bad = {"count": pick(["1000000", "4096"])}
        vlevel = True
    elif kind == "bit_outside_dtype":    # native layout of a float32 operand: bits 0..31
        ctx = {"value": pick(["bitflip", "stuck_at"]), "layout": pick(["", "native"])}
        bad = {"bit": str(rng.randrange(32, 64))}
        vlevel = True
    elif kind == "bits_outside_dtype":
        ctx = {"bit": "", "bits": "2", "layout": pick(["", "native"])}
        bad = {"bits": str(rng.randrange(33, 65))}
        vlevel = True
    elif kind == "site_not_on_layer":     # a norm layer has no kernel for bwd_weight
        ctx = {"site": "fwd_output", "layer": NO_BWD_WEIGHT[wl]}
        bad = {"site": "bwd_weight"}
        vlevel = True
    elif kind == "integer_operand":      # the transformer's token ids are int64
        row = template_row("transformer")
        row.update(site="fwd_output", layer="embed", replica="0", epoch="0", step="0",
                   value=pick(["bitflip", "zero", "nan", "random"]), position_mode="random",
                   count="1")
        bad = {"site": pick(["fwd_input", "grad_in"])}
        vlevel = True
    elif kind == "bias_on_layer_without_bias":
        ctx = {"site": "param", "tensor": "weight", "layer": "conv1"}
        row.update(template_row("resnet18"))
        row.update(replica="0", epoch="0", step="0")
        bad = {"tensor": "bias"}
        vlevel = True
    # --- issue 11 item 3: sizes that cannot be held (pending) ------------------------------------
    elif kind == "oversize":
        bad = {pick(["width", "input_size"]): str(MAX_INT)}
        pending = PENDING_SIZE
    else:
        raise AssertionError(kind)
    twin = dict(row, **{k: str(v) for k, v in ctx.items()})
    badrow = dict(twin, **{k: str(v) for k, v in bad.items()})
    desc = f"{kind} on {twin['workload']}/{twin['layer'] or twin['site'] or 'control'}: " + \
        ", ".join(f"{k}={v[:40]!r}" for k, v in ((k, str(v)) for k, v in bad.items()))
    return [twin], [badrow], desc, vlevel, pending


TARGETED_COLUMNAR = (
    "replica_eq_replicas", "replica_negative", "step_eq_steps_per_epoch", "step_negative",
    "epoch_eq_epochs", "bit_99", "bit_outside_layout", "bits_zero", "bits_outside_layout",
    "bit_and_bits", "stuck_not_binary", "bit_with_zero", "factor_nonfinite", "ramp_bad",
    "set_without_values", "set_value_count", "set_value_syntax", "lr_bad", "probability_bad",
    "probability_without_intermittent", "duration_steps_bad", "seed_out_of_range",
    "fault_seed_out_of_range", "replicas_bad", "size_zero", "checkpoint_every_negative",
    "horizon_negative", "int_syntax", "framework_bad", "workload_unknown",
    "tensor_wrong_for_param", "tensor_on_activation", "tensor_wrong_for_opt_state",
    "site_unknown", "value_unknown", "layout_unknown", "position_mode_unknown", "count_bad",
    "groups_without_groups_mode", "count_with_explicit", "positions_with_random",
    "explicit_without_positions", "position_syntax", "trial_id_bad", "layer_name_bad",
    "dataset_bad", "site_and_fmodel", "fmodel_unknown", "stage_unknown", "fwrd_with_grad_layer",
    "bkwd_without_suffix", "operand_fmodel_on_grad_wt", "fmodel_with_value_column",
    "isca_values_without_positions", "control_with_fault_column", "nul_in_cell",
    "control_char_in_cell", "unknown_layer", "position_outside_operand", "position_dimensions",
    "random_count_over_operand", "consecutive_over_last_dim", "bit_outside_dtype",
    "bits_outside_dtype", "site_not_on_layer", "integer_operand", "bias_on_layer_without_bias",
    "oversize")
#: file-structure kinds (the whole file, not one cell)
TARGETED_STRUCTURE = ("extra_field", "unknown_column", "duplicate_column", "empty_header_field",
                      "rows_disagree", "control_and_fault_rows", "utf16")
TARGETED_ISCA = ("isca_worker_eq_replicas", "isca_step_eq_steps", "isca_epoch_eq_epochs",
                 "isca_negative", "isca_missing_key", "isca_duplicate_key", "isca_unknown_key",
                 "isca_values_without_pos", "isca_values_count", "isca_two_values",
                 "isca_empty_value", "isca_model_artifact", "isca_lr_bad", "isca_bad_fmodel",
                 "isca_duration_steps_missing", "isca_unknown_layer", "isca_pos_outside_operand")
TARGETED = TARGETED_COLUMNAR + TARGETED_STRUCTURE + TARGETED_ISCA


def _targeted_structure(rng, kind):
    wl = rng.choice(BUILTINS)
    layer = rng.choice(sorted(LAYERS[wl]))
    row = template_row(wl)
    row.update(site="fwd_output", layer=layer, replica="0", epoch="0", step="0", value="zero")
    twin = columnar_text([row])
    if kind == "extra_field":
        bad = twin.rstrip("\n") + rng.choice([",junk", ",0", ", x"]) + "\n"
    elif kind == "unknown_column":
        bad = twin.replace("trial,", rng.choice(["colour,", "trials,", "work load,", "#x,"]), 1)
    elif kind == "duplicate_column":
        col = rng.choice(["replica", "layer", "workload", "seed"])
        head, body = twin.split("\n", 1)
        bad = head + "," + col + "\n" + body.rstrip("\n") + "," + row[col] + "\n"
    elif kind == "empty_header_field":
        bad = twin.replace(",tensor,", ",,", 1)
    elif kind == "rows_disagree":
        twin = columnar_text([row, dict(row, layer=layer, value="nan")])
        col = rng.choice(["width", "seed", "epochs", "lr", "framework", "horizon"])
        other = {"width": "12", "seed": "99", "epochs": "9", "lr": "0.5", "framework": "tf",
                 "horizon": "1"}[col]
        if row.get(col) == other:
            other = "2"
        bad = columnar_text([row, dict(row, layer=layer, value="nan", **{col: other})])
        kind = f"rows_disagree({col})"
    elif kind == "control_and_fault_rows":
        twin = columnar_text([row, dict(row, trial="x2", site="", layer="", replica="", epoch="",
                                        step="", value="")])
        bad = columnar_text([row, dict(row, site="", layer="", replica="", epoch="", step="",
                                       value="")])
    elif kind == "utf16":
        return twin.encode(), twin.encode(rng.choice(["utf-16", "utf-32"])), "utf16 file"
    else:
        raise AssertionError(kind)
    return twin.encode(), bad.encode("utf-8", "surrogatepass"), kind


def _targeted_isca(rng, kind):
    wl = rng.choice(BUILTINS)
    cfg = TEMPLATES[wl]
    pairs = template_isca(rng, wl)
    keys = [k for k, _ in pairs]
    twin = list(pairs)
    vlevel = False

    def set_(k, v):
        return [(kk, v if kk == k else vv) for kk, vv in twin]
    if kind == "isca_worker_eq_replicas":
        bad = set_("target_worker", str(cfg["replicas"]))
    elif kind == "isca_step_eq_steps":
        bad = set_("target_step", str(cfg["steps_per_epoch"]))
    elif kind == "isca_epoch_eq_epochs":
        bad = set_("target_epoch", str(cfg["epochs"]))
    elif kind == "isca_negative":
        bad = set_(rng.choice(["target_worker", "target_step", "target_epoch"]), "-1")
    elif kind == "isca_missing_key":
        drop = rng.choice(["model", "stage", "fmodel", "target_worker", "target_layer",
                           "target_epoch", "target_step"])
        bad = [(k, v) for k, v in twin if k != drop]
    elif kind == "isca_duplicate_key":
        i = rng.randrange(len(twin))
        bad = twin[:i + 1] + [twin[i]] + twin[i + 1:]
    elif kind == "isca_unknown_key":
        bad = twin + [(rng.choice(["target_wroker", "colour", "inj_pos2", "lr"]), "1")]
    elif kind == "isca_values_without_pos":
        od = _isca_dims(twin, wl)
        twin = [(k, v) for k, v in twin if k not in ("inj_pos", "inj_values")] + \
            [("inj_pos", _pos(od)), ("inj_values", "1.0")]
        bad = [(k, v) for k, v in twin if k != "inj_pos"]
    elif kind == "isca_values_count":
        od = _isca_dims(twin, wl)
        twin = [(k, v) for k, v in twin if k not in ("inj_pos", "inj_values")] + \
            [("inj_pos", _pos(od) + "," + _pos(od, 1)), ("inj_values", "1.0")]
        bad = set_("inj_values", "1.0,2.0,3.0")
    elif kind == "isca_two_values":
        k = rng.choice(["target_worker", "model", "seed", "learning_rate"])
        bad = [(kk, vv + (",1" if kk == k else "")) for kk, vv in twin]
    elif kind == "isca_empty_value":
        k = rng.choice(keys)
        bad = [(kk, "" if kk == k else vv) for kk, vv in twin]
        if k in ("inj_pos", "inj_values"):
            bad = [(kk, vv + ",,1" if kk == k else vv) for kk, vv in twin]
    elif kind == "isca_model_artifact":
        bad = set_("model", rng.choice(["resnet18_sgd", "resnet18_nobn", "effnet", "densenet",
                                        "nfnet"]))
    elif kind == "isca_lr_bad":
        bad = set_("learning_rate", rng.choice(["0", "nan", "-1", "inf", "1e400"]))
    elif kind == "isca_bad_fmodel":
        bad = set_("fmodel", rng.choice(["RDX", "N32_RD", "INPUT16"]))
    elif kind == "isca_duration_steps_missing":
        twin = [(k, v) for k, v in twin if k not in ("duration", "duration_steps")] + \
            [("duration", "steps"), ("duration_steps", "2")]
        bad = [(k, v) for k, v in twin if k != "duration_steps"]
    elif kind == "isca_unknown_layer":
        layer = _isca_layer(twin)
        new = "no_such_layer" + ("_grad_in" if dict(twin)["stage"] == "bkwd_inject" else "")
        bad = set_("target_layer", new)
        vlevel = True
        kind += f"({layer})"
    elif kind == "isca_pos_outside_operand":
        od = _isca_dims(twin, wl)
        twin = [(k, v) for k, v in twin if k not in ("inj_pos", "inj_values")] + \
            [("inj_pos", _pos(od)), ("inj_values", "1.0")]
        bad = set_("inj_pos", "/".join(["100000"] + ["0"] * (od - 1)))
        vlevel = True
    else:
        raise AssertionError(kind)
    return isca_text(twin).encode(), isca_text(bad).encode(), f"{kind} on {wl}", vlevel


def _isca_dims(pairs, wl) -> int:
    """Dimensions of the operand an ISCA (stage, fmodel, layer) corrupts (templates' layers)."""
    d = dict(pairs)
    od, wd, _bias = LAYERS[wl][_isca_layer(pairs)]
    return wd if d["stage"] == "fwrd_inject" and d["fmodel"].upper().startswith("WT") else od


def _isca_layer(pairs):
    layer = dict(pairs)["target_layer"]
    for suffix in ("_grad_in", "_grad_wt"):
        if layer.endswith(suffix):
            layer = layer[:-len(suffix)]
    return layer


# --- the oracle ----------------------------------------------------------------------------------

def _name_ok(text, pattern) -> bool:
    return isinstance(text, str) and 0 < len(text) <= MAX_NAME and bool(pattern.fullmatch(text))


def _val(x):
    return getattr(x, "value", x)


def check_parse_level(camp, data: bytes) -> list[str]:
    """What docs/formats.md promises about every accepted campaign (no framework needed)."""
    p: list[str] = []
    want = hashlib.sha256(data).hexdigest()[:16]
    if camp.digest != want:
        p.append(f"digest {camp.digest} is not the file's sha256 {want}")
    if camp.format not in ("isca", "columnar"):
        p.append(f"format {camp.format!r}")
    if not camp.trials:
        p.append("accepted with no trials")
    ids = [t.trial_id for t in camp.trials]
    if len(set(ids)) != len(ids):
        p.append(f"duplicate trial ids {ids}")
    if camp.format == "isca" and (ids != ["0"] or len(camp.trials[0].faults) != 1):
        p.append(f"an ISCA file gave trials {ids} with {[len(t.faults) for t in camp.trials]} faults")
    for t in camp.trials:
        where = f"trial {t.trial_id!r}"
        if not _name_ok(t.trial_id, _TRIAL_CHARS):
            p.append(f"{where}: trial id outside the name grammar")
        c = t.workload
        if not (c.workload in BUILTINS or _USER_WORKLOAD.fullmatch(c.workload or "")
                or c.workload in installed_workloads()):
            p.append(f"{where}: workload {c.workload!r}")
        if _val(c.framework) not in FRAMEWORKS:
            p.append(f"{where}: framework {c.framework!r}")
        for k, (lo, hi) in WORKLOAD_RANGES.items():
            v = getattr(c, k)
            if type(v) is not int or not lo <= v <= hi:
                p.append(f"{where}: {k} {v!r} outside {lo}..{hi}")
        if not (isinstance(c.lr, float) and math.isfinite(c.lr) and c.lr > 0):
            p.append(f"{where}: lr {c.lr!r}")
        if not _name_ok(c.dataset, _DATASET_CHARS):
            p.append(f"{where}: dataset {c.dataset!r}")
        if t.horizon is not None and not (type(t.horizon) is int and 0 <= t.horizon <= MAX_INT):
            p.append(f"{where}: horizon {t.horizon!r}")
        total = c.steps_per_epoch * c.epochs
        for i, f in enumerate(t.faults):
            p += [f"{where} fault {i}: {m}" for m in _check_fault(f, c, total)]
    return p


def _check_fault(f, c, total) -> list[str]:
    p = []
    site = _val(f.site)
    if site not in SITES:
        p.append(f"site {site!r}")
    if not _name_ok(f.layer, _LAYER_CHARS):
        p.append(f"layer {f.layer!r}")
    if f.tensor is not None and f.tensor not in TENSORS.get(site, ()):
        p.append(f"tensor {f.tensor!r} on site {site}")
    offload = getattr(c, "offload", "")
    if site == "host_state" and not offload:
        p.append("host_state accepted on a workload without offload")
    if offload and not (re.fullmatch(r"window:[1-9][0-9]*", offload) and _val(c.framework)
                        == "torch" and c.processes == 1):
        p.append(f"offload {offload!r} accepted (framework {c.framework}, processes "
                 f"{c.processes})")
    if type(f.replica) is not int or not 0 <= f.replica < c.replicas:
        p.append(f"replica {f.replica!r} not in 0..{c.replicas - 1}")
    if type(f.step) is not int or not 0 <= f.step < total:
        p.append(f"step {f.step!r} not in 0..{total - 1}")
    if type(f.seed) is not int or not 0 <= f.seed <= MAX_SEED:
        p.append(f"seed {f.seed!r}")
    v = f.value
    model, layout = _val(v.model), _val(v.layout)
    if model not in VALUE_MODELS:
        p.append(f"value model {model!r}")
    if layout not in LAYOUT_WIDTH:
        p.append(f"layout {layout!r}")
    width = LAYOUT_WIDTH.get(layout, 64)
    if v.bit is not None:
        if model not in ("bitflip", "stuck_at"):
            p.append(f"bit {v.bit} with value {model}")
        if type(v.bit) is not int or not 0 <= v.bit < width:
            p.append(f"bit {v.bit!r} outside the {layout} layout (0..{width - 1})")
    if model == "bitflip" and (type(v.bits) is not int or not 1 <= v.bits <= width
                               or (v.bit is not None and v.bits != 1)):
        p.append(f"bits {v.bits!r} (bit {v.bit!r}) in the {layout} layout")
    if model == "stuck_at" and v.stuck not in (0, 1):
        p.append(f"stuck {v.stuck!r}")
    if model == "scale" and not math.isfinite(v.factor):
        p.append(f"factor {v.factor!r}")
    if model == "degrade" and (not math.isfinite(v.ramp) or v.ramp == 0):
        p.append(f"ramp {v.ramp!r}")
    if model == "set" and (not v.values or not all(isinstance(x, float) for x in v.values)):
        p.append(f"set values {v.values!r}")
    pos = f.positions
    mode = _val(pos.mode)
    if mode not in POSITION_MODES:
        p.append(f"position mode {mode!r}")
    if mode == "explicit":
        ix = pos.indices
        if not ix:
            p.append("explicit mode without positions")
        if len(set(ix)) != len(ix):
            p.append("a position listed twice")
        if len({len(i) for i in ix}) > 1:
            p.append("positions of different dimensions")
        for i in ix:
            if not 1 <= len(i) <= MAX_DIMS or not all(type(k) is int and 0 <= k <= MAX_INT for k in i):
                p.append(f"position {i!r}")
        if model == "set" and len(v.values) not in (1, len(ix)):
            p.append(f"{len(v.values)} values for {len(ix)} positions")
    else:
        if pos.indices:
            p.append(f"indices with mode {mode}")
        for k in ("count", "groups"):
            n = getattr(pos, k)
            if type(n) is not int or not 1 <= n <= MAX_INT:
                p.append(f"{k} {n!r}")
        if model == "set" and len(v.values) != 1 and not (
                mode in ("random", "consecutive") and len(v.values) == pos.count):
            p.append(f"{len(v.values)} values for mode {mode} count {pos.count}")
    d = f.duration
    kind = _val(d.kind)
    if kind not in DURATIONS:
        p.append(f"duration {kind!r}")
    if type(d.steps) is not int or not 1 <= d.steps <= MAX_INT:
        p.append(f"duration steps {d.steps!r}")
    if not (isinstance(d.probability, float) and 0 < d.probability <= 1):
        p.append(f"probability {d.probability!r}")
    return p


def check_validate_level(trial, table, resolve_ok: bool) -> list[str]:
    """Each fault of an accepted trial against its operand (shape, dtype): the layer and the
    site exist, positions fit, bits fit the dtype, the dtype can be corrupted; and the fault
    resolves as the runner will resolve it at its step."""
    p = []
    for i, f in enumerate(trial.faults):
        site = _val(f.site)
        where = f"trial {trial.trial_id!r} fault {i} ({f.layer}/{site})"
        if f.layer not in table:
            p.append(f"{where}: layer not in the workload ({len(table)} layers)")
            continue
        key = "bias" if f.tensor == "bias" else f.site
        entry = table[f.layer]
        if key not in entry:
            p.append(f"{where}: operand {_val(key)} not on the layer")
            continue
        shape, dtype = entry[key]
        shape = tuple(int(s) for s in shape)
        size = math.prod(shape)
        v, pos = f.value, f.positions
        model, layout, mode = _val(v.model), _val(v.layout), _val(pos.mode)
        if dtype not in DTYPE_WIDTH:
            p.append(f"{where}: accepted on a {dtype} operand, which cannot be corrupted")
            continue
        width = DTYPE_WIDTH[dtype] if layout == "native" else LAYOUT_WIDTH[layout]
        if v.bit is not None and v.bit >= width:
            p.append(f"{where}: bit {v.bit} of a {dtype} operand in the {layout} layout "
                     f"(0..{width - 1})")
        if model == "bitflip" and v.bit is None and v.bits > width:
            p.append(f"{where}: {v.bits} bits of a {dtype} operand in the {layout} layout")
        if mode == "explicit":
            for ix in pos.indices:
                if len(ix) != len(shape) or not all(0 <= a < n for a, n in zip(ix, shape)):
                    p.append(f"{where}: position {ix} outside shape {shape}")
                    break
        elif mode in ("random", "groups") and pos.count > size:
            p.append(f"{where}: {mode} count {pos.count} > {size} elements")
        elif mode == "consecutive" and pos.count > (shape[-1] if shape else 1):
            p.append(f"{where}: consecutive count {pos.count} > last dimension of {shape}")
        if model == "copy" and size < 2:
            p.append(f"{where}: copy on an operand of {size} element(s)")
        if not p and resolve_ok and size <= 2**22 and pos.count <= 4096 and len(pos.indices) <= 4096:
            try:
                f.resolve(shape, dtype, f.step)
            except FaultlabError as e:
                p.append(f"{where}: validate accepted it but resolving it at its step fails: {e}")
    return p


def normalized(trials) -> str:
    """The trials as JSON, without where they came from (for 'same trials' comparisons)."""
    from faultlab.trials import fault_to_dict
    return json.dumps([(t.trial_id, t.workload.to_dict(), [fault_to_dict(f) for f in t.faults],
                        t.horizon) for t in trials], sort_keys=True, default=repr)


def _message_problem(msg: str) -> str | None:
    if "\n" in msg or "\r" in msg or len(msg.splitlines()) > 1:
        return "error message is not one line"
    bad = [c for c in msg if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    if bad:
        return f"error message carries control/format characters {sorted(set(bad))[:5]!r}"
    if len(msg) > 4000:
        return f"error message is {len(msg)} characters long"
    return None


# --- running -------------------------------------------------------------------------------------

@dataclass
class Failure:
    case: int
    kind: str           # traceback | hang | invalid_accepted | valid_refused | unstable | ...
    desc: str
    detail: str
    pending: str | None = None
    saved: str | None = None
    via: str = "in-process"

    def line(self) -> str:
        tag = f" [pending {self.pending}]" if self.pending else ""
        saved = f" (bytes: {self.saved})" if self.saved else ""
        return f"FAIL case {self.case} {self.kind}{tag} via {self.via}: {self.desc}: " \
               f"{self.detail}{saved}"


class _Timeout(BaseException):
    pass


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise _Timeout in the main thread after `seconds` (no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(*_):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _ShapeCache:
    """A Session for validate_trials whose backend caches operand tables (by config key)."""

    def __init__(self):
        from faultlab.runner.session import Session
        self.session = Session()
        self.tables: dict = {}
        cache = self.tables
        real = self.session.backend

        class Cached:
            def __init__(self, b):
                self._b = b

            def __getattr__(self, name):
                return getattr(self._b, name)

            def operand_shapes(self, cfg):
                k = cfg.key()
                if k not in cache:
                    cache[k] = self._b.operand_shapes(cfg)
                return cache[k]

        self.session.backend = lambda cfg: Cached(real(cfg))

    def table(self, cfg):
        return self.session.backend(cfg).operand_shapes(cfg)


LOADER_CHILD = r"""
import json, signal, sys, traceback
from faultlab.campaigns import load_campaign
from faultlab.errors import FaultlabError
class Hang(BaseException): pass
def fire(*_): raise Hang()
signal.signal(signal.SIGALRM, fire)
for line in sys.stdin:
    req = json.loads(line)
    print(json.dumps({"i": req["i"], "started": True}), flush=True)
    signal.alarm(int(req["timeout"]))
    try:
        c = load_campaign(req["path"])
        out = {"status": "accepted", "trials": len(c.trials)}
    except FaultlabError as e:
        out = {"status": "refused", "cls": type(e).__name__, "msg": str(e)}
    except Hang:
        out = {"status": "hang"}
    except BaseException as e:
        out = {"status": "traceback", "cls": type(e).__name__, "msg": str(e)[:500],
               "tb": traceback.format_exc()[-3000:]}
    finally:
        signal.alarm(0)
    out["i"] = req["i"]
    print(json.dumps(out), flush=True)
"""


@dataclass
class Summary:
    seed: int
    cases: int = 0
    accepted: int = 0
    refused: int = 0
    refused_by: dict = field(default_factory=dict)
    skipped: int = 0
    by_kind: dict = field(default_factory=dict)
    cli_cases: int = 0
    cli_ok: int = 0
    validated: int = 0
    unjudged: int = 0
    wall_s: float = 0.0
    seeds: list = field(default_factory=list)
    shared_seeds: bool = False
    failures: list = field(default_factory=list)
    saved_dir: str = ""

    def _cases(self, kinds=None, exclude=(), pending=None) -> int:
        """Distinct cases (a case failing in-process and through the command counts once)."""
        return len({f.case for f in self.failures if f.pending == pending and
                    (kinds is None or f.kind in kinds) and f.kind not in exclude})

    @property
    def tracebacks(self) -> int:
        return self._cases(("traceback",))

    @property
    def invalid_accepted(self) -> int:
        return self._cases(("invalid_accepted",))

    @property
    def hangs(self) -> int:
        return self._cases(("hang",))

    @property
    def other_failures(self) -> int:
        return self._cases(exclude=("traceback", "invalid_accepted", "hang"))

    @property
    def pending(self) -> dict:
        labels = {f.pending for f in self.failures if f.pending}
        return {lb: self._cases(pending=lb) for lb in sorted(labels)}

    @property
    def real_failures(self) -> list:
        """Every failure: the size and workload checks (tagged with the issue-11 item they
        test) are strict now that both are in faultlab."""
        return list(self.failures)

    def line(self) -> str:
        by = ", ".join(f"{k}={v}" for k, v in sorted(self.refused_by.items())) or "-"
        pend = ", ".join(f"{k}={v}" for k, v in sorted(self.pending.items())) or "0"
        return (f"campaign fuzz: seed={self.seed} cases={self.cases} accepted={self.accepted} "
                f"refused={self.refused} ({by}) tracebacks={self.tracebacks} "
                f"invalid_accepted={self.invalid_accepted} hangs={self.hangs} "
                f"other_failures={self.other_failures} skipped={self.skipped} "
                f"validated={self.validated} unjudged={self.unjudged} "
                f"cli={self.cli_ok}/{self.cli_cases} pending=[{pend}] "
                f"time={self.wall_s:.1f}s")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("tracebacks", "invalid_accepted", "hangs", "other_failures", "pending"):
            d[k] = getattr(self, k)
        d["failures"] = [dataclasses.asdict(f) for f in self.failures]
        d["summary"] = self.line()
        return d


class Fuzzer:
    def __init__(self, seed: int = 1, workdir: str | None = None, validate: bool | None = None,
                 verbose: bool = False, out=sys.stdout, loader=None):
        """`loader(path)` replaces load_campaign (the oracle's self-test breaks it on purpose)."""
        self.seed = seed
        self.loader = loader
        self.out = out
        self.verbose = verbose
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="faultlab-fuzz-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "cases").mkdir(exist_ok=True)
        (self.workdir / "failures").mkdir(exist_ok=True)
        (self.workdir / "paths").mkdir(exist_ok=True)
        self.canary = f"fuzzcanary_{os.getpid()}_{seed}"
        self.canary_marker = self.workdir / f"{self.canary}.imported"
        (self.workdir / f"{self.canary}.py").write_text(
            "import pathlib\n"
            f"pathlib.Path({str(self.canary_marker)!r}).write_text('imported')\n"
            "def build(config):\n    return None\n")
        fs, self.shared = file_seeds()
        self.seeds = fs + generated_seeds(seed)
        self.prelude = ([("seed", s.name) for s in self.seeds] +
                        [("path", k) for k in PATH_KINDS] +
                        [("workload", m) for m in WORKLOAD_MODULES] +
                        [("targeted", k) for k in TARGETED])
        if validate is None:
            from faultlab import backends
            validate = backends.installed("torch")
        self.validate = validate
        self._shapes = None

    # -- cases --
    def case(self, number: int) -> Case:
        rng = random.Random(f"faultlab-fuzz:{self.seed}:{number}")
        if number < len(self.prelude):
            kind, what = self.prelude[number]
        else:
            r = rng.random()
            kind = ("mutation" if r < 0.75 else "targeted" if r < 0.93 else
                    "workload" if r < 0.95 else "path")
            what = (rng.choice(PATH_KINDS) if kind == "path" else
                    rng.choice(WORKLOAD_MODULES) if kind == "workload" else
                    rng.choice(TARGETED) if kind == "targeted" else None)
        if kind == "seed":
            s = next(s for s in self.seeds if s.name == what)
            return Case(number, "seed", f"seed {s.name}", s.data, expect="accept")
        if kind == "path":
            return Case(number, "path", f"path: {what}", path_kind=what, expect="refuse")
        if kind == "workload":
            return self._workload_case(rng, number, what)
        if kind == "targeted":
            return self._targeted_case(rng, number, what)
        seed = rng.choice(self.seeds)
        data, descs, expect = seed.data, [], "any"
        rounds = 1 if rng.random() < 0.8 else rng.randint(2, 3)
        for _ in range(rounds):
            data, desc, expect = mutate(rng, dataclasses.replace(seed, data=data))
            descs.append(desc)
        if rounds > 1:     # a later mutation may undo what made an earlier one invalid
            expect = "any"
        return Case(number, "mutation", f"{seed.name}: " + " + ".join(descs), data,
                    expect=expect, same_as=seed.data if expect == "same" else None)

    def _targeted_case(self, rng, number, what) -> Case:
        if what in TARGETED_COLUMNAR:
            twin, bad, desc, vlevel, pending = _targeted_columnar(rng, what)
            twin_b = columnar_text(twin).encode("utf-8", "surrogatepass")
            bad_b = columnar_text(bad).encode("utf-8", "surrogatepass")
        elif what in TARGETED_STRUCTURE:
            twin_b, bad_b, desc = _targeted_structure(rng, what)
            vlevel, pending = False, None
        else:
            twin_b, bad_b, desc, vlevel = _targeted_isca(rng, what)
            pending = None
        if rng.random() < 0.2:   # the same invalid cell in a file with other harmless changes
            bad_b = codecs.BOM_UTF8 + bad_b.replace(b"\n", b"\r\n")
            twin_b = codecs.BOM_UTF8 + twin_b.replace(b"\n", b"\r\n")
            desc += " (BOM, CRLF)"
        return Case(number, "targeted", f"targeted {desc}", bad_b, expect="refuse",
                    pending=pending, twin=twin_b, validate_level=vlevel)

    def _workload_case(self, rng, number, what) -> Case:
        name = what.replace("CANARY", self.canary)
        wl = rng.choice(BUILTINS)
        if rng.random() < 0.7:
            row = template_row(wl)
            row.update(site="fwd_output", layer=sorted(LAYERS[wl])[0], replica="0", epoch="0",
                       step="0", value="zero")
            twin = columnar_text([row]).encode()
            bad = columnar_text([dict(row, workload=name)]).encode()
        else:
            pairs = template_isca(rng, wl)
            twin = isca_text(pairs).encode()
            bad = isca_text([(k, name if k == "model" else v) for k, v in pairs]).encode()
        return Case(number, "workload", f"workload {name!r} named by the file", bad,
                    expect="refuse", pending=PENDING_WORKLOAD, twin=twin,
                    module=name.partition(":")[0])

    # -- in-process: load_campaign, then validate_trials --
    def _shape_cache(self):
        if self._shapes is None:
            self._shapes = _ShapeCache()
        return self._shapes

    def _load(self, path: Path):
        """('accepted', campaign) | ('refused', error) | ('traceback', text) | ('hang', '')."""
        from faultlab.campaigns import load_campaign
        load = self.loader or load_campaign
        try:
            with _deadline(CASE_TIMEOUT):
                return "accepted", load(str(path))
        except _Timeout:
            return "hang", f"load_campaign took over {CASE_TIMEOUT}s"
        except FaultlabError as e:
            return "refused", e
        except KeyboardInterrupt:
            raise
        except BaseException as e:   # noqa: BLE001 - the point: nothing else may escape
            return "traceback", _tb(e)

    def _validate(self, camp):
        """validate_trials as `faultlab validate` runs it; a TF trial is checked against the
        torch backend's (identical, canonical) shapes so that TF is never imported."""
        from faultlab.runner.session import validate_trials
        trials = [t if _val(t.workload.framework) == "torch" else
                  dataclasses.replace(t, workload=t.workload.replace(framework="torch"))
                  for t in camp.trials]
        cache = self._shape_cache()
        try:
            with _deadline(CASE_TIMEOUT):
                validate_trials(trials, cache.session)
            return "accepted", trials
        except _Timeout:
            return "hang", f"validate_trials took over {CASE_TIMEOUT}s"
        except FaultlabError as e:
            return "refused", e
        except KeyboardInterrupt:
            raise
        except BaseException as e:   # noqa: BLE001
            return "traceback", _tb(e)

    def run_case(self, case: Case, summary: Summary) -> dict:
        """Run one case in-process (path cases in a child); record its outcome and failures.
        Returns what the CLI sample needs to know about it."""
        info = {"case": case, "outcome": None, "cli_ok": False}
        if case.kind == "path":
            return self._run_path_cases([case], summary)[0]
        path = self.workdir / "cases" / f"case_{case.number}.csv"
        path.write_bytes(case.data)
        fails: list[Failure] = []

        def fail(kind, detail, pending=None):
            fails.append(Failure(case.number, kind, case.desc, detail, pending or case.pending))

        if case.twin is not None:   # the valid file this case is one cell away from
            twin_path = self.workdir / "cases" / f"case_{case.number}.twin.csv"
            twin_path.write_bytes(case.twin)
            st, res = self._load(twin_path)
            if st == "accepted" and self.validate and not _user_workload(res):
                st, res = self._validate(res)
            twin_path.unlink()
            if st != "accepted":
                fail("valid_refused", f"the valid twin of this targeted case was {st}: "
                                      f"{_short(res)}", pending=None)
        modules_before = set(sys.modules)
        path_before = list(sys.path)
        if case.module == self.canary:
            sys.path.insert(0, str(self.workdir))
        try:
            status, res = self._load(path)
            stage = "parse"
            camp = res if status == "accepted" else None
            user = status == "accepted" and _user_workload(camp)
            big = status == "accepted" and max(
                (memory_lower_bound(t.workload) for t in camp.trials), default=0)
            checked_trials = None
            if status == "accepted":
                problems = check_parse_level(camp, case.data)
                if problems:
                    fail("invalid_accepted", "; ".join(problems[:4]))
                self._stability(case, camp, path, fail)
                if user:
                    fail("invalid_accepted", "accepted a module:function workload the person "
                                             "running faultlab did not allow "
                                             f"({sorted({t.workload.workload for t in camp.trials if ':' in t.workload.workload})[:3]})",
                         pending=PENDING_WORKLOAD)
                if self.validate and (not user or case.module == self.canary):
                    stage = "validate"
                    status, res = self._validate(camp)
                    checked_trials = res if status == "accepted" else None
                    summary.validated += 1
            if status == "accepted" and checked_trials is not None:
                for t in checked_trials:
                    table = self._shape_cache().table(t.workload)
                    problems = check_validate_level(t, table, resolve_ok=True)
                    if problems:
                        fail("invalid_accepted", "; ".join(problems[:3]))
                if big > CERTAINLY_TOO_BIG:
                    fail("invalid_accepted", f"a configuration needing over {big / 2**40:.0f} "
                                             f"TiB was accepted", pending=PENDING_SIZE)
            if status == "refused":
                msg_problem = _message_problem(str(res))
                if msg_problem:
                    fail("bad_message", f"{msg_problem}: {str(res)[:200]!r}")
                summary.refused_by[type(res).__name__] = summary.refused_by.get(
                    type(res).__name__, 0) + 1
            elif status == "traceback":
                pend = PENDING_SIZE if stage == "validate" and big > CERTAINLY_TOO_BIG else None
                fail("traceback", f"at {stage} level: {res}", pending=pend)
            elif status == "hang":
                fail("hang", f"at {stage} level: {res}")
            # expectations
            if status == "accepted":
                if case.expect == "refuse":
                    if case.validate_level and not self.validate:
                        summary.unjudged += 1
                    else:
                        fail("invalid_accepted", "a file the format refuses was accepted")
                if case.expect == "same" and case.same_as is not None:
                    st2, seedcamp = self._load_bytes(case.same_as, f"case_{case.number}.seed")
                    if st2 == "accepted" and normalized(seedcamp.trials) != normalized(camp.trials):
                        fail("changed_trials", "a change the format ignores gave other trials")
            elif status == "refused" and case.expect in ("accept", "same"):
                fail("valid_refused", f"refused: {str(res)[:300]}")
        finally:
            new = set(sys.modules) - modules_before
            sys.path[:] = path_before
            if case.module:
                named = {m for m in new if m == case.module or m.startswith(case.module + ".")}
                if named or (case.module == self.canary and self.canary_marker.exists()):
                    fail("imported", f"in-process loading imported {sorted(named) or [case.module]}"
                                     f" named by the file", pending=PENDING_WORKLOAD)
                for m in named:
                    if m.startswith("fuzzcanary_"):
                        sys.modules.pop(m, None)
                if self.canary_marker.exists():
                    self.canary_marker.unlink()
        fails = _merge(fails)
        info["outcome"] = status
        info["torch_only"] = camp is None or all(
            _val(t.workload.framework) == "torch" for t in camp.trials)
        info["user"] = status == "accepted" and user if camp else False
        info["digest"] = camp.digest if camp else None
        info["trials"] = len(camp.trials) if camp else None
        info["big"] = big if camp else 0
        self._record(case, status, res, fails, summary)
        path.unlink()
        return info

    def _load_bytes(self, data: bytes, name: str):
        p = self.workdir / "cases" / f"{name}.csv"
        p.write_bytes(data)
        try:
            return self._load(p)
        finally:
            p.unlink()

    def _stability(self, case, camp, path, fail):
        st, again = self._load(path)
        if st != "accepted":
            fail("unstable", f"the same bytes loaded again were {st}: {_short(again)}")
            return
        if again.digest != camp.digest or normalized(again.trials) != normalized(camp.trials):
            fail("unstable", "the same bytes loaded twice gave another digest or other trials")
        try:
            from faultlab.campaigns import format_columnar, parse_columnar
        except ImportError:
            return
        if _user_workload(camp):
            return
        try:
            back = parse_columnar(format_columnar(camp.trials), "<roundtrip>")
        except FaultlabError as e:
            fail("roundtrip", f"format_columnar wrote a file parse_columnar refuses: {e}")
            return
        except BaseException as e:   # noqa: BLE001
            fail("roundtrip", f"format_columnar / parse_columnar raised {_tb(e)}")
            return
        if normalized(back) != normalized(camp.trials):
            fail("roundtrip", "format_columnar wrote trials that read back different")

    def _record(self, case, status, res, fails, summary):
        summary.cases += 1
        summary.by_kind[case.kind] = summary.by_kind.get(case.kind, 0) + 1
        if status == "accepted":
            summary.accepted += 1
        elif status == "refused":
            summary.refused += 1
        elif status == "skipped":
            summary.skipped += 1
        for f in fails:
            self._fail(f, case, summary)

    def _fail(self, f: Failure, case: Case, summary: Summary):
        if case.data is not None:
            saved = self.workdir / "failures" / f"case_{case.number}.bin"
            saved.write_bytes(case.data)
            f.saved = str(saved)
        summary.failures.append(f)
        print(f.line(), file=self.out, flush=True)

    # -- paths that are not campaign files, in a child with a timeout --
    def _make_path(self, kind: str) -> str | None:
        d = self.workdir / "paths"
        p = d / kind
        if p.exists() or p.is_symlink():
            if p.is_dir() and not p.is_symlink():
                pass
            else:
                p.unlink()
        if kind == "directory":
            p.mkdir(exist_ok=True)
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "fifo_symlink":
            fifo = d / "fifo_target"
            if not fifo.exists():
                os.mkfifo(fifo)
            p.symlink_to(fifo)
        elif kind == "missing":
            pass
        elif kind == "nul_in_path":
            return str(d / "a\x00b.csv")
        elif kind == "symlink_loop":
            other = d / "loop_b"
            if other.is_symlink():
                other.unlink()
            p.symlink_to(other)
            other.symlink_to(p)
        elif kind == "dangling_symlink":
            p.symlink_to(d / "nowhere" / "x.csv")
        elif kind == "unreadable":
            if os.geteuid() == 0:
                return None        # root reads anything
            p.write_bytes(self.seeds[0].data)
            p.chmod(0)
        elif kind == "dev_null":
            return os.devnull
        elif kind == "dev_zero":
            return "/dev/zero" if os.path.exists("/dev/zero") else None
        elif kind == "too_big":
            with open(p, "wb") as f:
                f.write(b"workload\n")
                f.truncate((64 << 20) + 1)
        elif kind == "not_a_dir_component":
            f = d / "plainfile"
            f.write_bytes(self.seeds[0].data)
            return str(f / "x.csv")
        elif kind == "name_too_long":
            return str(d / ("n" * 300 + ".csv"))
        elif kind == "empty_path":
            return ""
        elif kind in ("newline_in_name", "escape_in_name"):
            # an existing, invalid file: the error names it (on one line, escaped)
            odd = d / ("bad\nname.csv" if kind == "newline_in_name" else "bad\x1b[31mred.csv")
            odd.write_bytes(b"workload,replica\nmlp,99\n")
            return str(odd)
        elif kind == "missing_newline_in_name":
            return str(d / "no\nsuch\rfile.csv")
        return str(p)

    def _run_path_cases(self, cases: list[Case], summary: Summary) -> list[dict]:
        infos, reqs = [], []
        for c in cases:
            p = self._make_path(c.path_kind)
            c.data = None
            infos.append({"case": c, "outcome": "skipped" if p is None else None, "path": p,
                          "torch_only": True, "user": False, "big": 0})
            if p is not None:
                reqs.append({"i": len(infos) - 1, "path": p, "timeout": PATH_TIMEOUT})
        results = _loader_child(reqs, PATH_TIMEOUT) if reqs else {}
        for i, info in enumerate(infos):
            c = info["case"]
            fails: list[Failure] = []
            if info["outcome"] == "skipped":
                self._record(c, "skipped", None, [], summary)
                continue
            r = results.get(i, {"status": "hang"})
            st = r["status"]
            if st == "refused":
                problem = _message_problem(r["msg"])
                if problem:
                    fails.append(Failure(c.number, "bad_message", c.desc, f"{problem}: {r['msg'][:200]!r}"))
                summary.refused_by[r["cls"]] = summary.refused_by.get(r["cls"], 0) + 1
            elif st == "accepted":
                fails.append(Failure(c.number, "invalid_accepted", c.desc,
                                     f"{info['path']!r} was accepted as a campaign file"))
            elif st == "hang":
                fails.append(Failure(c.number, "hang", c.desc,
                                     f"load_campaign({info['path']!r}) did not return within "
                                     f"{PATH_TIMEOUT}s", via="child"))
            else:
                fails.append(Failure(c.number, "traceback", c.desc,
                                     f"{r.get('cls')}: {r.get('msg')} | "
                                     f"{r.get('tb', '').strip().splitlines()[-1:]}", via="child"))
            info["outcome"] = st
            self._record(c, st if st in ("accepted", "refused") else "failure", None, fails,
                         summary)
        return infos

    # -- the real command --
    def run_cli(self, infos: list[dict], summary: Summary) -> None:
        jobs = []
        for info in infos:
            c = info["case"]
            if c.kind == "path":
                path = info["path"]
            else:
                path = str(self.workdir / "cases" / f"cli_{c.number}.csv")
                Path(path).write_bytes(c.data)
            jobs.append((info, path))
        env = dict(os.environ, FAULTLAB_CACHE=str(self.workdir / "cache"), PYTHONDONTWRITEBYTECODE="1")
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(lambda j: _run_cli_one(j[1], self.workdir, env), jobs))
        for (info, path), (rc, out, err, hung) in zip(jobs, results):
            c = info["case"]
            summary.cli_cases += 1
            fails = []

            def fail(kind, detail, pending=None):
                fails.append(Failure(c.number, kind, c.desc, detail, pending or c.pending,
                                     via="cli"))
            lines = err.splitlines()
            if hung:
                fail("hang", f"`faultlab validate` did not finish within {CLI_TIMEOUT}s")
            elif rc not in (0, 2) or "Traceback" in err:
                pend = PENDING_SIZE if info.get("big", 0) > CERTAINLY_TOO_BIG else None
                fail("traceback", f"exit {rc}, stderr ends {lines[-1:]!r}", pending=pend)
            elif rc == 2 and len(lines) != 1:
                fail("bad_message", f"exit 2 with {len(lines)} stderr lines: {err[:300]!r}")
            elif rc == 2 and not lines[0].startswith("faultlab"):
                fail("bad_message", f"stderr line {lines[0][:200]!r}")
            elif rc == 0 and c.expect == "refuse":
                if c.pending:
                    fail("invalid_accepted", "the command accepted it")
                elif not (c.validate_level and not self.validate):
                    fail("invalid_accepted", "the command accepted a file the format refuses")
            if rc == 0 and not hung:
                try:
                    doc = json.loads(out)
                    if info.get("digest") and (doc.get("digest"), doc.get("trials")) != \
                            (info["digest"], info["trials"]):
                        fail("cli_mismatch", f"the command reports digest {doc.get('digest')} "
                                             f"and {doc.get('trials')} trials, in-process "
                                             f"{info['digest']} and {info['trials']}")
                except ValueError:
                    fail("bad_output", f"`validate --json` printed {out[:200]!r}")
            if not hung and rc in (0, 2) and info["outcome"] in ("accepted", "refused") and \
                    (rc == 0) != (info["outcome"] == "accepted") and self.validate and \
                    c.module is None:
                fail("cli_mismatch", f"exit {rc} but in-process {info['outcome']}")
            if c.module == self.canary and self.canary_marker.exists():
                fail("imported", f"`faultlab validate` imported {c.module}, named by the file",
                     pending=PENDING_WORKLOAD)
                self.canary_marker.unlink()
            fails = _merge(fails)
            if not fails:
                summary.cli_ok += 1
            for f in fails:
                self._fail(f, c, summary)
            if c.kind != "path":
                Path(path).unlink(missing_ok=True)

    def choose_cli(self, infos: list[dict], n: int) -> list[dict]:
        """The cases the real command runs: the canary workload, a FIFO, a directory, a
        validate-level targeted case, an oversize one, then a seeded random sample of the
        rest (files that would make the command import TF or a user's module are left out)."""
        if n <= 0:
            return []
        rng = random.Random(f"faultlab-fuzz-cli:{self.seed}")
        picked: list[dict] = []

        def eligible(i):
            c = i["case"]
            if c.kind == "path":
                return i.get("path") not in (None, "") and "\x00" not in (i.get("path") or "")
            if c.module is not None:
                return c.module == self.canary
            return i["torch_only"] and not i["user"]
        wants = [lambda c: c.module == self.canary,
                 lambda c: c.path_kind == "fifo",
                 lambda c: c.path_kind == "directory",
                 lambda c: c.path_kind == "newline_in_name",
                 lambda c: c.kind == "targeted" and c.desc.startswith("targeted bit_outside_dtype"),
                 lambda c: c.kind == "targeted" and c.pending == PENDING_SIZE,
                 lambda c: c.kind == "targeted" and c.desc.startswith("targeted integer_operand")]
        for want in wants:
            for i in infos:
                if len(picked) < n and want(i["case"]) and eligible(i) and i not in picked:
                    picked.append(i)
                    break
        rest = [i for i in infos if eligible(i) and i not in picked]
        rng.shuffle(rest)
        picked += rest[:max(0, n - len(picked))]
        return picked

    # -- the whole run --
    def run(self, cases: int, cli_sample: int = 10, only: tuple | None = None) -> Summary:
        t0 = time.monotonic()
        summary = Summary(seed=self.seed, seeds=[s.name for s in self.seeds],
                          shared_seeds=self.shared, saved_dir=str(self.workdir / "failures"))
        infos, path_cases = [], []
        for n in range(cases):
            c = self.case(n)
            if only and c.kind not in only:
                continue
            if c.kind == "path":
                path_cases.append(c)
                continue
            infos.append(self.run_case(c, summary))
            if self.verbose:
                print(f"case {n} {c.kind} {infos[-1]['outcome']}: {c.desc[:120]}", file=self.out)
        if path_cases:
            infos += self._run_path_cases(path_cases, summary)
        infos.sort(key=lambda i: i["case"].number)
        self.run_cli(self.choose_cli(infos, cli_sample), summary)
        summary.wall_s = time.monotonic() - t0
        return summary


def _merge(fails: list) -> list:
    """One failure per (kind, pending) of a case: counts are of files, not of messages."""
    out: dict = {}
    for f in fails:
        key = (f.kind, f.pending)
        if key in out:
            out[key].detail += " | " + f.detail
        else:
            out[key] = f
    return list(out.values())


def _user_workload(camp) -> bool:
    return any(":" in t.workload.workload for t in camp.trials)


def _tb(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    last = tb[-1] if tb else None
    at = f" at {Path(last.filename).name}:{last.lineno} in {last.name}" if last else ""
    return f"{type(e).__name__}: {str(e)[:300]}{at}"


def _short(x) -> str:
    return str(x)[:300]


def _loader_child(reqs: list[dict], per_case: float) -> dict:
    """Run load_campaign on each path in one child process; {index: result}. A case still
    running when the child's time is up is a hang (and the rest are retried in a new child)."""
    results: dict = {}
    todo = list(reqs)
    while todo:
        proc = subprocess.Popen([sys.executable, "-c", LOADER_CHILD], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdin.write("".join(json.dumps(r) + "\n" for r in todo))
        proc.stdin.close()
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        current, deadline = None, time.monotonic() + per_case + 15  # + the child's start
        buf = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not sel.select(timeout=left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536).decode()
            if not chunk:
                break
            buf += chunk
            while "\n" in buf:
                line, buf = buf.split("\n", 1)
                msg = json.loads(line)
                if msg.get("started"):
                    current = msg["i"]
                    deadline = time.monotonic() + per_case + 5
                else:
                    results[msg["i"]] = msg
                    current = None
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        err = proc.stderr.read()
        done = set(results)
        if current is not None and current not in done:
            results[current] = {"status": "hang"}
            done.add(current)
        rest = [r for r in todo if r["i"] not in done]
        if rest and len(rest) == len(todo):   # the child died before any result: report it
            for r in rest:
                results[r["i"]] = {"status": "traceback", "cls": "child", "msg": err[-500:],
                                   "tb": err[-2000:]}
            rest = []
        todo = rest
    return results


def _run_cli_one(path: str, cwd: Path, env: dict):
    try:
        p = subprocess.run([sys.executable, "-m", "faultlab", "validate", "--json", path], cwd=cwd,
                           env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                           errors="replace")
        return p.returncode, p.stdout, p.stderr, False
    except subprocess.TimeoutExpired:
        return None, "", "", True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=int(os.environ.get("FAULTLAB_FUZZ_CASES", 3000)))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("FAULTLAB_FUZZ_SEED", 1)))
    ap.add_argument("--case", type=int, action="append",
                    help="run only this case number (repeatable), e.g. to re-run a failure")
    ap.add_argument("--cli", type=int, default=None, metavar="N",
                    help="cases also run through `python -m faultlab validate` "
                         "(default: max(10, cases/100); with --case: all of them)")
    ap.add_argument("--no-validate", action="store_true",
                    help="parse level only (no torch import)")
    ap.add_argument("--workdir", help="where cases and failing bytes go (default: a new tmp dir)")
    ap.add_argument("--report", default=os.environ.get("FAULTLAB_FUZZ_REPORT"),
                    help="write the JSON summary here (env FAULTLAB_FUZZ_REPORT)")
    ap.add_argument("--show", action="store_true", help="print the case(s) and their bytes")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    fz = Fuzzer(a.seed, a.workdir, validate=False if a.no_validate else None, verbose=a.verbose)
    print(f"seeds: {len(fz.seeds)} ({'with' if fz.shared else 'without'} ../shared/reference/"
          f"isca_ae); validate level: {'on' if fz.validate else 'off'}; workdir {fz.workdir}")
    if a.case:
        summary = Summary(seed=a.seed, seeds=[s.name for s in fz.seeds], shared_seeds=fz.shared,
                          saved_dir=str(fz.workdir / "failures"))
        t0 = time.monotonic()
        infos = []
        for n in a.case:
            c = fz.case(n)
            print(f"case {n}: {c.kind}: {c.desc} (expect {c.expect})")
            if a.show and c.data is not None:
                print(repr(c.data[:2000]))
            infos += fz._run_path_cases([c], summary) if c.kind == "path" else [fz.run_case(c, summary)]
            print(f"  -> {infos[-1]['outcome']}")
        fz.run_cli(fz.choose_cli(infos, len(infos) if a.cli is None else a.cli), summary)
        summary.wall_s = time.monotonic() - t0
    else:
        cli = a.cli if a.cli is not None else max(10, a.cases // 100)
        summary = fz.run(a.cases, cli_sample=cli)
    print(summary.line())
    if a.report:
        Path(a.report).write_text(json.dumps(summary.to_json(), indent=1, default=str))
    return 1 if summary.real_failures else 0


if __name__ == "__main__":
    sys.exit(main())
