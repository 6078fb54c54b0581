"""backends.base.check_fault (what validate_trials and the campaign runner check a fault with,
against a workload's operand table) words its errors as the injectors do: it calls
faults.check_target, plus its own step check. Framework-free: the table is written out."""

from __future__ import annotations

import pytest

from faultlab.backends.base import check_fault
from faultlab.errors import SpecError
from faultlab.faults import FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.workloads.base import default_config

CFG = default_config("mlp", replicas=2, per_replica_batch=4, width=8, input_size=8,
                     dataset="digits", steps_per_epoch=3, epochs=2, seed=1)
W1 = ((64, 8), "float32")
TABLE = {
    "dense_1": {Site.FWD_INPUT: ((4, 64), "float32"), Site.FWD_OUTPUT: ((4, 8), "float32"),
                Site.FWD_WEIGHT: W1, Site.PARAM: W1, "bias": ((8,), "float32")},
    "dense_2": {Site.FWD_OUTPUT: ((4, 10), "float32")},
}


def fault(site="fwd_output", layer="dense_1", pos=(0, 0), replica=0, step=0, **kw):
    return FaultSpec(site=site, layer=layer, value=ValueSpec("set", values=(1.0,)),
                     positions=PositionSpec("explicit", indices=(pos,)), replica=replica,
                     step=step, **kw)


@pytest.mark.parametrize("f,field,msg", [
    (fault(replica=2), "replica",
     "fault replica 2 is out of range: workload mlp has 2 replicas (valid: 0-1)"),
    (fault(layer="dense_9"), "layer",
     "unknown layer 'dense_9': valid layers are dense_1, dense_2"),
    (fault(site="grad_in"), "site",
     "site grad_in is not available on layer 'dense_1': valid sites are fwd_input, "
     "fwd_weight, fwd_output, param"),
    (fault(site="param", layer="dense_2", tensor="bias", pos=(0,)), "site",
     "site param with tensor 'bias' is not available on layer 'dense_2' (the layer has no "
     "bias): valid sites are fwd_output"),
    (fault(pos=(4, 0)), "positions",
     "position 4/0 is outside the fwd_output operand of layer 'dense_1' of shape 4/8"),
    (fault(step=6), "step", "step 6 is past the end of training (6 steps)"),
], ids=["replica", "layer", "site", "bias", "positions", "step"])
def test_wording_is_the_injectors(f, field, msg):
    with pytest.raises(SpecError) as e:
        check_fault(TABLE, f, CFG)
    assert e.value.field == field
    assert str(e.value).startswith(msg), str(e.value)
    assert "\n" not in str(e.value)


def test_valid_faults_pass():
    check_fault(TABLE, fault(replica=1, pos=(3, 7), step=5), CFG)
    check_fault(TABLE, fault(site="param", tensor="bias", pos=(7,)), CFG)
