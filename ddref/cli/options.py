"""The options of the ``ddref`` commands: one per DistillConfig field, checked types, the parser."""

from __future__ import annotations

import argparse
import dataclasses
import math

import ddref


# help for each DistillConfig field; the option is --field-name, the default the config's
CONFIG_HELP = {
    "method": "what to learn the set with: bptt (Algorithm 1 of Wang et al. 2018, back-propagation "
              "through the inner training); dc (gradient matching, Zhao et al. 2021), dm "
              "(distribution matching, Zhao & Bilen 2023) or kip (kernel inducing points, Nguyen "
              "et al. 2021), which learn one unordered set judged by the field protocol, with "
              "their papers' defaults for the options not given",
    "dataset": "data set to distil (see `ddref datasets`)",
    "model": "network: mlp, lenet, convnet or convnet3",
    "init": "fixed: one θ0 for the whole run; random: fresh θ0 ~ p(θ0) every iteration; "
            "fixed-pretrained: one pre-trained network; random-pretrained: networks drawn from a "
            "pool of pre-trained ones (see `ddref pretrain`)",
    "n_nets": "random and random-pretrained init: networks per iteration (meta-gradients averaged)",
    "steps": "gradient steps S, each on its own group of distilled images",
    "epochs": "epochs E: passes over the S steps (same images, new learning rates)",
    "images_per_class": "distilled images of each class in every step",
    "distill_lr": "initial learned learning rate η̃",
    "lr": "outer learning rate (Adam; dc and dm: SGD with momentum 0.5; default 0.1 for dc, 1 "
          "for dm, 0.04 for kip)",
    "betas": "outer Adam betas",
    "lr_decay": "outer learning rate factor applied every --decay-every iterations",
    "decay_every": "iterations between outer learning-rate decays (0: never)",
    "batch_size": "real images per outer iteration (dc, dm, kip: per class; default 256, 256, 500)",
    "iterations": "outer iterations",
    "engine": "meta-gradient: backgrad (stored θ_t + Hessian-vector products), naive (autograd through the unroll), "
              "checkpoint (θ stored every √T steps, segments recomputed) or reverse (training run backwards "
              "exactly; needs --momentum > 0; memory independent of T)",
    "objective": "classify, or attack: make --source-class be read as --target-class",
    "source_class": "attack: the class K to be misread",
    "target_class": "attack: the class T it should be read as",
    "init_scheme": "weight initialisation: xavier, kaiming or normal",
    "init_scale": "gain (xavier, kaiming) or std (normal) of the initialisation",
    "dtype": "float32 (fast) or float64",
    "seed": "random seed: same seed, same run",
    "eval_every": "iterations between test-accuracy points on the curve (0: start and end only)",
    "eval_inits": "random init: held-out initialisations for the final accuracy",
    "checkpoint_every": "iterations between checkpoints",
    "order": "learned: the steps in their order; random: a new random step order every "
             "iteration (for order-independent images)",
    "momentum": "inner-loop momentum β: v ← βv − η̃g, θ ← θ + v (0: plain gradient descent; 0.9 usual)",
    "truncate": "meta-gradient through the last K inner steps only (0: all steps; biased)",
    "source_dataset": "pre-trained init: data set the networks are pre-trained on, brought to "
                      "--dataset's image shape (adaptation; default: --dataset itself)",
    "pool_nets": "pre-trained init: networks in the training pool (random-pretrained draws from them)",
    "pretrained_net": "fixed-pretrained: which network of the training pool is θ0",
    "pretrain_epochs": "pre-trained pools: Adam epochs on the source training split",
    "pretrain_lr": "pre-trained pools: Adam learning rate",
    "train_pool": "recorded by the run (training pool file and checksum); leave unset",
    "eval_pool": "recorded by the run (held-out pool file and checksum); leave unset",
    "learn_labels": "learn a label for every distilled image (see --label-form), jointly with "
                    "the images and learning rates (engines naive or backgrad, fixed or random init)",
    "images": "distilled images per step, classes assigned round-robin — fewer than the "
              "classes is meaningful with --learn-labels; with fixed labels the last classes "
              "get no image (0: --images-per-class × classes)",
    "label_lr": "--learn-labels: outer Adam learning rate of the label vectors (decays like --lr)",
    "label_init": "--learn-labels: initial probability of each image's assigned class (the rest "
                  "shared evenly by the other classes)",
    "label_form": "--learn-labels: softmax (the target is softmax of the learned vector, a "
                  "distribution) or free (the target is the learned vector itself, started at the "
                  "hard label, as in Sucholutsky & Schonlau's code)",
    "field_epochs": "dc, dm, kip: epochs of each fresh network of the field protocol that judges "
                    "the set (ddref.protocol; DC's 300 without augmentation)",
    "width": "convnet3: channels of each block (0: the model's default, 128)",
}


EXIT_STATUS = ("exit status: 0 done; 1 `ddref evaluate` ran but did not reproduce the accuracy "
               "the run reported; 2 the command could not be done as asked — a bad option or "
               "argument, a missing, damaged or unwritable file or folder, a size that cannot "
               "fit, training that diverged — said in one sentence on stderr (argparse's usage "
               "errors too); 130 interrupted (Ctrl-C), with what to run to continue.")


def _add_config_options(parser):
    from ddref.distill import DistillConfig

    for f in dataclasses.fields(DistillConfig):
        option = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(option, action="store_const", const=True, default=None,
                                help=CONFIG_HELP[f.name])
        elif f.name == "betas":
            parser.add_argument(option, type=float, nargs=2, default=None, metavar=("B1", "B2"),
                                help=CONFIG_HELP[f.name] + f" (default {f.default[0]} {f.default[1]})")
        elif f.name in RECORDED_BY_THE_RUN:
            parser.add_argument(option, type=type(f.default), default=None, help=argparse.SUPPRESS)
        else:
            parser.add_argument(option, type=type(f.default), default=None,
                                help=CONFIG_HELP[f.name] + (f" (default {f.default})"
                                                            if f.default != "" else ""))


# config fields a run fills in itself (the pools it used): options for ddref's own use, not listed
RECORDED_BY_THE_RUN = ("train_pool", "eval_pool")


def _given_config_options(args):
    """The config fields the user set on the command line, with their values."""
    from ddref.distill import DistillConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)
              if getattr(args, f.name) is not None}
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return values


def _config_from_args(args):
    from ddref.distill import DistillConfig

    return DistillConfig.from_dict(_given_config_options(args)).validate()


def _whole_number(minimum):
    """An argparse type: an int ≥ ``minimum``, else one sentence."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _jobs(text):
    """An argparse type for --jobs: a whole number ≥ 1, or -1 for every core."""
    value = _whole_number(-1)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1, or -1 for every core; got 0")
    return value


def _positive_number(text):
    """An argparse type: a positive finite float, else one sentence."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


NO_PROGRESS = "no progress bar (the default when stderr is not a terminal, e.g. redirected to a log)"


def build_parser():
    # --threads is accepted before or after the subcommand (SUPPRESS: a subcommand that does
    # not see it keeps the value given before it)
    threads_help = ("BLAS threads (default 1: ddref's small matrix products gain little from more "
                    "and on a busy machine threads wait on each other; 0: the BLAS library's own "
                    "default). The same seed, thread count and BLAS kernel give the same bytes; "
                    "another kernel (OpenBLAS: OPENBLAS_CORETYPE) sums in another order")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_whole_number(0), default=argparse.SUPPRESS, help=threads_help)

    parser = argparse.ArgumentParser(
        prog="ddref", description="Dataset Distillation (Wang et al. 2018) in numpy + autograd.",
        epilog=EXIT_STATUS)
    parser.add_argument("--version", action="version", version=f"ddref {ddref.__version__}")
    parser.add_argument("--threads", type=_whole_number(0), default=1, help=threads_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", parents=[common],
                       help="learn distilled images and learning rates (Algorithm 1)")
    _add_config_options(p)
    p.add_argument("--out", default=None, help="run folder (default runs/DATASET-MODEL-INIT)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint; only "
                        + ", ".join("--" + n.replace("_", "-") for n in _resumable()) + " may change")
    p.add_argument("--force", action="store_true",
                   help="replace the run already in --out (without it a run is never overwritten)")
    p.add_argument("--baseline-draws", type=_whole_number(1), default=10,
                   help="random-real baseline: draws of real images (default 10)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    p = sub.add_parser("evaluate", parents=[common],
                       help="re-train networks on a distilled set and report test accuracy")
    p.add_argument("run", help="run folder or distilled.npz")
    p.add_argument("--n-inits", type=_whole_number(1), default=None,
                   help="random and random-pretrained init: held-out networks (default: the run's --eval-inits)")
    p.add_argument("--order", choices=("learned", "shuffled", "pool"), default=None,
                   help="train on the steps in their learned order, with the steps shuffled, or "
                        "on the images as an unordered pool by minibatch SGD with a tuned lr")
    p.add_argument("--model", default=None,
                   help="train another network (mlp, lenet, convnet) on the set: with the learned "
                        "lrs and with a tuned constant lr (images padded where needed)")

    p = sub.add_parser("show", parents=[common], help="redraw the figures of a run")
    p.add_argument("run", help="run folder or distilled.npz")

    p = sub.add_parser("train", parents=[common], help="train a network on the full training split")
    p.add_argument("--dataset", default="digits", help="data set (see `ddref datasets`; default digits)")
    p.add_argument("--model", default="mlp", help="network: mlp, lenet or convnet (default mlp)")
    p.add_argument("--epochs", type=_whole_number(1), default=None,
                   help="passes over the training split (default 30 for digits, 15 otherwise)")
    p.add_argument("--batch-size", type=_whole_number(1), default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=_positive_number, default=1e-3, help="Adam learning rate (default 0.001)")
    p.add_argument("--seed", type=_whole_number(0), default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    sub.add_parser("datasets", parents=[common],
                   help="list the data sets, whether each is available now and where it was found")

    p = sub.add_parser("table", parents=[common],
                       help="the results grid: distilled vs baselines, one run folder per cell")
    p.add_argument("--grid", default="small",
                   help="small (the default: the same methods on a grid that takes minutes) or "
                        "readme (the README's results: hours on 2 cores)")
    p.add_argument("--out", default=None, help="output folder (default results/ for --grid readme, "
                                               "results/GRID for another grid; git ignores "
                                               "results/GRID)")
    p.add_argument("--jobs", type=_jobs, default=1, help="cells computed in parallel (joblib; -1: all cores)")
    p.add_argument("--only", default=None, help="comma-separated glob patterns of cell names, "
                                                "e.g. 'digits-mlp-fixed-*'")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    p = sub.add_parser("pretrain", parents=[common],
                       help="train (or reuse) a pool of pre-trained networks; --list shows them")
    p.add_argument("--list", action="store_true", help="list the pools in the cache and stop")
    p.add_argument("--dataset", default="digits", help="data set to train on (the source)")
    p.add_argument("--target", default=None,
                   help="data set whose image shape the networks take (default: --dataset)")
    p.add_argument("--model", default="mlp", help="network: mlp, lenet or convnet (default mlp)")
    p.add_argument("--nets", type=_whole_number(1), default=20, help="networks in the pool (default 20)")
    p.add_argument("--split", default="train", choices=("train", "held-out"),
                   help="train (seeds 0…) or held-out (seeds 1,000,000…)")
    p.add_argument("--epochs", type=_whole_number(1), default=10, help="Adam epochs per network (default 10)")
    p.add_argument("--lr", type=_positive_number, default=1e-3, help="Adam learning rate (default 0.001)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    p = sub.add_parser("download", parents=[common],
                       help="download a data set's files into the cache and verify them")
    p.add_argument("name", help="mnist, fashion-mnist, usps, svhn or cifar10")
    return parser


def _resumable():
    from ddref.distill import RESUMABLE

    return RESUMABLE
