"""The `faultlab` command end to end (child processes) on what a campaign file must not do: run
code it names without the user's consent (issue 11, item 4) and ask for sizes this machine
cannot hold (item 3). Each refusal: exit 2, one line on stderr, nothing imported or built."""

from __future__ import annotations

import textwrap

import pytest

from _clihelpers import env_for, finish, start

HEADER = "trial,workload,replicas,per_replica_batch,width,input_size,steps_per_epoch,epochs"


@pytest.fixture
def project(tmp_path):
    """A directory with a module whose import leaves a marker file, and a .git (so that no
    pyproject.toml above it is read)."""
    (tmp_path / ".git").mkdir()
    marker = tmp_path / "imported.txt"
    (tmp_path / "mymod.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")

        def make(config):
            return None

        def make_loop():
            return None
        """))
    (tmp_path / "c.csv").write_text(f"{HEADER}\nt,mymod:make,2,8,16,8,5,4\n")
    (tmp_path / "huge.csv").write_text(f"{HEADER}\nok,mlp,2,8,16,8,5,4\n"
                                       f"big,mlp,2,8,2147483647,8,5,4\n")
    return tmp_path, marker


def _run_all(argvs, cwd, env):
    procs = [start(a, cwd, env) for a in argvs]
    return [finish(p) for p in procs]


def _refused(p, *parts):
    assert p.returncode == 2, (p.args, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def test_files_and_options_naming_code_that_was_not_allowed_import_nothing(project):
    tmp, marker = project
    env = env_for(tmp / "cache")
    env["PYTHONPATH"] = str(tmp)          # importable: only the allow-list stands in the way
    validate, run, crash = _run_all([["validate", "c.csv"], ["run", "c.csv"],
                                     ["crash", "--workload", "mymod:make_loop"]], tmp, env)
    how = "pass --allow-workload mymod, or list it under [tool.faultlab] allow-workloads"
    _refused(validate, "c.csv:2: column 'workload': workload 'mymod:make' is not allowed", how)
    _refused(run, "c.csv:2: column 'workload': workload 'mymod:make' is not allowed", how)
    _refused(crash, "--workload: loop factory 'mymod:make_loop' is not allowed", how)
    assert not marker.exists()
    assert not (tmp / "faultlab-results").exists()


@pytest.mark.framework("torch")
def test_allowed_code_that_is_not_a_workload_factory_is_one_line(project):
    tmp, marker = project
    (tmp / "pyproject.toml").write_text('[tool.faultlab]\nallow-workloads = ["mymod"]\n')
    (tmp / "os.csv").write_text(f"{HEADER}\nt,os:getcwd,2,8,16,8,5,4\n")
    by_config, by_flag = _run_all([["validate", "c.csv"],
                                   ["validate", "os.csv", "--allow-workload", "os"]],
                                  tmp, env_for(tmp / "cache"))
    _refused(by_config, "c.csv:2: workload 'mymod:make' returned NoneType, not TorchWorkload")
    assert marker.exists()                # allowed by pyproject.toml: imported
    _refused(by_flag, "os.csv:2: workload 'os:getcwd' failed: calling getcwd(config) raised "
                      "TypeError")


def test_sizes_this_machine_cannot_hold_are_refused_before_anything_is_built(project):
    tmp, _ = project
    env = env_for(tmp / "cache")
    env.pop("FAULTLAB_MEMORY_LIMIT", None)
    validate, run = _run_all([["validate", "huge.csv"], ["run", "huge.csv"]], tmp, env)
    for p in (validate, run):
        _refused(p, "huge.csv:3: column 'width': workload mlp with width 2147483647 needs "
                    "about 112.0 EiB (parameters 16.0 EiB", "but this machine has")
    assert not (tmp / "faultlab-results").exists() and not (tmp / "cache").exists()
