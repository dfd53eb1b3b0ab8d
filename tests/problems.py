"""A small meta-gradient problem shared by the engine tests: random x̃, rates near 0.02."""

import numpy as np

from ddref import losses, nn
from ddref.unroll import inverse_softplus

STEPS, EPOCHS, PER_STEP, N_REAL = 3, 2, 10, 16
MODELS = {"mlp": (1, 8, 8), "lenet": (1, 28, 28)}


def make_problem(name, seed=0, dtype="float64", steps=STEPS, epochs=EPOCHS):
    """Model ``name`` with θ0, distilled images, raw rates and a real batch, as keyword
    arguments of ``engines.meta_gradient``."""
    shape = MODELS[name]
    rng = np.random.default_rng(seed)
    model = nn.build_model(name, shape, 10)
    theta0 = model.init(rng, dtype=dtype)
    x = rng.normal(size=(steps, PER_STEP, *shape)).astype(dtype)
    targets = losses.one_hot(np.arange(PER_STEP) % 10, 10, dtype=dtype)
    raw = (np.full((epochs, steps), inverse_softplus(0.02))
           + 0.1 * rng.normal(size=(epochs, steps))).astype(dtype)
    x_real = rng.normal(size=(N_REAL, *shape)).astype(dtype)
    real_targets = losses.one_hot(rng.integers(0, 10, N_REAL), 10, dtype=dtype)
    return dict(apply=model.apply, theta0=theta0, x_distilled=x, targets=targets,
                raw_lrs=raw, x_real=x_real, real_targets=real_targets)
