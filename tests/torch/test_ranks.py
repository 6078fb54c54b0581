"""Multi-process training (faultlab/backends/torch/ranks, faultlab/runner/ranks.py): real
ranks under torch.distributed.elastic with gloo on 127.0.0.1, started by the tests."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from faultlab.faults import fault
from faultlab.process_faults import ProcessFault
from faultlab.runner import ranks
from faultlab.runner.session import DetectOptions
from faultlab.workloads.base import default_config

pytestmark = pytest.mark.framework("torch")

CFG = default_config("mlp", processes=3, width=16, per_replica_batch=8, steps_per_epoch=6,
                     epochs=2)
CFG2 = default_config("mlp", processes=4, nodes=2, width=16, per_replica_batch=8,
                      steps_per_epoch=6, epochs=2)


def _job(cfg, tmp_path, name, faults=(), process=(), **kw):
    run = tmp_path / name
    shm = ranks._scratch(name)[1]
    job = ranks.RankJob(cfg, str(run), str(shm), tuple(faults), tuple(process),
                        persist_every=kw.pop("persist_every", 4), **kw)
    try:
        rec = ranks.run_job(job)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    assert rec.ok, rec.error
    return rec, run


def _losses(rec, cfg):
    return rec.series(cfg.total_steps)[0]


def _sums(rec):
    return [r["checksum"] for r in rec.final["ranks"]]


def _digests(rec):
    return [r["digest"] for r in rec.final["ranks"]]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    rec, run = _job(CFG, tmp_path_factory.mktemp("g"), "golden", record_grads=True)
    return rec, run


def test_fault_free_job_repeats_itself_bit_for_bit(golden, tmp_path):
    rec, _ = _job(CFG, tmp_path, "again")
    g = golden[0]
    assert _losses(rec, CFG) == _losses(g, CFG)
    assert _digests(rec) == _digests(g)
    assert len(set(_sums(g))) == 1              # DDP: every rank holds the same parameters


def test_a_gradient_fault_on_rank_k_changes_only_its_local_gradient(golden, tmp_path):
    f = fault("grad_wt", "dense_2", replica=1, step=3, value="set", values=[1e3],
              positions=[(0, 0)])
    rec, run = _job(CFG, tmp_path, "grad", [f], record_grads=True)
    gold_run = golden[1]
    for r in range(3):
        mine = np.load(run / f"grads-r{r}-s3.npz")
        ref = np.load(gold_run / f"grads-r{r}-s3.npz")
        same = all(np.array_equal(mine[k], ref[k]) for k in ref.files)
        assert same == (r != 1), r
        if r == 1:
            assert mine["dense_2.weight"][0, 0] == 1e3     # torch layout (out, in): (0, 0)
    # earlier steps are untouched everywhere
    for r in range(3):
        mine, ref = np.load(run / f"grads-r{r}-s2.npz"), np.load(gold_run / f"grads-r{r}-s2.npz")
        assert all(np.array_equal(mine[k], ref[k]) for k in ref.files)
    # after the all-reduce every rank applied the same (corrupted) mean: still in step
    assert len(set(_sums(rec))) == 1
    assert _sums(rec) != _sums(golden[0])


@pytest.mark.parametrize("site,tensor", [("param", None), ("opt_state", "m")])
def test_a_state_fault_on_rank_k_makes_that_rank_diverge_and_no_other(golden, tmp_path, site,
                                                                      tensor):
    f = fault(site, "dense_1", replica=2, step=4, value="bitflip", bit=30,
              positions=[(0, 1)], tensor=tensor)
    rec, _ = _job(CFG, tmp_path, site, [f])
    sums = _sums(rec)
    assert sums[0] == sums[1] != sums[2]


def test_a_killed_rank_resumes_from_memory_bit_identical(golden, tmp_path):
    kills = [ProcessFault("kill", 4, rank=1), ProcessFault("kill", 8, rank=2, phase="staging")]
    rec, _ = _job(CFG, tmp_path, "kill", process=kills)
    assert _losses(rec, CFG) == _losses(golden[0], CFG)
    assert _digests(rec) == _digests(golden[0])
    rs = [e for e in rec.events if e["event"] == "recovery"]
    assert [(e["source"], e["step"]) for e in rs] == [("memory", 3), ("memory", 7)]
    assert rec.attempts >= 2    # (a loaded machine may add a restart: a join that timed out)


def test_a_node_kill_recovers_from_peers_and_a_persist_kill_from_memory(tmp_path):
    ref, _ = _job(CFG2, tmp_path, "ref")
    kills = [ProcessFault("kill_node", 5, node=1, phase="replicating"),
             ProcessFault("kill", 7, rank=0, phase="persisting")]
    rec, _ = _job(CFG2, tmp_path, "node", process=kills)
    assert _digests(rec) == _digests(ref)
    assert _losses(rec, CFG2) == _losses(ref, CFG2)
    first = next(e for e in rec.events if e["event"] == "recovery")
    # node 1 (ranks 2, 3) lost its memory: their state came from peers on node 0
    assert first["fetch"]["2"][0] == "peer" and first["fetch"]["3"][0] == "peer"
    assert first["fetch"]["0"] == ["local", 0]


def test_losing_every_copy_falls_back_to_the_engine_file(tmp_path):
    ref, _ = _job(CFG2, tmp_path, "ref")
    # both nodes die at the same step: no memory survives, the engine's file (every 4 steps)
    kills = [ProcessFault("kill_node", 6, node=0), ProcessFault("kill_node", 6, node=1)]
    rec, _ = _job(CFG2, tmp_path, "both", process=kills)
    assert _digests(rec) == _digests(ref)
    srcs = [(e["source"], e["step"]) for e in rec.events if e["event"] == "recovery"]
    assert ("disk", 3) in srcs


def test_a_hung_rank_is_caught_by_the_timeout_and_the_job_recovers(golden, tmp_path):
    rec, _ = _job(CFG, tmp_path, "hang", process=[ProcessFault("hang", 5, rank=2)],
                  timeout_s=3.0)
    assert _digests(rec) == _digests(golden[0])
    assert any(e["event"] == "collective-failed" for e in rec.events)


def test_protected_job_detects_divergence_rolls_back_and_ends_bit_identical(golden, tmp_path):
    f = fault("param", "dense_2", replica=0, step=5, value="bitflip", bit=20,
              positions=[(1, 1)])
    det = DetectOptions(("nonfinite", "divergence"), checkpoint_every=4)
    rec, _ = _job(CFG, tmp_path, "protect", [f], detect=det)
    dets = [e for e in rec.events if e["event"] == "detection"]
    assert [(d["step"], d["detector"]) for d in dets] == [(5, "divergence")]
    assert _digests(rec) == _digests(golden[0])
    assert _losses(rec, CFG) == _losses(golden[0], CFG)


def test_sharded_optimizer_state_resumes_bit_identical(tmp_path):
    ref, _ = _job(CFG, tmp_path, "zero_ref", zero=True)
    rec, _ = _job(CFG, tmp_path, "zero_kill", process=[ProcessFault("kill", 6, rank=0)],
                  zero=True)
    assert _digests(rec) == _digests(ref)
    assert len(set(_sums(ref))) == 1
    # each rank holds only its shard of the optimizer state: the digests differ by rank
    assert len(set(_digests(ref))) == 3


def test_fsdp2_shards_resume_and_roll_back_bit_identical(tmp_path):
    cfg = default_config("mlp", processes=2, width=16, per_replica_batch=8, steps_per_epoch=6,
                         epochs=2)
    ref, _ = _job(cfg, tmp_path, "fsdp_ref", fsdp=True)
    assert len(set(_digests(ref))) == 2             # each rank holds its own shards
    kill, _ = _job(cfg, tmp_path, "fsdp_kill", process=[ProcessFault("kill", 5, rank=1)],
                   fsdp=True)
    assert _digests(kill) == _digests(ref)
    f = fault("fwd_output", "dense_1", replica=1, step=3, value="nan", positions=[(0, 0)])
    det = DetectOptions(("nonfinite",), checkpoint_every=4)
    prot, _ = _job(cfg, tmp_path, "fsdp_nan", [f], fsdp=True, detect=det)
    assert [e["step"] for e in prot.events if e["event"] == "detection"] == [3]
    assert _digests(prot) == _digests(ref)


def test_a_single_process_workload_takes_kill_rows(tmp_path):
    cfg = default_config("mlp", width=16, per_replica_batch=8, steps_per_epoch=6, epochs=2)
    assert cfg.processes == 1 and cfg.replicas == 2        # emulated replicas, one process
    ref, _ = _job(cfg, tmp_path, "solo_ref")
    f = fault("fwd_output", "dense_1", replica=1, step=2, value="set", values=[50.0],
              positions=[(0, 0)])
    rec, _ = _job(cfg, tmp_path, "solo_kill", [f], process=[ProcessFault("kill", 7, rank=0)])
    plain, _ = _job(cfg, tmp_path, "solo_fault", [f])
    assert _digests(rec) == _digests(plain) != _digests(ref)    # the fault fired once
    assert [(e["source"], e["step"]) for e in rec.events if e["event"] == "recovery"] == [
        ("memory", 6)]
