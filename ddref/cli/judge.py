"""``ddref evaluate``: a saved set judged again the way its run judged it (and other ways)."""

from __future__ import annotations

from pathlib import Path



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
