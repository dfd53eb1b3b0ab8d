"""Momentum SGD run forwards and backwards without losing a bit (the ``reverse`` engine).

    v_{t+1} = β v_t − η̃_t g_t,      θ_{t+1} = θ_t + v_{t+1}

run backwards as θ_t = θ_{t+1} − v_{t+1} and v_t = (v_{t+1} + η̃_t g_t) / β
(Maclaurin, Duvenaud & Adams 2015), exactly.

Exact reversal.  In floating point, (βv)/β ≠ v and θ + v − v ≠ θ, and the errors grow
like β^{-t} on the way back.  So θ and v live on a fixed-point grid (int64 counts of
2^-48): adding and subtracting grid numbers is exact.  Multiplying by β = n/d is not:
v·n/d drops the remainder v mod d.  That remainder is what we keep — pushed onto one
exact unbounded integer per parameter, B ← B·d + (v mod d) — and, so that the buffer
grows by only log₂(d/n) = log₂(1/β) bits per step rather than log₂ d, n values are
taken back out of it, p = B mod n, B ← B div n, and used as the low digit of the product:

    v ← (v div d)·n + p          (exact to n grid points; invertible: v div n, v mod n give
                                  back v div d and p, and p pushed back onto B restores it)

:class:`RemainderBuffer` holds the B's as little-endian base-2³² digits in a (digits × P)
uint32 array; push and pop are schoolbook multiply/divide by a small integer, vectorised
over the P parameters (HIPS hypergrad used numpy object arrays of Python ints for the same
job).  Memory: θ and v on the grid (2 int64 per parameter) plus ~log₂(1/β) bits per
parameter per step — 0.15 bits for β = 0.9.
"""

from __future__ import annotations

import math

from ddref import backend

RADIX_BITS = 48                   # the grid: int64 counts of 2^-48


class ReversalError(ValueError):
    """The reverse engine cannot represent this training run exactly; the message names the fix."""


class RemainderBuffer:
    """One exact integer B ≥ 0 per parameter, used as a stack of mixed-radix digits:

        push(r, d):  B ← B·d + r      (0 ≤ r < d)
        pop(n):      r ← B mod n,  B ← B div n      (undoes push(r, n))

    B is stored as little-endian base-2³² digits, a list of uint32 arrays of length P,
    one array per digit; push and pop are the schoolbook multiply and divide by a small
    integer, carried digit by digit, vectorised over the parameters.  Memory: the largest
    B's bit length, rounded up to 32, per parameter.
    """

    DIGIT = 32
    MASK = (1 << 32) - 1

    def __init__(self, size):
        self.size = size
        self.digits = []

    def push(self, r, d):
        xp = backend.xp()
        carry = r.astype(xp.uint64)
        for i, digit in enumerate(self.digits):
            product = digit.astype(xp.uint64) * d + carry        # < 2^32·d + d < 2^64
            self.digits[i] = (product & self.MASK).astype(xp.uint32)
            carry = product >> self.DIGIT
        if bool(carry.any()):
            self.digits.append(carry.astype(xp.uint32))

    def pop(self, n):
        xp = backend.xp()
        remainder = xp.zeros(self.size, dtype=xp.uint64)
        for i in reversed(range(len(self.digits))):
            value = (remainder << self.DIGIT) | self.digits[i].astype(xp.uint64)   # < n·2^32
            self.digits[i] = (value // n).astype(xp.uint32)
            remainder = value % n
        while self.digits and not bool(self.digits[-1].any()):
            self.digits.pop()
        return remainder.astype(xp.int64)

    @property
    def nbytes(self):
        return sum(int(d.nbytes) for d in self.digits)

    def bit_lengths(self):
        """The bit length of each parameter's B (0 where B = 0): the information it holds."""
        xp = backend.xp()
        lengths = xp.zeros(self.size, dtype=xp.int64)
        for i, digit in enumerate(self.digits):
            nonzero = digit > 0
            top = xp.floor(xp.log2(digit[nonzero].astype(xp.float64))).astype(xp.int64)
            lengths[nonzero] = 32 * i + top + 1
        return lengths

    def is_empty(self):
        return not self.digits


class ExactMomentum:
    """Momentum SGD on a fixed-point grid (int64 counts of 2^-48), run forwards and back
    without losing a bit.  θ and v are flat int64 vectors over the parameters (sorted keys).

        forward(g, η):      v ← β v − η g  (β = n/d, exact, see module docstring);  θ ← θ + v
        undo_position():    θ ← θ − v, returns θ_t as floats
        undo_velocity(g, η): v ← (v + η g) / β, exact inverse of the product
    """

    def __init__(self, params, velocity, n, d, radix_bits=RADIX_BITS):
        self.keys = sorted(params)
        self.shapes = {k: params[k].shape for k in self.keys}
        self.dtype = params[self.keys[0]].dtype
        self.n, self.d = n, d
        self.scale = 2.0 ** radix_bits
        self.limit = 2 ** (62 - radix_bits)           # |θ|, |v| below this: no int64 overflow
        self.theta = self.to_grid(self.flatten(params), "the weights", 0)
        self.velocity = self.to_grid(self.flatten(velocity), "the velocities", 0)
        self.start_theta = self.theta.copy()           # kept for the tests and the notebook only
        self.buffer = RemainderBuffer(self.theta.size)
        self.steps = 0

    # -- grid <-> floats
    def flatten(self, tree):
        xp = backend.xp()
        return xp.concatenate([xp.ravel(tree[k]).astype(xp.float64) for k in self.keys])

    def unflatten(self, flat):
        out, offset = {}, 0
        for k in self.keys:
            size = math.prod(self.shapes[k])
            out[k] = flat[offset: offset + size].reshape(self.shapes[k]).astype(self.dtype)
            offset += size
        return out

    def to_grid(self, values, what, step):
        xp = backend.xp()
        biggest = float(xp.abs(values).max()) if values.size else 0.0
        if not biggest < self.limit:        # also catches NaN
            self._out_of_range(what, biggest, step)
        return xp.rint(values * self.scale).astype(xp.int64)

    def check_range(self, ints, what, step):
        """Grid values stay below 2^62 in magnitude, so a sum of two never wraps around."""
        biggest = int(backend.xp().abs(ints).max()) if ints.size else 0
        if biggest >= 2 ** 62:
            self._out_of_range(what, biggest / self.scale, step)

    def _out_of_range(self, what, biggest, step):
        raise ReversalError(
            f"{what} reached |x| = {biggest:.3g} at inner step {step}, outside the reverse "
            f"engine's fixed-point range ±{self.limit}: the inner training is diverging; "
            f"lower --distill-lr or --momentum, or use --engine checkpoint.")

    def to_float(self, ints):
        return ints.astype(backend.xp().float64) / self.scale

    def params(self):
        return self.unflatten(self.to_float(self.theta))

    def velocity_floats(self):
        return self.unflatten(self.to_float(self.velocity))

    # -- the step and its inverse
    def forward(self, grads, lr, step=None):
        step = self.steps if step is None else step
        self.velocity = (self._multiply(self.velocity, self.n, self.d)         # β v − η g
                         - self.to_grid(self.flatten(grads) * float(lr), "η g", step))
        self.check_range(self.velocity, "the velocities", step + 1)
        self.theta = self.theta + self.velocity
        self.check_range(self.theta, "the weights", step + 1)
        self.steps += 1

    def undo_position(self):
        self.theta = self.theta - self.velocity
        return self.params()

    def undo_velocity(self, grads, lr):
        self.velocity = self.velocity + self.to_grid(self.flatten(grads) * float(lr), "η g",
                                                     self.steps - 1)
        self.velocity = self._multiply(self.velocity, self.d, self.n)            # ÷ β, exactly
        self.steps -= 1

    def _multiply(self, ints, n, d):
        """ints · n/d on the grid, the lost remainder kept: push (x mod d), take p < n back."""
        self.buffer.push(ints % d, d)
        return (ints // d) * n + self.buffer.pop(n)

    def recovered_start(self):
        """True when θ and v are back at the start bit for bit and the buffer is empty."""
        xp = backend.xp()
        return (self.steps == 0 and bool(xp.array_equal(self.theta, self.start_theta))
                and self.buffer.is_empty())

    @property
    def nbytes(self):
        """Bytes held: θ and v on the grid, and the remainder buffer."""
        return int(self.theta.nbytes + self.velocity.nbytes) + self.buffer.nbytes
