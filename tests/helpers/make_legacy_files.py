"""Write the on-disk files of an earlier faultlab (run with that version on sys.path) that
tests/core/test_legacy_files.py loads with this one: a checkpoint-engine file, a torch adapter
checkpoint, a `sync` baseline directory, a results database and a golden-run cache.

    PYTHONPATH=OLD_CHECKOUT python tests/helpers/make_legacy_files.py OUT_DIR
"""

import os
import sys
from pathlib import Path

import numpy as np


def engine_state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((20, 7)).astype(np.float32), "m": rng.standard_normal(33),
            "flags": rng.random(5) > 0.5, "big_endian": rng.standard_normal(4).astype(">f8"),
            "step": np.array(step, dtype=np.int64)}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    os.environ["FAULTLAB_CACHE"] = str(out / "cache")
    from faultlab.checkpointing import CheckpointEngine
    with CheckpointEngine(out / "engine.ckpt", keep=2, chunk_bytes=4096) as engine:
        for step in (1, 2, 3):
            engine.save(step, engine_state(step), {"step": step, "note": "legacy"}).wait()

    import torch
    from faultlab.checkpointing.adapters import TorchCheckpointAdapter
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
    adapter = TorchCheckpointAdapter(model, opt)
    with CheckpointEngine(out / "adapter.ckpt", chunk_bytes=4096) as engine:
        adapter.save(engine, 3, data_position={"batch": 3}).wait()
    np.savez(out / "adapter_expected.npz",
             **{k: v.detach().numpy() for k, v in model.state_dict().items()})

    from faultlab.checkpointing.baselines import open_checkpointer
    ckpt = open_checkpointer("sync", out / "sync")
    for step in (4, 5):
        ckpt.save(step, engine_state(step), {"step": step}).wait()
    ckpt.close()

    from faultlab.campaigns import parse_campaign
    from faultlab.runner import Session
    from faultlab.results import ResultStore
    campaign = ("trial,workload,replicas,per_replica_batch,width,input_size,dataset,"
                "steps_per_epoch,epochs,site,layer,replica,step,value,positions\n"
                "control,mlp,2,8,16,8,digits,5,2,,,,,,\n"
                "nan,mlp,2,8,16,8,digits,5,2,fwd_output,dense_1,0,3,nan,0/0\n")
    camp = parse_campaign(campaign.encode(), "legacy.csv")
    session = Session(threads=1)
    with ResultStore(out / "results.sqlite") as store:
        for trial in camp.trials:
            store.add(session.run_trial(trial, camp.digest))
    (out / "campaign.csv").write_text(campaign)
    # CPU kernels differ by instruction set: a golden run reproduces only on the same kind
    (out / "cpu_capability.txt").write_text(torch.backends.cpu.get_cpu_capability() + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
