"""The ``ddref`` command line: ``distill``, ``evaluate``, ``show``, ``train``, ``datasets``.

    ddref distill                       # digits, mlp, fixed init, 10 steps × 3 epochs
    ddref distill --init random --n-nets 4 --out runs/random
    ddref distill --resume --out runs/random
    ddref evaluate runs/digits-mlp-fixed
    ddref show runs/digits-mlp-fixed
    ddref train --dataset mnist5k --model lenet
    ddref datasets
    ddref download mnist
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ddref import data

# help for each DistillConfig field; the option is --field-name, the default the config's
CONFIG_HELP = {
    "dataset": "data set to distil (see `ddref datasets`)",
    "model": "network: mlp, lenet or convnet",
    "init": "fixed: one θ0 for the whole run; random: fresh θ0 ~ p(θ0) every iteration",
    "n_nets": "random init: networks per iteration (meta-gradients averaged)",
    "steps": "gradient steps S, each on its own group of distilled images",
    "epochs": "epochs E: passes over the S steps (same images, new learning rates)",
    "images_per_class": "distilled images of each class in every step",
    "distill_lr": "initial learned learning rate η̃",
    "lr": "outer Adam learning rate",
    "betas": "outer Adam betas",
    "lr_decay": "outer learning rate factor applied every --decay-every iterations",
    "decay_every": "iterations between outer learning-rate decays (0: never)",
    "batch_size": "real images per outer iteration",
    "iterations": "outer iterations",
    "engine": "meta-gradient: backgrad (stored θ_t + Hessian-vector products) or naive (autograd through the unroll)",
    "objective": "classify, or attack: make --source-class be read as --target-class",
    "source_class": "attack: the class K to be misread",
    "target_class": "attack: the class T it should be read as",
    "init_scheme": "weight initialisation: xavier, kaiming or normal",
    "init_scale": "gain (xavier, kaiming) or std (normal) of the initialisation",
    "dtype": "float32 (fast) or float64",
    "seed": "random seed: same seed, same run",
    "eval_every": "iterations between test-accuracy points on the curve (0: end only)",
    "eval_inits": "random init: held-out initialisations for the final accuracy",
    "checkpoint_every": "iterations between checkpoints",
}


def _add_config_options(parser):
    from ddref.distill import DistillConfig

    for f in dataclasses.fields(DistillConfig):
        option = "--" + f.name.replace("_", "-")
        if f.name == "betas":
            parser.add_argument(option, type=float, nargs=2, default=None, metavar=("B1", "B2"),
                                help=CONFIG_HELP[f.name] + f" (default {f.default})")
        else:
            parser.add_argument(option, type=type(f.default), default=None,
                                help=CONFIG_HELP[f.name] + f" (default {f.default})")


def _config_from_args(args):
    from ddref.distill import DistillConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)
              if getattr(args, f.name) is not None}
    return DistillConfig.from_dict(values)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ddref", description="Dataset Distillation (Wang et al. 2018) in numpy + autograd.")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads (default 1: ddref's small matrix products gain little from "
                             "more, and on a busy machine threads wait on each other; 0: the BLAS "
                             "library's own default)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="learn distilled images and learning rates (Algorithm 1)")
    _add_config_options(p)
    p.add_argument("--out", default=None, help="run folder (default runs/DATASET-MODEL-INIT)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--baseline-draws", type=int, default=10,
                   help="random-real baseline: draws of real images (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("evaluate", help="re-train networks on a distilled set and report test accuracy")
    p.add_argument("run", help="run folder or distilled.npz")
    p.add_argument("--n-inits", type=int, default=None, help="random init: held-out initialisations")

    p = sub.add_parser("show", help="redraw the figures of a run")
    p.add_argument("run", help="run folder")

    p = sub.add_parser("train", help="train a network on the full training split")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="mlp")
    p.add_argument("--epochs", type=int, default=None, help="default 30 (digits) or 15")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")

    sub.add_parser("datasets", help="list the data sets and whether each is available now")

    p = sub.add_parser("download", help="download a data set's files into the cache and verify them")
    p.add_argument("name", help="mnist, usps, svhn or cifar10")
    return parser


# ---------------------------------------------------------------------------- commands


def cmd_distill(args):
    from ddref.distill import Distiller
    from ddref.evaluate import random_real_baseline

    config = _config_from_args(args)
    out = Path(args.out or f"runs/{config.dataset}-{config.model}-{config.init}")
    checkpoint = out / "checkpoint.npz"
    if args.resume:
        if not checkpoint.exists():
            raise SystemExit(f"ddref: error: no checkpoint in {out} to resume; start a new run without --resume.")
        distiller = Distiller.from_checkpoint(checkpoint, progress=not args.no_progress,
                                              iterations=args.iterations)
        print(f"resuming {out} at iteration {distiller.iteration} of {distiller.config.iterations}")
    else:
        if checkpoint.exists():
            print(f"replacing the run in {out} (pass --resume to continue it instead)")
        distiller = Distiller(config, progress=not args.no_progress)
    config = distiller.config
    print(f"distilling {config.dataset} for {config.model}: {config.init} init, "
          f"{config.steps} steps × {config.epochs} epochs, {len(distiller.labels)} images per step, "
          f"{config.engine} meta-gradient → {out}")
    try:
        distiller.run(checkpoint_path=checkpoint)
    except KeyboardInterrupt:
        print(f"stopped; continue with: ddref distill --resume --out {out}", file=sys.stderr)
        return 130

    distilled = distiller.distilled_set()
    distilled.save(out / "distilled.npz")
    accuracy = distiller.accuracy()
    baseline, baseline_lr = random_real_baseline(
        distiller.model, distiller.dataset, config.steps, config.epochs, distiller.labels,
        theta0=distiller.theta0, n_draws=args.baseline_draws, seed=config.seed, dtype=config.dtype)
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
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _draw(out, distilled, history, baseline.mean, distiller.dataset.classes)
    n = metrics["n_images"]
    print(f"wrote {out}/distilled.npz, distilled.png, curves.png, metrics.json")
    print(f"test accuracy, {n} distilled images:   {accuracy}")
    print(f"test accuracy, {n} random real images: {baseline} (lr {baseline_lr:g})")
    return 0


def _draw(out, distilled, history, baseline, class_names):
    import matplotlib.pyplot as plt

    from ddref import plot

    plt.close(plot.plot_distilled(distilled, class_names=class_names, path=out / "distilled.png"))
    cfg = distilled.config
    title = f"{cfg['dataset']} / {cfg['model']}, {cfg['init']} init, {cfg['engine']}"
    plt.close(plot.plot_curves(history, path=out / "curves.png", baseline=baseline, title=title))


def _distilled_path(run):
    run = Path(run)
    return run / "distilled.npz" if run.is_dir() else run


def cmd_evaluate(args):
    from ddref.distill import DistilledSet, held_out_accuracy

    path = _distilled_path(args.run)
    distilled = DistilledSet.load(path)
    accuracy = held_out_accuracy(distilled, n_inits=args.n_inits)
    print(f"test accuracy of networks trained on {path}: {accuracy}")
    metrics_path = path.parent / "metrics.json"
    if metrics_path.exists() and args.n_inits is None:
        reported = json.loads(metrics_path.read_text())["distilled_accuracy"]
        same = abs(reported["mean"] - accuracy.mean) < 1e-9
        print(f"reported at the end of the run: {100 * reported['mean']:.2f}% "
              f"({'reproduced' if same else 'DIFFERENT'})")
        return 0 if same else 1
    return 0


def cmd_show(args):
    from ddref.distill import DistilledSet, History

    run = Path(args.run)
    distilled = DistilledSet.load(_distilled_path(run))
    metrics_path = run / "metrics.json"
    if not metrics_path.exists():
        raise SystemExit(f"ddref: error: no metrics.json in {run}; is it a finished `ddref distill` run?")
    metrics = json.loads(metrics_path.read_text())
    dataset_classes = [str(c) for c in range(int(distilled.labels.max()) + 1)]
    try:
        dataset_classes = list(data.load(distilled.config["dataset"]).classes)
    except data.DataError:
        pass
    _draw(run, distilled, History(**metrics["history"]), metrics["random_real_accuracy"]["mean"],
          dataset_classes)
    print(f"wrote {run}/distilled.png and {run}/curves.png")
    return 0


def cmd_train(args):
    from ddref import nn
    from ddref.evaluate import accuracy_on, train_full

    dataset = data.load(args.dataset)
    model = nn.build_model(args.model, dataset.image_shape, dataset.num_classes)
    epochs = args.epochs or (30 if args.dataset == "digits" else 15)
    params = train_full(model, dataset, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, progress=not args.no_progress)
    acc = accuracy_on(model.apply, params, dataset.x_test, dataset.y_test)
    print(f"{args.model} trained on all {len(dataset.y_train)} {args.dataset} training images "
          f"for {epochs} epochs: test accuracy {100 * acc:.2f}% ({len(dataset.y_test)} test images)")
    return 0


def cmd_datasets(args):
    rows = data.list_datasets()
    print(f"{'name':10s} {'image':>10s} {'classes':>7s} {'train':>7s} {'test':>7s}  available  how")
    for row in rows:
        shape = "×".join(str(s) for s in row["image_shape"])
        print(f"{row['name']:10s} {shape:>10s} {row['num_classes']:>7d} {row['n_train']:>7d} "
              f"{row['n_test']:>7d}  {'yes' if row['available'] else 'no':9s}  {row['how']}")
    print(f"cache directory: {data.cache_dir()} (set DDREF_DATA to move it)")
    return 0


def cmd_download(args):
    paths = data.download(args.name)
    for path in paths:
        print(f"verified {path}")
    if not paths:
        print(f"{args.name} needs no download")
    return 0


COMMANDS = {"distill": cmd_distill, "evaluate": cmd_evaluate, "show": cmd_show,
            "train": cmd_train, "datasets": cmd_datasets,
            "download": cmd_download}


def main(argv=None):
    from ddref.distill import DistillError
    from ddref.nn import ShapeError

    args = build_parser().parse_args(argv)
    try:
        if args.threads:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=args.threads, user_api="blas"):
                return COMMANDS[args.command](args)
        return COMMANDS[args.command](args)
    except (data.DataError, DistillError, ShapeError, ValueError) as error:
        print(f"ddref: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
