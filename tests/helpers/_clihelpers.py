"""Running the `faultlab` command in child processes, for the command-line tests: a tiny TF
campaign header and workload, the environment, start / finish."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600

HEADER = ("trial,framework,workload,replicas,per_replica_batch,width,input_size,dataset,"
          "steps_per_epoch,epochs,site,layer,tensor,replica,epoch,step,value,values,positions")
TINY = "mlp,2,8,16,8,digits,5,4"


def env_for(cache: Path) -> dict:
    env = dict(os.environ, FAULTLAB_CACHE=str(cache))
    env.pop("FAULTLAB_STOP_AFTER", None)
    return env


def start(args, cwd, env, script=None):
    cmd = [sys.executable, script] if script else [sys.executable, "-m", "faultlab.cli"]
    return subprocess.Popen(cmd + [str(a) for a in args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(p):
    out, err = p.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)
