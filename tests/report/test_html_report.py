"""`faultlab report --html / --figures`: a self-contained page (no network: the Vega bundle
inlined), every figure exported; and the page in a real headless Chromium: no console error,
no request leaving the file, every chart drawn as SVG, a screenshot that is not blank, text
readable at a laptop's width."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from faultlab.cli import main

from _browser import Browser, chromium, png_pixels
from _synthetic import write, write_crash, write_runs

pytest.importorskip("vl_convert", reason="pip install vl-convert-python")

WIDTH, HEIGHT = 1366, 768

TINY = "mlp,2,8,16,8,digits,5,4"
CAMPAIGN = f"""trial,workload,replicas,per_replica_batch,width,input_size,dataset,steps_per_epoch,epochs,site,layer,replica,epoch,step,value,values,positions,bit
control,{TINY},,,,,,,,,
nan,{TINY},fwd_output,dense_1,0,1,2,nan,,0/0,
harmless,{TINY},fwd_output,dense_3,1,3,4,set,0.0,0/0,
flip,{TINY},fwd_output,dense_2,0,2,1,bitflip,,0/1,30
"""


def _offline_checks(page: str) -> None:
    scripts = re.findall(r"<script\b[^>]*>", page, re.I)
    assert scripts and all("src" not in s.lower() for s in scripts), scripts
    assert not re.search(r"""<link\b[^>]*href=["']?https?:""", page, re.I)
    assert not re.search(r"""\bsrc=["']?(https?:)?//""", page, re.I)
    assert not re.search(r"@import\s+url\(\s*['\"]?https?:", page, re.I)


def test_html_and_figures_offline(tmp_path):
    db = tmp_path / "r.sqlite"
    write(db)
    out, figs = tmp_path / "report.html", tmp_path / "figs"
    assert main(["report", str(db), "--html", str(out), "--figures", str(figs),
                 "--trials", "nan,flip"]) == 0
    page = out.read_text(encoding="utf-8")
    _offline_checks(page)
    charts = set(re.findall(r'data-chart="([^"]+)"', page))
    for want in ("rates_site", "rates_layer", "rates_value", "rates_bit", "rates_replica",
                 "heatmap_layer_site", "heatmap_bit_layer", "curves_loss", "curves_acc",
                 "detection_latency", "recovery_time", "recovery_path"):
        assert want in charts
        assert (figs / f"{want}.svg").read_text().lstrip().startswith("<svg")
        assert (figs / f"{want}.png").read_bytes()[:4] == b"\x89PNG"
    assert "coverage: 1/2 non-Masked" in page
    assert "No <code>faultlab crash</code> campaign is stored" in page
    assert "Configuration and determinism" in page
    assert "the results do not carry one" in page or "do not carry the determinism" in page


def test_crash_tables_chart_and_stored_fingerprint(tmp_path):
    db = tmp_path / "r.sqlite"
    write(db)
    write_runs(db)
    write_crash(db)
    out, figs = tmp_path / "report.html", tmp_path / "figs"
    assert main(["report", str(db), "--html", str(out), "--figures", str(figs)]) == 0
    page = out.read_text(encoding="utf-8")
    _offline_checks(page)
    assert 'data-chart="crash_verdicts"' in page
    assert (figs / "crash_verdicts.svg").read_text().lstrip().startswith("<svg")
    for text in ("crash campaign kill-1", "crash campaign power-1", "engine (power loss)",
                 "lost-committed", "naive", "torn: w differs"):
        assert text in page
    # the fingerprint the results carry, not the local cache's
    assert "determinism fingerprint stored in the results (the plain, detect run" in page
    assert "GenuineIntel avx avx2 fma" in page
    assert "local cache" not in page


def test_a_file_of_crash_campaigns_only_reports(tmp_path, capsys):
    db = tmp_path / "c.sqlite"
    write_crash(db)
    out = tmp_path / "c.html"
    assert main(["report", str(db), "--html", str(out)]) == 0
    text = capsys.readouterr().out
    assert "crash campaign kill-1" in text and "engine (power loss)" in text
    page = out.read_text(encoding="utf-8")
    _offline_checks(page)
    assert 'data-chart="crash_verdicts"' in page and "Outcome rates" not in page
    assert main(["report", str(db), "--html", str(out), "--trials", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only crash campaigns" in err


def test_unknown_trial_is_one_line(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    write(db)
    assert main(["report", str(db), "--html", str(tmp_path / "x.html"), "--trials", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory, faultlab_cache):
    """The HTML report of a tiny campaign, run plainly and with --detect into one file, and of
    a short kill campaign stored in the same file."""
    d = tmp_path_factory.mktemp("tiny")
    (d / "tiny.csv").write_text(CAMPAIGN)
    env = {**os.environ, "FAULTLAB_CACHE": str(faultlab_cache)}
    env.pop("FAULTLAB_STOP_AFTER", None)
    for argv in (["run", "tiny.csv"], ["run", "tiny.csv", "--detect"],
                 ["crash", "--kills", "3", "--steps", "6"]):      # a few real kills
        p = subprocess.run([sys.executable, "-m", "faultlab.cli", *argv,
                            "--results", "t.sqlite"], cwd=d, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "faultlab.cli", "report", "t.sqlite",
                        "--html", "report.html"], cwd=d, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return d / "report.html"


CHECK_TEXT = """(() => {
  const bad = [];
  for (const el of document.querySelectorAll('body *')) {
    if (!el.childNodes.length) continue;
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!own) continue;
    const size = parseFloat(getComputedStyle(el).fontSize);
    const r = el.getBoundingClientRect();
    if (size < 12 && r.width > 0) bad.push(el.tagName + ' ' + size + ' ' +
                                           el.textContent.trim().slice(0, 30));
  }
  return bad;
})()"""


@pytest.mark.framework("torch")
@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (apt install chromium)")
def test_report_in_headless_chromium(tiny_report):
    pytest.importorskip("websocket", reason="pip install websocket-client")
    page = tiny_report.read_text(encoding="utf-8")
    _offline_checks(page)
    names = re.findall(r'data-chart="([^"]+)"', page)
    assert {"curves_loss", "rates_site", "heatmap_layer_site", "recovery_path",
            "crash_verdicts"} <= set(names)
    assert "determinism fingerprint stored in the results" in page   # `faultlab run` stored it
    _check_in_chromium(tiny_report, names)


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (apt install chromium)")
def test_crash_tables_in_headless_chromium(tmp_path):
    """Framework-free: trials, stored fingerprints and crash campaigns written directly."""
    pytest.importorskip("websocket", reason="pip install websocket-client")
    db = tmp_path / "r.sqlite"
    write(db)
    write_runs(db)
    write_crash(db)
    out = tmp_path / "report.html"
    assert main(["report", str(db), "--html", str(out)]) == 0
    names = re.findall(r'data-chart="([^"]+)"', out.read_text(encoding="utf-8"))
    assert "crash_verdicts" in names
    _check_in_chromium(out, names)
    # the crash chart drew one bar per report and verdict with a count: 2 + 3 + 2
    only = tmp_path / "crash-only.sqlite"
    write_crash(only)
    out2 = tmp_path / "crash.html"
    assert main(["report", str(only), "--html", str(out2)]) == 0
    _check_in_chromium(out2, ["crash_verdicts"], bars=("crash_verdicts", 7))


def _check_in_chromium(report: Path, names: list[str], bars: tuple[str, int] | None = None):
    b = Browser(WIDTH, HEIGHT, timeout=120)
    try:
        b.open(report.resolve().as_uri())
        n = len(names)
        b.wait_for(f"document.querySelectorAll('[data-chart][data-rendered=\"1\"] svg')"
                   f".length >= {n} || document.querySelector('.err') !== null")
        assert b.eval("document.querySelector('.err') && document.querySelector('.err')"
                      ".textContent") is None
        assert b.errors() == []
        # nothing but the file itself (and inline data) was requested: no network
        assert [u for u in b.requests() if not u.startswith(("file:", "data:", "blob:"))] == []
        # every chart drew marks
        drawn = b.eval("[...document.querySelectorAll('[data-chart]')].map(el => "
                       "[el.dataset.chart, el.querySelectorAll('svg path, svg rect, "
                       "svg line, svg text').length])")
        assert len(drawn) == n and all(k > 5 for _, k in drawn), drawn
        # a laptop's width: no horizontal overflow, readable text (HTML and chart labels)
        assert b.eval("document.documentElement.scrollWidth <= window.innerWidth") is True
        assert b.eval("document.body.scrollWidth <= window.innerWidth") is True
        assert b.eval(CHECK_TEXT) == []
        w, h, rows = png_pixels(b.screenshot(WIDTH, HEIGHT))
        assert abs(w - WIDTH / 4) <= 1 and abs(h - HEIGHT / 4) <= 1, (w, h)
        assert len(set(rows)) > 10 and len({px for r in rows for px in
                                            (r[i:i + 3] for i in range(0, len(r), 12))}) > 5
        if bars:
            name, k = bars
            got = b.eval(f"document.querySelectorAll('[data-chart=\"{name}\"] "
                         f"svg g.mark-rect path').length")
            assert got == k, got
        assert b.errors() == []
    finally:
        b.close()
