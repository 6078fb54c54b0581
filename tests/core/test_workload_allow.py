"""A campaign file never runs code: user workloads and crash-loop factories are imported only
when the person running faultlab allowed them (faultlab/workloads/allow.py): --allow-workload,
an installed entry point (group faultlab.workloads), or [tool.faultlab] allow-workloads in the
project's pyproject.toml. A refusal is one line and happens before anything is imported; a
callable that is not a workload factory is a one-line SpecError.

Framework-free: nothing here builds a model (the command-line tests that do are in
tests/cli/test_workload_cli.py)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from faultlab import cli
from faultlab.campaigns import load_campaign, parse_campaign
from faultlab.errors import CampaignError, FaultlabError, SpecError
from faultlab.workloads import allow
from faultlab.workloads.allow import AllowList, allowing, check_allowed, parse_entry
from faultlab.workloads.base import default_config, is_user_workload, load_user_workload

HEADER = "trial,workload,replicas,per_replica_batch,width,input_size,steps_per_epoch,epochs"


def campaign(workload: str) -> str:
    return f"{HEADER}\nt,{workload},2,8,16,8,5,4\n"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A directory holding a module `mymod` whose import writes a marker file, on sys.path and
    the current directory, with a .git so that no pyproject.toml above it counts."""
    (tmp_path / ".git").mkdir()
    marker = tmp_path / "imported.txt"
    (tmp_path / "mymod.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("mymod was imported")

        class Result:
            pass

        def make(config):
            return Result()

        def no_args():
            return Result()

        def broken(config):
            raise ValueError("the factory broke")

        def wrong_type(config):
            return 42

        NOT_A_FUNCTION = 3
        """))
    (tmp_path / "badmod.py").write_text("raise RuntimeError('import-time failure')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mymod", "badmod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path, marker
    for name in ("mymod", "badmod"):
        sys.modules.pop(name, None)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- refusals happen before anything is imported ------------------------------------------------

def test_a_campaign_naming_a_module_that_was_not_allowed_is_refused_before_it_is_imported(project):
    tmp, marker = project
    (tmp / "c.csv").write_text(campaign("mymod:make"))
    with pytest.raises(CampaignError) as e:
        load_campaign(tmp / "c.csv")
    msg = str(e.value)
    assert msg.startswith(f"{tmp / 'c.csv'}:2: column 'workload': workload 'mymod:make' is "
                          "not allowed: pass --allow-workload mymod, or list it under "
                          "[tool.faultlab] allow-workloads in pyproject.toml")
    assert "mymod" not in sys.modules and not marker.exists()


@pytest.mark.parametrize("command", [["validate"], ["run"], ["detect", "--campaign"]])
def test_every_command_that_reads_a_campaign_refuses_it_in_one_line(project, capsys, command):
    tmp, marker = project
    (tmp / "c.csv").write_text(campaign("mymod:make"))
    assert cli.main([*command, "c.csv"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "c.csv:2: column 'workload': workload 'mymod:make' is not allowed" in line
    assert "mymod" not in sys.modules and not marker.exists()


@pytest.mark.parametrize("argv", [
    ["workloads", "--layers", "mymod:make"],
    ["plan", "--workload", "mymod:make", "-o", "out.csv"],
    ["detect", "--workload", "mymod:make"],
    ["replay", "--workload", "mymod:make"],
    ["crash", "--workload", "mymod:make"],
    ["crash", "--workload", "mymod.py:make"],
])
def test_every_command_line_option_naming_user_code_is_checked(project, capsys, argv):
    tmp, marker = project
    assert cli.main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert "is not allowed: pass --allow-workload" in line
    assert "mymod" not in sys.modules and not marker.exists()


@pytest.mark.parametrize("name", ["os:getcwd", "json:dumps", "subprocess:run"])
def test_the_standard_library_is_no_exception(tmp_path, name, capsys):
    (tmp_path / "c.csv").write_text(campaign(name))
    assert cli.main(["validate", str(tmp_path / "c.csv")]) == 2
    line = _one_line(capsys.readouterr().err)
    module = name.split(":")[0]
    assert f"workload '{name}' is not allowed: pass --allow-workload {module}" in line


def test_the_isca_format_is_checked_too(project):
    tmp, marker = project
    text = ("model,mymod:make\nstage,fwd\nfmodel,INPUT\ntarget_worker,0\ntarget_layer,dense_1\n"
            "target_epoch,0\ntarget_step,1\ninj_pos,0/0\n")
    with pytest.raises(CampaignError, match=r"c\.isca:1: column 'model': workload 'mymod:make' "
                                            r"is not allowed"):
        parse_campaign(text.encode(), "c.isca")
    assert "mymod" not in sys.modules and not marker.exists()


def test_a_bad_allow_workload_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:       # argparse's usage error
        cli.main(["validate", "x.csv", "--allow-workload", "not a module"])
    assert e.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert "--allow-workload" in line and "cannot allow 'not a module'" in line


# --- opting in ---------------------------------------------------------------------------------

def test_allowed_on_the_command_line_or_through_the_api_a_campaign_loads(project):
    tmp, marker = project
    (tmp / "c.csv").write_text(campaign("mymod:make"))
    camp = load_campaign(tmp / "c.csv", allow_workloads=["mymod"])
    assert camp.trials[0].workload.workload == "mymod:make"
    with allowing(["mymod:make"]):
        assert load_campaign(tmp / "c.csv").trials
    # loading parses names only: the module is imported when a trainer is built
    assert "mymod" not in sys.modules and not marker.exists()
    with pytest.raises(CampaignError, match="allow_workloads: cannot allow"):
        load_campaign(tmp / "c.csv", allow_workloads=["-x"])


def test_allowing_a_function_allows_that_function_only(project):
    tmp, _ = project
    (tmp / "c.csv").write_text(campaign("mymod:broken"))
    with pytest.raises(CampaignError, match="'mymod:broken' is not allowed"):
        load_campaign(tmp / "c.csv", allow_workloads=["mymod:make"])


def test_the_allowance_ends_with_its_block(project):
    tmp, _ = project
    with allowing(["mymod"]):
        check_allowed("mymod:make")
    with pytest.raises(SpecError):
        check_allowed("mymod:make")


@pytest.mark.parametrize("entry, name, allowed", [
    ("pkg", "pkg:f", True),
    ("pkg", "pkg.sub:f", True),
    ("pkg", "pkg.sub.deeper:f", True),
    ("pkg", "pkgx:f", False),
    ("pkg", "other.pkg:f", False),
    ("pkg.sub", "pkg.sub:f", True),
    ("pkg.sub", "pkg:f", False),
    ("pkg.sub", "pkg.other:f", False),
    ("pkg.mod:f", "pkg.mod:f", True),
    ("pkg.mod:f", "pkg.mod:g", False),
    ("pkg.mod:f", "pkg.mod.sub:f", False),
    ("pkg", "pkg.py:f", False),
])
def test_what_an_entry_allows(tmp_path, monkeypatch, entry, name, allowed):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".git").mkdir()
    assert AllowList((parse_entry(entry),)).allows(name) is allowed


def test_a_file_entry_allows_loop_factories_of_that_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".git").mkdir()
    (tmp_path / "sub").mkdir()
    al = AllowList((parse_entry("sub/loops.py"),))
    assert al.allows("sub/loops.py:make")
    assert al.allows(f"{tmp_path}/sub/loops.py:other")
    assert not al.allows("loops.py:make")         # another file
    assert not al.allows("sub.loops:make")        # the module name is not the file


def test_the_projects_pyproject_allows_modules(project, monkeypatch):
    tmp, marker = project
    (tmp / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.faultlab]\n'
                                        'allow-workloads = ["mymod", "loops/crash.py"]\n')
    (tmp / "deep" / "er").mkdir(parents=True)
    (tmp / "c.csv").write_text(campaign("mymod:make"))
    monkeypatch.chdir(tmp / "deep" / "er")          # found from a subdirectory too
    assert load_campaign(tmp / "c.csv").trials
    check_allowed(f"{tmp}/loops/crash.py:make", "loop factory")   # relative to the file
    with pytest.raises(CampaignError, match="not allowed"):
        parse_campaign(campaign("other:make").encode(), "c.csv")
    assert "mymod" not in sys.modules and not marker.exists()


def test_a_pyproject_above_the_repository_root_does_not_count(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.faultlab]\nallow-workloads = ["mymod"]\n')
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    monkeypatch.chdir(repo)
    assert allow.find_pyproject() is None
    with pytest.raises(SpecError):
        check_allowed("mymod:make")


def test_the_nearest_pyproject_wins_even_without_a_faultlab_table(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()
    (tmp_path / "pyproject.toml").write_text('[tool.faultlab]\nallow-workloads = ["mymod"]\n')
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "pyproject.toml").write_text('[project]\nname = "inner"\n')
    monkeypatch.chdir(tmp_path / "inner")
    with pytest.raises(SpecError):
        check_allowed("mymod:make")


@pytest.mark.parametrize("text, message", [
    ("[tool.faultlab\n", "not valid TOML"),
    ('[tool.faultlab]\nallow-workloads = "mymod"\n', "must be a list of strings"),
    ('[tool.faultlab]\nallow-workloads = [1]\n', "must be a list of strings"),
    ('[tool.faultlab]\nallow-workloads = ["no good"]\n', "cannot allow 'no good'"),
    ('[tool]\nfaultlab = 3\n', "[tool.faultlab] must be a table"),
])
def test_a_broken_pyproject_is_one_line_naming_it(tmp_path, monkeypatch, capsys, text, message):
    (tmp_path / ".git").mkdir()
    (tmp_path / "pyproject.toml").write_text(text)
    (tmp_path / "c.csv").write_text(campaign("mymod:make"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate", "c.csv"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "pyproject.toml" in line and message in line


def test_a_broken_pyproject_does_not_matter_to_builtin_workloads(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()
    (tmp_path / "pyproject.toml").write_text("[tool.faultlab\n")
    monkeypatch.chdir(tmp_path)
    assert parse_campaign(campaign("mlp").encode(), "c.csv").trials


# --- installed packages' entry points -----------------------------------------------------------

@pytest.fixture
def installed(tmp_path, monkeypatch, project):
    """An installed distribution (a .dist-info on sys.path) with entry points in the group
    faultlab.workloads."""
    site = tmp_path / "site"
    info = site / "myworkloads-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myworkloads\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[faultlab.workloads]\nmynet = mymod:make\nmlp = mymod:broken\nbad = not a target\n")
    monkeypatch.syspath_prepend(str(site))
    allow.refresh()
    yield project
    monkeypatch.undo()
    allow.refresh()


def test_an_entry_point_names_a_workload_and_allows_its_function(installed):
    tmp, marker = installed
    assert allow.installed_workloads() == {"mynet": "mymod:make"}   # no shadowing, no junk
    assert is_user_workload("mynet") and not is_user_workload("mlp")
    camp = parse_campaign(campaign("mynet").encode(), "c.csv")
    assert camp.trials[0].workload.workload == "mynet"
    assert parse_campaign(campaign("mymod:make").encode(), "c.csv").trials
    with pytest.raises(CampaignError, match="'mymod:broken' is not allowed"):
        parse_campaign(campaign("mymod:broken").encode(), "c.csv")
    assert "mymod" not in sys.modules and not marker.exists()
    # a worker resolves the name to its target
    wl = load_user_workload(default_config("mynet"), object)
    assert type(wl).__name__ == "Result" and marker.exists()


def test_an_unknown_name_lists_the_installed_workloads(installed):
    with pytest.raises(CampaignError, match=r"unknown workload 'nosuch' \(built-ins: mlp, "
                                            r"resnet18, transformer; installed: mynet;"):
        parse_campaign(campaign("nosuch").encode(), "c.csv")


# --- a callable that is not a workload factory -------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("mymod:no_args", "calling no_args(config) raised TypeError"),
    ("mymod:broken", "calling broken(config) raised ValueError: the factory broke"),
    ("mymod:wrong_type", "returned int, not Result"),
    ("mymod:NOT_A_FUNCTION", "NOT_A_FUNCTION is not callable (int)"),
    ("mymod:missing", "module 'mymod' has no attribute 'missing'"),
    ("badmod:make", "importing badmod raised RuntimeError: import-time failure"),
    ("nosuchmodule_xyz:make", "No module named 'nosuchmodule_xyz'"),
])
def test_what_is_not_a_workload_factory_is_a_one_line_spec_error(project, name, message):
    import mymod
    with pytest.raises(SpecError) as e:
        load_user_workload(default_config(name), mymod.Result)
    text = str(e.value)
    assert name in text and message in text and "\n" not in text


# --- properties ---------------------------------------------------------------------------------

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}(\.[A-Za-z_][A-Za-z0-9_]{0,6}){0,3}",
                      fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parsing_any_entry_gives_an_entry_or_a_spec_error(text):
    try:
        parse_entry(text)
    except SpecError:
        pass


@settings(max_examples=300, deadline=None)
@given(NAMES, NAMES, NAMES)
def test_a_module_entry_allows_exactly_its_tree(entry, module, fn):
    al = AllowList((parse_entry(entry),), use_config=False)
    inside = module == entry or module.startswith(entry + ".")
    assert al.allows(f"{module}:{fn}") is inside
    assert al.allows(f"{entry}.{module}:{fn}")
    assert not al.allows(f"{entry}x:{fn}")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_checking_any_name_never_raises_anything_but_spec_error(name):
    try:
        AllowList(use_config=False).check(name)
    except SpecError as e:
        assert "\n" not in str(e)


def test_nothing_is_allowed_by_default(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()
    monkeypatch.chdir(tmp_path)
    assert not AllowList().allows("os:getcwd")
    with pytest.raises(FaultlabError):
        check_allowed("os:getcwd")


def test_module_entries_are_not_files(tmp_path):
    e = parse_entry("mymod")
    assert e.module == "mymod" and e.file is None
    f = parse_entry("loops.py", tmp_path)
    assert f.file == str((tmp_path / "loops.py").resolve())
    assert str(f) == f.file and str(parse_entry("a.b:c")) == "a.b:c"
    assert Path(f.file).name == "loops.py"
