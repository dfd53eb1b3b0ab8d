"""The linear case of §3.4: every claim of ddref.linear as a test that fails if the claim is false."""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

from ddref import linear

# ---------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------


def random_problem(rng, n_points, dim, n_outputs=None):
    """Real data d (N, D), targets t (N,) or (N, K), and its optimum θ*."""
    d = rng.standard_normal((n_points, dim))
    t = rng.standard_normal((n_points,) if n_outputs is None else (n_points, n_outputs))
    return d, t, linear.least_squares_optimum(d, t)


def random_distilled(rng, n_distilled, dim, n_outputs=None, n_steps=None):
    """Arbitrary (not constructed) d̃, t̃, η̃ for one step, or T steps if n_steps is given."""
    lead = () if n_steps is None else (n_steps,)
    out = () if n_outputs is None else (n_outputs,)
    d = rng.standard_normal(lead + (n_distilled, dim))
    t = rng.standard_normal(lead + (n_distilled,) + out)
    lrs = rng.uniform(0.05, 0.5, size=lead) if n_steps is not None else rng.uniform(0.05, 0.5)
    return d, t, lrs


def initialisations(rng, theta_star, norms=(1e-3, 1.0, 1e3, 1e8)):
    """θ0 at several distances from θ*, in random directions."""
    for norm in norms:
        direction = rng.standard_normal(theta_star.shape)
        yield theta_star + norm * direction / np.linalg.norm(direction)


def sphere_samples(rng, shape, radius, n):
    """n points uniformly on the sphere ‖e‖_F = r of arrays of the given shape."""
    e = rng.standard_normal((n,) + shape)
    norms = np.sqrt(np.sum(e**2, axis=tuple(range(1, e.ndim)), keepdims=True))
    return radius * e / norms


def brute_force_max_error(residual_map, offset, radius, rng, n_samples=20000, n_starts=20, n_ascent=3000):
    """max ‖A e + b‖ over ‖e‖ = r by random sampling, then ascent from the best samples.

    The ascent is the minorise-maximise step for a convex function on a sphere,
    e ← r ∇f(e)/‖∇f(e)‖ with f(e) = ½‖Ae + b‖², which never decreases f.
    """
    def apply(e):  # A e + b for a batch e of shape (n,) + offset.shape
        return np.einsum("ij,nj...->ni...", residual_map, e) + offset

    def norms(x):
        return np.sqrt(np.sum(x**2, axis=tuple(range(1, x.ndim))))

    samples = sphere_samples(rng, offset.shape, radius, n_samples)
    values = norms(apply(samples))
    e = samples[np.argsort(values)[-n_starts:]]
    for _ in range(n_ascent):
        gradient = np.einsum("ji,nj...->ni...", residual_map, apply(e))
        length = norms(gradient).reshape((-1,) + (1,) * offset.ndim)
        e = np.where(length > 0, radius * gradient / np.maximum(length, 1e-300), e)
    return values.max(), norms(apply(e)).max()


# ---------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_outputs", [None, 3])
def test_optimum_has_zero_gradient_and_beats_perturbations(n_outputs):
    rng = np.random.default_rng(0)
    d, t, theta_star = random_problem(rng, 30, 5, n_outputs)
    gradient = grad(linear.loss)(theta_star, d, t)
    assert np.max(np.abs(gradient)) < 1e-12
    best = linear.loss(theta_star, d, t)
    for _ in range(10):
        assert linear.loss(theta_star + 1e-3 * rng.standard_normal(theta_star.shape), d, t) > best


@pytest.mark.parametrize("n_outputs", [None, 2])
def test_gradient_step_is_gradient_descent_on_the_distilled_loss(n_outputs):
    """θ1 = θ0 − η̃ ∇ℓ̃(θ0) with ℓ̃ = 1/(2M)‖d̃θ − t̃‖², the gradient taken by autograd."""
    rng = np.random.default_rng(1)
    d_distilled, t_distilled, lr = random_distilled(rng, 4, 6, n_outputs)
    theta0 = rng.standard_normal((6,) if n_outputs is None else (6, n_outputs))
    expected = theta0 - lr * grad(linear.loss)(theta0, d_distilled, t_distilled)
    np.testing.assert_allclose(linear.gradient_step(theta0, d_distilled, t_distilled, lr), expected,
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("n_outputs", [None, 2])
@pytest.mark.parametrize("n_steps", [1, 3])
def test_affine_error_map_reproduces_the_steps(n_steps, n_outputs):
    """θ_T − θ* = A(θ0 − θ*) + b for arbitrary d̃, t̃, η̃ and θ0."""
    rng = np.random.default_rng(2)
    _, _, theta_star = random_problem(rng, 20, 5, n_outputs)
    d_steps, t_steps, lrs = random_distilled(rng, 3, 5, n_outputs, n_steps=n_steps)
    residual_map, offset = linear.affine_error_map(d_steps, t_steps, lrs, theta_star)
    for theta0 in initialisations(rng, theta_star, norms=(0.1, 1.0, 10.0)):
        theta_final = linear.gradient_steps(theta0, d_steps, t_steps, lrs)
        np.testing.assert_allclose(theta_final - theta_star,
                                   residual_map @ (theta0 - theta_star) + offset, rtol=1e-11, atol=1e-11)
    if n_steps == 1:  # the one-step signature agrees with the T = 1 form
        one_map, one_offset = linear.affine_error_map(d_steps[0], t_steps[0], lrs[0], theta_star)
        np.testing.assert_allclose(one_map, residual_map, atol=1e-14)
        np.testing.assert_allclose(one_offset, offset, atol=1e-14)


# ---------------------------------------------------------------------------------
# M ≥ D: the exact construction
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_outputs", [None, 3])
@pytest.mark.parametrize("dim, n_distilled", [(1, 1), (3, 3), (5, 5), (5, 8), (10, 10), (10, 17)])
@pytest.mark.parametrize("seed", [0, 1])
def test_full_rank_construction_sends_every_theta0_to_the_optimum(dim, n_distilled, seed, n_outputs):
    rng = np.random.default_rng(seed)
    _, _, theta_star = random_problem(rng, 3 * dim + 2, dim, n_outputs)
    lr = rng.uniform(0.01, 2.0)
    d_distilled, t_distilled = linear.construct_distilled(theta_star, n_distilled, lr, rng)

    np.testing.assert_allclose((lr / n_distilled) * d_distilled.T @ d_distilled, np.eye(dim), atol=1e-12)
    for theta0 in initialisations(rng, theta_star):
        theta1 = linear.gradient_step(theta0, d_distilled, t_distilled, lr)
        assert np.linalg.norm(theta1 - theta_star) < 1e-10 * max(1.0, np.linalg.norm(theta0 - theta_star))

    check = linear.check_distilled(d_distilled, t_distilled, lr, theta_star, radius=10.0)
    assert check.gram_rank == dim and check.uncorrected == 0
    assert check.residual_norm < 1e-12 and check.offset_norm < 1e-10
    assert check.worst_case_error < 1e-10 and check.expected_error < 1e-20
    assert check.exact


@pytest.mark.parametrize("dim, n_distilled", [(4, 4), (4, 9)])
def test_breaking_the_condition_breaks_exactness(dim, n_distilled):
    """Any d̃ᵀd̃ ≠ (M/η̃)I, even full rank, leaves some θ0 off θ*: worst case = r‖A‖₂ > 0."""
    rng = np.random.default_rng(3)
    theta_star = rng.standard_normal(dim)
    lr = 0.5
    d_distilled, _ = linear.construct_distilled(theta_star, n_distilled, lr, rng)
    d_distilled = d_distilled * np.linspace(0.9, 1.1, dim)  # still full rank, gram no longer ∝ I
    t_distilled = d_distilled @ theta_star  # b = 0
    check = linear.check_distilled(d_distilled, t_distilled, lr, theta_star, radius=2.0)
    assert check.gram_rank == dim and not check.exact
    assert check.residual_norm > 0.1
    assert check.worst_case_error == pytest.approx(2.0 * check.residual_norm, rel=1e-12)
    assert check.worst_case_error == pytest.approx(check.worst_case_bound, rel=1e-12)


# ---------------------------------------------------------------------------------
# M < D: the impossibility, shown by the eigenvalues of A
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_outputs", [None, 2])
@pytest.mark.parametrize("dim, n_distilled", [(2, 1), (5, 2), (5, 4), (12, 7)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fewer_points_than_features_never_correct_the_null_space(dim, n_distilled, seed, n_outputs):
    """For arbitrary d̃, t̃, η̃ with M < D: A keeps D − M unit eigenvalues on null(d̃),
    b has no component there, so the error along those directions is carried unchanged."""
    rng = np.random.default_rng(seed)
    _, _, theta_star = random_problem(rng, 3 * dim, dim, n_outputs)
    d_distilled, t_distilled, lr = random_distilled(rng, n_distilled, dim, n_outputs)

    count, eigenvectors = linear.unit_eigenvalues(d_distilled, lr)
    null_basis = linear.uncorrected_directions(d_distilled)
    assert count == dim - n_distilled == null_basis.shape[1]
    projector = null_basis @ null_basis.T
    np.testing.assert_allclose(eigenvectors @ eigenvectors.T, projector, atol=1e-10)  # same subspace

    residual_map, offset = linear.affine_error_map(d_distilled, t_distilled, lr, theta_star)
    np.testing.assert_allclose(residual_map @ null_basis, null_basis, atol=1e-12)
    np.testing.assert_allclose(null_basis.T @ offset, 0.0, atol=1e-12)
    for theta0 in initialisations(rng, theta_star, norms=(1.0, 1e3)):
        theta1 = linear.gradient_step(theta0, d_distilled, t_distilled, lr)
        np.testing.assert_allclose(null_basis.T @ (theta1 - theta_star), null_basis.T @ (theta0 - theta_star),
                                   rtol=1e-9, atol=1e-9)

    check = linear.check_distilled(d_distilled, t_distilled, lr, theta_star, radius=3.0)
    assert check.uncorrected == dim - n_distilled and check.gram_rank == n_distilled
    assert check.worst_case_error >= 3.0 * (1 - 1e-12) and not check.exact
    n_out = 1 if n_outputs is None else n_outputs
    assert check.expected_error >= n_out * (dim - n_distilled) * (1 - 1e-12)


@pytest.mark.parametrize("dim, n_distilled", [(2, 1), (3, 1), (3, 2), (6, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_best_construction_below_rank_leaves_exactly_the_predicted_error(dim, n_distilled, seed):
    """The projector construction with M < D: worst case r (attained along null(d̃)),
    expected error D − M (the floor) — checked against brute-force search."""
    rng = np.random.default_rng(seed)
    theta_star = rng.standard_normal(dim)
    radius, lr = 2.5, 0.3
    d_distilled, t_distilled = linear.construct_distilled(theta_star, n_distilled, lr, rng)
    check = linear.check_distilled(d_distilled, t_distilled, lr, theta_star, radius=radius)
    assert check.worst_case_error == pytest.approx(radius, rel=1e-12)
    assert check.expected_error == pytest.approx(dim - n_distilled, rel=1e-12)
    assert check.residual_norm == pytest.approx(1.0, rel=1e-12)

    residual_map, offset = linear.affine_error_map(d_distilled, t_distilled, lr, theta_star)
    best_sampled, best_ascended = brute_force_max_error(residual_map, offset, radius, rng)
    assert best_sampled <= check.worst_case_error * (1 + 1e-12)
    assert best_ascended == pytest.approx(check.worst_case_error, rel=1e-9)

    # and the error is really nonzero along the uncorrected directions
    null_basis = linear.uncorrected_directions(d_distilled)
    theta0 = theta_star + radius * null_basis[:, 0]
    theta1 = linear.gradient_step(theta0, d_distilled, t_distilled, lr)
    assert np.linalg.norm(theta1 - theta_star) == pytest.approx(radius, rel=1e-12)


# ---------------------------------------------------------------------------------
# The closed forms: worst case on a sphere, expected error over N(θ*, I)
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_outputs", [None, 2])
@pytest.mark.parametrize("dim, n_distilled, n_steps", [(2, 1, 1), (2, 3, 1), (3, 2, 1), (4, 2, 2), (5, 3, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_worst_case_closed_form_matches_brute_force(dim, n_distilled, n_steps, seed, n_outputs):
    rng = np.random.default_rng(seed)
    _, _, theta_star = random_problem(rng, 4 * dim, dim, n_outputs)
    d_steps, t_steps, lrs = random_distilled(rng, n_distilled, dim, n_outputs, n_steps=n_steps)
    radius = 1.7
    value, theta0 = linear.worst_case_error(d_steps, t_steps, lrs, theta_star, radius)

    # the returned θ0 is on the sphere and attains the value
    assert np.linalg.norm(theta0 - theta_star) == pytest.approx(radius, rel=1e-12)
    attained = np.linalg.norm(linear.gradient_steps(theta0, d_steps, t_steps, lrs) - theta_star)
    assert attained == pytest.approx(value, rel=1e-10)

    residual_map, offset = linear.affine_error_map(d_steps, t_steps, lrs, theta_star)
    best_sampled, best_ascended = brute_force_max_error(residual_map, offset, radius, rng)
    assert best_sampled <= value * (1 + 1e-12)  # nothing beats the closed form
    assert best_ascended == pytest.approx(value, rel=1e-7)  # and search finds it
    assert value <= linear.worst_case_bound(d_steps, t_steps, lrs, theta_star, radius) * (1 + 1e-12)


def test_worst_case_on_a_circle_including_the_hard_case():
    """D = 2 with a dense grid of angles, for offsets along, across and off the top direction."""
    residual_map = np.diag([1.0, 0.5])
    angles = np.linspace(0, 2 * np.pi, 200001)
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    for offset in ([0.0, 0.1], [0.0, 0.6], [0.3, 0.0], [0.2, -0.4], [0.0, 0.0]):
        offset = np.array(offset)
        value, e = linear.max_error_on_sphere(residual_map, offset, 1.0)
        grid_max = np.linalg.norm(circle @ residual_map.T + offset, axis=1).max()
        assert value == pytest.approx(grid_max, rel=1e-9)
        assert np.linalg.norm(e) == pytest.approx(1.0, rel=1e-12)
    # Repeated top singular value with b (almost) orthogonal to it — what null spaces produce.
    # Hard case: y_3 = σ_3 c_3 / (σ_max² − σ_3²), the rest of the radius along the top pair.
    y3 = 0.5 * 0.4 / (1 - 0.25)
    exact = np.sqrt(1 - y3**2 + (0.5 * y3 + 0.4) ** 2)
    for top_offset in (0.0, 5e-15, 1e-9):
        value, _ = linear.max_error_on_sphere(np.diag([1.0, 1.0, 0.5]), np.array([top_offset, 0.0, 0.4]), 1.0)
        assert value == pytest.approx(exact, rel=1e-8)
    # A = 0: the error is ‖b‖ whatever θ0
    assert linear.max_error_on_sphere(np.zeros((2, 2)), np.array([0.3, 0.4]), 5.0)[0] == pytest.approx(0.5)


@pytest.mark.parametrize("n_outputs", [None, 3])
@pytest.mark.parametrize("n_steps", [1, 2])
def test_expected_error_closed_form(n_steps, n_outputs):
    """E‖Ae + b‖² = σ²K‖A‖_F² + ‖b‖²: exact against the cubature e ∈ {±σ√(DK) unit vectors}
    (exact for quadratics), and consistent with Monte Carlo."""
    rng = np.random.default_rng(4)
    dim, init_std = 4, 0.7
    _, _, theta_star = random_problem(rng, 12, dim, n_outputs)
    d_steps, t_steps, lrs = random_distilled(rng, 3, dim, n_outputs, n_steps=n_steps)
    closed = linear.expected_error(d_steps, t_steps, lrs, theta_star, init_std)

    size = theta_star.size
    points = init_std * np.sqrt(size) * np.concatenate([np.eye(size), -np.eye(size)])
    cubature = np.mean([
        np.sum((linear.gradient_steps(theta_star + p.reshape(theta_star.shape), d_steps, t_steps, lrs)
                - theta_star) ** 2) for p in points])
    assert closed == pytest.approx(cubature, rel=1e-11)

    residual_map, offset = linear.affine_error_map(d_steps, t_steps, lrs, theta_star)
    e = init_std * rng.standard_normal((200000,) + theta_star.shape)
    squared = np.sum((np.einsum("ij,nj...->ni...", residual_map, e) + offset) ** 2,
                     axis=tuple(range(1, e.ndim)))
    assert abs(squared.mean() - closed) < 5 * squared.std() / np.sqrt(len(squared))


# ---------------------------------------------------------------------------------
# M < D: the impossibility, shown by learning
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, n_distilled, seed", [(3, 1, 0), (6, 3, 0), (6, 5, 2), (10, 6, 1)])
def test_learning_below_rank_plateaus_at_the_floor(dim, n_distilled, seed):
    rng = np.random.default_rng(seed)
    theta_star = rng.standard_normal(dim)
    learned = linear.learn_distilled(theta_star, n_distilled, rng, n_iters=600)
    floor = dim - n_distilled
    assert learned.floor == floor
    assert np.all(learned.history >= floor * (1 - 1e-12))  # a lower bound, at every iterate
    assert learned.final_error == pytest.approx(floor, rel=1e-6)  # and the optimiser reaches it
    assert np.all(learned.lrs > 0)


@pytest.mark.parametrize("dim, n_distilled, seed", [(3, 3, 0), (6, 6, 0), (6, 8, 2), (8, 8, 1)])
def test_learning_with_enough_points_reaches_zero_and_the_condition(dim, n_distilled, seed):
    rng = np.random.default_rng(seed)
    theta_star = rng.standard_normal(dim)
    learned = linear.learn_distilled(theta_star, n_distilled, rng, n_iters=1000)
    assert learned.final_error < 1e-8
    d_distilled, t_distilled, lr = learned.d_distilled[0], learned.t_distilled[0], learned.lrs[0]
    np.testing.assert_allclose(d_distilled.T @ d_distilled, (n_distilled / lr) * np.eye(dim),
                               atol=1e-4 * n_distilled / lr)
    check = linear.check_distilled(d_distilled, t_distilled, lr, theta_star)
    assert check.gram_rank == dim and check.worst_case_error < 1e-4


@pytest.mark.parametrize("n_outputs", [None, 2])
@pytest.mark.parametrize("n_steps", [1, 2])
def test_learning_objective_gradient_matches_finite_differences(n_steps, n_outputs):
    rng = np.random.default_rng(5)
    theta_star = rng.standard_normal((4,) if n_outputs is None else (4, n_outputs))
    params = linear.initial_params(theta_star, 3, n_steps, rng)
    params = {k: v + 0.1 * rng.standard_normal(np.shape(v)) for k, v in params.items()}

    def objective(p):
        return linear.learning_objective(p, theta_star)

    analytic = grad(objective)(params)
    step = 1e-5
    for key, value in params.items():
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            plus = {**params, key: value.copy()}
            minus = {**params, key: value.copy()}
            plus[key][index] += step
            minus[key][index] -= step
            numeric[index] = (objective(plus) - objective(minus)) / (2 * step)
        rel_err = np.linalg.norm(analytic[key] - numeric) / np.linalg.norm(numeric)
        assert rel_err < 1e-6, key


def test_learned_learning_rate_is_softplus_positive():
    raw = anp.array([-50.0, -3.0, 0.0, 4.0, 800.0])
    assert np.all(linear.softplus(raw) > 0)
    y = np.array([1e-6, 0.3, 2.0, 40.0])
    np.testing.assert_allclose(linear.softplus(linear.inverse_softplus(y)), y, rtol=1e-12)


# ---------------------------------------------------------------------------------
# T steps of M points (beyond the paper)
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_outputs", [None, 2])
@pytest.mark.parametrize("dim, n_steps, n_distilled", [(6, 2, 3), (6, 3, 2), (7, 3, 3), (5, 1, 5), (5, 2, 6), (10, 4, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_multistep_construction_is_exact_when_steps_times_points_cover_the_dimension(
        dim, n_steps, n_distilled, seed, n_outputs):
    rng = np.random.default_rng(seed)
    _, _, theta_star = random_problem(rng, 3 * dim, dim, n_outputs)
    d_steps, t_steps, lrs = linear.construct_multistep(theta_star, n_steps, n_distilled, 0.4, rng)
    assert d_steps.shape == (n_steps, n_distilled, dim)
    for theta0 in initialisations(rng, theta_star):
        theta_final = linear.gradient_steps(theta0, d_steps, t_steps, lrs)
        assert np.linalg.norm(theta_final - theta_star) < 1e-10 * max(1.0, np.linalg.norm(theta0 - theta_star))
    check = linear.check_distilled(d_steps, t_steps, lrs, theta_star, radius=5.0)
    assert check.exact and check.uncorrected == 0 and check.gram_rank == dim


@pytest.mark.parametrize("dim, n_steps, n_distilled", [(6, 2, 2), (7, 3, 2), (10, 3, 3), (5, 4, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_multistep_cannot_be_exact_when_steps_times_points_fall_short(dim, n_steps, n_distilled, seed):
    """T·M < D: the construction leaves exactly D − T·M directions (worst case r); and for
    arbitrary d̃_i, t̃_i, η̃_i the error along ∩ null(d̃_i) is carried through all T steps."""
    rng = np.random.default_rng(seed)
    theta_star = rng.standard_normal(dim)
    d_steps, t_steps, lrs = linear.construct_multistep(theta_star, n_steps, n_distilled, 0.4, rng)
    check = linear.check_distilled(d_steps, t_steps, lrs, theta_star, radius=2.0)
    assert check.uncorrected == dim - n_steps * n_distilled and not check.exact
    assert check.worst_case_error == pytest.approx(2.0, rel=1e-12)
    assert check.expected_error == pytest.approx(dim - n_steps * n_distilled, rel=1e-12)

    d_steps, t_steps, lrs = random_distilled(rng, n_distilled, dim, n_steps=n_steps)
    null_basis = linear.uncorrected_directions(d_steps)
    assert null_basis.shape[1] == dim - n_steps * n_distilled
    for theta0 in initialisations(rng, theta_star, norms=(1.0, 100.0)):
        error0 = theta0 - theta_star
        error_final = linear.gradient_steps(theta0, d_steps, t_steps, lrs) - theta_star
        np.testing.assert_allclose(null_basis.T @ error_final, null_basis.T @ error0, rtol=1e-9, atol=1e-9)
        assert np.linalg.norm(null_basis.T @ error0) > 1e-3  # the predicted directions keep a nonzero error
    worst, _ = linear.worst_case_error(d_steps, t_steps, lrs, theta_star, radius=2.0)
    assert worst >= 2.0 * (1 - 1e-12)


@pytest.mark.parametrize("dim, n_steps, n_distilled", [(6, 2, 2), (6, 3, 2), (8, 3, 2)])
def test_learning_multistep_reaches_the_floor_max_zero_d_minus_tm(dim, n_steps, n_distilled):
    rng = np.random.default_rng(6)
    theta_star = rng.standard_normal(dim)
    learned = linear.learn_distilled(theta_star, n_distilled, rng, n_steps=n_steps, n_iters=600)
    floor = max(0, dim - n_steps * n_distilled)
    assert learned.floor == floor
    assert np.all(learned.history >= floor * (1 - 1e-12))
    if floor:
        assert learned.final_error == pytest.approx(floor, rel=1e-6)
    else:
        assert learned.final_error < 1e-8


# ---------------------------------------------------------------------------------
# Bad input, rank-deficient data, seeds
# ---------------------------------------------------------------------------------


def test_rank_deficient_data_raise_unless_min_norm_is_asked_for():
    rng = np.random.default_rng(7)
    d = rng.standard_normal((10, 3))
    d = np.column_stack([d, d[:, 0] + d[:, 1]])  # rank 3 < D = 4: θ* not unique
    t = rng.standard_normal(10)
    with pytest.raises(ValueError, match="min_norm=True"):
        linear.least_squares_optimum(d, t)
    theta_star = linear.least_squares_optimum(d, t, min_norm=True)
    np.testing.assert_allclose(theta_star, np.linalg.pinv(d) @ t, atol=1e-12)
    assert np.max(np.abs(grad(linear.loss)(theta_star, d, t))) < 1e-12  # still a minimiser
    # fewer points than features is rank deficient too
    with pytest.raises(ValueError, match="not unique"):
        linear.least_squares_optimum(rng.standard_normal((2, 5)), rng.standard_normal(2))


@pytest.mark.parametrize("lr", [0.0, -0.1, np.nan, np.inf])
def test_non_positive_or_non_finite_learning_rates_are_refused(lr):
    rng = np.random.default_rng(8)
    theta_star = rng.standard_normal(3)
    d_distilled, t_distilled = linear.construct_distilled(theta_star, 3, 0.5, rng)
    with pytest.raises(ValueError, match="learning rate|lr"):
        linear.gradient_step(theta_star, d_distilled, t_distilled, lr)
    with pytest.raises(ValueError):
        linear.check_distilled(d_distilled, t_distilled, lr, theta_star)
    with pytest.raises(ValueError):
        linear.construct_distilled(theta_star, 3, lr, rng)
    with pytest.raises(ValueError):
        linear.gradient_steps(theta_star, d_distilled[None], t_distilled[None], np.array([lr]))


def test_mismatched_shapes_are_refused_with_one_sentence():
    rng = np.random.default_rng(9)
    d, t = rng.standard_normal((10, 3)), rng.standard_normal(10)
    theta = rng.standard_normal(3)
    cases = [
        (lambda: linear.least_squares_optimum(d[:, 0], t), "2-D"),
        (lambda: linear.least_squares_optimum(d, t[:7]), "to match"),
        (lambda: linear.gradient_step(theta[:2], d, t, 0.1), "theta0 must have shape"),
        (lambda: linear.gradient_step(theta, d, rng.standard_normal((10, 2)), 0.1), r"\(3, 2\)"),
        (lambda: linear.gradient_step(theta, d, t, np.array([0.1, 0.2])), "scalar"),
        (lambda: linear.gradient_steps(theta, d[None], t[None], np.array([0.1, 0.2])), "one per step"),
        (lambda: linear.gradient_steps(theta, d, t, 0.1), r"\(T, M, D\)"),
        (lambda: linear.gradient_steps(theta, d[None], t[None, :5], np.array([0.1])), "to match"),
        (lambda: linear.expected_error(d, t, 0.1, theta[:2]), "theta_star must have shape"),
        (lambda: linear.uncorrected_directions(theta), r"\(M, D\)"),
        (lambda: linear.least_squares_optimum(np.full((10, 3), np.nan), t), "NaN"),
        (lambda: linear.learn_distilled(theta, 0, rng), "positive integer"),
        (lambda: linear.construct_multistep(theta, 0, 2, 0.1, rng), "positive integer"),
        (lambda: linear.max_error_on_sphere(np.eye(3), np.zeros(3), -1.0), "non-negative"),
        (lambda: linear.max_error_on_sphere(np.eye(3), np.zeros(2), 1.0), "square and match"),
        (lambda: linear.unit_eigenvalues(theta, 0.1), r"\(M, D\)"),
        (lambda: linear.expected_one_step_loss(d, t, d[:3, :2], t[:3], 0.1), "must match the features"),
        (lambda: linear.one_step_loss_floor(d, t, 0), "positive integer"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")  # one sentence


def test_same_seed_same_result():
    theta_star = np.random.default_rng(10).standard_normal(4)
    a = linear.construct_distilled(theta_star, 5, 0.3, np.random.default_rng(11))
    b = linear.construct_distilled(theta_star, 5, 0.3, np.random.default_rng(11))
    np.testing.assert_array_equal(a[0], b[0])
    first = linear.learn_distilled(theta_star, 2, np.random.default_rng(12), n_iters=50)
    second = linear.learn_distilled(theta_star, 2, np.random.default_rng(12), n_iters=50)
    np.testing.assert_array_equal(first.history, second.history)
    np.testing.assert_array_equal(first.d_distilled, second.d_distilled)
    assert first.d_distilled.dtype == np.float64


def test_learned_error_curve_shows_the_transition_at_m_equals_d():
    curve = linear.learned_error_curve(4, [3, 4], np.random.default_rng(13), n_iters=600)
    np.testing.assert_array_equal(curve.floor, [1, 0])
    assert np.all(curve.expected_error >= curve.floor * (1 - 1e-12))
    assert curve.expected_error[0] == pytest.approx(1.0, rel=1e-6) and curve.expected_error[1] < 1e-8
    assert curve.worst_case_error[0] >= 1 - 1e-12 and curve.worst_case_error[1] < 1e-4


# --- the general Algorithm 1 machinery tells the same story -------------------------
#
# distill_with_algorithm1 learns d̃ and η̃ (labels fixed) with ddref.hypergrad on the
# expected real loss over θ0 ~ N(0, I).  What the theory predicts for what it learns:
#   M ≥ D: A = I − (η̃/M) d̃ᵀd̃ = 0 and b = 0, so one step lands on θ* from every θ0;
#   M < D: A = I on null(d̃) whatever d̃; the best is A = the orthogonal projector onto
#          null(d̃) (eigenvalues 0 × M, 1 × (D − M)) with the offset as good as its row
#          space allows, and the loss stays above ½ Σ of the D − M smallest eigenvalues of dᵀd/N.


def _regression_problem(dim, seed):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((200, dim))
    theta_star = rng.standard_normal((dim, 1))
    return rng, d, d @ theta_star, theta_star


def _residual_map(d_distilled, lr):
    n_distilled, dim = d_distilled.shape
    return np.eye(dim) - lr / n_distilled * d_distilled.T @ d_distilled


def _best_real_loss_for_row_space(d, t, d_distilled):
    """The least expected real loss of any one step whose d̃ has the row space R of
    ``d_distilled``: A = the projector P_N onto null(d̃), and the offset c ∈ R fitted by
    least squares on the real data."""
    _, singular_values, right_t = np.linalg.svd(d_distilled)
    row_space = right_t[: np.sum(singular_values > 1e-10)].T   # (D, M)
    null_projector = np.eye(d.shape[1]) - row_space @ row_space.T
    coefficients, *_ = np.linalg.lstsq(d @ row_space, t, rcond=None)
    fit = np.sum((d @ row_space @ coefficients - t) ** 2)
    return (np.trace(null_projector @ d.T @ d @ null_projector) + fit) / (2 * len(d))


def _is_exact_design(d_distilled, t_distilled, lr, theta_star, tolerance=1e-8):
    residual_ok = np.linalg.norm(_residual_map(d_distilled, lr), 2) < tolerance
    check = linear.check_distilled(d_distilled, t_distilled, lr, theta_star, radius=10.0)
    return residual_ok and check.worst_case_error < 10 * tolerance


def _is_best_projector(d, t, d_distilled, t_distilled, lr, tolerance=1e-8):
    n_distilled, dim = d_distilled.shape
    eigenvalues = np.linalg.eigvalsh(_residual_map(d_distilled, lr))
    expected = np.r_[np.zeros(min(n_distilled, dim)), np.ones(max(dim - n_distilled, 0))]
    loss = linear.expected_one_step_loss(d, t, d_distilled, t_distilled, lr)
    best = _best_real_loss_for_row_space(d, t, d_distilled)
    return np.max(np.abs(eigenvalues - expected)) < tolerance and abs(loss - best) < tolerance * best


@pytest.mark.parametrize("n_outputs", [None, 2])
def test_expected_one_step_loss_is_the_cubature_mean(n_outputs):
    """E_{θ0 ~ N(0, I)} ℓ(θ1) in closed form against the exact cubature over θ0 ∈ {±√(DK) e_i}
    (θ1 is affine in θ0 and ℓ quadratic, so the mean over those points is the expectation)."""
    rng = np.random.default_rng(21)
    d, t, _ = random_problem(rng, 30, 4, n_outputs)
    d_distilled, t_distilled, lr = random_distilled(rng, 3, 4, n_outputs)
    theta_shape = (4,) if n_outputs is None else (4, n_outputs)
    size = int(np.prod(theta_shape))
    points = [sign * np.sqrt(size) * np.eye(size)[i].reshape(theta_shape)
              for i in range(size) for sign in (1, -1)]
    cubature = np.mean([linear.loss(linear.gradient_step(p, d_distilled, t_distilled, lr), d, t)
                        for p in points])
    assert linear.expected_one_step_loss(d, t, d_distilled, t_distilled, lr) == pytest.approx(cubature, rel=1e-12)


@pytest.mark.parametrize("n_distilled", [1, 3, 5, 7])
def test_no_one_step_design_beats_the_floor_and_the_construction_meets_it_for_m_at_least_d(n_distilled):
    rng = np.random.default_rng(22)
    dim = 5
    d, t, theta_star = random_problem(rng, 40, dim)
    floor = linear.one_step_loss_floor(d, t, n_distilled)
    least_squares = linear.loss(theta_star, d, t)
    for _ in range(200):
        d_distilled, t_distilled, lr = random_distilled(rng, n_distilled, dim)
        assert linear.expected_one_step_loss(d, t, d_distilled, t_distilled, lr) >= floor
    d_distilled, t_distilled = linear.construct_distilled(theta_star, n_distilled, 0.3, rng)
    constructed = linear.expected_one_step_loss(d, t, d_distilled, t_distilled, 0.3)
    if n_distilled >= dim:
        assert floor == pytest.approx(least_squares, rel=1e-12)
        assert constructed == pytest.approx(floor, rel=1e-9)
    else:
        assert floor > least_squares and constructed >= floor


@pytest.mark.parametrize("dim, n_distilled, seed", [(3, 3, 0), (5, 5, 3), (4, 6, 3)])
def test_algorithm1_reaches_the_exact_one_step_design_when_m_at_least_d(dim, n_distilled, seed):
    rng, d, t, theta_star = _regression_problem(dim, seed)
    result = linear.distill_with_algorithm1(d, t, n_distilled, rng)
    # d̃ᵀd̃ = (M/η̃)·I to rounding: every scaled singular value is 1, A = 0 ...
    assert result.residual_norm() < 1e-8
    np.testing.assert_allclose(result.scaled_singular_values(), 1.0, atol=1e-8)
    # ... and the fixed labels are met (b = 0): one step from any θ0 at distance 10 lands on θ*
    assert _is_exact_design(result.d_distilled, result.t_distilled, result.lr, theta_star)
    far_away = theta_star + 1e3 * rng.standard_normal(theta_star.shape)
    theta1 = linear.gradient_step(far_away, result.d_distilled, result.t_distilled, result.lr)
    np.testing.assert_allclose(theta1, theta_star, atol=1e-6)
    # the outer loss, E ℓ(θ1) on the real data, falls to rounding level
    assert result.losses[-1] < 1e-20 * result.losses[0]


@pytest.mark.parametrize("dim, n_distilled, seed", [(6, 3, 1), (5, 2, 0)])
def test_algorithm1_below_m_equals_d_corrects_m_directions_and_leaves_the_rest(dim, n_distilled, seed):
    rng, d, t, theta_star = _regression_problem(dim, seed)
    result = linear.distill_with_algorithm1(d, t, n_distilled, rng)
    d_distilled, t_distilled, lr = result.d_distilled, result.t_distilled, result.lr
    # A is the orthogonal projector onto null(d̃): M scaled singular values exactly 1 ...
    np.testing.assert_allclose(result.scaled_singular_values(), 1.0, atol=1e-8)
    assert _is_best_projector(d, t, d_distilled, t_distilled, lr)
    # ... and D − M directions are never corrected: the failure the theory predicts
    count, _ = linear.unit_eigenvalues(d_distilled, lr)
    assert count == dim - n_distilled
    loss = linear.expected_one_step_loss(d, t, d_distilled, t_distilled, lr)
    assert loss == pytest.approx(result.losses[-1], rel=1e-8)   # the closed form is what it minimised
    assert loss >= linear.one_step_loss_floor(d, t, n_distilled) > 0.3 * (dim - n_distilled)
    worst, _ = linear.worst_case_error(d_distilled, t_distilled, lr, theta_star, radius=2.0)
    assert worst >= 2.0 * (1 - 1e-12)


def test_the_algorithm1_checks_reject_an_arbitrary_design():
    """The two checks above have teeth: a d̃ that was not learned fails them."""
    for dim, n_distilled in [(3, 3), (4, 6), (6, 3)]:
        rng, d, t, theta_star = _regression_problem(dim, seed=4)
        d_garbage = rng.standard_normal((n_distilled, dim))
        t_garbage = rng.standard_normal((n_distilled, 1))
        lr = n_distilled / np.linalg.norm(d_garbage, 2) ** 2   # even with the best-scaled η̃
        assert not _is_exact_design(d_garbage, t_garbage, lr, theta_star)
        assert not _is_best_projector(d, t, d_garbage, t_garbage, lr)


def test_algorithm1_with_random_initialisations_also_reaches_the_exact_design():
    """With θ0 drawn afresh (4 per iteration) the meta-gradient is noisy, but at the exact
    design every θ0 lands on θ*, so the noise vanishes there and Adam still gets close."""
    rng, d, t, theta_star = _regression_problem(4, seed=1)
    result = linear.distill_with_algorithm1(d, t, 4, rng, inits="random", n_nets=4)
    assert result.residual_norm() < 1e-5
    assert _is_exact_design(result.d_distilled, result.t_distilled, result.lr, theta_star, 1e-5)


@pytest.mark.parametrize("inits", ["cubature", "random"])
def test_algorithm1_runs_on_a_device_backend(inits):
    """Every array goes through ddref.backend: on the strict fake device (which refuses host
    arrays mixed into device ones) the result is the numpy one, bit for bit."""
    from ddref import _cupy, backend
    try:
        from fake_device import FakeArray, fake_xp
    except ImportError:  # tests/ imported as a package
        from tests.fake_device import FakeArray, fake_xp

    rng, d, t, _ = _regression_problem(3, seed=0)
    on_host = linear.distill_with_algorithm1(d, t, 3, rng, iterations=10, inits=inits)
    _cupy.install(fake_xp, FakeArray)
    rng, d, t, _ = _regression_problem(3, seed=0)
    with backend._using_namespace("fake", fake_xp):
        on_device = linear.distill_with_algorithm1(d, t, 3, rng, iterations=10, inits=inits)
    assert type(on_device.d_distilled) is np.ndarray and isinstance(on_device.lr, float)
    np.testing.assert_array_equal(on_device.d_distilled, on_host.d_distilled)
    assert on_device.lr == on_host.lr and on_device.losses == on_host.losses


def test_algorithm1_options_are_checked_with_one_sentence():
    rng, d, t, _ = _regression_problem(3, seed=0)
    cases = [
        (dict(n_distilled=0), "n_distilled must be a positive integer"),
        (dict(iterations=2.5), "iterations must be a positive integer"),
        (dict(inits="sobol"), "inits must be 'cubature' or 'random'"),
        (dict(n_nets=-1), "n_nets must be a positive integer"),
        (dict(initial_lr=0.0), "initial_lr must be a finite positive number"),
        (dict(step_size=np.inf), "step_size must be a finite positive number"),
        (dict(engine="exact"), "engine must be one of naive, backgrad"),
    ]
    for options, message in cases:
        arguments = dict(n_distilled=3) | options
        with pytest.raises(ValueError, match=message) as info:
            linear.distill_with_algorithm1(d, t, rng=rng, **arguments)
        assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")
