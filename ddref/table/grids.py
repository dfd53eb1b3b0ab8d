"""The grids of the results table: settings (data set × model), init modes, methods.

A :class:`Grid` is settings × init modes × methods, and how many draws or networks each
number averages; :data:`GRIDS` holds the named ones ('readme': the README's results;
'small': seconds).  :func:`check_grid` refuses a grid that cannot run before any cell does,
and :func:`distill_config` turns one setting and init mode into a distillation's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ddref import data, nn


TRAINING_METHODS = ("distilled", "random_real", "optimised_real", "kmeans", "average")
METHODS = TRAINING_METHODS + ("full_data",)
LABELS = {"distilled": "distilled", "random_real": "random real", "optimised_real": "optimised real",
          "kmeans": "k-means", "average": "class average", "full_data": "full training data"}


@dataclass(frozen=True)
class Setting:
    """One data set and model: the distilled set's shape and how it is distilled."""

    dataset: str
    model: str
    steps: int = 10
    epochs: int = 3
    images_per_class: int = 1
    iterations: int = 1000
    distill: dict = field(default_factory=dict)   # further DistillConfig fields
    full_epochs: int = 15                          # full_data: epochs of Adam on the training split


@dataclass(frozen=True)
class Grid:
    """Settings × init modes × methods, and how many draws/networks each number averages."""

    name: str
    settings: tuple
    inits: tuple = ("fixed", "random")
    methods: tuple = METHODS
    n_draws: int = 10          # baseline draws; random init: held-out networks (draw i ↔ net i)
    tune_draws: int = 3        # draws the baselines' lr is tuned on (training split)
    n_candidates: int = 20     # optimised real: random draws ranked on the training split
    score_nets: int = 3        # optimised real, random init: networks that rank them
    kmeans_draws: int = 3      # k-means seeds (recycled over the networks)
    full_data_nets: int = 3    # full_data, random init: networks trained on all the data
    seed: int = 0
    dtype: str = "float32"
    notes: tuple = ()          # how this grid departs from the paper's settings (in the table)

    def cells(self):
        return [Cell(s, init, method) for s in self.settings for init in self.inits
                for method in self.methods]


@dataclass(frozen=True)
class Cell:
    setting: Setting
    init: str
    method: str

    @property
    def name(self):
        return f"{self.setting.dataset}-{self.setting.model}-{self.init}-{self.method}"


# The settings, in one place.  'readme': the README's results (benchmarks/reproduce.sh's
# distillation settings, 10 steps × 3 epochs, one image per class per step); 'small': seconds.
GRIDS = {
    "readme": Grid("readme", settings=(
        Setting("digits", "mlp", steps=10, epochs=3, iterations=2000,
                distill={"decay_every": 800}, full_epochs=30),
        Setting("mnist5k", "lenet", steps=10, epochs=3, iterations=600,
                distill={"batch_size": 1024, "decay_every": 240}, full_epochs=15),
    ), notes=(
        "mnist5k / lenet: 600 outer iterations (Adam's lr halved every 240) instead of the "
        "1,000 (every 400) of benchmarks/reproduce.sh, to fit one evening on 2 shared cores.",
        "mnist5k is 4,000 training / 1,000 test images of MNIST; the paper uses all 60,000 / "
        "10,000, so its numbers are a guide here, not a target.",
        "k-means: 3 seeds, recycled over the 10 networks; optimised real: the best 10 of 20 "
        "random draws, ranked on the training split by 1 network (fixed init) or 3 (random); "
        "full training data: 3 networks under random init.",
    )),
    "small": Grid("small", settings=(
        Setting("digits", "mlp", steps=2, epochs=1, iterations=200,
                distill={"batch_size": 128}, full_epochs=2),
    ), n_draws=2, tune_draws=2, n_candidates=3, score_nets=2, kmeans_draws=1, full_data_nets=2),
}


def check_grid(grid):
    """Raise ValueError with one sentence for a grid that cannot run."""
    from ddref.distill import INIT_MODES

    for init in grid.inits:
        if init not in INIT_MODES:
            raise ValueError(f"grid {grid.name!r}: init mode {init!r} is not one of {INIT_MODES}.")
    for method in grid.methods:
        if method not in METHODS:
            raise ValueError(f"grid {grid.name!r}: method {method!r} is not one of {METHODS}.")
    for name in ("n_draws", "tune_draws", "n_candidates", "score_nets", "kmeans_draws", "full_data_nets"):
        if getattr(grid, name) < 1:
            raise ValueError(f"grid {grid.name!r}: {name} must be at least 1.")
    if grid.tune_draws > grid.n_draws or grid.n_draws > grid.n_candidates:
        raise ValueError(f"grid {grid.name!r}: need tune_draws ≤ n_draws ≤ n_candidates.")
    catalogue = {row["name"]: row for row in data.list_datasets()}
    for setting in grid.settings:
        distill_config(grid, setting, grid.inits[0]).validate()
        if setting.dataset not in catalogue:
            raise ValueError(f"grid {grid.name!r}: unknown data set {setting.dataset!r}; "
                             f"`ddref datasets` lists them.")
        entry = catalogue[setting.dataset]
        if not entry["available"]:
            raise data.DataError(f"grid {grid.name!r} needs {setting.dataset}, which is not "
                                 f"available: {entry['how']}.")
        nn.build_model(setting.model, entry["image_shape"], entry["num_classes"])  # fits the images?
    return grid


def distill_config(grid, setting, init):
    """The distillation config of one setting under one init mode (no curve during the run;
    its final evaluation on ``grid.n_draws`` networks)."""
    from ddref.distill import DistillConfig

    return DistillConfig.from_dict({
        "dataset": setting.dataset, "model": setting.model, "init": init, "steps": setting.steps,
        "epochs": setting.epochs, "images_per_class": setting.images_per_class,
        "iterations": setting.iterations, "seed": grid.seed, "dtype": grid.dtype,
        "eval_every": 0, "eval_inits": grid.n_draws, **setting.distill})


def _catalogue():
    """{name: catalogue row} of every data set (shape, classes, availability)."""
    return {row["name"]: row for row in data.list_datasets()}


def _n_images(setting):
    return setting.steps * setting.images_per_class * _catalogue()[setting.dataset]["num_classes"]
