"""Every backend's corruption kernels agree with the NumPy reference bit for bit (NaN payloads,
subnormals and every emulated layout included), and change only the indexed elements.

Each property runs once per installed backend, with that backend's number of hypothesis
examples (``EXAMPLES`` in its adapter): the properties are built inside the test, from the
``backend`` and ``bitcases`` fixtures. Framework-only kernel tests (torch autograd, TF's
fixed-size mode, layout cross-checks against a framework's own casts) stay in
tests/torch/test_kernels.py and tests/tf/test_kernels.py."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from faultlab.faults import (DTYPE_LAYOUT, LAYOUT_BITS, Corruption, PositionSpec, ValueModel,
                             ValueSpec, resolve)
from faultlab.injectors.reference import apply_reference, bits_to_float


def check(backend, bitcases, x: np.ndarray, c: Corruption, dtype: str) -> np.ndarray:
    """The reference against every way the backend applies `c`: equal bits everywhere, and
    only indexed elements may change. Returns the reference's result."""
    np_bits = bitcases.np_bits
    ref = apply_reference(x, c, dtype)
    assert ref.dtype == x.dtype and ref.shape == x.shape
    want = np_bits(ref, dtype)
    for how, got in backend.kernel_outputs(x, c, dtype).items():
        bad = np.nonzero(got != want)[0]
        assert bad.size == 0, (f"{c.model.value}/{c.layout.value} on {dtype}: element {bad[0]}: "
                               f"x={np_bits(x, dtype)[bad[0]]:#x} {backend.NAME} {how}="
                               f"{got[bad[0]]:#x} reference={want[bad[0]]:#x}")
    outside = np.ones(x.size, dtype=bool)
    outside[np.asarray(c.index)] = False
    assert (want[outside] == np_bits(x, dtype)[outside]).all(), "non-indexed element changed"
    return ref


# --- bit-level models --------------------------------------------------------------------------

def test_single_bit_every_position(backend, bitcases):
    B = bitcases

    @B.cfg(backend.EXAMPLES["single_bit"])
    @given(dl=B.dtype_layout(), data=st.data(), n=st.integers(1, 48),
           seed=st.integers(0, 2**32 - 1), model=st.sampled_from(["flip", "stuck0", "stuck1"]))
    def prop(dl, data, n, seed, model):
        dtype, layout = dl
        bit = data.draw(st.integers(0, LAYOUT_BITS[layout] - 1), label="bit")
        rng = np.random.default_rng(seed)
        idx = B.pick_index(rng, n, int(rng.integers(1, n + 1)))
        masks = np.full(idx.size, np.uint64(1) << np.uint64(bit), dtype=np.uint64)
        c = Corruption(ValueModel.BITFLIP if model == "flip" else ValueModel.STUCK_AT, idx,
                       layout, masks=masks, stuck=0 if model == "stuck0" else 1)
        check(backend, B, B.make_tensor(dtype, n, seed), c, dtype)
    prop()


def test_k_bit_random_masks(backend, bitcases):
    B = bitcases

    @B.cfg(backend.EXAMPLES["k_bit"])
    @given(dl=B.dtype_layout(), data=st.data(), n=st.integers(1, 48),
           seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(["random", "consecutive", "groups"]))
    def prop(dl, data, n, seed, mode):
        dtype, layout = dl
        width = LAYOUT_BITS[layout]
        k = data.draw(st.integers(1, width), label="bits")
        count = data.draw(st.integers(1, n), label="count")
        c = resolve(ValueSpec(ValueModel.BITFLIP, bits=k, layout=layout),
                    PositionSpec(mode, count=count, groups=3), (n,), dtype,
                    np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2]))
        popcount = np.array([bin(int(m)).count("1") for m in c.masks])
        assert (popcount == k).all()
        assert width == 64 or (c.masks < np.uint64(1 << width)).all()
        check(backend, B, B.make_tensor(dtype, n, seed), c, dtype)
    prop()


# --- value models ------------------------------------------------------------------------------

def _values_for(dtype):
    if dtype == "int8":
        return st.floats(-300, 300, allow_nan=False)
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
                     st.floats(-70000, 70000), st.floats(-1e-6, 1e-6),
                     st.sampled_from([0.0, -0.0, 2.0 ** -149, 2.0 ** -24, 2.0 ** -133,
                                      65504.0, 65520.0, 3.4028235e38, 3.4e38 * 1.0000001,
                                      1 + 2.0 ** -11 + 2.0 ** -40, 2.5, -3.5, 2.87e24]))


def test_set(backend, bitcases):
    B = bitcases

    @B.cfg(backend.EXAMPLES["set"])
    @given(dtype=st.sampled_from(B.DTYPES), data=st.data(), n=st.integers(1, 32),
           seed=st.integers(0, 2**32 - 1), one=st.booleans())
    def prop(dtype, data, n, seed, one):
        rng = np.random.default_rng(seed)
        idx = B.pick_index(rng, n, int(rng.integers(1, n + 1)))
        vals = data.draw(st.lists(_values_for(dtype), min_size=1 if one else idx.size,
                                  max_size=1 if one else idx.size), label="values")
        values = np.broadcast_to(np.array(vals, dtype=np.float64), idx.shape).copy()
        c = Corruption(ValueModel.SET, idx, DTYPE_LAYOUT[dtype], values=values)
        ref = check(backend, B, B.make_tensor(dtype, n, seed), c, dtype)
        if backend.native_set is not None:
            # non-NaN values round exactly like the framework's own float64 -> dtype cast
            ok = ~np.isnan(values)
            want = backend.native_set(values, dtype)
            assert (want[ok] == B.np_bits(ref, dtype)[idx][ok]).all()
    prop()


def test_replacement_models(backend, bitcases):
    B = bitcases

    @B.cfg(backend.EXAMPLES["replacement"])
    @given(dl=B.dtype_layout(), n=st.integers(1, 48), seed=st.integers(0, 2**32 - 1),
           model=st.sampled_from([ValueModel.RANDOM, ValueModel.ZERO, ValueModel.NAN,
                                  ValueModel.POS_INF, ValueModel.NEG_INF]))
    def prop(dl, n, seed, model):
        dtype, layout = dl
        if dtype == "int8" and model not in (ValueModel.RANDOM, ValueModel.ZERO):
            return
        c = resolve(ValueSpec(model, layout=layout),
                    PositionSpec("random", count=max(1, n // 2)), (n,), dtype,
                    np.random.default_rng(seed), np.random.default_rng(seed + 7))
        ref = check(backend, B, B.make_tensor(dtype, n, seed), c, dtype)
        got = B.np_bits(ref, dtype)[c.index]
        if dtype != "int8":
            vals = bits_to_float(got.astype(np.uint64), DTYPE_LAYOUT[dtype])
            if model is ValueModel.ZERO:
                assert (got == 0).all()
            elif model is ValueModel.NAN:
                assert np.isnan(vals).all()
            elif model is ValueModel.POS_INF:
                assert (vals == np.inf).all()
            elif model is ValueModel.NEG_INF:
                assert (vals == -np.inf).all()
    prop()


_factors = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                     st.floats(-4, 4), st.floats(-1e-30, 1e-30),
                     st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1.0000001, 3.4e38, 1e39,
                                      2.0 ** -149, 1e-46, 65504.0, 1e300, 1e-310, 1 / 3]))


def test_scale_and_degrade(backend, bitcases):
    """Products that are subnormal, overflow, or involve subnormals: TF flushes denormals in
    its own float arithmetic, the kernels must not."""
    B = bitcases

    @B.cfg(backend.EXAMPLES["scale"])
    @given(dtype=st.sampled_from(B.DTYPES), factor=_factors, n=st.integers(1, 48),
           seed=st.integers(0, 2**32 - 1), degrade=st.booleans())
    def prop(dtype, factor, n, seed, degrade):
        rng = np.random.default_rng(seed)
        idx = B.pick_index(rng, n, int(rng.integers(1, n + 1)))
        model = ValueModel.DEGRADE if degrade else ValueModel.SCALE
        c = Corruption(model, idx, DTYPE_LAYOUT[dtype], factor=factor)
        x = B.make_tensor(dtype, n, seed)
        ref = check(backend, B, x, c, dtype)
        if backend.native_scale is not None:
            # the framework's own arithmetic gives the same values wherever no NaN is involved
            plain, ok = backend.native_scale(x, idx, factor, dtype)
            assert (plain[ok] == B.np_bits(ref, dtype)[idx][ok]).all()
    prop()
