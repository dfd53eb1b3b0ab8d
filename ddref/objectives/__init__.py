"""What the outer loop minimises: one module per method, one line each in :data:`METHODS`.

A new method is a subclass of :class:`ddref.objectives.base.Objective` in a module of its own
(its paper's equation in the docstring) and one line here, or :func:`register` from outside.
"""

from __future__ import annotations

from ddref.objectives.base import Objective
from ddref.objectives.bptt import Algorithm1
from ddref.objectives.dc import GradientMatching
from ddref.objectives.dm import DistributionMatching
from ddref.objectives.kip import KernelInducingPoints

METHODS = {
    "bptt": Algorithm1,          # Wang et al. 2018, Algorithm 1: back-propagation through training
    "dc": GradientMatching,      # Zhao, Mopuri & Bilen 2021: gradient matching
    "dm": DistributionMatching,  # Zhao & Bilen 2023: distribution matching
    "kip": KernelInducingPoints,  # Nguyen, Chen & Lee 2021: kernel inducing points
}


def register(name, objective_class):
    """Add a method (a subclass of :class:`Objective`) under ``name``."""
    if not (isinstance(objective_class, type) and issubclass(objective_class, Objective)):
        raise ValueError(f"a method must be a subclass of ddref.objectives.base.Objective; got "
                         f"{objective_class!r}.")
    METHODS[name] = objective_class


def check(config):
    """``config`` validated, its method known and the method's own options checked
    (:meth:`Objective.check_config`), before anything is loaded or computed."""
    config.validate()
    if config.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {config.method!r}.")
    METHODS[config.method].check_config(config)
    return config


def build(config, dataset, rng, progress=True) -> Objective:
    """The objective of ``config.method`` for this data set, drawing from ``rng``."""
    return METHODS[check(config).method](config, dataset, rng, progress)


__all__ = ["METHODS", "Objective", "build", "check", "register"]
