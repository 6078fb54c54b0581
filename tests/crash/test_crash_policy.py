"""Which engines and loop a crash campaign runs comes from the registries (checkpointer
classes' framework, the backends' crash_loops), and what a zygote preloads from the loop's
backend: a TF loop's zygote never imports torch, a framework-free loop's imports neither."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import faultlab.backends as backends
from faultlab.checkpointing.api import COMPARED
from faultlab.crash import (KillCampaign, KillPoint, LoopSpec, Phase, builtin_loops,
                            campaign_setup, factory_name, loop_framework)
from faultlab.errors import FaultlabError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.framework("torch")
def test_the_default_campaign_is_the_engine_on_the_first_framework_s_first_loop():
    setup = campaign_setup()
    assert setup.engines == ("faultlab",) and setup.framework is None
    assert setup.workload == "mlp"
    assert setup.loop.factory == "faultlab.backends.torch.loops:mlp_loop"
    assert campaign_setup(["all"]).engines == tuple(COMPARED)


def test_engines_of_a_framework_get_that_framework_s_loop():
    if not backends.installed("tf"):
        with pytest.raises(FaultlabError, match=r"pip install 'faultlab\[tf\]'"):
            campaign_setup(["tf-sync"])
        return
    setup = campaign_setup(["tf-sync", "tf-async"])
    assert (setup.framework, setup.workload) == ("tf", "keras-mlp")
    assert setup.loop.factory == "faultlab.backends.tf.loops:keras_loop"


def test_array_baselines_take_any_loop_and_mixed_engines_the_default_one():
    """A baseline stores the loop's arrays whatever made them (as before the registry)."""
    if not backends.installed("tf"):
        return
    assert campaign_setup(["tf-sync"], "mlp").workload == "mlp"
    assert campaign_setup(["sync"], "keras-mlp").workload == "keras-mlp"
    mixed = campaign_setup(["faultlab", "tf-sync"])
    assert (mixed.framework, mixed.workload) == (None, "mlp")
    assert campaign_setup(["sync", "tf-sync"]).workload == "mlp"


@pytest.mark.parametrize("engines, workload, message", [
    (["faultlab+cow"], "keras-mlp", "needs a torch loop"),
    (["nope"], None, "unknown engine 'nope'"),
    (["faultlab"], "nomodule", "not module:function"),
])
@pytest.mark.framework("torch")
def test_bad_combinations_are_one_line_errors(engines, workload, message):
    with pytest.raises(FaultlabError, match=message) as e:
        campaign_setup(engines, workload)
    assert "\n" not in str(e.value)


def test_a_missing_framework_is_a_pip_hint(monkeypatch):
    monkeypatch.setattr(backends, "installed", lambda fw: fw != "torch")
    with pytest.raises(FaultlabError, match=r"pip install 'faultlab\[torch\]'"):
        campaign_setup(["sync"])


def test_built_in_loops_come_from_the_backends():
    loops = builtin_loops()
    assert {n: fw for n, (fw, _) in loops.items()} == {"mlp": "torch", "rng-mlp": "torch",
                                                        "keras-mlp": "tf"}
    assert loop_framework("rng-mlp") == "torch"
    assert loop_framework("faultlab.backends.tf.loops:keras_loop") == "tf"
    assert loop_framework("my.module:loop") is None
    assert factory_name("keras-mlp") == "faultlab.backends.tf.loops:keras_loop"


def _zygote_modules(factory: str, engines: str) -> dict:
    """Run the zygote's preparation (stdin closed: it exits at once); which frameworks did it
    import?"""
    code = ("import sys\nfrom faultlab.crash.zygote import zygote_main\n"
            f"zygote_main([{factory!r}, '1', '1', '', {engines!r}])\n"
            "import json\nprint(json.dumps({m: m in sys.modules for m in "
            "('torch', 'tensorflow', 'torch.distributed.checkpoint')}))")
    out = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_tf_loop_s_zygote_imports_no_framework():
    assert backends.backend_module("tf").BACKEND.crash_preload(("tf-sync",)) == []
    got = _zygote_modules("faultlab.backends.tf.loops:keras_loop", "faultlab,tf-sync,tf-async")
    assert got == {"torch": False, "tensorflow": False, "torch.distributed.checkpoint": False}


@pytest.mark.framework("torch")
def test_a_torch_loop_s_zygote_preloads_torch_and_dcp_only_for_dcp_async():
    got = _zygote_modules("faultlab.backends.torch.loops:mlp_loop", "faultlab,sync")
    assert got["torch"] and not got["tensorflow"] and not got["torch.distributed.checkpoint"]
    got = _zygote_modules("faultlab.backends.torch.loops:mlp_loop", "faultlab,dcp-async")
    assert got["torch.distributed.checkpoint"]


# -- a framework-free loop: its zygote imports no framework, its campaign works ---------------

class CounterLoop:
    """A NumPy-only loop: the state after k steps is a function of k alone."""

    def __init__(self):
        marker = os.environ.get("FAULTLAB_TEST_MARKER")
        if marker:
            with open(marker, "a") as f:
                f.write(json.dumps({"torch": "torch" in sys.modules,
                                    "tensorflow": "tensorflow" in sys.modules}) + "\n")
        self.w = np.zeros(64, dtype=np.float32)

    def step(self, k: int) -> None:
        self.w = self.w * np.float32(0.5) + np.float32(k)

    def capture(self, step: int):
        return {"w": self.w.copy()}, {"step": step}

    def restore(self, state, meta) -> None:
        self.w = np.array(state["w"])


def counter_loop() -> CounterLoop:
    return CounterLoop()


def test_a_framework_free_loop_survives_kills_without_importing_a_framework(tmp_path,
                                                                           monkeypatch):
    marker = tmp_path / "marker.jsonl"
    monkeypatch.setenv("FAULTLAB_TEST_MARKER", str(marker))
    plan = [KillPoint(Phase.COMMITTING, 2), KillPoint(Phase.WRITING, 3)]
    with KillCampaign(LoopSpec(factory_name(counter_loop), steps=8), tmp_path / "kc",
                      engines=["faultlab"]) as kc:
        kc.run("faultlab", plan).assert_ok()
    seen = [json.loads(line) for line in marker.read_text().splitlines()]
    assert seen and all(s == {"torch": False, "tensorflow": False} for s in seen)
