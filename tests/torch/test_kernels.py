"""The torch corruption kernels agree with the NumPy reference bit for bit (NaN payloads
included), for every value model, dtype, bit position and emulated layout. The properties
every backend shares run for torch too in tests/backends/test_backend_kernels.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultlab.errors import SpecError
from faultlab.faults import (DTYPE_LAYOUT, LAYOUT_BITS, BitLayout, Corruption, PositionSpec,
                             ValueModel, ValueSpec, resolve)
from faultlab.backends.torch.kernels import prepare
from faultlab.injectors.reference import apply_reference, bits_to_float, convert_bits

from _bitcases import (DTYPES, FLOAT_DTYPES, FLOAT_LAYOUTS, FMT, NP, UINT, cfg, dtype_layout,
                       layouts_for, make_tensor, specials)

TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
         "float64": torch.float64, "int8": torch.int8}
SINT = {np.uint8: np.int8, np.uint16: np.int16, np.uint32: np.int32, np.uint64: np.int64}
TORCH_INT = {"float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16,
             "float64": torch.int64, "int8": torch.int8}
SPECIALS = {d: specials(d) for d in DTYPES}


def to_torch(x: np.ndarray, dtype: str) -> torch.Tensor:
    u = UINT[dtype]
    return torch.from_numpy(x.view(u).view(SINT[u]).copy()).view(TORCH[dtype])


def tbits(t: torch.Tensor, dtype: str) -> np.ndarray:
    u = UINT[dtype]
    return t.contiguous().view(TORCH_INT[dtype]).numpy().view(u)


def nbits(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.view(UINT[dtype])


def check(x: np.ndarray, c: Corruption, dtype: str) -> np.ndarray:
    """Run reference and torch (apply and apply_); assert bit equality and locality."""
    ref = apply_reference(x, c, dtype)
    assert ref.dtype == x.dtype and ref.shape == x.shape
    t = to_torch(x, dtype)
    tc = prepare(c, t)
    out = tc.apply(t)
    got, want = tbits(out, dtype), nbits(ref, dtype)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, (f"{c.model.value}/{c.layout.value} on {dtype}: element {bad[0]}: "
                           f"x={nbits(x, dtype)[bad[0]]:#x} torch={got[bad[0]]:#x} "
                           f"reference={want[bad[0]]:#x}")
    assert (tbits(t, dtype) == nbits(x, dtype)).all(), "apply modified its input"
    outside = np.ones(x.size, dtype=bool)
    outside[np.asarray(c.index)] = False
    assert (want[outside] == nbits(x, dtype)[outside]).all(), "non-indexed element changed"
    t2 = to_torch(x, dtype)
    ptr = t2.data_ptr()
    assert tc.apply_(t2) is t2 and t2.data_ptr() == ptr
    assert (tbits(t2, dtype) == want).all(), "apply_ differs from apply"
    return ref


# --- bit-level models --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", FLOAT_LAYOUTS + [BitLayout.INT8])
def test_every_bit_exhaustive_on_specials(dtype, layout):
    """Every bit of every emulated layout, flipped in every special value at once."""
    x = np.concatenate([SPECIALS[dtype].astype(UINT[dtype]).view(NP[dtype]),
                        make_tensor(dtype, 16, 7)])
    for bit in range(LAYOUT_BITS[layout]):
        for model in (ValueModel.BITFLIP, ValueModel.STUCK_AT):
            idx = np.arange(x.size, dtype=np.int64)
            masks = np.full(x.size, np.uint64(1) << np.uint64(bit), dtype=np.uint64)
            check(x, Corruption(model, idx, layout, masks=masks, stuck=bit % 2), dtype)


@cfg(250)
@given(dl=dtype_layout(), n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       stuck=st.sampled_from([0, 1]), chosen=st.booleans())
def test_stuck_at_via_resolve(dl, n, seed, stuck, chosen):
    dtype, layout = dl
    bit = int(np.random.default_rng(seed).integers(LAYOUT_BITS[layout])) if chosen else None
    spec = ValueSpec(ValueModel.STUCK_AT, bit=bit, stuck=stuck, layout=layout)
    c = resolve(spec, PositionSpec("random", count=max(1, n // 2)), (n,), dtype,
                np.random.default_rng(seed), np.random.default_rng(seed + 1))
    ref = check(make_tensor(dtype, n, seed), c, dtype)
    if layout is DTYPE_LAYOUT[dtype]:  # natively, the bit really is stuck
        b = nbits(ref, dtype)[c.index].astype(np.uint64)
        assert (((b & c.masks) != 0) == bool(stuck)).all()


@cfg(150)
@given(dtype=st.sampled_from(DTYPES), n=st.integers(1, 48), seed=st.integers(0, 2**32 - 1),
       k=st.integers(1, 8))
def test_bitflip_twice_restores(dtype, n, seed, k):
    width = LAYOUT_BITS[DTYPE_LAYOUT[dtype]]
    c = resolve(ValueSpec(ValueModel.BITFLIP, bits=min(k, width)),
                PositionSpec("random", count=max(1, n // 3)), (n,), dtype,
                np.random.default_rng(seed), np.random.default_rng(seed))
    x = make_tensor(dtype, n, seed)
    once = check(x, c, dtype)
    twice = check(once, c, dtype)
    assert (nbits(twice, dtype) == nbits(x, dtype)).all()
    t = to_torch(x, dtype)
    tc = prepare(c, t)
    tc.apply_(t)
    tc.apply_(t)
    assert (tbits(t, dtype) == nbits(x, dtype)).all()


# --- value models -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_rejects_non_finite(dtype):
    x = make_tensor(dtype, 8, 3)
    idx = np.array([1, 4], dtype=np.int64)
    layout = DTYPE_LAYOUT[dtype]
    bad = [Corruption(ValueModel.SET, idx, layout, values=np.array([1.0, np.nan])),
           Corruption(ValueModel.SET, idx, layout, values=np.array([np.inf, 1.0])),
           Corruption(ValueModel.NAN, idx, layout), Corruption(ValueModel.POS_INF, idx, layout),
           Corruption(ValueModel.NEG_INF, idx, layout)]
    for c in bad:
        if dtype == "int8":
            with pytest.raises(SpecError):
                apply_reference(x, c, dtype)
            with pytest.raises(SpecError):
                prepare(c, to_torch(x, dtype))
        else:
            check(x, c, dtype)
    if dtype == "int8":
        for layout in FLOAT_LAYOUTS:
            with pytest.raises(SpecError):
                resolve(ValueSpec("bitflip", layout=layout), PositionSpec(), (8,), "int8",
                        np.random.default_rng(0), np.random.default_rng(0))
            c = Corruption(ValueModel.BITFLIP, idx, layout, masks=np.array([1, 2], np.uint64))
            with pytest.raises(SpecError):
                apply_reference(x, c, dtype)
            with pytest.raises(SpecError):
                prepare(c, to_torch(x, dtype))


@cfg(300)
@given(layout=st.sampled_from(FLOAT_LAYOUTS + [BitLayout.INT8]), n=st.integers(1, 200),
       seed=st.integers(0, 2**32 - 1))
def test_resolve_random_values_finite_and_representable(layout, n, seed):
    dtype = {BitLayout.FP32: "float32", BitLayout.FP16: "float16", BitLayout.BF16: "float32",
             BitLayout.FP64: "float64", BitLayout.INT8: "float32"}[layout]
    c = resolve(ValueSpec(ValueModel.RANDOM, layout=layout), PositionSpec("random", count=n),
                (n,), dtype, np.random.default_rng(seed), np.random.default_rng(seed))
    v = c.values
    assert v.dtype == np.float64 and v.shape == (n,) and np.isfinite(v).all()
    if layout is BitLayout.INT8:
        assert (v == np.rint(v)).all() and v.min() >= -128 and v.max() <= 127
    elif layout is BitLayout.FP32:
        assert (v.astype(np.float32).astype(np.float64) == v).all()
    elif layout is BitLayout.FP16:
        assert (v.astype(np.float16).astype(np.float64) == v).all()
    elif layout is BitLayout.BF16:
        f = v.astype(np.float32)
        assert (f.astype(np.float64) == v).all() and (f.view(np.uint32) & 0xFFFF == 0).all()


@cfg(200)
@given(dtype=st.sampled_from(DTYPES), n=st.integers(2, 48), seed=st.integers(0, 2**32 - 1))
def test_copy(dtype, n, seed):
    c = resolve(ValueSpec(ValueModel.COPY), PositionSpec("random", count=int(n * 0.6) or 1),
                (n,), dtype, np.random.default_rng(seed), np.random.default_rng(seed))
    assert (c.src != c.index).all()
    x = make_tensor(dtype, n, seed)
    ref = check(x, c, dtype)
    assert (nbits(ref, dtype)[c.index] == nbits(x, dtype)[c.src]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_reads_originals_when_src_overlaps_index(dtype):
    x = make_tensor(dtype, 10, 11)
    idx = np.array([0, 1, 2, 3, 4], dtype=np.int64)
    src = np.array([1, 2, 3, 4, 0], dtype=np.int64)  # a rotation: every source is also hit
    ref = check(x, Corruption(ValueModel.COPY, idx, DTYPE_LAYOUT[dtype], src=src), dtype)
    assert (nbits(ref, dtype)[idx] == nbits(x, dtype)[src]).all()
    idx2 = np.array([5, 6, 7], dtype=np.int64)
    src2 = np.array([6, 7, 5], dtype=np.int64)
    ref2 = check(x, Corruption(ValueModel.COPY, idx2, DTYPE_LAYOUT[dtype], src=src2), dtype)
    assert (nbits(ref2, dtype)[idx2] == nbits(x, dtype)[src2]).all()


def test_degrade_via_resolve():
    for dtype in DTYPES:
        spec = ValueSpec(ValueModel.DEGRADE, ramp=0.01)
        c = resolve(spec, PositionSpec("random", count=5), (4, 5), dtype,
                    np.random.default_rng(1), np.random.default_rng(2), onset=3)
        assert c.factor == pytest.approx(1.04)
        check(make_tensor(dtype, 20, 5), c, dtype)


# --- layout emulation cross-checks -------------------------------------------------------

@cfg(250)
@given(layout=st.sampled_from([BitLayout.FP16, BitLayout.BF16]), data=st.data(),
       n=st.integers(1, 48), seed=st.integers(0, 2**32 - 1))
def test_emulation_matches_plain_torch_casts(layout, data, n, seed):
    """fp32 tensor, fp16/bf16 layout: the same as cast, flip in the integer view, cast back."""
    bit = data.draw(st.integers(0, 15), label="bit")
    x = make_tensor("float32", n, seed)
    idx = np.arange(n, dtype=np.int64)
    c = Corruption(ValueModel.BITFLIP, idx, layout,
                   masks=np.full(n, np.uint64(1) << np.uint64(bit), dtype=np.uint64))
    ref = check(x, c, "float32")
    td = torch.float16 if layout is BitLayout.FP16 else torch.bfloat16
    t = torch.from_numpy(x.copy())
    plain = (t.to(td).view(torch.int16) ^ (1 << bit if bit < 15 else -32768)).view(td).float()
    ok = ~(torch.isnan(plain).numpy() | np.isnan(x))
    assert (tbits(plain, "float32")[ok] == nbits(ref, "float32")[ok]).all()


@cfg(250)
@given(dtype=st.sampled_from(FLOAT_DTYPES), data=st.data(), n=st.integers(1, 48),
       seed=st.integers(0, 2**32 - 1))
def test_int8_quantisation_formula(dtype, data, n, seed):
    bit = data.draw(st.integers(0, 7), label="bit")
    x = make_tensor(dtype, n, seed)
    idx = np.arange(n, dtype=np.int64)
    c = Corruption(ValueModel.BITFLIP, idx, BitLayout.INT8,
                   masks=np.full(n, np.uint64(1) << np.uint64(bit), dtype=np.uint64))
    ref = check(x, c, dtype)
    # an independent transcription of the documented formula, rounded by torch's own casts
    wt = np.float64 if dtype == "float64" else np.float32
    with np.errstate(all="ignore"):
        xw = bits_to_float(nbits(x, dtype).astype(np.uint64), DTYPE_LAYOUT[dtype]).astype(wt)
        fin = np.isfinite(xw)
        scale = (np.abs(xw[fin]).max() if fin.any() else wt(0)) / wt(127)
        scale = wt(1) if scale == 0 else scale
        q = np.clip(np.rint(np.nan_to_num(xw / scale, nan=0.0, posinf=127, neginf=-127)),
                    -127, 127).astype(np.int8)
        q = (q.view(np.uint8) ^ np.uint8(1 << bit)).view(np.int8)
        want = torch.from_numpy(q.astype(wt) * scale).to(TORCH[dtype])
    assert (tbits(want, dtype) == nbits(ref, dtype)).all()
    assert (np.abs(q.astype(np.float64)) <= 128).all()


# --- misc properties ---------------------------------------------------------------------

@cfg(200)
@given(raw=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=64))
def test_bits_to_float(raw):
    r = np.array(raw, dtype=np.uint64)
    for layout, ft, ut in ((BitLayout.FP32, np.float32, np.uint32),
                           (BitLayout.FP16, np.float16, np.uint16),
                           (BitLayout.FP64, np.float64, np.uint64)):
        got = bits_to_float(r, layout)
        assert got.dtype == np.float64
        want = (r & np.uint64((1 << LAYOUT_BITS[layout]) - 1)).astype(ut).view(ft)
        with np.errstate(invalid="ignore"):
            want64 = want.astype(np.float64)
        same = (got == want64) | (np.isnan(got) & np.isnan(want64))
        assert same.all()
        assert (np.signbit(got) == np.signbit(want)).all()
        fin = np.isfinite(got)
        assert (got[fin].astype(ft).view(ut) == want[fin].view(ut)).all()
    low = (r & np.uint64(0xFFFF)).astype(np.uint16)
    tb = torch.from_numpy(low.view(np.int16)).view(torch.bfloat16).double().numpy()
    got = bits_to_float(r, BitLayout.BF16)
    assert ((got == tb) | (np.isnan(got) & np.isnan(tb))).all()
    assert (np.signbit(got) == np.signbit(tb)).all()
    i8 = bits_to_float(r, BitLayout.INT8)
    assert (i8 == (r & np.uint64(0xFF)).astype(np.uint8).view(np.int8)).all()


@cfg(100)
@given(dl=dtype_layout(), seed=st.integers(0, 2**32 - 1),
       model=st.sampled_from([ValueModel.BITFLIP, ValueModel.COPY, ValueModel.SCALE,
                              ValueModel.RANDOM]))
def test_non_contiguous_input(dl, seed, model):
    dtype, layout = dl
    shape = (5, 7)
    base = to_torch(make_tensor(dtype, 35, seed), dtype).view(7, 5)
    t = base.t()  # (5, 7), not contiguous
    assert not t.is_contiguous()
    x = tbits(t, dtype).reshape(-1)  # canonical row-major elements of t
    x = x if dtype == "bfloat16" else x.view(NP[dtype])
    spec = ValueSpec(model, layout=layout if model is ValueModel.BITFLIP else "native",
                     factor=0.37)
    c = resolve(spec, PositionSpec("random", count=6), shape, dtype,
                np.random.default_rng(seed), np.random.default_rng(seed))
    ref = apply_reference(x, c, dtype)
    tc = prepare(c, t)
    out = tc.apply(t)
    assert out.shape == t.shape and out.is_contiguous()
    assert (tbits(out, dtype).reshape(-1) == nbits(ref, dtype)).all()
    ptr = base.data_ptr()
    assert tc.apply_(t) is t  # in place through the strided view, into base's storage
    assert t.data_ptr() == ptr
    assert (tbits(base.t(), dtype).reshape(-1) == nbits(ref, dtype)).all()


def test_duplicate_indices_last_entry_wins():
    x = make_tensor("float32", 8, 2)
    idx = np.array([3, 1, 3, 5, 1], dtype=np.int64)
    c = Corruption(ValueModel.SET, idx, BitLayout.FP32,
                   values=np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    ref = check(x, c, "float32")
    assert ref[3] == 3.0 and ref[1] == 5.0 and ref[5] == 4.0
    m = np.array([1, 2, 4, 8, 16], dtype=np.uint64)
    c = Corruption(ValueModel.BITFLIP, idx, BitLayout.FP16, masks=m)
    check(x, c, "float32")


def test_autograd_and_no_grad():
    x = torch.randn(4, 6, dtype=torch.float32, requires_grad=True)
    c = resolve(ValueSpec(ValueModel.BITFLIP, bit=30), PositionSpec("random", count=3),
                (4, 6), "float32", np.random.default_rng(0), np.random.default_rng(0))
    tc = prepare(c, x)
    y = tc.apply(x * 2)
    y.sum().backward()
    g = x.grad.view(-1)
    hit = torch.zeros(24, dtype=torch.bool)
    hit[torch.from_numpy(c.index)] = True
    assert (g[hit] == 0).all() and (g[~hit] == 2).all()
    with torch.no_grad():
        z = tc.apply(x)
    assert not z.requires_grad

    # inside a gradient hook
    seen = {}
    w = torch.randn(4, 6, requires_grad=True)

    def hook(grad):
        seen["before"] = grad.clone()
        return tc.apply(grad)

    w.register_hook(hook)
    (w * 3).sum().backward()
    ref = apply_reference(seen["before"].numpy().reshape(-1), c, "float32")
    assert (w.grad.numpy().reshape(-1).view(np.uint32) == ref.view(np.uint32)).all()

    # in place on a leaf parameter (stored state)
    p = torch.nn.Parameter(torch.randn(4, 6))
    before = p.detach().numpy().reshape(-1).copy()
    tc.apply_(p)
    assert (p.detach().numpy().reshape(-1).view(np.uint32)
            == apply_reference(before, c, "float32").view(np.uint32)).all()


def test_prepare_with_remapped_index_and_range_checks():
    x = make_tensor("float32", 12, 4)
    c = Corruption(ValueModel.ZERO, np.array([0, 1], dtype=np.int64), BitLayout.FP32)
    t = to_torch(x, "float32")
    out = prepare(c, t, index=np.array([10, 11])).apply(t)
    assert (out[10:] == 0).all() and (tbits(out, "float32")[:10] == nbits(x, "float32")[:10]).all()
    with pytest.raises(SpecError):
        prepare(c, t, index=np.array([3, 12])).apply(t)
    with pytest.raises(SpecError):
        prepare(c, t).apply(t.double())
    with pytest.raises(SpecError):
        apply_reference(x, Corruption(ValueModel.ZERO, np.array([12]), BitLayout.FP32), "float32")


def test_resolve_rejects_too_many_bits():
    with pytest.raises(SpecError):
        resolve(ValueSpec(ValueModel.BITFLIP, bits=20), PositionSpec(), (4,), "float16",
                np.random.default_rng(0), np.random.default_rng(0))
    c = resolve(ValueSpec(ValueModel.BITFLIP, bits=64), PositionSpec(count=3), (4,), "float64",
                np.random.default_rng(0), np.random.default_rng(0))
    assert (c.masks == np.uint64(0xFFFFFFFFFFFFFFFF)).all()
    check(make_tensor("float64", 4, 0), c, "float64")
