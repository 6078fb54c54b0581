"""The `options` column of columnar campaigns (issue 12, item 6): workload options as
docs/workloads.md documents them, the learning-rate schedule switched on and off, and one-line
errors naming the column and the bad key at load."""

from __future__ import annotations

import pytest

from _clihelpers import env_for, finish, start
from faultlab.campaigns import format_columnar, parse_columnar
from faultlab.errors import CampaignError, SpecError
from faultlab.workloads.base import (check_options, default_config, lr_schedule,
                                     parse_options)

HEADER = "trial,workload,replicas,per_replica_batch,width,input_size,steps_per_epoch,epochs,options"
ROW = "t,mlp,2,8,16,8,5,4"


def _parse(options: str, workload: str = "mlp"):
    row = ROW.replace("mlp", workload, 1)
    return parse_columnar(f"{HEADER}\n{row},{options}\n", "c.csv")


def test_options_column_is_read_and_written_back():
    [t] = _parse('"schedule=constant"')
    assert t.workload.options == (("schedule", "constant"),)
    [t] = _parse("decay_steps=10; end_lr_ratio=0.5")
    assert t.workload.options == (("decay_steps", "10"), ("end_lr_ratio", "0.5"))
    again = parse_columnar(format_columnar([t]), "again.csv")
    assert again[0].workload == t.workload
    # an empty cell: no options, the same configuration (and cache key) as before the column
    [plain] = _parse("")
    assert plain.workload.options == () and plain.workload.key() == default_config(
        "mlp", replicas=2, per_replica_batch=8, width=16, input_size=8, steps_per_epoch=5,
        epochs=4).key()


def test_built_in_options_of_each_workload_are_accepted():
    assert _parse("dropout=0.2;augment=0", "resnet18")[0].workload.option("augment") == "0"
    assert _parse("blocks=1;heads=2", "transformer")[0].workload.option("blocks") == "1"


@pytest.mark.parametrize("cell, message", [
    ("schedul=constant", "workload mlp has no option 'schedul' (did you mean schedule?"),
    ("dropout=0.2", "workload mlp has no option 'dropout'"),
    ("schedule=cosine", "option schedule must be one of linear, constant, got 'cosine'"),
    ("decay_steps=-1", "option decay_steps must be an integer >= 0, got '-1'"),
    ("end_lr_ratio=nan", "option end_lr_ratio must be a number >= 0, got 'nan'"),
    ("schedule=constant;decay_steps=5", "option decay_steps applies to schedule linear"),
    ("schedule", "options must be key=value pairs separated by ';', got 'schedule'"),
    ("schedule=linear;schedule=constant", "option 'schedule' is given twice"),
])
def test_bad_options_are_one_line_naming_the_column_and_key(cell, message):
    with pytest.raises(CampaignError) as e:
        _parse(cell)
    text = str(e.value)
    assert text.startswith("c.csv:2: column 'options': ") and message in text, text
    assert "\n" not in text


def test_user_workloads_keep_their_own_options_and_faultlab_checks_its_own():
    cfg = default_config("mymod:make", options=(("vocab", "1000"), ("schedule", "constant")))
    check_options(cfg)                                  # 'vocab' is the user's own
    with pytest.raises(SpecError, match="option schedule must be one of"):
        check_options(cfg.replace(options=(("schedule", "off"),)))


def test_schedule_constant_and_linear():
    cfg = default_config("mlp", steps_per_epoch=5, epochs=4, lr=0.01)
    linear = lr_schedule(cfg)
    assert linear(0) == pytest.approx(0.01) and linear(20) == pytest.approx(0.001) and linear(10) < linear(5)
    const = lr_schedule(cfg.replace(options=parse_options("schedule=constant")))
    assert [const(s) for s in (0, 7, 19, 100)] == [0.01] * 4
    short = lr_schedule(cfg.replace(options=parse_options("decay_steps=4;end_lr_ratio=0.5")))
    assert short(4) == short(10) == pytest.approx(0.005)


@pytest.mark.framework("torch")
def test_schedule_constant_keeps_the_optimizers_lr_across_steps():
    from faultlab.backends.torch.trainer import TorchTrainer
    cfg = default_config("mlp", replicas=1, per_replica_batch=8, width=8, input_size=8,
                         steps_per_epoch=3, epochs=2, lr=0.02)
    seen = {}
    for cell in ("schedule=constant", ""):
        t = TorchTrainer(cfg.replace(options=parse_options(cell)))
        lrs = []
        for step in range(cfg.total_steps):
            t.train_step(step)
            lrs.append(t.optimizer.param_groups[0]["lr"])
        seen[cell] = lrs
    assert seen["schedule=constant"] == [0.02] * 6
    assert seen[""][0] == pytest.approx(0.02) and seen[""][-1] < seen[""][1] < 0.02   # the default decays


def test_a_bad_option_key_is_exit_2_with_one_line(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / "c.csv").write_text(f"{HEADER}\n{ROW},schedul=constant\n")
    p = finish(start(["validate", "c.csv"], tmp_path, env_for(tmp_path / "cache")))
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0] == ("faultlab: error: c.csv:2: column 'options': workload mlp has no "
                        "option 'schedul' (did you mean schedule? options: schedule, "
                        "decay_steps, end_lr_ratio)")
