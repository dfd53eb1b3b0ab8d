"""The ``ddref`` command line: ``distill``, ``evaluate``, ``show``, ``train``, ``pretrain``, ``datasets``.

    ddref distill                       # digits, mlp, fixed init, 10 steps × 3 epochs
    ddref distill --init random --n-nets 4 --out runs/random
    ddref distill --resume --out runs/random
    ddref evaluate runs/digits-mlp-fixed
    ddref show runs/digits-mlp-fixed
    ddref train --dataset mnist5k --model lenet
    ddref pretrain --dataset digits --target mnist5k --model lenet --nets 20
    ddref pretrain --list
    ddref distill --init random-pretrained --source-dataset digits --dataset mnist5k --model lenet
    ddref datasets
    ddref download mnist
    ddref table --grid small --jobs 2   # distilled vs the baselines, one run folder per cell
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import ddref
from ddref import data

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


# ---------------------------------------------------------------------------- commands


def cmd_distill(args):
    from ddref.distill import DistillConfig
    from ddref.saved import lock_run_folder

    _import_what_the_end_of_a_run_needs()

    given = _given_config_options(args)
    config = DistillConfig.for_method(**given).validate()
    if not args.resume:
        _warn_untrained_attack(config)
    if args.out is not None and not args.out.strip():
        raise ValueError("--out is empty; name the run folder, e.g. --out runs/my-run.")
    kind = config.init if config.method == "bptt" else config.method
    out = Path(args.out or f"runs/{config.dataset}-{config.model}-{kind}")
    with lock_run_folder(out):           # one run at a time in a folder, for the whole run
        return _distill_in_locked_folder(args, given, config, out)


def _distill_in_locked_folder(args, given, config, out):
    from ddref.distill import Distiller
    from ddref.saved import check_run_folder, claim_run_folder

    replace = check_run_folder(out, resume=args.resume, force=args.force)
    checkpoint = out / "checkpoint.npz"
    progress = not args.no_progress
    if args.resume:
        distiller = Distiller.from_checkpoint(checkpoint, progress=progress, changes=given)
        print(f"resuming {out} at iteration {distiller.iteration} of {distiller.config.iterations}")
    else:
        distiller = Distiller(config, progress=progress)
        claim_run_folder(out, replace)
        if replace:
            print(f"--force: replaced the run that was in {out}")
    config = distiller.config
    if distiller.pools is not None and not (args.resume and (out / "pools.json").exists()):
        from ddref.saved import atomic_write_text

        atomic_write_text(out / "pools.json", json.dumps(distiller.pools.records(), indent=1))
    if config.method == "bptt":
        print(f"distilling {config.dataset} for {config.model}: {config.init} init, "
              f"{_count(config.steps, 'step')} × {_count(config.epochs, 'epoch')}, "
              f"{_count(len(distiller.labels), 'image')} per step, "
              f"{config.engine} meta-gradient → {out}")
    else:
        print(f"distilling {config.dataset} for {config.model} with {config.method} "
              f"({distiller.objective.citation}): {config.images_per_class} images per class, "
              f"{distiller.objective.optimiser} at lr {config.lr:g}, {config.batch_size} real images "
              f"per class per iteration → {out}")
    try:
        distiller.run(checkpoint_path=checkpoint)
    except KeyboardInterrupt:
        print(f"stopped; continue with: ddref distill --resume --out {out}", file=sys.stderr)
        return 130
    try:
        _finish_run(out, distiller, args.baseline_draws, progress)
    except KeyboardInterrupt:
        print(f"stopped while evaluating; all {distiller.iteration} iterations are saved in "
              f"{checkpoint}: `ddref distill --resume --out {out}` finishes the run.", file=sys.stderr)
        return 130
    return 0


def _import_what_the_end_of_a_run_needs():
    """Import the evaluation and plotting modules (scikit-learn, matplotlib) before the run
    starts rather than when it ends: a Ctrl-C that lands inside an extension module's import
    can make CPython exit by SIGINT after ddref has handled it, instead of with code 130."""
    import matplotlib.pyplot  # noqa: F401

    from ddref import attack, baselines, plot, pretrained  # noqa: F401


def _finish_run(out, distiller, baseline_draws, progress=True):
    """Evaluate the distilled set against random real images (and, for an attack, measure the
    attack against relabelled real images); write the set, metrics, figures."""
    from ddref.baselines import random_real_baseline
    from ddref.saved import atomic_write_text, json_safe

    config = distiller.config
    print("evaluating the distilled set and the random-real baseline …")
    distilled = distiller.distilled_set()
    pretrained_metrics = {}
    if distiller.pools is not None:
        from ddref import pretrained
        from ddref.evaluate import Accuracy

        pretrained_metrics = pretrained.evaluate_run(
            config, distiller.model, distiller.dataset, distilled.images, distilled.labels,
            distilled.lrs, distiller.pools, baseline_draws=baseline_draws,
            progress=progress)
        accuracy = Accuracy(**pretrained_metrics["distilled_accuracy"])
        baseline = Accuracy(**pretrained_metrics["random_real_accuracy"])
        baseline_lr = pretrained_metrics["random_real_lr"]
    elif config.method != "bptt":          # a pool: the field protocol for both
        from ddref.objectives.pool import field_recipe

        accuracy = distiller.accuracy()
        baseline = distiller.objective.random_real_accuracy(baseline_draws)
        baseline_lr = field_recipe(config).lr
        pretrained_metrics = {"protocol": field_recipe(config).to_dict()}
    else:
        accuracy = distiller.accuracy()
        baseline, baseline_lr = random_real_baseline(
            distiller.model, distiller.dataset, config.steps, config.epochs, distiller.labels,
            theta0=distiller.theta0, n_draws=baseline_draws, seed=config.seed,
            dtype=config.dtype, momentum=config.momentum)
    history = distiller.history
    metrics = {
        "distilled_accuracy": dataclasses.asdict(accuracy),
        "random_real_accuracy": dataclasses.asdict(baseline),
        "random_real_lr": baseline_lr,
        "n_images": int(distilled.images.shape[0] * distilled.images.shape[1]),
        "iterations": distiller.iteration,
        "seconds_distilling": round(history.seconds, 2),
        "seconds_per_iteration": round(history.seconds / max(len(history.losses), 1), 5),
        "final_outer_loss": history.losses[-1] if history.losses else None,
        "history": dataclasses.asdict(history),
        "config": config.to_dict(),
        **pretrained_metrics,
    }
    if config.objective == "attack":
        from ddref import attack

        metrics["attack"] = attack.attack_report(
            distiller.model, distiller.dataset, distilled.images, distilled.labels, distilled.lrs,
            distiller.evaluation_networks(), config.source_class, config.target_class,
            n_draws=baseline_draws, seed=config.seed, momentum=config.momentum)
    distilled.save(out / "distilled.npz")
    _draw(out, distilled, history, baseline.mean, attack=metrics.get("attack"))
    atomic_write_text(out / "metrics.json", json.dumps(json_safe(metrics), indent=1))
    n = metrics["n_images"]
    print(f"wrote {out}/distilled.npz, distilled.png, curves.png, metrics.json "
          f"(checkpoint.npz stays: --resume --iterations N continues the run)")
    if config.method != "bptt":
        recipe = metrics["protocol"]
        print(f"test accuracy under the field protocol ({config.model}, {recipe['epochs']} epochs, "
              f"lr {recipe['lr']:g}):")
        print(f"  {n} images made by {config.method}: {accuracy}, over fresh networks")
        print(f"  {n} random real images:  {baseline}, over draws (one network each)")
        return
    print(f"test accuracy, {n} distilled images:   {accuracy}")
    print(f"test accuracy, {n} random real images: {baseline} (lr {baseline_lr:g})")
    if pretrained_metrics:
        print(f"target test accuracy of the pre-trained networks "
              f"({pretrained_metrics['evaluated_on']['pool']} pool):")
        print("\n".join(pretrained.summary_lines(pretrained_metrics)))
    if "attack" in metrics:
        print("\n".join(attack.report_lines(metrics["attack"])))


def _draw(out, distilled, history, baseline, stem="", attack=None):
    """distilled.png (and curves.png when the history is known) in the folder ``out``; an
    attack run's curves carry its attack measures (``attack``: metrics.json's entry)."""
    import matplotlib.pyplot as plt

    from ddref import plot

    classes = distilled.classes or [str(c) for c in range(int(distilled.labels.max()) + 1)]
    plt.close(plot.plot_distilled(distilled, class_names=classes, path=out / f"{stem}distilled.png"))
    if distilled.soft_labels is not None:
        from ddref.plot import plot_soft_labels

        plt.close(plot_soft_labels(distilled.soft_labels, classes, path=out / f"{stem}labels.png",
                                   form=distilled.config.get("label_form", "softmax")))
    if history is None:
        return
    cfg = distilled.config
    title = f"{cfg.get('dataset')} / {cfg.get('model')}, {cfg.get('init')} init, {cfg.get('engine')}"
    plt.close(plot.plot_curves(history, path=out / f"{stem}curves.png", baseline=baseline, title=title,
                               attack=attack))


def _distilled_path(run):
    """A run folder's distilled.npz, or the .npz file given."""
    run = Path(run)
    path = run / "distilled.npz" if run.is_dir() else run
    if not path.is_file():
        from ddref.saved import SavedFileError

        raise SavedFileError(f"{path} does not exist; give a run folder made by `ddref distill` "
                             f"or its distilled.npz.")
    return path


def _reported_metrics(path):
    from ddref.saved import read_json

    return read_json(path, "metrics file", required=("distilled_accuracy", "random_real_accuracy",
                                                      "history"))


def cmd_evaluate(args):
    from ddref.distill import DistilledSet

    path = _distilled_path(args.run)
    distilled = DistilledSet.load(path)
    method = distilled.config.get("method", "bptt")
    if method != "bptt" and (args.order is not None or args.model is not None):
        raise ValueError(f"--order and --model apply to sets of --method bptt; {path} is a {method} "
                         f"set, an unordered pool trained by the field protocol: leave them out.")
    if args.order is not None or args.model is not None:
        return _evaluate_reuse(distilled, path, args)
    if distilled.config.get("init") in ("fixed-pretrained", "random-pretrained"):
        status = _evaluate_pretrained(distilled, path, args.n_inits)
    else:
        status = _evaluate_plain(distilled, path, args.n_inits)
    if distilled.config.get("objective") == "attack" and args.n_inits is None:
        status = max(status, _recheck_attack(distilled, path))
    return status


def _evaluate_plain(distilled, path, n_inits):
    """Re-evaluate a fixed- or random-init set, or a pool set of dc, dm or kip (by the field
    protocol); compare with metrics.json."""
    from ddref.distill import held_out_accuracy

    accuracy = held_out_accuracy(distilled, n_inits=n_inits, source=str(path))
    method = distilled.config.get("method", "bptt")
    if method != "bptt":
        epochs = distilled.config.get("field_epochs")
        print(f"test accuracy of fresh {distilled.config.get('model')} networks trained on {path} "
              f"({method} set) by the field protocol, {epochs} epochs: {accuracy}")
    else:
        print(f"test accuracy of networks trained on {path}: {accuracy}")
    metrics_path = path.parent / "metrics.json"
    if metrics_path.exists() and n_inits is None:
        reported = _reported_metrics(metrics_path)["distilled_accuracy"]
        if not isinstance(reported, dict) or not isinstance(reported.get("mean"), (int, float)):
            from ddref.saved import SavedFileError

            raise SavedFileError(f"{metrics_path} has no usable distilled_accuracy.mean; "
                                 f"re-create it with `ddref distill`.")
        same = abs(reported["mean"] - accuracy.mean) < 1e-9
        print(f"reported at the end of the run: {100 * reported['mean']:.2f}% "
              f"({'reproduced' if same else 'DIFFERENT'})")
        return 0 if same else 1
    return 0


ATTACK_MEASURES = ("attack_success", "other_classes_accuracy", "accuracy", "attacked_accuracy")


def _recheck_attack(distilled, path):
    """An attack run: measure the attack again on the networks the run measured it on (before
    and after the distilled steps) and compare with metrics.json's ``attack.distilled``.  The
    relabelled-real baseline, which tunes a learning rate over many draws, is not re-run."""
    from ddref import attack
    from ddref.distill import evaluation_networks, prepared_for_evaluation
    from ddref.saved import SavedFileError

    config, dataset, model, x, lrs, theta0 = prepared_for_evaluation(distilled, source=str(path))
    nets = evaluation_networks(config, dataset, model, theta0)
    again = attack.evaluate_attack(model, dataset, x, distilled.labels, lrs, nets,
                                   config.source_class, config.target_class, config.momentum)
    k, t = config.source_class, config.target_class
    print(f"attack {k}→{t} on the same {len(nets)} network(s): {k}s read as {t} "
          f"{again['before'].attack_success} before, {again['after'].attack_success} after; "
          f"other classes {again['after'].other_classes_accuracy} after")
    metrics_path = path.parent / "metrics.json"
    if not metrics_path.exists():
        return 0
    try:
        reported = _reported_metrics(metrics_path)["attack"]["distilled"]
        same = all(abs(reported[when][m]["mean"] - getattr(again[when], m).mean) < 1e-9
                   for when in ("before", "after") for m in ATTACK_MEASURES)
    except (KeyError, TypeError):
        raise SavedFileError(f"{metrics_path} has no usable attack.distilled measures; re-create "
                             f"it with `ddref distill`.") from None
    print(f"attack measures reported at the end of the run: {k}s read as {t} "
          f"{100 * reported['after']['attack_success']['mean']:.2f}% after "
          f"({'reproduced' if same else 'DIFFERENT'})")
    return 0 if same else 1


def _count(n, noun):
    """'1 step', '3 steps'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _warn_untrained_attack(config):
    """--objective attack against networks that were never trained: say so before the run."""
    if config.objective == "attack" and config.init in ("fixed", "random"):
        print(f"warning: --objective attack with --init {config.init} attacks untrained networks "
              f"({'one random θ0' if config.init == 'fixed' else 'fresh random θ0'}), which read "
              f"no class well to begin with; the paper attacks trained networks: "
              f"--init random-pretrained (or fixed-pretrained).", file=sys.stderr)


def _evaluate_reuse(distilled, path, args):
    """`evaluate --order` and `evaluate --model`: the set used another way (ddref.reuse), on
    the networks the run itself is judged on (a pre-trained run: its own pool's networks)."""
    from ddref import reuse
    from ddref.distill import check_n_inits, prepared_for_evaluation

    config, dataset, model, x, lrs, theta0 = prepared_for_evaluation(distilled, source=str(path))
    pretrained_run = config.init in ("fixed-pretrained", "random-pretrained")
    if args.model in (None, config.model) and not pretrained_run:
        check_n_inits(args.n_inits, config, str(path))
    n_inits = args.n_inits or config.eval_inits
    if args.model is not None and args.model != config.model:
        if args.order not in (None, "learned"):
            raise ValueError("--order with another --model: give one of them at a time.")
        if pretrained_run:
            raise ValueError(f"--model {args.model}: {path} was distilled for pre-trained "
                             f"{config.model} networks ({config.init}), and there are no "
                             f"pre-trained {args.model} networks to train on it; leave --model out.")
        result = reuse.other_architecture_accuracy(args.model, dataset, x, distilled.labels, lrs,
                                                   n_inits=n_inits, seed=config.seed,
                                                   momentum=config.momentum,
                                                   soft_labels=distilled.soft_labels)
        learned = result["learned_lrs"] or "diverged (the learned rates are too large for it)"
        print(f"{args.model} trained on {path} (distilled for {config.model}), {n_inits} held-out inits:")
        print(f"  with the learned learning rates: {learned}")
        print(f"  with a tuned constant lr ({result['lr']:g}): {result['tuned_lr']}")
        return 0
    order = args.order or "learned"
    inits, on = None, ""
    if pretrained_run:
        inits, on = _pretrained_evaluation_networks(config, dataset, args.n_inits, str(path))
    accuracy, lr = reuse.order_accuracy(order, model, dataset, x, distilled.labels, lrs,
                                        theta0=theta0, n_inits=n_inits, seed=config.seed,
                                        momentum=config.momentum,
                                        soft_labels=distilled.soft_labels, inits=inits)
    print(f"test accuracy, {order} order{f' (tuned lr {lr:g})' if lr else ''}{on}: {accuracy}")
    return 0


def _pretrained_evaluation_networks(config, dataset, n_nets, source):
    """The networks a pre-trained run is evaluated on (its fixed pre-trained θ0, or networks of
    its held-out pool), checked against the pools it recorded; and a phrase naming them."""
    from ddref import pretrained

    if n_nets is not None and config.init == "fixed-pretrained":
        raise ValueError(f"--n-inits applies to sets distilled for random initialisations; "
                         f"{source} was distilled for one pre-trained network: leave --n-inits out.")
    pools = pretrained.pools_for(config, dataset, held_out_nets=(
        n_nets if n_nets and n_nets > config.eval_inits else None))
    pool, ids = pretrained.evaluation_networks(config, pools, n_nets)
    return pool.networks(ids, config.dtype), f" ({pool.meta['spec']['split']} pool, networks {ids})"


def _evaluate_pretrained(distilled, path, n_nets):
    """Re-evaluate a pre-trained-mode set on its recorded pool; compare with metrics.json."""
    from ddref import pretrained

    metrics_path = path.parent / "metrics.json"
    reported = None
    if metrics_path.exists():
        from ddref.saved import read_json

        reported = read_json(metrics_path, "metrics file",
                             required=("random_real_accuracy", *pretrained.METRIC_NAMES))
        if not all(isinstance(reported[k], dict) and isinstance(reported[k].get("mean"), (int, float))
                   for k in pretrained.METRIC_NAMES) or not isinstance(
                reported["random_real_accuracy"].get("n"), int):
            from ddref.saved import SavedFileError

            raise SavedFileError(f"{metrics_path} has unusable accuracies; re-create it with "
                                 f"`ddref distill`.")
    draws = reported["random_real_accuracy"]["n"] if reported and n_nets is None else None
    metrics = pretrained.evaluate_saved(distilled, n_nets=n_nets, baseline_draws=draws)
    print(f"target test accuracy of pre-trained networks ({metrics['evaluated_on']['file']}, "
          f"networks {metrics['evaluated_on']['network_ids']}) with {path}:")
    print("\n".join(pretrained.summary_lines(metrics)))
    if reported is None or n_nets is not None:
        return 0
    same = all(abs(reported[k]["mean"] - metrics[k]["mean"]) < 1e-9 for k in pretrained.METRIC_NAMES
               if k in reported)
    print("reported at the end of the run: " + ", ".join(
        f"{k} {100 * reported[k]['mean']:.2f}%" for k in pretrained.METRIC_NAMES if k in reported)
        + f" ({'reproduced' if same else 'DIFFERENT'})")
    return 0 if same else 1


def cmd_show(args):
    from ddref.distill import DistilledSet, History

    path = _distilled_path(args.run)
    out = path.parent
    distilled = DistilledSet.load(path)
    if distilled.classes is not None:      # labels must name one of the classes it stores
        distilled.check(len(distilled.classes), source=path)
    metrics_path = out / "metrics.json"
    history, baseline, attack = None, None, None
    if metrics_path.exists():
        metrics = _reported_metrics(metrics_path)
        attack = metrics.get("attack") if isinstance(metrics.get("attack"), dict) else None
        try:
            history = History(**metrics["history"])
            baseline = float(metrics["random_real_accuracy"]["mean"])
        except (TypeError, KeyError, ValueError):
            from ddref.saved import SavedFileError

            raise SavedFileError(f"{metrics_path} has an unusable history or "
                                 f"random_real_accuracy; re-create it with `ddref distill`.") from None
    stem = "" if path.name == "distilled.npz" else path.stem + "-"
    print(f"drawing {path} …")
    _draw(out, distilled, history, baseline, stem, attack=attack)
    drawn = [f"{out}/{stem}{name}.png" for name, made in (
        ("distilled", True), ("labels", distilled.soft_labels is not None), ("curves", history))
        if made]
    print(f"wrote {', '.join(drawn)}"
          + ("" if history else f" (no metrics.json beside {path.name}: no curves)"))
    return 0


def cmd_train(args):
    from ddref import nn
    from ddref.evaluate import accuracy_on, check_trained, train_full

    dataset = data.load(args.dataset)
    model = nn.build_model(args.model, dataset.image_shape, dataset.num_classes)
    epochs = args.epochs if args.epochs is not None else (30 if args.dataset == "digits" else 15)
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):   # divergence is said below
        params = train_full(model, dataset, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed, progress=not args.no_progress)
        check_trained(model, params, dataset, f"--lr {args.lr:g}")   # one sentence if it diverged
    acc = accuracy_on(model.apply, params, dataset.x_test, dataset.y_test)
    print(f"{args.model} trained on all {len(dataset.y_train)} {args.dataset} training images "
          f"for {epochs} epochs: test accuracy {100 * acc:.2f}% ({len(dataset.y_test)} test images)")
    return 0


def cmd_datasets(args):
    rows = data.list_datasets()
    print(f"{'name':13s} {'image':>8s} {'classes':>7s} {'train':>6s} {'test':>6s}  available")
    for row in rows:
        shape = "×".join(str(s) for s in row["image_shape"])
        where = f"yes, in the {row['location']}" if row["available"] else f"no: {row['how']}"
        print(f"{row['name']:13s} {shape:>8s} {row['num_classes']:>7d} {row['n_train']:>6d} "
              f"{row['n_test']:>6d}  {where}")
    cache = data.cache_dir()
    problem = " — it is a file, not a folder: downloads cannot go there" if cache.is_file() else ""
    print(f"cache directory: {cache}{problem} (set DDREF_DATA to move it)")
    return 0


def cmd_pretrain(args):
    from ddref import nn, pretrained

    if args.list:
        rows = pretrained.list_pools()
        print(f"pre-trained pools in {pretrained.pool_dir()} (set DDREF_DATA to move it):")
        for row in rows:
            if row["ok"]:
                print(f"  {row['file']}: {row['n_nets']} {row['model']} on {row['source']} "
                      f"(shape of {row['target']}), {row['split']}, {row['epochs']} epochs, "
                      f"source test accuracy {row['test_accuracy']}, ddref {row['version']}")
            else:
                print(f"  {row['file']}: UNUSABLE: {row['error']}")
        if not rows:
            print("  none yet; make one with `ddref pretrain --dataset D --model M --nets N`")
        return 0
    target = data.load(args.target or args.dataset)
    nn.build_model(args.model, target.image_shape, target.num_classes)  # a clear error if it cannot fit
    spec = pretrained.PoolSpec(source=args.dataset, target=target.name, model=args.model,
                               image_shape=target.image_shape, num_classes=target.num_classes,
                               split=args.split, n_nets=args.nets, epochs=args.epochs, lr=args.lr)
    pool, trained = pretrained.get_pool(spec, progress=not args.no_progress)
    print(f"{'trained' if trained else 'reusing'} {pool.path}: {len(pool)} networks, source "
          f"test accuracy {pretrained.Accuracy.of(pool.test_accuracy)}")
    print(f"  {pool.meta['transform']}")
    return 0


def cmd_download(args):
    paths = data.download(args.name)
    cache = data.cache_dir()
    for path in paths:
        print(f"verified {path}" + ("" if cache in path.parents else " (a package's folder: "
                                                                       "nothing to download)"))
    if not paths:
        print(f"{args.name} needs no download")
    return 0


def cmd_table(args):
    from ddref import table

    if args.grid not in table.GRIDS:
        raise ValueError(f"--grid {args.grid!r} is not a grid; choose one of {', '.join(table.GRIDS)}.")
    if args.jobs == 0:
        raise ValueError("--jobs must be a positive number of workers, or -1 for all cores.")
    out = Path(args.out or ("results" if args.grid == "readme" else f"results/{args.grid}"))
    try:
        table.run_grid(table.GRIDS[args.grid], out, jobs=args.jobs, only=args.only,
                       progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"stopped; the finished cells are kept in {out}/cells: run the same command again "
              f"to compute the rest", file=sys.stderr)
        return 130
    return 0


COMMANDS = {"distill": cmd_distill, "evaluate": cmd_evaluate, "show": cmd_show,
            "train": cmd_train, "datasets": cmd_datasets, "pretrain": cmd_pretrain,
            "download": cmd_download, "table": cmd_table}


def _no_progress_bar_into_a_file(args):
    """A progress bar is for a terminal: redirected into a log it is thousands of redrawn
    lines, so a command whose stderr is not a terminal runs as with --no-progress."""
    if hasattr(args, "no_progress") and not sys.stderr.isatty():
        args.no_progress = True


def main(argv=None):
    try:
        from ddref import backend  # noqa: F401  (selects DDREF_BACKEND, which may fail)
        from ddref.distill import DistillError
        from ddref.nn import ShapeError
        from ddref.saved import SavedFileError

        errors = (data.DataError, DistillError, SavedFileError, ShapeError, ValueError,
                  backend.BackendUnavailable, OSError)
    except (ValueError, ImportError, RuntimeError) as error:
        print(f"ddref: error: {error} (from DDREF_BACKEND={os.environ.get('DDREF_BACKEND')!r})"
              if "backend" in str(error).lower() else f"ddref: error: {error}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    _no_progress_bar_into_a_file(args)
    try:
        if args.threads:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=args.threads, user_api="blas"):
                return COMMANDS[args.command](args)
        return COMMANDS[args.command](args)
    except errors as error:
        print(f"ddref: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddref: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
