"""What ``faultlab run`` records per campaign run beside its trials (``ResultStore.add_runs``):
each workload configuration and the determinism fingerprint of the golden run its trials were
compared with, so a results file says on what arithmetic it was made without the local
golden-run cache. Framework-free: the fingerprint comes from package metadata and golden.json.
"""

from __future__ import annotations

from collections.abc import Iterable

#: ``fingerprint_source`` values: read from the golden run's golden.json in the cache; this
#: process's fingerprint (the key the golden runs were looked up under; a legacy golden run
#: without one, or a multi-process configuration's); not recorded (Ray: recorded on a node)
FROM_GOLDEN = "golden run"
FROM_PROCESS = "campaign process"


def golden_records(configs: Iterable, threads: int, executor: str = "local") -> list[dict]:
    """One ``ResultStore.add_runs`` entry per workload configuration, after the pool's golden
    runs: the configuration, and the fingerprint of its golden run (for the Ray executor, whose
    golden runs are recorded on a node whose fingerprint may not be this machine's, none)."""
    from faultlab.determinism import fingerprint
    from faultlab.runner import golden as goldenmod
    out = []
    for cfg in configs:
        rec = {"workload_key": cfg.key(), "framework": getattr(cfg.framework, "value",
                                                               cfg.framework),
               "workload": cfg.workload, "config": cfg.to_dict(), "threads": threads,
               "executor": executor, "fingerprint": None, "fingerprint_source": None}
        if executor == "local":
            fp = fingerprint(cfg.framework, threads)
            run = (goldenmod.load(cfg, goldenmod.golden_dir(cfg, threads, fp), fp)
                   if cfg.processes <= 1 else None)
            if run is not None and run.fingerprint is not None:
                rec["fingerprint"], rec["fingerprint_source"] = (run.fingerprint.to_dict(),
                                                                 FROM_GOLDEN)
            else:
                rec["fingerprint"], rec["fingerprint_source"] = fp.to_dict(), FROM_PROCESS
        out.append(rec)
    return out
