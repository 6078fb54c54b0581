"""Vectorised TensorFlow execution of a :class:`~faultlab.faults.Corruption`.

:func:`prepare` turns a corruption into a few small NumPy arrays once, on the host, with the
reference code itself (replacement bit patterns, bit masks, the float32 factor); the kernel
then runs inside a ``tf.function`` on the tensor's device, bit-identical to
:func:`faultlab.injectors.reference.apply_reference` (the specification of every rounding and
NaN rule).

Why the arithmetic is done on integers: TensorFlow's CPU threads run with denormals flushed
to zero (FTZ/DAZ set in every thread of its pools, eager ops included), so a float multiply,
divide or conversion touching a subnormal disagrees with IEEE arithmetic and with the
reference. Every data-dependent float operation of the kernels (format conversions for the
reduced-precision layouts, the SCALE/DEGRADE product, int8 quantisation) is therefore a small
soft-float on int64 bit patterns: decode, exact integer significand arithmetic, and one
round-to-nearest-even pack that handles subnormals and overflow. The only hardware float op
left is ``rint`` on a float64 that is either normal or a value that rounds to zero anyway.

Every corruption, whatever its value model, is executed as

    new[i] = op((x[gather[i]] & and[i]) | or[i]) ^ xor[i])   at flat position index[i]

where ``op`` is one of a handful of *cases* (native bits, a conversion to another float layout
and back, int8 quantisation, a scale): SET / RANDOM / ZERO / NaN / Inf are ``and = 0,
or = bits``; COPY gathers from the source positions; bit flips are ``xor``; stuck-at bits are
``and`` / ``or``. So one traced function per tensor dtype serves every fault, and the
injectors arm faults by writing these arrays into variables (no retracing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from faultlab.backends.tf.runtime import tf

from faultlab.errors import SpecError
from faultlab.faults import DTYPE_LAYOUT, BitLayout, Corruption, ValueModel
from faultlab.injectors.reference import (FLOAT_FORMATS, LAYOUT_BITS, canonical_nan, dedupe_last,
                                 quiet_bit, replacement_bits)

__all__ = ["Prepared", "prepare", "apply", "apply_slots", "kernel_fn", "cases", "TF_DTYPES",
           "dtype_name", "N_INTS", "N_META"]

#: dtype name -> tf dtype
TF_DTYPES = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16,
             "float64": tf.float64, "int8": tf.int8}
_UNSIGNED = {"float32": tf.uint32, "float16": tf.uint16, "bfloat16": tf.uint16,
             "float64": None, "int8": tf.uint8}
_FLOAT_LAYOUTS = (BitLayout.FP32, BitLayout.FP16, BitLayout.BF16, BitLayout.FP64)

#: rows of a slot's int64 array: index, gather, and, or, xor
N_INTS = 5
#: entries of a slot's meta vector: case, n, factor bits, unused
N_META = 4

I64 = tf.int64


def dtype_name(dtype) -> str:
    """The kernels' name of a tf dtype ('float32', ...)."""
    return tf.as_dtype(dtype).name


def _c(v: int) -> tf.Tensor:
    return tf.constant(int(v), dtype=I64)


# --- soft float on int64 bit patterns -------------------------------------------------------------

class _Fmt:
    def __init__(self, layout: BitLayout):
        self.layout = layout
        self.eb, self.mb = FLOAT_FORMATS[layout]
        self.w = 1 + self.eb + self.mb
        self.bias = (1 << (self.eb - 1)) - 1
        self.emax_field = (1 << self.eb) - 1
        self.inf = self.emax_field << self.mb
        self.qnan = canonical_nan(layout)
        self.quiet = quiet_bit(layout)


_FMT = {lay: _Fmt(lay) for lay in _FLOAT_LAYOUTS}


def _sign(b, f: _Fmt):
    return tf.bitwise.bitwise_and(tf.bitwise.right_shift(b, _c(f.w - 1)), _c(1))


def _decode(b, f: _Fmt):
    """(sign, is_nan, is_inf, M, E): |value| = M * 2**E for finite values (M = 0 for zero)."""
    ex = tf.bitwise.bitwise_and(tf.bitwise.right_shift(b, _c(f.mb)), _c(f.emax_field))
    man = tf.bitwise.bitwise_and(b, _c((1 << f.mb) - 1))
    special = tf.equal(ex, _c(f.emax_field))
    is_nan = tf.logical_and(special, tf.not_equal(man, _c(0)))
    is_inf = tf.logical_and(special, tf.equal(man, _c(0)))
    sub = tf.equal(ex, _c(0))
    m = tf.where(sub, man, tf.bitwise.bitwise_or(man, _c(1 << f.mb)))
    e = tf.where(sub, _c(1 - f.bias - f.mb), ex - _c(f.bias + f.mb))
    return _sign(b, f), is_nan, is_inf, m, e


def _shl(x, s):
    return tf.bitwise.left_shift(x, tf.clip_by_value(s, _c(0), _c(63)))


def _shr(x, s):
    return tf.bitwise.right_shift(x, tf.clip_by_value(s, _c(0), _c(63)))


def _msb(m):
    """floor(log2(m)) for 0 < m < 2**63 (0 where m == 0). The int -> float64 conversion of a
    positive integer is a normal number, so it is exact up to one rounding step, corrected."""
    f = tf.cast(m, tf.float64)
    p = tf.bitwise.bitwise_and(tf.bitwise.right_shift(tf.bitcast(f, I64), _c(52)), _c(0x7FF))
    p = p - _c(1023)
    p = tf.clip_by_value(p, _c(0), _c(63))
    p = tf.where(tf.equal(_shr(m, p), _c(0)), p - _c(1), p)
    return tf.where(tf.equal(m, _c(0)), _c(0), tf.maximum(p, _c(0)))


def _round_pack(sign, m, e, sticky, f: _Fmt):
    """Bits of the value (-1)**sign * (m + tiny) * 2**e rounded to nearest even in format f,
    with subnormals and overflow to Inf; `sticky` says that nonzero bits lie below m's LSB.
    Requires 0 <= m < 2**62."""
    emin = 1 - f.bias
    p = _msb(m)
    ve = p + e
    qe = tf.clip_by_value(ve, _c(emin), _c(f.bias))
    q = qe - _c(f.mb)
    sh = q - e
    left = _shl(m, -sh)
    shc = tf.clip_by_value(sh, _c(1), _c(62))
    r = _shr(m, shc)
    rem = tf.bitwise.bitwise_and(m, _shl(_c(1), shc) - _c(1))
    half = _shl(_c(1), shc - _c(1))
    odd = tf.equal(tf.bitwise.bitwise_and(r, _c(1)), _c(1))
    up = tf.logical_or(tf.greater(rem, half),
                       tf.logical_and(tf.equal(rem, half), tf.logical_or(sticky, odd)))
    r = r + tf.cast(up, I64)
    r = tf.where(tf.greater(sh, _c(62)), _c(0), r)
    sig = tf.where(tf.less_equal(sh, _c(0)), left, r)
    bits = tf.bitwise.left_shift(qe + _c(f.bias - 1), _c(f.mb)) + sig
    over = tf.logical_or(tf.greater(ve, _c(f.bias)), tf.greater_equal(bits, _c(f.inf)))
    bits = tf.where(over, _c(f.inf), bits)
    bits = tf.where(tf.equal(m, _c(0)), _c(0), bits)
    return tf.bitwise.bitwise_or(bits, _shl(sign, _c(f.w - 1)))


def _nan_convert(b, s: _Fmt, d: _Fmt):
    """The NaN of `d` that the NaN `b` of `s` converts to (reference._nan_bits)."""
    mant = tf.bitwise.bitwise_and(b, _c((1 << s.mb) - 1))
    mant = (tf.bitwise.left_shift(mant, _c(d.mb - s.mb)) if d.mb >= s.mb
            else tf.bitwise.right_shift(mant, _c(s.mb - d.mb)))
    out = tf.bitwise.bitwise_or(_c(d.qnan), mant)
    return tf.bitwise.bitwise_or(out, tf.bitwise.left_shift(_sign(b, s), _c(d.w - 1)))


def _convert(b, src: BitLayout, dst: BitLayout):
    """reference.convert_bits on int64 bit patterns (RNE; fp64 <-> fp16/bf16 via fp32)."""
    if src is dst:
        return b
    s, d = _FMT[src], _FMT[dst]
    sign, is_nan, is_inf, m, e = _decode(b, s)
    if src is BitLayout.FP64 and dst in (BitLayout.FP16, BitLayout.BF16):
        mid = _FMT[BitLayout.FP32]
        b32 = _round_pack(sign, m, e, tf.zeros_like(is_nan), mid)
        sign2, _, is_inf2, m2, e2 = _decode(b32, mid)
        fin = _round_pack(sign2, m2, e2, tf.zeros_like(is_nan), d)
        fin = tf.where(is_inf2, tf.bitwise.bitwise_or(_c(d.inf), _shl(sign2, _c(d.w - 1))), fin)
    else:
        fin = _round_pack(sign, m, e, tf.zeros_like(is_nan), d)
    inf = tf.bitwise.bitwise_or(_c(d.inf), _shl(sign, _c(d.w - 1)))
    return tf.where(is_nan, _nan_convert(b, s, d), tf.where(is_inf, inf, fin))


def _mul(xb, fb, f: _Fmt):
    """x * factor rounded once to format f (fp32 or fp64); a NaN made by the product is the
    canonical quiet NaN (x's own NaN is handled by the caller)."""
    sx, nx, ix, mx, ex = _decode(xb, f)
    sf, nf, iff, mf, ef = _decode(fb, f)
    sign = tf.bitwise.bitwise_xor(sx, sf)
    zero_x = tf.logical_and(tf.equal(mx, _c(0)), tf.logical_not(tf.logical_or(nx, ix)))
    zero_f = tf.logical_and(tf.equal(mf, _c(0)), tf.logical_not(tf.logical_or(nf, iff)))
    if f.layout is BitLayout.FP64:
        # normalise both significands (subnormals too) so the product has 105-106 bits and
        # its top 62 bits keep every bit that rounding can need
        mx, ex = _normalise(tf.where(zero_x, _c(1), mx), ex, 52)
        mf, ef = _normalise(tf.where(zero_f, _c(1), mf), ef, 52)
        lo27 = _c((1 << 27) - 1)
        xh, xl = tf.bitwise.right_shift(mx, _c(27)), tf.bitwise.bitwise_and(mx, lo27)
        yh, yl = tf.bitwise.right_shift(mf, _c(27)), tf.bitwise.bitwise_and(mf, lo27)
        hh, hl, ll = xh * yh, xh * yl + xl * yh, xl * yl
        a = ll + tf.bitwise.left_shift(tf.bitwise.bitwise_and(hl, lo27), _c(27))
        upper = hh + tf.bitwise.right_shift(hl, _c(27)) + tf.bitwise.right_shift(a, _c(54))
        low = tf.bitwise.bitwise_and(a, _c((1 << 54) - 1))
        m = tf.bitwise.bitwise_or(tf.bitwise.left_shift(upper, _c(10)),
                                  tf.bitwise.right_shift(low, _c(44)))
        sticky = tf.not_equal(tf.bitwise.bitwise_and(low, _c((1 << 44) - 1)), _c(0))
        e = ex + ef + _c(44)
    else:
        m, e, sticky = mx * mf, ex + ef, tf.zeros_like(nx)
    m = tf.where(tf.logical_or(zero_x, zero_f), _c(0), m)
    out = _round_pack(sign, m, e, sticky, f)
    inf = tf.bitwise.bitwise_or(_c(f.inf), _shl(sign, _c(f.w - 1)))
    any_inf = tf.logical_or(ix, iff)
    made_nan = tf.logical_or(nf, tf.logical_or(tf.logical_and(ix, zero_f),
                                               tf.logical_and(iff, zero_x)))
    out = tf.where(any_inf, inf, out)
    return tf.where(made_nan, _c(f.qnan), out)


def _normalise(m, e, top: int):
    """Shift m (> 0) so that its most significant bit is bit `top`; adjust e."""
    s = _c(top) - _msb(m)
    return _shl(m, s), e - s


def _div127(ab, f: _Fmt):
    """Non-negative finite a / 127 rounded to nearest even in f (exact long division)."""
    _, _, _, m, e = _decode(ab, f)
    safe = tf.where(tf.equal(m, _c(0)), _c(1), m)
    mn, en = _normalise(safe, e, 61)
    q = tf.math.floordiv(mn, _c(127))
    sticky = tf.not_equal(tf.math.floormod(mn, _c(127)), _c(0))
    out = _round_pack(tf.zeros_like(m), q, en, sticky, f)
    return tf.where(tf.equal(m, _c(0)), _c(0), out)


def _div(xb, sb, f: _Fmt):
    """x / s rounded to nearest even in f, for s finite and > 0 (x may be NaN / Inf / 0)."""
    sx, nx, ix, mx, ex = _decode(xb, f)
    _, _, _, ms, es = _decode(sb, f)
    zx = tf.equal(mx, _c(0))
    mxn, exn = _normalise(tf.where(zx, _c(1), mx), ex, 52)
    msn, esn = _normalise(ms, es, 52)
    q = tf.math.floordiv(mxn, msn)
    r = tf.math.floormod(mxn, msn)
    for _ in range(6):  # 9 quotient bits a round: 1 + 54 bits in all
        r9 = tf.bitwise.left_shift(r, _c(9))
        q = tf.bitwise.bitwise_or(tf.bitwise.left_shift(q, _c(9)), tf.math.floordiv(r9, msn))
        r = tf.math.floormod(r9, msn)
    out = _round_pack(sx, q, exn - esn - _c(54), tf.not_equal(r, _c(0)), f)
    out = tf.where(zx, _shl(sx, _c(f.w - 1)), out)
    inf = tf.bitwise.bitwise_or(_c(f.inf), _shl(sx, _c(f.w - 1)))
    out = tf.where(ix, inf, out)
    return tf.where(nx, _c(f.qnan), out)


# --- bits <-> tensors ---------------------------------------------------------------------------

def _to_bits(v, dtype: str):
    """A tensor's elements as int64 bit patterns (unsigned value of the dtype's width)."""
    if dtype == "float64":
        return tf.bitcast(v, I64)
    return tf.cast(tf.bitcast(v, _UNSIGNED[dtype]), I64)


def _from_bits(b, dtype: str):
    if dtype == "float64":
        return tf.bitcast(b, tf.float64)
    return tf.bitcast(tf.cast(b, _UNSIGNED[dtype]), TF_DTYPES[dtype])


def _bitop(b, a, o, x):
    return tf.bitwise.bitwise_xor(tf.bitwise.bitwise_or(tf.bitwise.bitwise_and(b, a), o), x)


# --- the cases ------------------------------------------------------------------------------------

def cases(dtype: str) -> list[tuple[str, BitLayout | None]]:
    """The kernel cases of a dtype, in switch order: ("bits", None), ("convert", layout) for
    every other float layout, ("quant", None), ("scale", None)."""
    native = DTYPE_LAYOUT[dtype]
    out: list[tuple[str, BitLayout | None]] = [("bits", None)]
    if native is not BitLayout.INT8:
        out += [("convert", lay) for lay in _FLOAT_LAYOUTS if lay is not native]
        out.append(("quant", None))
    out.append(("scale", None))
    return out


def _case_fn(kind: str, layout, dtype: str):
    native = DTYPE_LAYOUT[dtype]
    work = BitLayout.FP64 if native is BitLayout.FP64 else BitLayout.FP32

    if kind == "bits":
        def fn(bits_all, g, a, o, x, fbits):
            return _bitop(g, a, o, x)

    elif kind == "convert":
        def fn(bits_all, g, a, o, x, fbits):
            lb = _bitop(_convert(g, native, layout), a, o, x)
            return _convert(lb, layout, native)

    elif kind == "quant":
        wf = _FMT[work]

        def fn(bits_all, g, a, o, x, fbits):
            nf = _FMT[native]
            ex = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits_all, _c(nf.mb)),
                                        _c(nf.emax_field))
            mag = tf.bitwise.bitwise_and(bits_all, _c((1 << (nf.w - 1)) - 1))
            mag = tf.where(tf.equal(ex, _c(nf.emax_field)), _c(0), mag)
            amax = _convert(tf.reduce_max(tf.concat([mag, _c(0)[None]], 0)), native, work)
            scale = _div127(amax, wf)
            one = _c(int(np.array(1, dtype=np.float64 if work is BitLayout.FP64 else np.float32)
                        .view(np.uint64 if work is BitLayout.FP64 else np.uint32)))
            scale = tf.where(tf.equal(scale, _c(0)), one, scale)
            r = _div(_convert(g, native, work), scale, wf)
            r64 = tf.bitcast(_convert(r, work, BitLayout.FP64), tf.float64)
            q = tf.clip_by_value(tf.math.rint(r64), -127.0, 127.0)
            q = tf.where(tf.math.is_nan(r64), tf.zeros_like(q), q)
            qb = tf.bitwise.bitwise_and(tf.cast(q, I64), _c(0xFF))
            qb = tf.bitwise.bitwise_and(_bitop(qb, a, o, x), _c(0xFF))
            qs = tf.bitwise.bitwise_xor(qb, _c(0x80)) - _c(0x80)           # signed byte
            prod = _round_pack(tf.cast(qs < 0, I64), tf.abs(qs) * _decode(scale, wf)[3],
                               _decode(scale, wf)[4], tf.zeros_like(qs < 0), wf)
            return _convert(prod, work, native)

    elif kind == "scale":
        if native is BitLayout.INT8:
            def fn(bits_all, g, a, o, x, fbits):
                v = tf.cast(tf.bitcast(tf.cast(g, tf.uint8), tf.int8), tf.float32)
                fac = tf.bitcast(tf.cast(fbits, tf.uint32), tf.float32)
                r = v * fac   # int8 * float32: flushing denormals cannot change rint's result
                r = tf.where(tf.math.is_nan(r), tf.zeros_like(r),
                             tf.clip_by_value(tf.math.rint(r), -128.0, 127.0))
                return tf.bitwise.bitwise_and(tf.cast(r, I64), _c(0xFF))
        else:
            nf, wf = _FMT[native], _FMT[work]

            def fn(bits_all, g, a, o, x, fbits):
                r = _mul(_convert(g, native, work), fbits, wf)
                out = _convert(r, work, native)
                r_nan = tf.logical_and(
                    tf.equal(tf.bitwise.bitwise_and(tf.bitwise.right_shift(r, _c(wf.mb)),
                                                    _c(wf.emax_field)), _c(wf.emax_field)),
                    tf.not_equal(tf.bitwise.bitwise_and(r, _c((1 << wf.mb) - 1)), _c(0)))
                out = tf.where(r_nan, _c(nf.qnan), out)
                g_nan = _decode(g, nf)[1]
                return tf.where(g_nan, tf.bitwise.bitwise_or(g, _c(nf.quiet)), out)
    else:  # pragma: no cover
        raise ValueError(kind)
    return fn


def _apply_one(flat, ints, meta, mode, dtype: str, static: bool):
    """One slot's corruption of a flat tensor (mode 0) or zeros at its positions (mode 1)."""
    size = tf.shape(flat, out_type=I64)[0]
    if static:  # fixed-size arrays, unused entries point at a scratch element past the end
        n = tf.shape(ints, out_type=I64)[1]
        valid = tf.range(n) < meta[1]
        work = tf.concat([flat, tf.zeros([1], flat.dtype)], 0)
        idx = tf.where(valid, ints[0], size)
        gat = tf.where(valid, ints[1], size)
    else:
        n = meta[1]
        work = flat
        idx, gat = ints[0, :n], ints[1, :n]
    a, o, x = ints[2, :n], ints[3, :n], ints[4, :n]

    def zero():
        return tf.tensor_scatter_nd_update(work, idx[:, None], tf.zeros_like(idx, flat.dtype))

    def corrupt():
        bits_all = _to_bits(flat, dtype)
        g = tf.gather(_to_bits(work, dtype), gat)
        branches = [lambda fn=_case_fn(k, lay, dtype): fn(bits_all, g, a, o, x, meta[2])
                    for k, lay in cases(dtype)]
        new = tf.switch_case(tf.cast(meta[0], tf.int32), branches)
        return tf.tensor_scatter_nd_update(work, idx[:, None], _from_bits(new, dtype))

    out = tf.cond(tf.equal(mode, 0), corrupt, zero)
    return out[:size] if static else out


def apply_slots(x, mask, ints, meta, dtype: str, static: bool = False):
    """Apply to tensor x every slot whose bit is set in `mask`, in slot order, then write
    zeros at the positions of every slot whose bit is set in `mask >> slots` (the gradient of
    a forward corruption, which sees the corrupted elements as constants).

    ints: int64 [slots, 5, capacity] (index, gather, and, or, xor); meta: int64 [slots, 4]
    (case, n, factor bits, 0). Both halves of the mask are runtime values, so Grappler never
    specialises the kernel per call site."""
    shape = tf.shape(x)
    flat = tf.reshape(x, [-1])
    slots = tf.shape(ints)[0]
    if not static:
        # one iteration per set bit, lowest first (the same order as below): a point that
        # fires one fault runs the loop body once, not 2 x slots times behind a cond each
        def body_bits(m, f):
            low = tf.bitwise.bitwise_and(m, -m)
            i = tf.cast(tf.raw_ops.PopulationCount(x=low - 1), tf.int32)
            s = tf.math.floormod(i, slots)
            f = _apply_one(f, ints[s], meta[s], tf.cast(i >= slots, tf.int32), dtype, static)
            return tf.bitwise.bitwise_and(m, m - 1), f

        _, flat = tf.while_loop(lambda m, f: tf.not_equal(m, 0), body_bits, [mask, flat],
                                shape_invariants=[tf.TensorShape([]), tf.TensorShape([None])])
        return tf.reshape(flat, shape)

    def body(i, f):
        on = tf.not_equal(tf.bitwise.bitwise_and(tf.bitwise.right_shift(mask, i), 1), 0)
        s = tf.math.floormod(i, slots)
        mode = tf.cast(i >= slots, tf.int32)
        f = tf.cond(on, lambda: _apply_one(f, ints[s], meta[s], mode, dtype, static),
                    lambda: tf.identity(f))
        return i + 1, f

    _, flat = tf.while_loop(lambda i, f: i < 2 * slots, body, [tf.constant(0), flat],
                            shape_invariants=[tf.TensorShape([]), tf.TensorShape([None])])
    return tf.reshape(flat, shape)


_KERNELS: dict = {}


def kernel_fn(dtype: str, static: bool = False):
    """The kernel for one dtype as a concrete function (x, mask, ints, meta) -> x': called
    from every injection point of a graph, traced once per process and, on CPU / GPU, never
    inlined (so an untaken point costs no work and the graph stays small)."""
    key = (dtype, static)
    fn = _KERNELS.get(key)
    if fn is None:
        tfd = TF_DTYPES[dtype]

        def kernel(x, mask, ints, meta):
            return apply_slots(x, mask, ints, meta, dtype, static)
        attrs = None if static else {"_noinline": True}
        fn = tf.function(kernel, autograph=False, experimental_attributes=attrs,
                         input_signature=[tf.TensorSpec(None, tfd), tf.TensorSpec([], tf.int32),
                                          tf.TensorSpec([None, N_INTS, None], I64),
                                          tf.TensorSpec([None, N_META], I64)])
        fn = fn.get_concrete_function()
        _KERNELS[key] = fn
    return fn


# --- host-side preparation ------------------------------------------------------------------------

@dataclass(frozen=True)
class Prepared:
    """A corruption bound to a dtype: what the kernel executes (see the module docstring)."""

    dtype: str
    case: int
    index: np.ndarray      # int64 [n] flat positions (duplicates removed, last entry kept)
    gather: np.ndarray     # int64 [n]
    and_m: np.ndarray      # int64 [n]
    or_m: np.ndarray       # int64 [n]
    xor_m: np.ndarray      # int64 [n]
    factor_bits: int
    max_index: int         # largest flat position read or written

    @property
    def n(self) -> int:
        return int(self.index.size)

    def slot(self, capacity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ints [5, capacity], meta [4]) as a slot of the injectors' arming variables."""
        cap = self.n if capacity is None else capacity
        if self.n > cap:
            raise SpecError(f"a fault hitting {self.n} elements exceeds the capacity "
                            f"{cap} of an injection slot")
        ints = np.zeros((N_INTS, max(cap, 1)), dtype=np.int64)
        for row, arr in enumerate((self.index, self.gather, self.and_m, self.or_m, self.xor_m)):
            ints[row, :self.n] = arr
        meta = np.array([self.case, self.n, self.factor_bits, 0], dtype=np.int64)
        return ints, meta

    def check(self, size: int) -> None:
        if self.max_index >= size:
            raise SpecError(f"corruption index {self.max_index} out of range for a tensor of "
                            f"{size} elements")


def _as_i64(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.uint64).view(np.int64))


def prepare(c: Corruption, dtype: str, index: np.ndarray | None = None,
            src: np.ndarray | None = None) -> Prepared:
    """Bind corruption `c` to a tensor of `dtype` ('float32', ...). `index` / `src` replace
    c.index / c.src (flat indices into the tensor as the backend stores it)."""
    dtype = dtype_name(dtype) if not isinstance(dtype, str) else dtype
    if dtype not in TF_DTYPES:
        raise SpecError(f"cannot corrupt a tensor of dtype {dtype}")
    native = DTYPE_LAYOUT[dtype]
    layout = BitLayout(c.layout)
    layout = native if layout is BitLayout.NATIVE else layout
    model = ValueModel(c.model)
    index = np.asarray(c.index if index is None else index, dtype=np.int64).reshape(-1)
    if index.size and index.min() < 0:
        raise SpecError("negative corruption index")
    keep = dedupe_last(index)
    idx = np.ascontiguousarray(index[keep])
    n = idx.size
    ones = np.full(n, -1, dtype=np.int64)
    zeros = np.zeros(n, dtype=np.int64)
    gather, and_m, or_m, xor_m = idx, ones, zeros, zeros
    factor_bits = 0
    names = cases(dtype)
    case = 0
    max_index = int(idx.max()) if n else -1

    if model in (ValueModel.BITFLIP, ValueModel.STUCK_AT):
        if c.masks is None:
            raise SpecError(f"value model {model.value} needs bit masks")
        if native is BitLayout.INT8 and layout is not BitLayout.INT8:
            raise SpecError(f"an int8 tensor cannot be corrupted in the {layout.value} layout")
        width = LAYOUT_BITS[layout]
        masks = np.asarray(c.masks, dtype=np.uint64).reshape(-1)[keep]
        if width < 64:
            masks = masks & np.uint64((1 << width) - 1)
        m = _as_i64(masks)
        if model is ValueModel.BITFLIP:
            xor_m = m
        elif c.stuck == 1:
            or_m = m
        else:
            and_m = ~m
        if layout is not native:
            case = names.index(("quant", None) if layout is BitLayout.INT8
                               else ("convert", layout))
    elif model is ValueModel.COPY:
        if src is None and c.src is None:
            raise SpecError("value model copy needs source indices")
        s = np.asarray(c.src if src is None else src, dtype=np.int64).reshape(-1)[keep]
        if s.size and s.min() < 0:
            raise SpecError("negative copy source index")
        gather = np.ascontiguousarray(s)
        max_index = max(max_index, int(s.max()) if s.size else -1)
    elif model in (ValueModel.SCALE, ValueModel.DEGRADE):
        case = names.index(("scale", None))
        if native is BitLayout.FP64:
            factor_bits = int(np.array(float(c.factor), dtype=np.float64).view(np.int64))
        else:
            with np.errstate(over="ignore"):
                factor_bits = int(np.array(np.float32(c.factor)).view(np.uint32))
    else:  # SET, RANDOM, ZERO, NAN, +-INF: the new bit patterns, computed by the reference
        bits = replacement_bits(c, dtype, keep)
        and_m = zeros
        or_m = _as_i64(np.asarray(bits).astype(np.uint64))
    return Prepared(dtype, case, idx, np.asarray(gather, dtype=np.int64), and_m, or_m, xor_m,
                    factor_bits, max_index)


def apply(x: tf.Tensor, p: Prepared, static: bool = False) -> tf.Tensor:
    """A new tensor equal to `x` except at the corrupted elements (flat row-major indices),
    eagerly or inside a tf.function."""
    x = tf.convert_to_tensor(x)
    if dtype_name(x.dtype) != p.dtype:
        raise SpecError(f"corruption prepared for {p.dtype}, applied to {dtype_name(x.dtype)}")
    if x.shape.num_elements() is not None:
        p.check(int(x.shape.num_elements()))
    ints, meta = p.slot()
    return kernel_fn(p.dtype, static)(x, tf.constant(1), tf.constant(ints[None]),
                                      tf.constant(meta[None]))
