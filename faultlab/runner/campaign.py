"""Running a whole campaign: validate its trials, skip those the results store already holds,
record the golden runs, run the rest in a worker pool and store each result as it ends."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from faultlab.campaigns import Campaign
from faultlab.errors import FaultlabError
from faultlab.outcomes import OutcomeRules
from faultlab.results import ResultStore, TrialResult, golden_records
from faultlab.runner.pool import LocalPool
from faultlab.runner.session import DetectOptions, check_windows, validate_trials


EXECUTORS = ("local", "ray")


def make_pool(executor: str, workers: int, threads: int, rules: OutcomeRules, timeout: float,
              detect, dist, address: str | None = None, early_stop: bool = True):
    """The executor's pool: golden(configs) and trials(trials, campaign, on_result)."""
    if executor == "ray":
        from faultlab.runner.ray_pool import RayPool
        return RayPool(workers, threads, rules, timeout, detect, dist, address=address,
                       early_stop=early_stop)
    return LocalPool(workers, threads, rules, timeout, detect, dist, early_stop=early_stop)


def default_threads(workers: int) -> int:
    """Intra-op threads per worker: the machine's cores shared among the workers."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def default_results_path(campaign_path: str | os.PathLike) -> Path:
    return Path("faultlab-results") / (Path(campaign_path).stem + ".sqlite")


def campaign_id(campaign: Campaign, detect: DetectOptions | None) -> str:
    """The id a campaign's results are stored under: a protected run is a different
    experiment, so its results are kept under their own id."""
    return campaign.digest + ("+detect" if detect is not None else "")


@dataclass
class CampaignRun:
    campaign: Campaign
    campaign_id: str
    results_path: Path
    results: list[TrialResult]


def run_campaign(campaign: Campaign, results_path: str | os.PathLike, *, workers: int = 1,
                 threads: int = 0, rules: OutcomeRules | None = None, timeout: float = 3600.0,
                 detect: DetectOptions | None = None, fresh: bool = False, dist=None,
                 executor: str = "local", address: str | None = None,
                 early_stop: bool = True,
                 say: Callable[[str], None] = lambda msg: None,
                 on_start: Callable[[int], None] = lambda n: None,
                 on_result: Callable[[TrialResult], None] = lambda r: None) -> CampaignRun:
    """Run what is not done yet of `campaign` (all of it with `fresh`), storing each result in
    `results_path` when its trial ends, so an interrupted run resumes losing nothing. `say`
    gets progress lines, `on_start` the number of trials to run, `on_result` each result
    after it is stored (an exception it raises stops the campaign). `executor` is "local"
    (a pool of processes on this machine) or "ray" (tasks on the Ray cluster at `address`:
    runner/ray_pool.py). `early_stop` False runs every trial to its horizon (Session.early_stop)."""
    if workers < 1:
        raise FaultlabError("--workers must be at least 1")
    if executor not in EXECUTORS:
        raise FaultlabError(f"--executor: unknown executor {executor!r} "
                            f"(one of: {', '.join(EXECUTORS)})")
    if address is not None and executor != "ray":
        raise FaultlabError("--address needs --executor ray")
    validate_trials(campaign.trials)
    from faultlab.runner.ranks import check_options
    check_options(campaign.trials, dist)
    threads = threads or default_threads(workers)
    cid = campaign_id(campaign, detect)
    store = ResultStore(results_path)
    with store:
        if fresh:
            store.clear(cid)
        done = store.done(cid)
        todo = [t for t in campaign.trials if t.trial_id not in done]
        if done:
            say(f"resuming: {len(done)} of {len(campaign.trials)} trial(s) already done "
                f"in {store.path}")
        if todo:
            with make_pool(executor, min(workers, len(todo)), threads, rules or OutcomeRules(),
                           timeout, detect, dist, address, early_stop) as pool:
                configs = {t.workload.key(): t.workload for t in todo}
                say(f"golden run: {len(configs)} configuration(s) "
                    f"({', '.join(sorted({c.workload for c in configs.values()}))}), "
                    f"cached after the first time")
                check_windows(todo, pool.golden(configs.values()) or {})
                store.add_runs(cid, golden_records(configs.values(), threads, executor))
                on_start(len(todo))

                def stored(res: TrialResult) -> None:
                    store.add(res)
                    on_result(res)
                pool.trials(todo, cid, stored)
        results = store.results(cid)
    return CampaignRun(campaign, cid, store.path, results)
