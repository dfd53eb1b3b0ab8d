"""ddref.reversible: the momentum unroll and its four meta-gradient engines, exact reversal
of training, and truncation.

Every engine must agree on the same unroll (checkpoint = backgrad to 1e-12, reverse = naive
to 1e-10, float64), the momentum meta-gradient must match central finite differences of a
meta-loss written out independently, and the reverse engine must land back on θ_0 bit for bit.
"""

import numpy as np
import pytest
from autograd import grad

from ddref import engines, hypergrad, losses, reversible
from ddref.distill import DistillConfig, Distiller
from ddref.evaluate import train_on_steps
from ddref.reversible import ExactMomentum, RemainderBuffer, ReversalError
from ddref.unroll import softplus, step_schedule, unroll

from problems import EPOCHS, MODELS, STEPS, make_problem
T = STEPS * EPOCHS
BETA = 0.9
TOL = 1e-6




@pytest.fixture(scope="module", params=sorted(MODELS))
def momentum_solved(request):
    """A problem and every engine's answer with β = 0.9, computed once per model."""
    p = make_problem(request.param)
    answers = {e: engines.meta_gradient(e, **p, momentum=BETA) for e in engines.ENGINES}
    return request.param, p, answers


def reference_momentum_loss(p, x_distilled, raw_lrs, momentum=BETA, steps=None):
    """The meta-loss written out without ddref.unroll / ddref.reversible: v ← βv − η g,
    θ ← θ + v over the (epoch, step) pairs (the first ``steps`` of them), then ℓ on the real batch."""
    apply, targets = p["apply"], p["targets"]

    def loss(params, x, t):
        return losses.cross_entropy(apply(params, x), t)

    theta = p["theta0"]
    velocity = {k: np.zeros_like(v) for k, v in theta.items()}
    pairs = [(e, s) for e in range(raw_lrs.shape[0]) for s in range(raw_lrs.shape[1])]
    for e, s in pairs[:steps]:
        lr = np.logaddexp(0.0, raw_lrs[e, s])
        g = grad(loss)(theta, x_distilled[s], targets)
        velocity = {k: momentum * velocity[k] - lr * g[k] for k in theta}
        theta = {k: theta[k] + velocity[k] for k in theta}
    return loss(theta, p["x_real"], p["real_targets"])


# ---------------------------------------------------------------------------- β = 0 is today's GD


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_zero_momentum_is_plain_gradient_descent_bit_for_bit(dtype):
    p = make_problem("mlp", dtype=dtype)
    lrs = softplus(p["raw_lrs"])
    plain = unroll(p["apply"], p["theta0"], p["x_distilled"], p["targets"], lrs, return_all=True)
    heavy = reversible.momentum_unroll(p["apply"], p["theta0"], p["x_distilled"], p["targets"], lrs,
                                       momentum=0.0, return_all=True)
    assert len(plain) == len(heavy) == T + 1
    for a, b in zip(plain, heavy):
        for k in a:
            assert a[k].dtype == b[k].dtype == np.dtype(dtype)
            assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("engine", ["naive", "backgrad", "checkpoint"])
def test_zero_momentum_engines_match_hypergrad_backgrad(engine, rel_err):
    p = make_problem("mlp")
    want = hypergrad.backgrad(**p)
    got = engines.meta_gradient(engine, **p, momentum=0.0, specialise=False)
    assert rel_err(got.loss, want.loss) < 1e-12
    assert rel_err(got.grad_x, want.grad_x) < 1e-12
    assert rel_err(got.grad_raw_lrs, want.grad_raw_lrs) < 1e-12


def test_evaluation_trains_with_the_same_momentum():
    p = make_problem("mlp")
    lrs = softplus(p["raw_lrs"])
    args = (p["apply"], p["theta0"], p["x_distilled"], p["targets"], lrs)
    want = reversible.momentum_unroll(*args, momentum=BETA)
    got = train_on_steps(*args, momentum=BETA)
    plain = train_on_steps(*args)
    for k in want:
        assert np.array_equal(got[k], want[k])
        assert not np.allclose(plain[k], want[k])


# ---------------------------------------------------------------------------- engines agree (β = 0.9)


def test_momentum_changes_the_meta_gradient(momentum_solved, rel_err):
    _, p, mg = momentum_solved
    plain = engines.meta_gradient("backgrad", **p, momentum=0.0, specialise=False)
    assert rel_err(plain.grad_x, mg["naive"].grad_x) > 1e-3


def test_loss_is_the_momentum_meta_loss(momentum_solved, rel_err):
    _, p, mg = momentum_solved
    want = reference_momentum_loss(p, p["x_distilled"], p["raw_lrs"])
    for engine in ("naive", "backgrad", "checkpoint"):
        assert rel_err(mg[engine].loss, want) < 1e-12, engine
    assert rel_err(mg["reverse"].loss, want) < 1e-10      # trained on the 2^-48 grid


def test_backgrad_and_checkpoint_match_naive(momentum_solved, rel_err):
    _, p, mg = momentum_solved
    for engine in ("backgrad", "checkpoint"):
        assert rel_err(mg[engine].grad_x, mg["naive"].grad_x) < 1e-10, engine
        assert rel_err(mg[engine].grad_raw_lrs, mg["naive"].grad_raw_lrs) < 1e-10, engine


@pytest.mark.parametrize("segment", [1, 2, 4, T, T + 3])
def test_checkpoint_equals_backgrad_for_any_segment(segment, rel_err):
    p = make_problem("mlp")
    want = engines.meta_gradient("backgrad", **p, momentum=BETA)
    got = engines.meta_gradient("checkpoint", **p, momentum=BETA, segment=segment)
    assert rel_err(got.loss, want.loss) < 1e-12
    assert rel_err(got.grad_x, want.grad_x) < 1e-12
    assert rel_err(got.grad_raw_lrs, want.grad_raw_lrs) < 1e-12


def test_reverse_matches_naive(momentum_solved, rel_err):
    _, p, mg = momentum_solved
    assert rel_err(mg["reverse"].grad_x, mg["naive"].grad_x) < 1e-10
    assert rel_err(mg["reverse"].grad_raw_lrs, mg["naive"].grad_raw_lrs) < 1e-10
    for s in range(STEPS):
        assert rel_err(mg["reverse"].grad_x[s], mg["naive"].grad_x[s]) < 1e-10


# ---------------------------------------------------------------------------- finite differences


def test_momentum_gradients_match_finite_differences(momentum_solved, rel_err, central_fd):
    """Images along ĝ + r̂ (see test_hypergrad), and every raw learning rate."""
    name, p, mg = momentum_solved
    x, raw = p["x_distilled"], p["raw_lrs"]
    rng = np.random.default_rng(5)
    g = mg["naive"].grad_x
    for _attempt in range(5):
        r = rng.normal(size=x.shape)
        d = g / np.linalg.norm(g) + r / np.linalg.norm(r)
        fd = central_fd(lambda t: reference_momentum_loss(p, x + t * d, raw), eps=1e-4, halvings=6)
        if fd is not None:
            break
    else:
        pytest.fail(f"{name}: every direction straddled a switching surface")
    for engine in engines.ENGINES:
        assert rel_err(fd, np.vdot(mg[engine].grad_x, d)) < TOL, engine
    indices = list(np.ndindex(raw.shape)) if name == "mlp" else [(0, 0), (EPOCHS - 1, STEPS - 1)]
    for i in indices:
        e = np.zeros_like(raw)
        e[i] = 1.0
        fd = central_fd(lambda t: reference_momentum_loss(p, x, raw + t * e), eps=1e-4, halvings=6)
        assert fd is not None, f"raw_lrs{i}: finite difference straddles a switch"
        for engine in engines.ENGINES:
            assert rel_err(fd, mg[engine].grad_raw_lrs[i]) < TOL, (engine, i)


# ---------------------------------------------------------------------------- exact reversal


def on_grid(theta, bits=30):
    """θ rounded to multiples of 2^-bits: float64 values the fixed-point grid holds exactly."""
    return {k: np.round(v * 2.0 ** bits) / 2.0 ** bits for k, v in theta.items()}


@pytest.mark.parametrize("dtype,beta", [("float64", 0.9), ("float32", 0.9), ("float64", 0.5),
                                        ("float64", 0.95)])
def test_reverse_recovers_theta0_bit_for_bit(dtype, beta):
    p = make_problem("mlp", dtype=dtype, steps=3, epochs=4)
    if dtype == "float64":
        p["theta0"] = on_grid(p["theta0"])
    lrs = softplus(p["raw_lrs"])
    schedule = step_schedule(*lrs.shape)
    n, d = reversible.momentum_fraction(beta)
    state = ExactMomentum(p["theta0"], reversible.zero_velocity(p["theta0"]), n, d)
    forward_thetas = []
    for e, s in schedule:
        forward_thetas.append(state.params())
        g = reversible.inner_grad(p["apply"], state.params(), p["x_distilled"][s], p["targets"])
        state.forward(g, lrs[e, s])
    assert state.buffer.nbytes > 0
    for t in reversed(range(len(schedule))):
        e, s = schedule[t]
        theta_t = state.undo_position()
        for k in theta_t:                                   # every intermediate θ_t, bit for bit
            assert np.array_equal(theta_t[k], forward_thetas[t][k]), (t, k)
        g = reversible.inner_grad(p["apply"], theta_t, p["x_distilled"][s], p["targets"])
        state.undo_velocity(g, lrs[e, s])
    assert state.recovered_start()
    recovered = state.params()
    for k in recovered:
        assert recovered[k].dtype == np.dtype(dtype)
        assert np.array_equal(recovered[k], p["theta0"][k]), k
    assert not np.any(state.velocity)


def test_reverse_engine_ends_where_it_started():
    p = make_problem("lenet")
    trace = []
    problem = reversible.Window(p["apply"], p["x_distilled"], p["targets"], softplus(p["raw_lrs"]),
                                step_schedule(EPOCHS, STEPS), BETA, losses.cross_entropy,
                                p["x_real"], p["real_targets"])
    theta0 = on_grid(p["theta0"])
    reversible.reverse(problem, theta0, reversible.zero_velocity(theta0), trace=trace)
    assert trace[0].recovered_start()
    assert all(np.array_equal(trace[0].params()[k], theta0[k]) for k in theta0)


def test_an_unreproducible_gradient_is_caught(monkeypatch):
    """If a step's gradient on the way back differs by more than the grid resolves (a
    nondeterministic kernel), the reverse engine must say so rather than return a silently
    wrong meta-gradient."""
    p = make_problem("mlp")
    calls = []
    exact_grad = reversible.inner_grad

    def flaky_grad(*args, **kwargs):
        calls.append(1)
        g = exact_grad(*args, **kwargs)
        if len(calls) == T + 3:       # backward: T+1 undoes step T-1, T+2 its HVP, T+3 undoes step T-2
            g = {k: v * (1 + 1e-9) for k, v in g.items()}   # ≫ the 2^-48 grid after × η
        return g

    monkeypatch.setattr(reversible, "inner_grad", flaky_grad)
    with pytest.raises(ReversalError, match="did not come back to θ_0"):
        engines.meta_gradient("reverse", **p, momentum=BETA)


def test_float_momentum_cannot_be_reversed():
    """Why the grid is needed: (θ + v) − v and (βv − ηg + ηg)/β in floats miss θ_0 after a
    few steps (if this ever passed, the fixed-point machinery would be unnecessary)."""
    p = make_problem("mlp", steps=3, epochs=4)
    lrs = softplus(p["raw_lrs"])
    schedule = step_schedule(*lrs.shape)
    theta, velocity = p["theta0"], reversible.zero_velocity(p["theta0"])
    grads = []
    for e, s in schedule:
        g = reversible.inner_grad(p["apply"], theta, p["x_distilled"][s], p["targets"])
        grads.append(g)
        velocity = {k: BETA * velocity[k] - lrs[e, s] * g[k] for k in theta}
        theta = {k: theta[k] + velocity[k] for k in theta}
    for (e, s), g in zip(reversed(schedule), reversed(grads)):
        theta = {k: theta[k] - velocity[k] for k in theta}
        velocity = {k: (velocity[k] + lrs[e, s] * g[k]) / BETA for k in theta}
    assert not all(np.array_equal(theta[k], p["theta0"][k]) for k in theta)


def test_remainder_buffer_is_exact_big_integer_arithmetic():
    """Against Python's unbounded ints: push/pop sequences give the same B and the same digits."""
    rng = np.random.default_rng(0)
    size = 7
    buffer = RemainderBuffer(size)
    reference = [0] * size
    history = []
    for _ in range(300):
        d = int(rng.integers(2, 1025))
        r = rng.integers(0, d, size=size)
        buffer.push(r, d)
        reference = [b * d + int(x) for b, x in zip(reference, r)]
        n = int(rng.integers(1, d + 1))
        popped = buffer.pop(n)
        assert popped.tolist() == [b % n for b in reference]
        reference = [b // n for b in reference]
        history.append((r, d, popped, n))
    value = [sum(int(digit[i]) << (32 * j) for j, digit in enumerate(buffer.digits)) for i in range(size)]
    assert value == reference and max(reference) > 2 ** 64   # several digits deep
    assert buffer.bit_lengths().tolist() == [b.bit_length() for b in reference]
    for r, d, popped, n in reversed(history):                   # and all the way back
        buffer.push(popped, n)
        assert np.array_equal(buffer.pop(d), r)
    assert buffer.is_empty()


@pytest.mark.parametrize("beta,bits", [(0.5, 1.0), (0.9, np.log2(10 / 9))])
def test_buffer_grows_by_log2_one_over_beta_bits_per_step(beta, bits):
    rng = np.random.default_rng(1)
    theta = {"w": rng.normal(size=500)}
    n, d = reversible.momentum_fraction(beta)
    state = ExactMomentum(theta, reversible.zero_velocity(theta), n, d)
    steps = 400
    for _ in range(steps):
        state.forward({"w": rng.normal(size=500)}, 0.01)
    stored_bits = 32 * len(state.buffer.digits)                # per parameter, rounded up to 32
    assert steps * bits - 32 < stored_bits <= steps * bits + 64


# ---------------------------------------------------------------------------- truncation


def test_truncating_to_all_steps_changes_nothing(rel_err):
    p = make_problem("mlp")
    full = engines.meta_gradient("backgrad", **p, momentum=BETA)
    for engine in engines.ENGINES:
        cut = engines.meta_gradient(engine, **p, momentum=BETA, truncate=T)
        assert rel_err(cut.grad_x, full.grad_x) < 1e-10, engine


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_truncation_differentiates_only_the_last_k_steps(engine, rel_err):
    p = make_problem("mlp")
    k = 2
    cut = engines.meta_gradient(engine, **p, momentum=BETA, truncate=k)
    exact = engines.meta_gradient("naive", **p, momentum=BETA)
    flat = cut.grad_raw_lrs.ravel()
    assert np.all(flat[:T - k] == 0) and np.all(flat[T - k:] != 0)
    assert rel_err(cut.loss, exact.loss) < 1e-10                         # the same θ_T
    # the last k steps' images are those of steps S-k … S-1 of the last epoch
    assert np.all(cut.grad_x[:STEPS - k] == 0)
    bias = reversible.compare(cut, exact)
    assert 0 < bias["rel_err_all"] and bias["cosine_all"] < 1 - 1e-6   # biased, and measured
    # a hand-made truncation: freeze θ_{T-k}, v_{T-k} and differentiate the rest with naive
    lrs = softplus(p["raw_lrs"])
    schedule = step_schedule(EPOCHS, STEPS)
    theta, velocity = reversible.train(p["apply"], p["theta0"], reversible.zero_velocity(p["theta0"]),
                                       p["x_distilled"], p["targets"], lrs, schedule[:T - k], BETA)
    problem = reversible.Window(p["apply"], p["x_distilled"], p["targets"], lrs, schedule[T - k:],
                                BETA, losses.cross_entropy, p["x_real"], p["real_targets"])
    _, grad_x, _ = reversible.naive(problem, theta, velocity)
    assert rel_err(cut.grad_x, grad_x) < 1e-10


def test_random_window_ends_at_a_random_step(rel_err):
    p = make_problem("mlp")
    k = 2
    ends = set()
    for seed in range(6):
        start, stop = reversible.window_bounds(T, k, "random", np.random.default_rng(seed))
        mg = engines.meta_gradient("backgrad", **p, momentum=BETA, truncate=k, window="random",
                                      rng=np.random.default_rng(seed))
        want = reference_momentum_loss(p, p["x_distilled"], p["raw_lrs"], steps=stop)
        assert stop - start == k and k <= stop <= T
        assert rel_err(mg.loss, want) < 1e-12
        nonzero = np.flatnonzero(mg.grad_raw_lrs.ravel())
        assert nonzero.tolist() == list(range(start, stop))
        ends.add(stop)
    assert len(ends) > 1
    draws = np.random.default_rng(0)                 # the end is uniform on {K, …, T}, both included
    stops = [reversible.window_bounds(T, k, "random", draws)[1] for _ in range(300)]
    assert set(stops) == set(range(k, T + 1))


def test_compare_of_a_gradient_with_itself():
    p = make_problem("mlp")
    mg = engines.meta_gradient("backgrad", **p)
    out = reversible.compare(mg, mg)
    assert out["cosine_all"] == pytest.approx(1.0, abs=1e-12) and out["rel_err_all"] == 0.0


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("options,words", [
    (dict(engine="magic"), "unknown meta-gradient engine"),
    (dict(momentum=1.0), "momentum must be in"),
    (dict(momentum=-0.1), "momentum must be in"),
    (dict(engine="reverse", momentum=0.0), "needs momentum > 0"),
    (dict(engine="reverse", momentum=0.123456789), "not a fraction"),
    (dict(truncate=T + 1), "truncate must be between 1"),
    (dict(truncate=2, window="random"), "give rng="),
    (dict(window="middle"), "window must be one of"),
    (dict(engine="checkpoint", segment=0), "segment"),
])
def test_bad_options_are_one_clear_error(options, words):
    p = make_problem("mlp")
    options = {"engine": "backgrad", "momentum": BETA, **options}
    with pytest.raises(ValueError, match=words):
        engines.meta_gradient(options.pop("engine"), **p, **options)


def test_diverging_training_leaves_the_grid_with_a_clear_error():
    p = make_problem("mlp")
    p["raw_lrs"] = p["raw_lrs"] + 1e5           # η̃ ≈ 1e5
    with pytest.raises(ReversalError, match="fixed-point range"):
        engines.meta_gradient("reverse", **p, momentum=BETA)


# ---------------------------------------------------------------------------- Algorithm 1


def test_distillation_with_the_reverse_engine(rel_err):
    """A few outer iterations: reverse and backgrad with the same momentum give the same run
    (to rounding); config checks name the option."""
    from ddref import data

    digits = data.load("digits", dtype="float64")
    values = dict(steps=2, epochs=2, batch_size=64, iterations=3, dtype="float64", eval_every=0,
                  eval_inits=2, checkpoint_every=0, seed=3, momentum=BETA)
    runs = {e: Distiller(DistillConfig(engine=e, **values), dataset=digits, progress=False).run()
            for e in ("backgrad", "reverse", "checkpoint")}
    base = runs["backgrad"]
    for engine in ("reverse", "checkpoint"):
        assert rel_err(runs[engine].x, base.x) < 1e-9, engine
        assert rel_err(runs[engine].history.losses, base.history.losses) < 1e-9, engine
    plain = Distiller(DistillConfig(engine="backgrad", **{**values, "momentum": 0.0}), dataset=digits,
                      progress=False).run()
    assert rel_err(plain.x, base.x) > 1e-6
    assert 0 <= base.accuracy().mean <= 1
    with pytest.raises(ValueError, match="needs momentum > 0"):
        DistillConfig(engine="reverse").validate()
    with pytest.raises(ValueError, match="truncate must be between"):
        DistillConfig(steps=2, epochs=2, truncate=5).validate()


# ---------------------------------------------------------------------------- memory


def test_memory_grows_like_t_sqrt_t_and_not_at_all():
    """tracemalloc peaks, in copies of θ, at T = 10, 40, 160 (10 steps × 1, 4, 16 epochs):
    backgrad grows by ~1 copy per step, checkpoint like 3√T, reverse not at all (its buffer
    is 0.15 bits per parameter per step).  Memory, unlike time, is reproducible."""
    import gc
    import tracemalloc

    def copies(engine, epochs):
        p = make_problem("mlp", steps=10, epochs=epochs)
        theta_bytes = sum(v.nbytes for v in p["theta0"].values())
        gc.collect()
        tracemalloc.start()
        try:
            engines.meta_gradient(engine, **p, momentum=BETA)
            return tracemalloc.get_traced_memory()[1] / theta_bytes
        finally:
            tracemalloc.stop()

    peaks = {e: [copies(e, epochs) for epochs in (1, 4, 16)] for e in ("backgrad", "checkpoint", "reverse")}
    growth = {e: [c - p[0] for c in p[1:]] for e, p in peaks.items()}
    assert growth["backgrad"][1] > 0.8 * 150                  # T: 150 more steps, ~150 more copies
    assert 0 < growth["checkpoint"][1] < 4 * np.sqrt(160)     # √T: 3√T copies held at most
    assert growth["checkpoint"][1] / growth["checkpoint"][0] < 4   # linear would be 150/30 = 5
    # reverse: only the integer buffer (log2(1/β) bits per parameter per step) and allocator
    # noise grow; the bound is 2× from T = 10 to T = 1,000
    assert peaks["reverse"][2] < 1.5 * peaks["reverse"][0]
