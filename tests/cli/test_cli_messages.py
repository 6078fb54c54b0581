"""The command's error line is one line whatever the user's text: file names with line breaks,
terminal escapes or NULs (campaign files, results databases, outputs), control characters in
arguments; and `faultlab validate` refuses, on one line at the cell, the faults the runner
used to crash on (a bit beyond the operand's dtype, an int64 operand).

Commands run in child processes, started together (their start-up overlaps)."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

TIMEOUT = 300


def _run_many(argvs, cwd: Path) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-m", "faultlab.cli", *argv], cwd=cwd,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for argv in argvs]
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
        out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    return out


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused command (exit 2), checked to be plain text."""
    err = r.stderr.decode("utf-8")
    assert r.returncode == 2, (r.args, r.returncode, err)
    assert "Traceback" not in err, err
    lines = err.split("\n")
    assert len(lines) == 2 and lines[1] == "", f"{len(lines) - 1} stderr lines: {err!r}"
    line = lines[0]
    assert line.startswith("faultlab: error: "), line
    bad = [c for c in line if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    assert not bad, f"control characters {bad!r} in {line!r}"
    return line


def test_path_arguments_never_break_the_error_line(tmp_path):
    bad = tmp_path / "bad\nname.csv"          # exists, with a mistake on row 2
    bad.write_text("trial,workload,replica\nt,mlp,1\n")
    red = tmp_path / "bad\x1b[31mred.csv"
    red.write_text("trial,workload,replica\nt,mlp,1\n")
    argvs = [["validate", "no\nsuch.csv"],
             ["validate", "no\x1b[31msuch.csv"],
             ["validate", "tab\tand\rcr.csv"],
             ["validate", str(bad)],
             ["validate", str(red)],
             ["report", "no\nsuch.sqlite"],
             ["plan", "--workload", "mlp", "--trials", "2", "-o", "missing\x1b/x\n.csv"],
             ["validate", "x.csv", "--bogus", "\x1b[2J\n"],
             ["crash", "--kills", "1", "--dir", str(tmp_path / "a-file" / "no\nsub")]]
    (tmp_path / "a-file").write_text("")
    results = _run_many(argvs, tmp_path)
    lines = [_one_error_line(r) for r in results]
    assert lines[0] == "faultlab: error: no\\nsuch.csv: no such campaign file"
    assert lines[1] == "faultlab: error: no\\x1b[31msuch.csv: no such campaign file"
    assert lines[2] == "faultlab: error: tab\\tand\\rcr.csv: no such campaign file"
    assert lines[3].endswith("bad\\nname.csv:2: column 'site': site is required: fault "
                             "columns are set (replica); leave them all empty for a "
                             "fault-free control trial")
    assert "bad\\x1b[31mred.csv:2: column 'site'" in lines[4]
    assert lines[5] == "faultlab: error: no\\nsuch.sqlite: no such results database"
    assert lines[6].startswith("faultlab: error: missing\\x1b/x\\n.csv: cannot write the "
                               "campaign: ")
    assert "unrecognized arguments: --bogus \\x1b[2J" in lines[7]
    assert lines[8].startswith(f"faultlab: error: --dir {tmp_path}/a-file/no\\nsub: cannot "
                               f"create it: "), lines[8]


def test_the_error_printer_is_a_safety_net(monkeypatch, capsys):
    """Whatever a FaultlabError carries, main prints one escaped line."""
    from faultlab import cli
    from faultlab.errors import FaultlabError

    def boom(a):
        raise FaultlabError("first\nsecond\x1b[31m\x00\u202e end")
    monkeypatch.setitem(cli.COMMANDS, "validate", boom)
    assert cli.main(["validate", "x.csv"]) == 2
    err = capsys.readouterr().err
    assert err == "faultlab: error: first\\nsecond\\x1b[31m\\x00\\u202e end\n"


@pytest.mark.framework("torch")
def test_validate_refuses_what_run_would_crash_on(tmp_path):
    files = {
        "bit.csv": "trial,workload,site,layer,value,bit\nt,mlp,fwd_output,dense_1,bitflip,40\n",
        "stuck.csv": "trial,workload,site,layer,value,bit\n"
                     "t,mlp,fwd_output,dense_1,stuck_at,63\n",
        "bits.csv": "trial,workload,site,layer,value,bits\n"
                    "t,mlp,fwd_output,dense_1,bitflip,33\n",
        "ids.csv": "trial,workload,site,layer,value\nt,transformer,fwd_input,embed,zero\n",
        "ids_grad.csv": "trial,workload,site,layer,value\nt,transformer,grad_in,embed,zero\n",
        "data.csv": "trial,workload,dataset\nt,resnet18,corpus\n",
        "host.csv": "trial,workload,site,layer,value\nt,mlp,host_state,dense_1,zero\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    results = _run_many([["validate", name] for name in files], tmp_path)
    lines = dict(zip(files, (_one_error_line(r) for r in results)))
    assert lines["bit.csv"].startswith("faultlab: error: bit.csv:2: column 'bit': bit 40 is "
                                       "outside the fp32 layout")
    assert lines["stuck.csv"].startswith("faultlab: error: stuck.csv:2: column 'bit': bit 63")
    assert lines["bits.csv"].startswith("faultlab: error: bits.csv:2: column 'bits': cannot "
                                        "flip 33 distinct bits in the 32-bit fp32 layout")
    for name in ("ids.csv", "ids_grad.csv"):
        assert lines[name].startswith(f"faultlab: error: {name}:2: column 'site': cannot "
                                      f"corrupt the "), lines[name]
        assert "of layer 'embed' of dtype int64" in lines[name]
    assert lines["data.csv"].startswith("faultlab: error: data.csv:2: column 'dataset': "
                                        "workload resnet18 cannot train on dataset 'corpus'")
    assert lines["host.csv"].startswith("faultlab: error: host.csv:2: column 'site': site "
                                        "host_state needs an offloaded workload: set the "
                                        "offload column")
