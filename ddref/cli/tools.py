"""``ddref show``, ``train``, ``datasets``, ``pretrain``, ``download`` and ``table``."""

from __future__ import annotations

import sys
from pathlib import Path

from ddref import data
from ddref.cli.run import _draw
from ddref.cli.judge import _distilled_path, _reported_metrics


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
