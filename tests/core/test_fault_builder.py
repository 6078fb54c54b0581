"""faultlab.fault: the framework-free fault builder (issue 12, item 1), its one-line errors,
the torch <-> canonical layout conversion it shares with faultlab.torch, and the tensor-name
check every injector applies (check_operand)."""

from __future__ import annotations

import pytest

import faultlab
from faultlab.errors import SpecError
from faultlab.faults import (CANONICAL_TENSORS, Duration, DurationKind, FaultSpec, PositionMode,
                             PositionSpec, Site, ValueModel, ValueSpec, canonical_to_torch,
                             check_operand, torch_perm, torch_to_canonical)


def one_line(exc_info, field=None) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    if field is not None:
        assert exc_info.value.field == field, msg
    return msg


def test_builds_the_fault_spec():
    f = faultlab.fault("fwd_output", "conv1", step=5, replica=1, value="bitflip", bit=30,
                       positions=[(0, 3, 3, 7)], duration="steps", duration_steps=3, seed=4)
    assert f == FaultSpec(site=Site.FWD_OUTPUT, value=ValueSpec(ValueModel.BITFLIP, bit=30),
                          positions=PositionSpec(PositionMode.EXPLICIT, indices=((0, 3, 3, 7),)),
                          layer="conv1", replica=1, step=5,
                          duration=Duration(DurationKind.STEPS, steps=3), seed=4)
    r = faultlab.fault("param", "fc", count=3, value="set", values=2.5, tensor="bias")
    assert r.positions == PositionSpec(PositionMode.RANDOM, count=3)
    assert r.value.values == (2.5,) and r.tensor == "bias"
    assert faultlab.fault(Site.GRAD_WT, "x", value=ValueModel.NAN).site is Site.GRAD_WT
    assert faultlab.fault("fwd_input", "x", layout="bf16").value.layout.value == "bf16"


@pytest.mark.parametrize("kw,field,needle", [
    (dict(site="fwd_outptu"), "site", "did you mean fwd_output"),
    (dict(value="bitflp"), "value", "did you mean bitflip"),
    (dict(duration="transent"), "duration", "did you mean transient"),
    (dict(bitt=3), "value", "did you mean bit"),
    (dict(layer=""), "layer", "non-empty"),
    (dict(positions=[3, 4]), "positions", "list of index tuples"),
    (dict(layout="torhc"), "layout", "valid bit layouts are"),
    (dict(positions_layout="nchw"), "positions", "valid positions layouts are torch, canonical"),
])
def test_misspellings_are_one_line_errors_listing_the_choices(kw, field, needle):
    args = dict(site="fwd_output", layer="conv1")
    args.update(kw)
    with pytest.raises(SpecError) as e:
        faultlab.fault(args.pop("site"), args.pop("layer"), **args)
    msg = one_line(e, field)
    assert needle in msg
    if field == "site":
        assert "valid sites are fwd_input, fwd_weight, fwd_output" in msg


def test_value_errors_stay_one_line():
    for kw in (dict(value="bitflip", bits=0), dict(value="set"), dict(step=-1),
               dict(duration="steps", duration_steps=0), dict(probability=2.0)):
        with pytest.raises(SpecError) as e:
            faultlab.fault("fwd_output", "x", **kw)
        one_line(e)


@pytest.mark.parametrize("site,torch_ix,canon_ix", [
    ("fwd_output", (0, 1, 2, 3), (0, 2, 3, 1)),      # NCHW -> NHWC
    ("fwd_input", (4, 5), (4, 5)),
    ("fwd_output", (1, 2, 3), (1, 2, 3)),            # sequences are the same in both
    ("param", (8, 4, 3, 2), (3, 2, 4, 8)),           # OIHW -> HWIO
    ("grad_wt", (7, 5), (5, 7)),                     # (out, in) -> (in, out)
    ("opt_state", (6,), (6,)),
])
def test_torch_layout_conversion(site, torch_ix, canon_ix):
    assert torch_to_canonical(site, torch_ix) == canon_ix
    assert canonical_to_torch(site, canon_ix) == torch_ix
    f = faultlab.fault(site, "x", positions=[torch_ix], layout="torch")
    assert f.positions.indices == (canon_ix,) and f.positions_layout == "canonical"
    g = faultlab.fault(site, "x", positions=[canon_ix], positions_layout="canonical")
    assert g == f
    assert faultlab.fault(site, "x", positions=[canon_ix]).positions_layout is None


def test_fault_spec_positions_layout():
    with pytest.raises(SpecError) as e:
        FaultSpec(site="param", layer="x", value=ValueSpec("zero"), positions_layout="torch")
    one_line(e, "positions")


def test_unknown_tensor_names_are_refused_by_injectors_that_do_not_list_them():
    entry = {Site.PARAM: ((3, 2), "float32"), "bias": ((2,), "float32")}
    for t in CANONICAL_TENSORS:
        check_operand(faultlab.fault("param", "fc", tensor=t), entry)
    with pytest.raises(SpecError) as e:
        check_operand(faultlab.fault("param", "fc", tensor="weight_hh_l0"), entry)
    assert "valid tensors are bias, m, v, weight" in one_line(e, "tensor")
    with pytest.raises(SpecError):
        check_operand(faultlab.fault("opt_state", "fc", tensor="exp_avg"), entry)
    check_operand(faultlab.fault("param", "fc", tensor="h"), {**entry, "tensors": ("h",)})
    for bad in ("", "a\nb"):
        with pytest.raises(SpecError):
            faultlab.fault("param", "fc", tensor=bad)


def test_keras_fault_is_the_framework_free_builder():
    from faultlab.backends.tf.keras_api import fault as keras_fault
    kw = dict(step=2, replica=1, value="bitflip", bit=3, positions=[(0, 1, 2, 3)],
              duration="permanent", seed=9, layout="bf16")
    assert keras_fault("fwd_output", "conv2d_1", **kw) == faultlab.fault("fwd_output",
                                                                          "conv2d_1", **kw)
    with pytest.raises(SpecError, match="did you mean fwd_weight"):
        keras_fault("fwd_wieght", "conv2d_1")


@pytest.mark.framework("torch")
def test_conversion_matches_the_torch_injectors_remapping():
    from faultlab.backends.torch.injector import act_perm, weight_perm
    from faultlab.faults import WEIGHT_SITES
    for site in Site:
        for n in range(1, 6):
            want = weight_perm(n) if site in WEIGHT_SITES else act_perm(n)
            assert torch_perm(site, n) == want, (site, n)
