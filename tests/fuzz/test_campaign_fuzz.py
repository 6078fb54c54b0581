"""The campaign-file fuzzer (tests/fuzz/campaign_fuzz.py; issue 11, item 6).

Quick variant in the default run (a few hundred cases, ten of them through the real command);
the long one is marked slow: FAULTLAB_FUZZ_CASES (default 3000), FAULTLAB_FUZZ_SEED (1),
FAULTLAB_FUZZ_CLI (cases/100). FAULTLAB_FUZZ_REPORT=FILE writes the JSON summary.
Re-run a failing case: python tests/fuzz/campaign_fuzz.py --seed S --case N --show
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

from faultlab.errors import CampaignError


def _fuzz_module():
    name = "campaign_fuzz"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod            # dataclasses look their module up while built
        spec.loader.exec_module(mod)
    return sys.modules[name]


cf = _fuzz_module()

QUICK_CASES, QUICK_SEED, QUICK_CLI = 250, 20231, 10


def _show(capsys, text: str) -> None:
    with capsys.disabled():
        print("\n" + text)


def _report(summary) -> None:
    path = os.environ.get("FAULTLAB_FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps(summary.to_json(), indent=1, default=str))


def _judge(summary) -> None:
    real = summary.real_failures
    assert not real, (f"{len(real)} failure(s):\n" + "\n".join(f.line() for f in real[:25]) +
                      "\n" + summary.line())


def _run(tmp_path_factory, cases: int, seed: int, cli: int):
    fz = cf.Fuzzer(seed, workdir=str(tmp_path_factory.mktemp("campaign-fuzz")))
    return fz.run(cases, cli_sample=cli)


def test_campaign_fuzz_quick(tmp_path_factory, capsys):
    summary = _run(tmp_path_factory, QUICK_CASES, QUICK_SEED, QUICK_CLI)
    _show(capsys, summary.line())
    _report(summary)
    assert summary.cases == QUICK_CASES
    assert summary.cli_cases == QUICK_CLI
    assert summary.accepted and summary.refused        # both outcomes were exercised
    _judge(summary)


@pytest.mark.slow
def test_campaign_fuzz_long(tmp_path_factory, capsys):
    cases = int(os.environ.get("FAULTLAB_FUZZ_CASES", "3000"))
    seed = int(os.environ.get("FAULTLAB_FUZZ_SEED", "1"))
    cli = int(os.environ.get("FAULTLAB_FUZZ_CLI", str(max(10, cases // 100))))
    summary = _run(tmp_path_factory, cases, seed, cli)
    _show(capsys, summary.line())
    _report(summary)
    assert summary.cases == cases
    _judge(summary)


def test_runs_without_the_shared_reference_files(tmp_path, monkeypatch):
    """../shared may be absent: its seeds are then skipped, nothing else changes."""
    monkeypatch.setattr(cf, "ISCA_AE", tmp_path / "no-such-shared")
    fz = cf.Fuzzer(5, workdir=str(tmp_path / "w"), validate=False)
    assert not fz.shared and not any(s.name.startswith("isca_ae/") for s in fz.seeds)
    summary = fz.run(80, cli_sample=0, only=("seed", "mutation", "targeted"))
    assert summary.cases > 40 and not summary.real_failures, summary.line()


def test_cases_are_reproducible_by_number(tmp_path):
    a = cf.Fuzzer(9, workdir=str(tmp_path / "a"), validate=False)
    b = cf.Fuzzer(9, workdir=str(tmp_path / "b"), validate=False)
    for n in (0, 40, 97, 311, 2999):
        ca, cb = a.case(n), b.case(n)
        assert (ca.kind, ca.desc, ca.data, ca.expect, ca.twin) == \
            (cb.kind, cb.desc, cb.data, cb.expect, cb.twin)


# --- the oracle catches a broken loader (its self-test) ------------------------------------------

def _targeted_only(fz, n=len(cf.TARGETED)):
    summary = cf.Summary(seed=fz.seed)
    first = fz.prelude.index(("targeted", cf.TARGETED[0]))
    for k in range(first, first + n):
        fz.run_case(fz.case(k), summary)
    return summary


def test_oracle_catches_a_loader_that_accepts_everything(tmp_path):
    """A loader that turns every refusal into the parse of a valid file: each targeted case
    must come out as an invalid file accepted (and its digest as wrong)."""
    from faultlab.campaigns import load_campaign
    valid = tmp_path / "valid.csv"
    valid.write_bytes(cf.generated_seeds(1)[0].data)

    def lenient(path):
        try:
            return load_campaign(path)
        except CampaignError:
            return load_campaign(str(valid))
    fz = cf.Fuzzer(3, workdir=str(tmp_path / "w"), validate=False, loader=lenient,
                   out=open(os.devnull, "w"))
    summary = _targeted_only(fz, 30)
    assert summary.invalid_accepted >= 25, summary.line()


def test_oracle_catches_out_of_range_fields(tmp_path):
    """A loader whose trials carry a replica past the workload's replicas."""
    from faultlab.campaigns import load_campaign

    def off_by_one(path):
        camp = load_campaign(path)
        trials = [dataclasses.replace(t, faults=tuple(
            dataclasses.replace(f, replica=t.workload.replicas) for f in t.faults))
            for t in camp.trials]
        return dataclasses.replace(camp, trials=trials)
    fz = cf.Fuzzer(3, workdir=str(tmp_path / "w"), validate=False, loader=off_by_one,
                   out=open(os.devnull, "w"))
    summary = cf.Summary(seed=3)
    for k in range(len(fz.seeds)):         # the seeds: valid files with faults
        fz.run_case(fz.case(k), summary)
    bad = [f for f in summary.failures if f.kind == "invalid_accepted"]
    assert bad and all("replica" in f.detail for f in bad), summary.line()


def test_oracle_catches_tracebacks_hangs_and_multiline_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(cf, "CASE_TIMEOUT", 0.5)
    behaviours = iter(["raise", "hang", "multiline"] * 10)

    def broken(path):
        b = next(behaviours)
        if b == "raise":
            raise ValueError("not a FaultlabError")
        if b == "hang":
            time.sleep(3)
        raise CampaignError("first line\nsecond line", file=path)
    fz = cf.Fuzzer(3, workdir=str(tmp_path / "w"), validate=False, loader=broken,
                   out=open(os.devnull, "w"))
    summary = cf.Summary(seed=3)
    first = fz.prelude.index(("targeted", cf.TARGETED[0]))
    for k in range(first, first + 3):
        case = fz.case(k)
        case.twin = None                   # the twin would consume a behaviour
        fz.run_case(case, summary)
    assert summary.tracebacks == 1 and summary.hangs == 1, summary.line()
    assert [f.kind for f in summary.failures] == ["traceback", "hang", "bad_message"]


def test_oracle_catches_an_import_of_a_module_the_file_names(tmp_path):
    """A loader that imports the (canary) module a workload cell names is reported."""
    import importlib
    from faultlab.campaigns import load_campaign
    fz = cf.Fuzzer(3, workdir=str(tmp_path / "w"), validate=False, out=open(os.devnull, "w"))

    def importing(path):
        if fz.canary in Path(path).read_text(errors="replace"):
            importlib.import_module(fz.canary)
        return load_campaign(path)
    fz.loader = importing
    summary = cf.Summary(seed=3)
    fz.run_case(fz.case(fz.prelude.index(("workload", "CANARY:build"))), summary)
    assert "imported" in [f.kind for f in summary.failures], summary.failures
    assert fz.canary not in sys.modules
