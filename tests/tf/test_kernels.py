"""The TensorFlow corruption kernels agree with the NumPy reference bit for bit (NaN payloads,
subnormals and every emulated layout included), in both kernel modes, and the same fault on
the same tensor gives the same values in TensorFlow, torch and NumPy. The properties every
backend shares run for TF too in tests/backends/test_backend_kernels.py."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultlab.errors import SpecError
from faultlab.faults import (DTYPE_LAYOUT, LAYOUT_BITS, BitLayout, Corruption, PositionSpec,
                             ValueModel, ValueSpec, resolve)
from faultlab.backends.tf import kernels as K
from faultlab.injectors.reference import apply_reference

from _bitcases import (DTYPES, FLOAT_DTYPES, FLOAT_LAYOUTS, NP, UINT, cfg, dtype_layout,
                       make_tensor, np_bits, pick_index, specials)
from _tfhelpers import tf_bits, to_tf

def check(x: np.ndarray, c: Corruption, dtype: str, static: bool = False) -> np.ndarray:
    """Reference vs TF kernel: equal bits everywhere; only indexed elements may change."""
    ref = apply_reference(x, c, dtype)
    p = K.prepare(c, dtype)
    t = to_tf(x, dtype)
    got, want = tf_bits(K.apply(t, p, static), dtype), np_bits(ref, dtype)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, (f"{c.model.value}/{c.layout.value} on {dtype}: element {bad[0]}: "
                           f"x={np_bits(x, dtype)[bad[0]]:#x} tf={got[bad[0]]:#x} "
                           f"reference={want[bad[0]]:#x}")
    assert (tf_bits(t, dtype) == np_bits(x, dtype)).all(), "apply modified its input"
    return ref


# --- bit-level models --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", FLOAT_LAYOUTS + [BitLayout.INT8])
def test_every_bit_on_every_special_value(dtype, layout):
    """Every bit of every emulated layout, flipped / stuck in every special value at once:
    subnormals, +-0, Inf, quiet and signalling NaNs with payloads, max finite."""
    x = np.concatenate([specials(dtype).astype(UINT[dtype]).view(NP[dtype]),
                        make_tensor(dtype, 16, 7)])
    idx = np.arange(x.size, dtype=np.int64)
    for bit in range(LAYOUT_BITS[layout]):
        masks = np.full(x.size, np.uint64(1) << np.uint64(bit), dtype=np.uint64)
        for model in (ValueModel.BITFLIP, ValueModel.STUCK_AT):
            check(x, Corruption(model, idx, layout, masks=masks, stuck=bit % 2), dtype)


# --- value models ------------------------------------------------------------------------------

@cfg(80)
@given(dtype=st.sampled_from(DTYPES), n=st.integers(2, 40), seed=st.integers(0, 2**32 - 1))
def test_copy_reads_the_original_values(dtype, n, seed):
    c = resolve(ValueSpec(ValueModel.COPY), PositionSpec("random", count=int(n * 0.6) or 1),
                (n,), dtype, np.random.default_rng(seed), np.random.default_rng(seed))
    x = make_tensor(dtype, n, seed)
    ref = check(x, c, dtype)
    assert (np_bits(ref, dtype)[c.index] == np_bits(x, dtype)[c.src]).all()


@cfg(150)
@given(dtype=st.sampled_from(FLOAT_DTYPES), data=st.data(), n=st.integers(1, 40),
       seed=st.integers(0, 2**32 - 1), tiny=st.booleans())
def test_int8_quantised_layout(dtype, data, n, seed, tiny):
    """int8 emulation on float tensors, including all-subnormal tensors (subnormal scale)."""
    x = make_tensor(dtype, n, seed)
    if tiny and dtype != "float16":  # every finite value subnormal: a subnormal scale
        mant = {"float32": 23, "bfloat16": 7, "float64": 52}[dtype]
        rng = np.random.default_rng(seed)
        bits = rng.integers(0, 1 << mant, size=n).astype(np.uint64)
        bits |= rng.integers(0, 2, size=n).astype(np.uint64) << np.uint64(8 * np.dtype(UINT[dtype]).itemsize - 1)
        x = bits.astype(UINT[dtype])
        x = x if dtype == "bfloat16" else x.view(NP[dtype])
    bit = data.draw(st.integers(0, 7), label="bit")
    idx = pick_index(np.random.default_rng(seed), n, max(1, n // 2))
    masks = np.full(idx.size, np.uint64(1) << np.uint64(bit), dtype=np.uint64)
    check(x, Corruption(ValueModel.BITFLIP, idx, BitLayout.INT8, masks=masks), dtype)


def test_degrade_via_resolve_and_duplicates_take_the_last_entry():
    for dtype in DTYPES:
        c = resolve(ValueSpec(ValueModel.DEGRADE, ramp=0.01), PositionSpec("random", count=5),
                    (4, 5), dtype, np.random.default_rng(1), np.random.default_rng(2), onset=3)
        check(make_tensor(dtype, 20, 5), c, dtype)
        idx = np.array([3, 1, 3], dtype=np.int64)
        c = Corruption(ValueModel.SET, idx, DTYPE_LAYOUT[dtype],
                       values=np.array([1.0, 2.0, 3.0]))
        ref = check(make_tensor(dtype, 8, 2), c, dtype)
        assert np_bits(ref, dtype)[3] == np_bits(apply_reference(
            make_tensor(dtype, 8, 2), Corruption(ValueModel.SET, np.array([3]),
                                                 DTYPE_LAYOUT[dtype], values=np.array([3.0])),
            dtype), dtype)[3]


@cfg(60)
@given(dl=dtype_layout(["float32", "float64"]), n=st.integers(1, 40),
       seed=st.integers(0, 2**32 - 1),
       model=st.sampled_from(["flip", "scale", "copy", "set", "quant"]))
def test_static_shape_mode_equals_dynamic(dl, n, seed, model):
    """The fixed-size (XLA / TPU) form of the kernel computes the same bits."""
    dtype, layout = dl
    rng = np.random.default_rng(seed)
    idx = pick_index(rng, n, int(rng.integers(1, n + 1)))
    if model == "flip":
        masks = np.full(idx.size, np.uint64(1) << np.uint64(int(rng.integers(8))), np.uint64)
        c = Corruption(ValueModel.BITFLIP, idx, layout, masks=masks)
    elif model == "quant":
        c = Corruption(ValueModel.BITFLIP, idx, BitLayout.INT8,
                       masks=np.full(idx.size, np.uint64(4), np.uint64))
    elif model == "scale":
        c = Corruption(ValueModel.SCALE, idx, layout, factor=float(rng.normal()) * 1e3)
    elif model == "copy":
        c = Corruption(ValueModel.COPY, idx, layout, src=(idx + 1) % n)
    else:
        c = Corruption(ValueModel.SET, idx, layout, values=rng.normal(size=idx.size))
    check(make_tensor(dtype, n, seed), c, dtype, static=True)


def test_int8_tensor_refuses_float_layouts_and_non_finite_values():
    idx = np.array([1, 4], dtype=np.int64)
    for layout in FLOAT_LAYOUTS:
        c = Corruption(ValueModel.BITFLIP, idx, layout, masks=np.array([1, 2], np.uint64))
        with pytest.raises(SpecError):
            K.prepare(c, "int8")
    with pytest.raises(SpecError):
        K.prepare(Corruption(ValueModel.NAN, idx, BitLayout.INT8), "int8")
    with pytest.raises(SpecError):
        K.apply(tf.zeros([3], tf.int8), K.prepare(
            Corruption(ValueModel.ZERO, np.array([5]), BitLayout.INT8), "int8"))


def test_corruption_works_on_any_shape_and_in_a_tf_function():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    c = Corruption(ValueModel.SET, np.array([5, 23]), BitLayout.FP32, values=np.array([-1.0, -1.0]))
    p = K.prepare(c, "float32")
    out = tf.function(lambda t: K.apply(t, p))(tf.constant(x)).numpy()
    want = x.copy().reshape(-1)
    want[[5, 23]] = -1.0
    assert out.shape == x.shape and (out.reshape(-1) == want).all()


# --- TF == torch == NumPy ------------------------------------------------------------------------

@cfg(60)
@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1),
       value=st.sampled_from(["bitflip", "random", "zero", "copy", "nan", "inf", "-inf",
                              "stuck_at", "scale", "set", "degrade"]),
       layout=st.sampled_from(["native", "fp16", "bf16", "fp64", "int8"]))
def test_same_fault_same_values_in_tensorflow_torch_and_numpy(dtype, seed, value, layout):
    torch = pytest.importorskip("torch")
    from faultlab.backends.torch.kernels import prepare as torch_prepare
    if dtype == "int8" and (layout not in ("native", "int8")
                            or value in ("nan", "inf", "-inf")):
        return
    if value not in ("bitflip", "stuck_at", "random") and layout != "native":
        layout = "native"
    kw = {"scale": dict(factor=-3.25e-3), "degrade": dict(ramp=0.5),
          "set": dict(values=(2.87e24,)), "bitflip": dict(bits=2)}.get(value, {})
    spec = ValueSpec(value, layout=layout, **kw)
    shape = (2, 3, 4, 5)
    c = resolve(spec, PositionSpec("random", count=7), shape, dtype,
                np.random.default_rng(seed), np.random.default_rng(seed + 1), onset=2)
    x = make_tensor(dtype, int(np.prod(shape)), seed)
    ref = np_bits(apply_reference(x, c, dtype), dtype)
    got_tf = tf_bits(K.apply(to_tf(x, dtype), K.prepare(c, dtype)), dtype)
    sint = {np.uint8: np.int8, np.uint16: np.int16, np.uint32: np.int32, np.uint64: np.int64}
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int8": torch.int8}[dtype]
    t = torch.from_numpy(x.view(UINT[dtype]).view(sint[UINT[dtype]]).copy()).view(tdt)
    got_torch = torch_prepare(c, t).apply(t).contiguous().view(
        {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float64: torch.int64, torch.int8: torch.int8}[tdt]).numpy().view(UINT[dtype])
    assert (got_tf == ref).all() and (got_torch == ref).all()


# --- several slots at one injection point ---------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.integers(0, 255))
def test_the_slot_loop_applies_every_armed_slot_in_order_then_zeroes(seed, mask):
    """apply_slots (the kernel every injection point calls) applies the slots whose bit is set
    in the low half of the mask in slot order, then zeroes the positions of those set in the
    high half, whichever bits are set: the same bits as applying them one by one with the
    reference, and as the fixed loop over every slot that static (XLA) graphs use."""
    slots, size = 4, 64
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(size).astype(np.float32)
    corruptions, ints, meta = [], np.zeros((slots, K.N_INTS, 8), np.int64), \
        np.zeros((slots, K.N_META), np.int64)
    for s in range(slots):
        idx = rng.choice(16, size=int(rng.integers(1, 5)), replace=False)   # overlapping
        bit = int(rng.integers(0, 32))
        c = Corruption(ValueModel.BITFLIP, idx, BitLayout.FP32,
                       masks=np.full(idx.size, np.uint64(1) << np.uint64(bit), np.uint64))
        corruptions.append(c)
        ints[s], meta[s] = K.prepare(c, "float32").slot(8)
    want = x.copy()
    for s in range(slots):
        if mask >> s & 1:
            want = apply_reference(want, corruptions[s], "float32")
    for s in range(slots):
        if mask >> (slots + s) & 1:
            want[corruptions[s].index] = 0.0
    args = (tf.constant(x), tf.constant(mask, tf.int32), tf.constant(ints), tf.constant(meta))
    for static in (False, True):
        got = K.apply_slots(*args, "float32", static).numpy()
        assert (got.view(np.uint32) == want.view(np.uint32)).all(), static
