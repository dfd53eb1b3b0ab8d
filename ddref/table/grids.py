"""The grids of the results table: settings (data set × model), init modes, methods.

A :class:`Grid` is settings × init modes × methods, and how many draws or networks each
number averages; :data:`GRIDS` holds the named ones ('readme': the README's results;
'small': seconds; 'fashion': Fashion-MNIST under both protocols).  ``Grid.protocols`` says
how a set is judged as training data: "paper" (Wang et al.'s: the set's steps in order, with
the learned η̃ or a tuned lr) and, with "field", also the field's protocol
(:mod:`ddref.protocol`: ``field_nets`` fresh networks trained on the set as an unordered pool
for ``field_epochs`` epochs).  :func:`check_grid` refuses a grid that cannot run before any cell does,
and :func:`distill_config` turns one setting and init mode into a distillation's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ddref import data, nn


PROTOCOLS = ("paper", "field")
POOL_METHODS = ("dc", "dm", "kip")   # sets learned as unordered pools (ddref.objectives): field protocol only
PAPER_METHODS = ("distilled", "random_real", "optimised_real", "kmeans", "average")   # Table 1's
TRAINING_METHODS = PAPER_METHODS + POOL_METHODS
METHODS = TRAINING_METHODS + ("full_data",)
LABELS = {"dc": "DC, gradient matching", "dm": "DM, distribution matching",
          "kip": "KIP, kernel inducing points",
          "distilled": "distilled", "random_real": "random real", "optimised_real": "optimised real",
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
    tag: str = ""       # tells apart two settings of one data set and model (cell names, rows)
    pool_options: dict = field(default_factory=dict)   # dc, dm, kip: DistillConfig fields (iterations …)

    @property
    def label(self):
        """``dataset-model`` or ``dataset-model-tag``: the start of its cells' names."""
        return f"{self.dataset}-{self.model}" + (f"-{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class Grid:
    """Settings × init modes × methods, and how many draws/networks each number averages."""

    name: str
    settings: tuple
    inits: tuple = ("fixed", "random")
    methods: tuple = PAPER_METHODS + ("full_data",)
    n_draws: int = 10          # baseline draws; random init: held-out networks (draw i ↔ net i)
    tune_draws: int = 3        # draws the baselines' lr is tuned on (training split)
    n_candidates: int = 20     # optimised real: random draws ranked on the training split
    score_nets: int = 3        # optimised real, random init: networks that rank them
    kmeans_draws: int = 3      # k-means seeds (recycled over the networks)
    full_data_nets: int = 3    # full_data, random init: networks trained on all the data
    seed: int = 0
    dtype: str = "float32"
    notes: tuple = ()          # how this grid departs from the paper's settings (in the table)
    protocols: tuple = ("paper",)   # + "field": every training method also gets a field_ row
    field_nets: int = 5        # the field protocol's K fresh networks per row
    field_epochs: int = 300    # and its epochs over the pool (DC's 300 without augmentation)
    tune_images: int = 0       # baselines tune their lr on this many training images (0: all)

    def cells(self):
        """Every (setting, init, method); dc, dm and kip draw fresh random networks, so they
        have a cell in the random-init column only."""
        return [Cell(s, init, method) for s in self.settings for init in self.inits
                for method in self.methods if method not in POOL_METHODS or init == "random"]


@dataclass(frozen=True)
class Cell:
    setting: Setting
    init: str
    method: str

    @property
    def name(self):
        return f"{self.setting.label}-{self.init}-{self.method}"


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
    # Fashion-MNIST (60,000 / 10,000) with LeNet, 100 images (10 steps × 3 epochs × 1 image per
    # class) and 10 images (1 step × 3 epochs), under the paper's and the field's protocol;
    # cut to fit about 45 minutes on 2 shared cores with --jobs 2 (benchmarks/fashion_grid.sh)
    "fashion": Grid("fashion", settings=(
        Setting("fashion-mnist", "lenet", steps=10, epochs=3, iterations=1000,
                distill={"batch_size": 1024, "decay_every": 400}, full_epochs=3, tag="100img"),
        Setting("fashion-mnist", "lenet", steps=1, epochs=3, iterations=1000,
                distill={"batch_size": 1024, "decay_every": 400}, full_epochs=3, tag="10img"),
    ), methods=("distilled", "random_real", "kmeans", "average", "full_data"),
        n_draws=5, tune_draws=2, kmeans_draws=2, full_data_nets=1, tune_images=5000,
        protocols=("paper", "field"), field_nets=5, field_epochs=300, notes=(
        "1,000 outer iterations (Adam's lr halved every 400, real batch 1,024), cut to fit the "
        "CPU: measured 1.4 s per iteration at 100 images and 0.9 s at 10 images on the loaded "
        "2-core machine; the whole grid took 23 minutes with --jobs 2 (each cell's seconds in "
        "table.json).",
        "Paper's protocol: 5 networks per number (the fixed θ0 or 5 held-out initialisations), 5 "
        "baseline draws (k-means: 2 seeds, recycled); the baselines' one lr is tuned over 2 "
        "draws on 5,000 images drawn from the training split (scoring 8 rates on all 60,000 "
        "takes minutes per draw here).",
        "Field protocol (ddref.protocol, DC's evaluate_synset recipe without augmentation): "
        "5 networks × 300 epochs; the baselines' draws are the same in both init columns, so "
        "their field rows are too — only the distilled set differs between the columns.",
        "Full training data: 3 epochs of Adam (batch 64) on all 60,000 images, 1 network per "
        "init, under the paper's table's protocol only: the field protocol's 300 SGD epochs over "
        "60,000 images would take about 47 minutes per LeNet on this CPU.",
        "At 10 images (one per class) k-means has one centre per class, the class average: "
        "their rows agree.",
        "convnet3 is left out: it has no fast path, so distilling through it does not fit the "
        "CPU budget, and a grid gives every setting every method (distilled included).",
    )),
    # Algorithm 1 beside the methods that came after, every set also under the field protocol;
    # 1 and 10 images per class (bptt: 1 step, or 10 steps, × 3 epochs); the MLP, whose fast
    # paths let every method fit the CPU (benchmarks/methods_grid.sh)
    "methods": Grid("methods", settings=tuple(
        Setting(dataset, "mlp", steps=steps, epochs=3, iterations=iterations, tag=f"{steps}ipc",
                distill={"batch_size": 256}, full_epochs=1,
                pool_options={"iterations": iterations, **pool, "dm": {"lr": 0.1 * steps}})
        for dataset, iterations, pool in (("digits", 400, {"batch_size": 64}),
                                          ("mnist5k", 400, {"batch_size": 128}),
                                          ("fashion-mnist", 300, {"batch_size": 128}))
        for steps in (1, 10)),
        methods=("distilled", "random_real", "kmeans", "dc", "dm", "kip"),
        n_draws=5, tune_draws=2, kmeans_draws=2, tune_images=4000,
        protocols=("paper", "field"), field_nets=5, field_epochs=300, notes=(
        "Every set is also judged by the field protocol (5 fresh MLPs, 300 epochs of SGD on the set "
        "as a pool, ddref.protocol); DC, DM and KIP sets by it alone: they are pools, with no "
        "learned rates or step order. They draw fresh random networks, so they fill the random "
        "column only.",
        "Short runs: 400 outer iterations (300 on fashion-mnist) for every method, the papers' "
        "other defaults (DistillConfig.for_method) with 64 real images per class on digits and "
        "128 elsewhere; DC's iteration is one of its matching steps. DM's lr is 0.1 × images "
        "per class: the paper's 1 (for a ConvNet with instance norm) diverges on the MLP at 1 "
        "image per class (chapter 11).",
        "The MLP (64/784-128-10) throughout: LeNet and convnet3 do not fit every method into the "
        "CPU budget here; KIP's kernel is the infinite-width fully connected ReLU network's.",
        "The papers: distilled = Algorithm 1 of Wang, Zhu, Torralba & Efros, Dataset Distillation "
        "(2018); DC = Zhao, Mopuri & Bilen, Dataset Condensation with Gradient Matching (ICLR "
        "2021); DM = Zhao & Bilen, Dataset Condensation with Distribution Matching (WACV 2023); "
        "KIP = Nguyen, Chen & Lee, Dataset Meta-Learning from Kernel Ridge-Regression (ICLR 2021).",
    )),
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
    if not grid.protocols or grid.protocols[0] != "paper" or any(
            p not in PROTOCOLS for p in grid.protocols) or len(set(grid.protocols)) != len(grid.protocols):
        raise ValueError(f"grid {grid.name!r}: protocols {grid.protocols!r} must be ('paper',) or "
                         f"('paper', 'field').")
    for name in ("n_draws", "tune_draws", "n_candidates", "score_nets", "kmeans_draws", "full_data_nets",
                 "field_nets", "field_epochs"):
        if getattr(grid, name) < 1:
            raise ValueError(f"grid {grid.name!r}: {name} must be at least 1.")
    if grid.tune_images < 0:
        raise ValueError(f"grid {grid.name!r}: tune_images must be ≥ 0 (0: the whole training split).")
    labels = [s.label for s in grid.settings]
    if len(set(labels)) != len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise ValueError(f"grid {grid.name!r}: two settings are both {twice!r}; give them "
                         f"different tags (Setting(..., tag=...)).")
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
