"""Figures: image grids of distilled or real images, learning-rate schedules, training curves.

All functions draw with matplotlib, return the Figure, and save it when given a path.
Images are shown in pixel space: the normalisation is undone and values clipped to [0, 1]
(distilled pixels may leave that range; clipping only affects the picture).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ddref.data import denormalise
from ddref.labels import LABEL_FORMS


def to_pixels(images, mean, std):
    """(…, C, H, W) normalised images → (…, H, W) or (…, H, W, 3) in [0, 1] for imshow."""
    pixels = np.clip(denormalise(np.asarray(images), mean, std), 0.0, 1.0)
    pixels = np.moveaxis(pixels, -3, -1)
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def save_figure(fig, path, **options):
    """Save ``fig`` to ``path`` (format from its suffix) atomically; a folder or disk that
    cannot take it is one sentence naming the path (:func:`ddref.saved.write_atomically`)."""
    from ddref.saved import write_atomically

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    write_atomically(path, lambda stream: fig.savefig(stream, format=fmt, **options))


def _finish(fig, path):
    if path is not None:
        save_figure(fig, path, dpi=120, bbox_inches="tight")
    return fig


def image_grid(images, mean, std, row_labels=None, col_labels=None, title=None, path=None,
               cell=0.9, cell_labels=None):
    """A grid of images (R, K, C, H, W): one row per R, one column per K.  ``cell_labels``
    (R × K, optional) titles every image; a cell whose label is None is left blank."""
    pixels = to_pixels(images, mean, std)
    rows, cols = pixels.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 0.6, cell * rows + 0.6),
                             squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01, wspace=0.02, hspace=0.02)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if cell_labels is not None:
                if cell_labels[r][c] is None:
                    ax.axis("off")
                    continue
                ax.set_title(str(cell_labels[r][c]), fontsize=8, pad=2)
            ax.imshow(pixels[r, c], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if r == 0 and col_labels is not None:
                ax.set_title(str(col_labels[c]), fontsize=9)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[r]), fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=11)
    return _finish(fig, path)


def plot_distilled(distilled, class_names=None, title=None, path=None):
    """The distilled set: rows = steps, columns = images of a step (class-major), with the
    learned learning rate of that step in every epoch written beside the row."""
    steps = distilled.images.shape[0]
    names = class_names if class_names is not None else [str(c) for c in range(int(distilled.labels.max()) + 1)]
    if len(distilled.labels) and not 0 <= int(distilled.labels.min()) <= int(distilled.labels.max()) < len(names):
        raise ValueError(f"the set's labels run {int(distilled.labels.min())}..{int(distilled.labels.max())} "
                         f"but there are {len(names)} class names (classes 0..{len(names) - 1}); "
                         f"the set is damaged — make it again with `ddref distill`.")
    col_labels = [names[int(c)] for c in distilled.labels]
    cfg = distilled.config
    method = cfg.get("method", "bptt")
    pool = method != "bptt"       # dc, dm, kip: an unordered pool, no steps and no learned rates
    row_labels = (["pool"] if pool else
                  [f"step {s + 1}\nη̃ " + ", ".join(f"{lr:.3f}" for lr in distilled.lrs[:, s])
                   for s in range(steps)])
    if title is None and pool:
        title = (f"{cfg.get('dataset', '?')} / {cfg.get('model', '?')}, {method}: "
                 f"{distilled.images.shape[1]} images, an unordered pool")
    elif title is None:
        title = (f"{cfg.get('dataset', '?')} / {cfg.get('model', '?')}, {cfg.get('init', '?')} init: "
                 f"{distilled.images.shape[0] * distilled.images.shape[1]} distilled images, "
                 f"{distilled.lrs.shape[0]} epoch{'' if distilled.lrs.shape[0] == 1 else 's'} "
                 f"(η̃ per epoch beside each step)")
    per_step = distilled.images.shape[1]
    width = wrap_width(steps, per_step)
    if width == per_step:
        return image_grid(distilled.images, distilled.mean, distilled.std, row_labels=row_labels,
                          col_labels=col_labels, title=title, path=path)
    images, cells, rows = wrapped(distilled.images, col_labels, width)
    labels = [row_labels[s] if first else "" for s, first in rows]
    return image_grid(images, distilled.mean, distilled.std, row_labels=labels, title=title,
                      path=path, cell_labels=cells)


MAX_ASPECT = 3.0     # image cells across ÷ down; with the row labels the figure stays below 4:1


def wrap_width(steps, per_step, max_aspect=MAX_ASPECT):
    """Images per grid row when each step's ``per_step`` images are wrapped onto several rows so
    that the grid is at most ``max_aspect`` cells wide per cell high: all of them when they fit,
    else the largest divisor w of ``per_step`` with w ≤ max_aspect · steps · ⌈per_step / w⌉
    (full rows), or the largest width that fits when no divisor is at least half of it."""
    if per_step <= max_aspect * steps:
        return per_step
    fits = [w for w in range(1, per_step + 1) if w <= max_aspect * steps * -(-per_step // w)]
    widest = max(fits)
    divisors = [w for w in fits if per_step % w == 0]
    return max(divisors) if divisors and 2 * max(divisors) >= widest else widest


def wrapped(images, col_labels, width):
    """(S, K, C, H, W) → (S·⌈K/width⌉, width, C, H, W): each step's images on consecutive rows,
    the last row of a step padded with blank cells; the per-cell labels (None: blank) and, for
    each grid row, (step, whether it is the step's first row)."""
    steps, per_step = images.shape[:2]
    per_row = -(-per_step // width)
    grid = np.zeros((steps * per_row, width, *images.shape[2:]), dtype=images.dtype)
    cells = [[None] * width for _ in range(steps * per_row)]
    rows = [(s, r == 0) for s in range(steps) for r in range(per_row)]
    for s in range(steps):
        for k in range(per_step):
            row, col = s * per_row + k // width, k % width
            grid[row, col] = images[s, k]
            cells[row][col] = col_labels[k]
    return grid, cells, rows


def plot_lr_schedule(lrs, ax=None, path=None, label=None):
    """Learned learning rates η̃ in the order the inner loop uses them (epoch-major)."""
    lrs = np.asarray(lrs)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3))
    epochs, steps = lrs.shape
    ax.plot(np.arange(1, lrs.size + 1), lrs.ravel(), marker="o", ms=3, label=label)
    for e in range(1, epochs):
        ax.axvline(e * steps + 0.5, color="0.8", lw=0.8)
    ax.set_xlabel("inner step (epochs separated by grey lines)")
    ax.set_ylabel("learned η̃")
    ax.set_title("learned learning rates")
    return _finish(fig if fig is not None else ax.figure, path)


def plot_curves(history, path=None, baseline=None, title=None, attack=None):
    """Outer loss and test accuracy against outer iterations.  ``attack`` (the ``attack`` entry
    of an attack run's metrics.json): the attack success K → T of the held-out networks after
    the distilled steps, and their accuracy on the other classes, drawn as marked points at the
    last iteration (the run measures them once, at its end), with the relabelled-real
    baseline's attack success as a dotted line; the accuracy curve is then accuracy against
    the true labels, which a successful attack lowers."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    its, losses = np.asarray(history.iterations), np.asarray(history.losses)
    ax_loss.plot(its, losses, lw=0.6, alpha=0.4, color="C0", label="per iteration")
    if len(losses) >= 20:
        window = max(len(losses) // 50, 5)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax_loss.plot(its[window - 1:], smooth, color="C0", label=f"mean of {window}")
    ax_loss.set_xlabel("outer iteration")
    ax_loss.set_ylabel("outer loss ℓ(x_real, θ_T)")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    ax_acc.plot(history.eval_iterations, 100 * np.asarray(history.eval_accuracies), marker="o",
                ms=3, color="C1", label="distilled" if attack is None else
                "distilled: accuracy against the true labels")
    if baseline is not None:
        ax_acc.axhline(100 * baseline, color="0.4", ls="--", label="random real (same count)")
    ax_acc.set_xlabel("outer iteration")
    ax_acc.set_ylabel("test accuracy (%)")
    if attack is not None:
        _attack_points(ax_acc, attack, history)
        ax_acc.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    else:
        ax_acc.legend(fontsize=8, loc="lower right")
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


def _attack_points(ax, attack, history):
    """The attack's end-of-run measures on the accuracy axes (see :func:`plot_curves`)."""
    k, t = attack["source_class"], attack["target_class"]
    end = history.eval_iterations[-1] if len(history.eval_iterations) else 0
    after = attack["distilled"]["after"]
    for name, label, colour, marker in (
            ("attack_success", f"attack success {k}→{t}: {k}s read as {t} (end of run)", "C3", "*"),
            ("other_classes_accuracy", f"accuracy on classes other than {k} (end of run)", "C2", "D")):
        m = after[name]
        ax.errorbar([end], [100 * m["mean"]], yerr=[100 * m["std"]], color=colour, marker=marker,
                    ms=11 if marker == "*" else 6, capsize=3, ls="none",
                    label=f"{label}: {100 * m['mean']:.1f}%")
    real = attack["relabelled_real"]["after"]["attack_success"]["mean"]
    ax.axhline(100 * real, color="C3", ls=":", lw=1,
               label=f"attack success, relabelled real (lr {attack['relabelled_real_lr']:g})")
    ax.set_ylim(-3, 103)
    ax.set_ylabel("test accuracy / attack success (%)")


def plot_real_samples(dataset, per_class=8, seed=0, path=None, title=None):
    """A grid of real training images: one row per class."""
    rng = np.random.default_rng(seed)
    rows = [dataset.x_train[rng.choice(np.flatnonzero(dataset.y_train == c), per_class, replace=False)]
            for c in range(dataset.num_classes)]
    return image_grid(np.stack(rows), dataset.mean, dataset.std, row_labels=dataset.classes,
                      title=title or f"{dataset.name}: {per_class} training images per class",
                      path=path)


def plot_soft_labels(soft_labels, class_names=None, title=None, path=None, max_steps=None,
                     form="softmax"):
    """A heat map of the learned labels of the first ``max_steps`` steps (default all): one
    row per distilled image, step after step, one column per class.  Distributions (the
    softmax form) are drawn on [0, 1]; free labels (any sign) on a diverging scale centred
    on 0.  ``title`` defaults to one that names the form."""
    s = np.asarray(soft_labels)[:max_steps]
    rows = s.reshape(-1, s.shape[-1])
    k = rows.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
    fig, ax = plt.subplots(figsize=(0.45 * k + 2, 0.32 * len(rows) + 1.2))
    if form not in LABEL_FORMS:
        raise ValueError(f"form must be one of {', '.join(LABEL_FORMS)}; got {form!r}.")
    distributions = form == "softmax"
    if distributions:
        image = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    else:
        bound = float(np.abs(rows).max()) or 1.0
        image = ax.imshow(rows, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(k), names, fontsize=8)
    ax.set_xlabel("class")
    ax.set_ylabel("distilled image")
    n = s.shape[1]
    ax.set_yticks(range(len(rows)), [f"step {i // n + 1}, {i % n}" for i in range(len(rows))],
                  fontsize=6)
    fig.colorbar(image, ax=ax, label="target probability" if distributions else "target value")
    kind = "distributions" if distributions else "vectors (free)"
    ax.set_title(title or f"learned label {kind} (rows: images, step by step)", fontsize=10)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, dpi=110)
    return fig
