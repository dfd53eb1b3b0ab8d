"""``ddref distill``: a run in a locked folder, its end (the saved set, pictures, metrics)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ddref.cli.options import _given_config_options


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
