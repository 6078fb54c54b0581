"""The fault model: what (value corruption), where (site, layer, replica, positions), when.

Everything here is framework-free. A :class:`FaultSpec` is what a campaign row says; it is
resolved against a concrete operand (shape and dtype) into a :class:`Corruption`, a small bundle
of NumPy arrays that the vectorised kernels of each framework execute.

Positions are given in the *canonical layout*: NHWC for image activations, HWIO for conv
kernels, (in, out) for dense kernels, batch-first for sequences, exactly as the ISCA'23 files
(Keras) index them. Each framework backend maps canonical indices onto its own layout.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from faultlab.backends import Framework  # noqa: F401 - built from the backend registry
from faultlab.bits import (DTYPE_LAYOUT, LAYOUT_BITS, BitLayout,  # noqa: F401 - re-exported
                           bits_to_float)
from faultlab.errors import SpecError



class Site(str, enum.Enum):
    """Where in a training step the corrupted value lives."""

    FWD_INPUT = "fwd_input"      # the layer's input operand (activation into the layer)
    FWD_WEIGHT = "fwd_weight"    # the layer's kernel operand, this call only
    FWD_OUTPUT = "fwd_output"    # the layer's output
    GRAD_OUT = "grad_out"        # gradient arriving at the layer output (feeds grad_in and grad_wt)
    BWD_INPUT = "bwd_input"      # incoming-gradient operand of the grad_in computation only
    BWD_WEIGHT = "bwd_weight"    # kernel operand of the grad_in computation only
    GRAD_IN = "grad_in"          # gradient w.r.t. the layer input (result of the backward conv)
    GRAD_WT = "grad_wt"          # gradient w.r.t. the layer's weight
    PARAM = "param"              # the stored parameter (persists)
    OPT_STATE = "opt_state"      # optimizer state, e.g. Adam moments (persists)
    HOST_STATE = "host_state"    # host-resident (offloaded) copy of state

    @property
    def is_backward(self) -> bool:
        return self in (Site.GRAD_OUT, Site.BWD_INPUT, Site.BWD_WEIGHT, Site.GRAD_IN, Site.GRAD_WT)

    @property
    def is_state(self) -> bool:
        return self in (Site.PARAM, Site.OPT_STATE, Site.HOST_STATE)


#: sites of the fault model that only an offloaded workload has (WorkloadConfig.offload; the
#: torch backend, docs/offload.md), and what they are: campaign files refuse them on rows
#: without offload (campaigns/columnar.py), the strategies of faultlab.testing draw them only
#: when asked, the injectors of user loops refuse them (faultlab.torch.Injector unless it is
#: given a faultlab.torch.Offload; faultlab.keras always)
UNSUPPORTED_SITES = {Site.HOST_STATE: "a host-resident (offloaded) copy of state: set offload, "
                                      "e.g. window:2, or use param or opt_state for the device "
                                      "copy"}

#: what a host_state fault's `tensor` names (docs/offload.md): the host master copy of a
#: layer's weight (the default) or bias, the host Adam moments of its weight (m, v), the
#: weight in transit to the device (transit), the weight gradient on its way back (grad)
HOST_TENSORS = ("weight", "bias", "m", "v", "transit", "grad")


class ValueModel(str, enum.Enum):
    BITFLIP = "bitflip"      # flip k chosen or random bits
    RANDOM = "random"        # random finite bit pattern of the value's width
    ZERO = "zero"
    COPY = "copy"            # value copied from another position of the same tensor
    NAN = "nan"
    POS_INF = "inf"
    NEG_INF = "-inf"
    STUCK_AT = "stuck_at"    # one bit forced to 0 or 1
    SCALE = "scale"          # multiply by a factor
    SET = "set"              # explicit replacement values (ISCA inj_values), exact
    DEGRADE = "degrade"      # slowly degrading unit: x * (1 + ramp * n), n = steps since onset


class PositionMode(str, enum.Enum):
    EXPLICIT = "explicit"        # listed indices
    RANDOM = "random"            # `count` random distinct elements
    CONSECUTIVE = "consecutive"  # `count` consecutive elements along the last axis (channels)
    GROUPS = "groups"            # groups of `count` consecutive elements repeated over a range


class DurationKind(str, enum.Enum):
    TRANSIENT = "transient"        # the injection step only
    INTERMITTENT = "intermittent"  # each step from the start with probability p
    PERMANENT = "permanent"        # every step from the start on
    STEPS = "steps"                # `steps` consecutive steps from the start


def parse_enum(cls, value, what):
    """`value` as a member of the enum `cls` (its value, any case); a SpecError naming `what`
    and the choices otherwise."""
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise SpecError(f"unknown {what} {value!r} (expected one of: {choices})") from None


@dataclass(frozen=True)
class ValueSpec:
    """What happens to each selected value."""

    model: ValueModel
    bit: int | None = None           # BITFLIP / STUCK_AT: chosen bit; None = random bit
    bits: int = 1                    # BITFLIP: number of distinct bits flipped
    stuck: int = 1                   # STUCK_AT: the bit is forced to this (0 or 1)
    factor: float = 1.0              # SCALE
    values: tuple[float, ...] = ()   # SET: one value, or one per position
    ramp: float = 0.0                # DEGRADE: relative error added per step
    layout: BitLayout = BitLayout.NATIVE

    def __post_init__(self):
        object.__setattr__(self, "model", parse_enum(ValueModel, self.model, "value model"))
        object.__setattr__(self, "layout", parse_enum(BitLayout, self.layout, "bit layout"))
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        m = self.model
        width = LAYOUT_BITS.get(self.layout)
        if self.bit is not None:
            if m not in (ValueModel.BITFLIP, ValueModel.STUCK_AT):
                raise SpecError(f"'bit' applies to bitflip and stuck_at, not {m.value}")
            if self.bit < 0 or (width is not None and self.bit >= width):
                raise SpecError(f"bit {self.bit} is outside the {self.layout.value} layout "
                                f"(0..{(width or 64) - 1})")
        if m is ValueModel.BITFLIP:
            if self.bits < 1 or (width is not None and self.bits > width):
                raise SpecError(f"bits must be 1..{width or 64}, got {self.bits}")
            if self.bit is not None and self.bits != 1:
                raise SpecError("give either a chosen 'bit' or a count of random 'bits', not both")
        if m is ValueModel.STUCK_AT and self.stuck not in (0, 1):
            raise SpecError(f"stuck-at value must be 0 or 1, got {self.stuck}")
        if m is ValueModel.SET and not self.values:
            raise SpecError("value model 'set' needs replacement values")
        if m is ValueModel.SCALE and not math.isfinite(self.factor):
            raise SpecError(f"scale factor must be finite, got {self.factor}")
        if m is ValueModel.DEGRADE and (not math.isfinite(self.ramp) or self.ramp == 0):
            raise SpecError(f"degrade needs a finite non-zero ramp, got {self.ramp}")


@dataclass(frozen=True)
class PositionSpec:
    """Which elements of the operand are hit (canonical layout)."""

    mode: PositionMode = PositionMode.RANDOM
    indices: tuple[tuple[int, ...], ...] = ()
    count: int = 1     # RANDOM: elements; CONSECUTIVE / GROUPS: elements per group
    groups: int = 1    # GROUPS: most groups in the repeated range (1..groups drawn at random)

    def __post_init__(self):
        object.__setattr__(self, "mode", parse_enum(PositionMode, self.mode, "position mode"))
        object.__setattr__(self, "indices", tuple(tuple(int(i) for i in ix) for ix in self.indices))
        if self.mode is PositionMode.EXPLICIT and not self.indices:
            raise SpecError("explicit positions need at least one index")
        if self.mode is not PositionMode.EXPLICIT and self.indices:
            raise SpecError(f"indices given but position mode is {self.mode.value}")
        if self.count < 1 or self.groups < 1:
            raise SpecError("position count and groups must be at least 1")

    def check(self, shape: tuple[int, ...], what: str = "operand") -> None:
        """Raise SpecError naming the offending index when a position does not fit `shape`."""
        size = int(np.prod(shape)) if shape else 1
        if self.mode is PositionMode.EXPLICIT:
            for ix in self.indices:
                if len(ix) != len(shape):
                    raise SpecError(f"position {_fmt(ix)} has {len(ix)} dimensions but the "
                                    f"{what} has shape {_fmt(shape)}")
                for d, (i, n) in enumerate(zip(ix, shape)):
                    if not 0 <= i < n:
                        raise SpecError(f"position {_fmt(ix)} is outside the {what} of shape "
                                        f"{_fmt(shape)} (dimension {d}: {i} not in 0..{n - 1})")
        elif self.mode is PositionMode.RANDOM and self.count > size:
            raise SpecError(f"{self.count} random positions exceed the {size} elements "
                            f"of the {what} of shape {_fmt(shape)}")
        elif self.mode is PositionMode.CONSECUTIVE and self.count > (shape[-1] if shape else 1):
            raise SpecError(f"{self.count} consecutive elements exceed the last dimension "
                            f"of the {what} of shape {_fmt(shape)}")
        elif self.mode is PositionMode.GROUPS and self.count > size:
            raise SpecError(f"groups of {self.count} exceed the {what} of shape {_fmt(shape)}")

    def resolve(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """Flat (row-major, canonical layout) indices of the hit elements."""
        self.check(shape)
        return self._draw(shape, rng)

    def _draw(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """resolve() once the positions are known to fit `shape` (check)."""
        size = int(np.prod(shape)) if shape else 1
        if self.mode is PositionMode.EXPLICIT:
            return np.ravel_multi_index(tuple(np.array(self.indices).T), shape).astype(np.int64)
        if self.mode is PositionMode.RANDOM:
            return np.sort(rng.choice(size, size=self.count, replace=False)).astype(np.int64)
        if self.mode is PositionMode.CONSECUTIVE:
            last = shape[-1]
            row = int(rng.integers(size // last))
            start = int(rng.integers(last // self.count)) * self.count  # aligned, as a SIMD lane
            return row * last + start + np.arange(self.count, dtype=np.int64)
        n_groups = int(rng.integers(1, min(self.groups, size // self.count) + 1))
        span = n_groups * self.count
        start = int(rng.integers(size - span + 1))
        return start + np.arange(span, dtype=np.int64)


@dataclass(frozen=True)
class Duration:
    kind: DurationKind = DurationKind.TRANSIENT
    steps: int = 1
    probability: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "kind", parse_enum(DurationKind, self.kind, "duration"))
        if self.steps < 1:
            raise SpecError(f"duration steps must be at least 1, got {self.steps}")
        if not 0.0 < self.probability <= 1.0:
            raise SpecError(f"probability must be in (0, 1], got {self.probability}")

    def active(self, step: int, start: int, seed: int, attempt: int = 0) -> bool:
        """Whether the fault fires at `step` (deterministic in seed, step and attempt: a
        replayed step redraws an intermittent fault with attempt > 0)."""
        if step < start:
            return False
        k = self.kind
        if k is DurationKind.TRANSIENT:
            return step == start
        if k is DurationKind.STEPS:
            return step < start + self.steps
        if k is DurationKind.PERMANENT:
            return True
        key = [seed, step, 0x1A7] + ([attempt] if attempt else [])
        return bool(np.random.default_rng(key).random() < self.probability)

    def last_step(self, start: int) -> int | None:
        """The last step the fault can fire at, None when it never stops."""
        if self.kind is DurationKind.TRANSIENT:
            return start
        if self.kind is DurationKind.STEPS:
            return start + self.steps - 1
        return None


@dataclass(frozen=True)
class FaultSpec:
    """One fault: what, where and when."""

    site: Site
    value: ValueSpec
    positions: PositionSpec = field(default_factory=PositionSpec)
    layer: str | None = None      # layer name (None only for whole-model state sites)
    tensor: str | None = None     # PARAM: 'weight' (default) or 'bias'; OPT_STATE: 'm' or 'v'
    replica: int = 0
    step: int = 0                 # global training step of the (first) injection
    duration: Duration = field(default_factory=Duration)
    seed: int = 0
    #: None: explicit positions are in the layout of the API the fault is handed to (the
    #: canonical one for campaign files and faultlab.keras, torch's own for
    #: faultlab.torch.Injector); "canonical": they are canonical whatever takes them
    positions_layout: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "site", parse_enum(Site, self.site, "site"))
        if self.positions_layout not in (None, "canonical"):
            raise SpecError(f"positions_layout must be None or 'canonical', got "
                            f"{self.positions_layout!r} (faultlab.fault converts torch-layout "
                            f"positions)", "positions")
        if self.replica < 0:
            raise SpecError(f"replica must be >= 0, got {self.replica}")
        if self.step < 0:
            raise SpecError(f"step must be >= 0, got {self.step}")
        if self.layer is None:
            raise SpecError(f"site {self.site.value} needs a layer")
        # Which tensor names an injector offers is the injector's business (check_operand:
        # the canonical CANONICAL_TENSORS unless its operand entry lists more, as
        # faultlab.torch.Injector's do: "weight_hh_l0", "h_n", "exp_avg", ...).
        if self.tensor is not None and (not isinstance(self.tensor, str) or not self.tensor
                                        or not self.tensor.isprintable()):
            raise SpecError(f"tensor must be a non-empty name, got {self.tensor!r}", "tensor")
        if self.value.model is ValueModel.SET and self.positions.mode is PositionMode.EXPLICIT:
            n, k = len(self.value.values), len(self.positions.indices)
            if n not in (1, k):
                raise SpecError(f"{n} replacement values for {k} positions")

    def active(self, step: int, attempt: int = 0) -> bool:
        return self.duration.active(step, self.step, self.seed, attempt)

    def resolve(self, shape: tuple[int, ...], dtype: str, step: int) -> "Corruption":
        """Resolve positions and random parameters against an operand at `step`.

        Positions and chosen bits depend only on the fault's seed, so a permanent fault keeps
        hitting the same unit; random replacement values are redrawn each step."""
        return resolve(self.value, self.positions, shape, dtype,
                       np.random.default_rng([self.seed, 0xFA17]),
                       np.random.default_rng([self.seed, step, 0x5EED]),
                       onset=step - self.step)


@dataclass(frozen=True)
class Corruption:
    """A fault resolved against one operand: what a framework kernel executes.

    `index` and `src` are flat indices in the canonical layout; a backend remaps them."""

    model: ValueModel
    index: np.ndarray                    # int64 flat indices of the hit elements
    layout: BitLayout                    # concrete layout (never NATIVE)
    masks: np.ndarray | None = None      # BITFLIP / STUCK_AT: uint64 bit masks per element
    stuck: int = 1
    values: np.ndarray | None = None     # SET / RANDOM: float64 replacements per element
    src: np.ndarray | None = None        # COPY: flat source indices per element
    factor: float = 1.0                  # SCALE / DEGRADE multiplier


def _random_masks(rng, n: int, width: int, k: int) -> np.ndarray:
    """n masks, each with k distinct random bits set among `width` (vectorised)."""
    order = np.argsort(rng.random((n, width)), axis=1)[:, :k]
    return np.bitwise_or.reduce(np.left_shift(np.uint64(1), order.astype(np.uint64)), axis=1)


def _random_finite(rng, n: int, layout: BitLayout) -> np.ndarray:
    """Random bit patterns of the layout's width, redrawn until finite, as float64."""
    out = np.empty(n, dtype=np.float64)
    todo = np.arange(n)
    width = LAYOUT_BITS[layout]
    while todo.size:
        hi = np.uint64((1 << width) - 1) if width < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
        raw = rng.integers(0, hi, size=todo.size, dtype=np.uint64, endpoint=True)
        vals = bits_to_float(raw, layout)
        ok = np.isfinite(vals)
        out[todo[ok]] = vals[ok]
        todo = todo[~ok]
    return out


#: the dtypes faultlab corrupts, for messages
CORRUPTIBLE = ", ".join(DTYPE_LAYOUT)


def check_corruption(value: ValueSpec, positions: PositionSpec, shape: tuple[int, ...] | None,
                     dtype: str | None, what: str = "tensor") -> BitLayout | None:
    """Every rule that ties a fault's value and positions to the operand it hits (`shape`,
    `dtype`; either may be None when not known): the dtype can be corrupted, an int8 tensor
    only in the int8 layout, a chosen `bit` and the number of random `bits` fit the layout's
    width, positions fit the shape, `copy` has another element to copy from, `set` has one
    value or one per element. Returns the concrete layout (None when the dtype is not known).

    The one copy of these rules: resolve() runs it on every resolution, check_operand (what
    `faultlab validate`, the campaign runner and the injectors' arm-time checks use) before
    anything runs. A one-line SpecError whose `field` names the part at fault ("site" for an
    operand that cannot be corrupted, "layout", "bit", "bits", "positions", "value")."""
    if shape is not None:
        try:
            positions.check(tuple(shape), what=what)
        except SpecError as e:
            raise SpecError(str(e), "positions") from None
    if dtype is None:
        return None
    if dtype not in DTYPE_LAYOUT:
        raise SpecError(f"cannot corrupt the {what} of dtype {dtype} (faultlab corrupts "
                        f"{CORRUPTIBLE} values)", "site")
    layout = DTYPE_LAYOUT[dtype] if value.layout is BitLayout.NATIVE else value.layout
    if dtype == "int8" and layout is not BitLayout.INT8:
        raise SpecError(f"the {what} is int8: it cannot be corrupted in the {layout.value} "
                        f"layout (use layout int8 or native)", "layout")
    width = LAYOUT_BITS[layout]
    native = f", the native layout of its {dtype}" if value.layout is BitLayout.NATIVE else ""
    m = value.model
    if m in (ValueModel.BITFLIP, ValueModel.STUCK_AT) and value.bit is not None \
            and not 0 <= value.bit < width:
        raise SpecError(f"bit {value.bit} is outside the {layout.value} layout of the {what} "
                        f"(bits 0..{width - 1}{native})", "bit")
    if m is ValueModel.BITFLIP and value.bit is None and value.bits > width:
        raise SpecError(f"cannot flip {value.bits} distinct bits in the {width}-bit "
                        f"{layout.value} layout of the {what} (bits 1..{width}{native})", "bits")
    if m is ValueModel.COPY and shape is not None and (int(np.prod(shape)) if shape else 1) < 2:
        raise SpecError(f"value copy needs an operand of at least two elements (the {what} "
                        f"has shape {_fmt(shape) or 'scalar'})", "value")
    if m is ValueModel.SET and len(value.values) != 1:
        n = (len(positions.indices) if positions.mode is PositionMode.EXPLICIT else
             positions.count if positions.mode in (PositionMode.RANDOM,
                                                   PositionMode.CONSECUTIVE) else None)
        if n != len(value.values):
            hit = f"{n} positions" if n is not None else "a random number of elements (groups)"
            raise SpecError(f"{len(value.values)} replacement values for {hit} (give 1"
                            f"{'' if n is None else f' or {n}'})", "values")
    return layout


def resolve(value: ValueSpec, positions: PositionSpec, shape: tuple[int, ...], dtype: str,
            place_rng: np.random.Generator, value_rng: np.random.Generator,
            onset: int = 0) -> Corruption:
    """Resolve a value and position spec against an operand of `shape` and `dtype` (checked
    first by check_corruption)."""
    shape = tuple(shape)
    layout = check_corruption(value, positions, shape, dtype)
    idx = positions._draw(shape, place_rng)
    n = idx.size
    width = LAYOUT_BITS[layout]
    m = value.model
    kw: dict = {}
    if m is ValueModel.BITFLIP:
        if value.bit is not None:
            kw["masks"] = np.full(n, np.uint64(1) << np.uint64(value.bit), dtype=np.uint64)
        else:
            kw["masks"] = _random_masks(place_rng, n, width, value.bits)
    elif m is ValueModel.STUCK_AT:
        bits = (np.full(n, value.bit, dtype=np.uint64) if value.bit is not None
                else place_rng.integers(0, width, size=n).astype(np.uint64))
        kw["masks"] = np.left_shift(np.uint64(1), bits)
        kw["stuck"] = value.stuck
    elif m is ValueModel.SET:
        vals = np.asarray(value.values, dtype=np.float64)
        kw["values"] = np.broadcast_to(vals, (n,)).copy()
    elif m is ValueModel.RANDOM:
        kw["values"] = _random_finite(value_rng, n, layout)
    elif m is ValueModel.COPY:
        size = int(np.prod(shape)) if shape else 1
        off = place_rng.integers(1, size, size=n)  # never the element itself
        kw["src"] = ((idx + off) % size).astype(np.int64)
    elif m is ValueModel.SCALE:
        kw["factor"] = value.factor
    elif m is ValueModel.DEGRADE:
        kw["factor"] = 1.0 + value.ramp * (max(onset, 0) + 1)
    return Corruption(model=m, index=idx, layout=layout, **kw)


def _fmt(ix) -> str:
    return "/".join(str(int(i)) for i in ix)


# --- range checks against what an injector can reach ---------------------------------------------
#
# The injectors (faultlab.keras's and faultlab.torch's) check a fault when it is armed, with
# these, so a fault that names a replica, layer, site or position the injector does not have is
# a one-line SpecError (`field` set) listing the valid choices, never a fault that silently
# does not fire. Operands are given as an injector knows them:
# {layer: {Site | "bias": (canonical shape, dtype) or None when the shape is not known}}.

def choices(items, limit: int = 10) -> str:
    """`items` for a one-line message: all of them, or the first `limit`, '...' and the count."""
    items = [str(i) for i in items]
    if not items:
        return "none"
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items)} in all)"


def _name(text, limit: int = 60) -> str:
    s = str(text)
    return repr(s if len(s) <= limit else s[:limit] + "...")


#: the tensor names every injector understands (campaign files' `tensor` column): a layer's
#: weight or bias (param, grad_wt, opt_state) and Adam's first / second moments (opt_state)
CANONICAL_TENSORS = ("weight", "bias", "m", "v")


def operand_key(fault: FaultSpec):
    """The operand a fault targets in an operand table: "bias" for a bias parameter or bias
    gradient (tensor="bias"), else its site."""
    if fault.tensor == "bias" and fault.site in (Site.PARAM, Site.GRAD_WT, Site.OPT_STATE,
                                                 Site.HOST_STATE):
        return "bias"
    return fault.site


def check_replica(fault: FaultSpec, replicas: int, owner: str = "this strategy") -> None:
    """SpecError (field "replica") unless 0 <= fault.replica < replicas."""
    if not 0 <= fault.replica < replicas:
        valid = "0" if replicas == 1 else f"0-{replicas - 1}"
        raise SpecError(f"fault replica {fault.replica} is out of range: {owner} has {replicas} "
                        f"replica{'s' if replicas != 1 else ''} (valid: {valid})", "replica")


def check_layer(fault: FaultSpec, layers) -> None:
    """SpecError (field "layer") unless fault.layer is one of `layers` (names, in order)."""
    if fault.layer in layers:
        return
    names = list(layers)
    msg = f"unknown layer {_name(fault.layer)}: valid layers are {choices(names)}"
    if len(names) > 10:
        import difflib
        close = difflib.get_close_matches(str(fault.layer), names, n=3, cutoff=0.6)
        if close:
            msg += f"; did you mean {', '.join(close)}?"
    raise SpecError(msg, "layer")


def check_operand(fault: FaultSpec, entry) -> tuple[tuple[int, ...], str] | None:
    """The (shape, dtype) of the operand `fault` targets in a layer's operand `entry`
    ({Site | "bias": (shape, dtype) or None}), checked against the fault by
    check_corruption (positions, dtype, layout, bit, bits: the rules resolve() applies when
    the fault fires) as far as the shape and dtype are known (None is returned when the
    shape is not). SpecError with field "site" when the layer has no such operand or its
    dtype cannot be corrupted, else the field check_corruption names."""
    key = operand_key(fault)
    tensors = entry.get("tensors", CANONICAL_TENSORS)
    if fault.tensor is not None and fault.tensor not in tensors:
        valid = choices(sorted(tensors))
        raise SpecError(f"unknown tensor {_name(fault.tensor)} for site {fault.site.value} "
                        f"on layer {_name(fault.layer)}: valid tensors are {valid}", "tensor")
    if key not in entry:
        sites = choices(s.value for s in Site if s in entry)
        what = f"site {fault.site.value}"
        if key == "bias":
            what += " with tensor 'bias'"
            why = " (the layer has no bias)"
        else:
            why = ""
        raise SpecError(f"{what} is not available on layer {_name(fault.layer)}{why}: valid "
                        f"sites are {sites}", "site")
    operand = entry[key]
    if operand is None:
        return None
    dtype = operand[1] if len(operand) > 1 else None
    what = (f"{fault.site.value} operand{' (bias)' if key == 'bias' else ''} of layer "
            f"{_name(fault.layer)}")
    if operand[0] is None:
        check_corruption(fault.value, fault.positions, None, dtype, what)
        return None
    shape = tuple(int(d) for d in operand[0])
    if any(d < 0 for d in shape):
        raise SpecError(f"the {what} has an unknown dimension (shape {_fmt(shape)}): give "
                        f"the injector a fully defined input shape", "positions")
    check_corruption(fault.value, fault.positions, shape, dtype, what)
    return shape, dtype


def check_target(fault: FaultSpec, operands, replicas: int | None = None,
                 owner: str = "this strategy") -> tuple[tuple[int, ...], str] | None:
    """Check a fault against an injector's targets before it is armed: replica (when the
    replica count is known), layer, site and positions (see check_operand). `operands`:
    {layer: {Site | "bias": (shape, dtype) or None}}, layers in the order to list them."""
    if replicas is not None:
        check_replica(fault, replicas, owner)
    check_layer(fault, operands)
    return check_operand(fault, operands[fault.layer])


# --- torch's own layout <-> the canonical one -----------------------------------------------------

#: sites whose operand is a weight-shaped tensor (a parameter, its gradient or its state)
WEIGHT_SITES = (Site.FWD_WEIGHT, Site.BWD_WEIGHT, Site.GRAD_WT, Site.PARAM, Site.OPT_STATE,
                Site.HOST_STATE)

#: the position layouts faultlab.fault and faultlab.torch.Injector take
POSITION_LAYOUTS = ("torch", "canonical")


def torch_perm(site: Site, ndim: int) -> tuple[int, ...]:
    """Axis i of an operand in torch's own layout holds canonical axis perm[i]: weights
    (out, in, kh, kw) <- HWIO and (out, in) <- (in, out); 4-D activations NCHW <- NHWC; any
    other operand is the same in both layouts. (What the torch injector's remapping does.)"""
    if Site(site) in WEIGHT_SITES:
        return (3, 2, 0, 1) if ndim == 4 else (1, 0) if ndim == 2 else tuple(range(ndim))
    return (0, 3, 1, 2) if ndim == 4 else tuple(range(ndim))


def torch_to_canonical(site: Site, index) -> tuple[int, ...]:
    """A position (or shape) in torch's layout of `site`'s operand -> the canonical one."""
    index = tuple(int(i) for i in index)
    out = [0] * len(index)
    for i, p in enumerate(torch_perm(site, len(index))):
        out[p] = index[i]
    return tuple(out)


def canonical_to_torch(site: Site, index) -> tuple[int, ...]:
    """A canonical position (or shape) of `site`'s operand -> torch's layout."""
    index = tuple(int(i) for i in index)
    return tuple(index[p] for p in torch_perm(site, len(index)))


# --- the fault builder ---------------------------------------------------------------------------

_VALUE_KW = ("bit", "bits", "stuck", "factor", "values", "ramp", "layout")


def _close(word, names) -> str:
    import difflib
    close = difflib.get_close_matches(str(word).strip().lower(), [str(n) for n in names], n=3,
                                      cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _member(cls, value, what: str, field_: str):
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).strip().lower())
    except ValueError:
        names = [m.value for m in cls]
        raise SpecError(f"unknown {what} {_name(value)}: valid {what}s are {', '.join(names)}"
                        f"{_close(value, names)}", field_) from None


def fault(site, layer, *, step: int = 0, replica: int = 0, value="bitflip", positions=None,
          count: int = 1, duration="transient", duration_steps: int = 1,
          probability: float = 1.0, tensor: str | None = None, seed: int = 0,
          positions_layout: str | None = None, **value_kw) -> FaultSpec:
    """A :class:`FaultSpec` from plain arguments, for any framework.

    site: a :class:`Site` or its name ("fwd_output", "param", ...); layer: the layer's name
    (faultlab.torch takes torch's module paths); positions: explicit indices (a list of index
    tuples) or, without them, `count` random elements; value: the value model ("bitflip",
    "zero", "nan", "set", ...) and `value_kw` its ValueSpec parameters (bit, bits, stuck,
    factor, values, ramp, layout: the bit layout, "bf16"...); duration: "transient",
    "steps" (`duration_steps` steps), "intermittent" (`probability`) or "permanent";
    tensor: which tensor of the layer (param / opt_state: "bias", "m", "v"; faultlab.torch:
    any parameter, buffer, optimizer state, named input or output: "weight_hh_l0",
    "running_mean", "exp_avg", "h_n", "query", ...).

    positions_layout: None (the default) leaves explicit positions in the layout of the API
    the fault is handed to: the canonical one (NHWC / HWIO / (in, out)) for campaign files
    and faultlab.keras, torch's own (NCHW / (out, in, kh, kw)) for faultlab.torch.Injector;
    "canonical" pins them to the canonical layout; "torch" converts torch-layout positions
    to canonical ones here. ``layout="torch"`` / ``layout="canonical"`` mean the same
    (any other `layout` is the value's bit layout).

    Every mistake is a one-line SpecError naming the valid choices (and close names)."""
    site = _member(Site, site, "site", "site")
    vmodel = _member(ValueModel, value, "value", "value")
    dkind = _member(DurationKind, duration, "duration", "duration")
    if "layout" in value_kw and str(value_kw["layout"]).strip().lower() in POSITION_LAYOUTS:
        if positions_layout is not None:
            raise SpecError("give the positions' layout once (layout= or positions_layout=)",
                            "positions")
        positions_layout = str(value_kw.pop("layout")).strip().lower()
    unknown = [k for k in value_kw if k not in _VALUE_KW]
    if unknown:
        raise SpecError(f"unknown argument {unknown[0]!r} to fault(): value parameters are "
                        f"{', '.join(_VALUE_KW)}{_close(unknown[0], _VALUE_KW)}", "value")
    if not isinstance(layer, str) or not layer:
        raise SpecError(f"layer must be a non-empty name, got {layer!r}", "layer")
    if positions_layout is not None:
        positions_layout = _member_str(positions_layout, POSITION_LAYOUTS, "positions layout")
    if "values" in value_kw:
        v = value_kw["values"]
        value_kw["values"] = (v,) if isinstance(v, (int, float)) else tuple(v)
    if "layout" in value_kw:
        value_kw["layout"] = _member(BitLayout, value_kw["layout"], "bit layout", "layout")
    if positions is not None and len(positions) > 0:
        try:
            idx = tuple(tuple(int(i) for i in p) for p in positions)
        except TypeError:
            raise SpecError(f"positions must be a list of index tuples, e.g. [(0, 3)]; got "
                            f"{_name(positions)}", "positions") from None
        if positions_layout == "torch":
            idx = tuple(torch_to_canonical(site, ix) for ix in idx)
        pos = PositionSpec(PositionMode.EXPLICIT, indices=idx)
    else:
        pos = PositionSpec(PositionMode.RANDOM, count=count)
    if positions_layout == "torch":
        positions_layout = "canonical"
    try:
        return FaultSpec(site=site, value=ValueSpec(vmodel, **value_kw), positions=pos,
                         layer=layer, tensor=tensor, replica=replica, step=step,
                         duration=Duration(dkind, steps=duration_steps, probability=probability),
                         seed=seed, positions_layout=positions_layout)
    except TypeError as e:  # a parameter of the wrong type
        raise SpecError(f"invalid fault argument: {e}") from None


def _member_str(value, names, what: str) -> str:
    v = str(value).strip().lower()
    if v not in names:
        raise SpecError(f"unknown {what} {_name(value)}: valid {what}s are {', '.join(names)}"
                        f"{_close(value, names)}", "positions")
    return v


# --- the ISCA'23 artifact's fault models -------------------------------------------------------

ISCA_STAGES = ("fwrd_inject", "bkwd_inject")


def isca_fault(fmodel: str, stage: str, layer: str, positions: tuple[tuple[int, ...], ...],
               values: tuple[float, ...]) -> tuple[Site, str, ValueSpec, PositionSpec]:
    """Map an ISCA (stage, fmodel, target_layer, inj_pos, inj_values) onto faultlab's model.

    Returns (site, base layer name, value spec, position spec). Replacement values given in the
    file are exact (model SET at the listed positions); without them the fmodel's own
    distribution is used. `_16` fmodels corrupt the value in the bf16 layout (the TPU's)."""
    fm = fmodel.strip().upper()
    if stage not in ISCA_STAGES:
        raise SpecError(f"unknown stage {stage!r} (expected fwrd_inject or bkwd_inject)")
    base = layer
    operand = ("input" if fm.startswith(("INPUT", "N64_INPUT")) else
               "weight" if fm.startswith(("WT", "N64_WT")) else "output")
    if fm not in ISCA_FMODELS:
        raise SpecError(f"unknown ISCA fmodel {fmodel!r} (expected one of: "
                        f"{', '.join(sorted(ISCA_FMODELS))})")
    if stage == "fwrd_inject":
        if layer.endswith(("_grad_in", "_grad_wt")):
            raise SpecError(f"layer {layer!r} is a backward site but stage is fwrd_inject")
        site = {"input": Site.FWD_INPUT, "weight": Site.FWD_WEIGHT, "output": Site.FWD_OUTPUT}[operand]
    else:
        if layer.endswith("_grad_in"):
            base = layer[: -len("_grad_in")]
            site = {"input": Site.BWD_INPUT, "weight": Site.BWD_WEIGHT,
                    "output": Site.GRAD_IN}[operand]
        elif layer.endswith("_grad_wt"):
            base = layer[: -len("_grad_wt")]
            if operand != "output":
                raise SpecError(f"operand faults ({fmodel}) on the weight-gradient computation "
                                f"({layer}) are not supported; use an output fault model")
            site = Site.GRAD_WT
        else:
            raise SpecError(f"backward layer {layer!r} must end in _grad_in or _grad_wt")
    layout = BitLayout.BF16 if fm.endswith("_16") else BitLayout.NATIVE
    if positions:
        pos = PositionSpec(PositionMode.EXPLICIT, indices=positions)
        if values:
            return site, base, ValueSpec(ValueModel.SET, values=values), pos
    n = 64 if fm.startswith("N64") else 16 if fm.startswith("N16") or fm.endswith("_GLB") else 1
    glb = fm.endswith("_GLB")
    if not positions:
        pos = (PositionSpec(PositionMode.GROUPS, count=n, groups=64) if glb else
               PositionSpec(PositionMode.CONSECUTIVE, count=n) if n > 1 else
               PositionSpec(PositionMode.RANDOM, count=1))
    if fm in ("INPUT", "INPUT_16", "WT", "WT_16", "RBFLIP"):
        val = ValueSpec(ValueModel.BITFLIP, layout=layout)
    elif fm in ("RD", "N16_RD", "RD_GLB"):
        val = ValueSpec(ValueModel.RANDOM)
    elif fm == "ZERO":
        val = ValueSpec(ValueModel.ZERO)
    else:  # the *_CORRECT and N64 models copy values from elsewhere in the tensor
        val = ValueSpec(ValueModel.COPY)
    return site, base, val, pos


ISCA_FMODELS = frozenset({
    "INPUT", "INPUT_16", "WT", "WT_16", "RBFLIP", "RD", "RD_CORRECT", "ZERO", "N16_RD",
    "N16_RD_CORRECT", "RD_GLB", "RD_CORRECT_GLB", "N64_INPUT", "N64_WT", "N64_INPUT_16",
    "N64_WT_16", "N64_INPUT_GLB", "N64_WT_GLB",
})
