"""The outer optimisers: Adam (Algorithm 1, KIP) and SGD with momentum (DC, DM), on dicts of
arrays.  Each keeps its whole state in :meth:`state`, so a run resumes exactly."""

from __future__ import annotations

from ddref import backend


class Adam:
    """Adam on a dict of arrays:  m ← β1 m + (1−β1) g,  v ← β2 v + (1−β2) g²,
    p ← p − lr · m̂ / (√v̂ + ε) with the bias-corrected m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ)."""

    def __init__(self, params, lr=0.01, betas=(0.5, 0.999), eps=1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.t = 0
        self.m = {k: backend.xp().zeros_like(p) for k, p in params.items()}
        self.v = {k: backend.xp().zeros_like(p) for k, p in params.items()}

    def step(self, params, grads):
        self.t += 1
        b1, b2 = self.betas
        out = {}
        for k in params:
            self.m[k] = b1 * self.m[k] + (1 - b1) * grads[k]
            self.v[k] = b2 * self.v[k] + (1 - b2) * grads[k] ** 2
            m_hat = self.m[k] / (1 - b1 ** self.t)
            v_hat = self.v[k] / (1 - b2 ** self.t)
            out[k] = params[k] - (self.lr * m_hat / (backend.xp().sqrt(v_hat) + self.eps)).astype(
                params[k].dtype)
        return out

    def state(self):
        """Everything needed to continue exactly where it stopped."""
        return {"t": self.t, "lr": self.lr, "m": dict(self.m), "v": dict(self.v)}

    def load_state(self, state):
        self.t, self.lr = int(state["t"]), float(state["lr"])
        self.m = {k: backend.asarray(v) for k, v in state["m"].items()}
        self.v = {k: backend.asarray(v) for k, v in state["v"].items()}


class SGD:
    """SGD with momentum on a dict of arrays, as PyTorch's ``torch.optim.SGD``:
    b ← μ b + g (b = g at the first step),  p ← p − lr · b.  The state keeps the same keys as
    :class:`Adam`'s (``m`` holds b, ``v`` is unused and empty of meaning but kept, zero, so a
    checkpoint has one layout for every optimiser)."""

    def __init__(self, params, lr=0.1, momentum=0.5):
        self.lr, self.momentum = lr, momentum
        self.t = 0
        self.m = {k: backend.xp().zeros_like(p) for k, p in params.items()}
        self.v = {k: backend.xp().zeros_like(p) for k, p in params.items()}

    def step(self, params, grads):
        self.t += 1
        out = {}
        for k in params:
            self.m[k] = grads[k] if self.t == 1 else self.momentum * self.m[k] + grads[k]
            out[k] = params[k] - (self.lr * self.m[k]).astype(params[k].dtype)
        return out

    state = Adam.state
    load_state = Adam.load_state


OPTIMISERS = {"adam": Adam, "sgd": SGD}
