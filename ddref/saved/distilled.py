"""The distilled set on disk (``distilled.npz``): :class:`DistilledSet`, saved and checked.

Images (S, n, C, H, W) in normalised space, their labels, the learned learning rates
(E, S), θ0 for fixed init, the normalisation, the config and, with learned labels, the
label distributions; a loaded set is checked before use, and anything that would make
training on it meaningless is one sentence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import ddref
from ddref.saved.files import SavedFileError, atomic_savez, json_field, load_npz


DISTILLED_KEYS = ("images", "labels", "lrs", "mean", "std", "config", "version")


@dataclass
class DistilledSet:
    """What a run produces: images (S, n, C, H, W) in normalised space, their labels (n,),
    the learned learning rates (E, S), θ0 for fixed init, and the data normalisation; with
    learned labels (``--learn-labels``) also the label distributions (S, n, K) that training
    on the set uses instead of the one-hot ``labels`` (the class each image started from)."""

    images: np.ndarray
    labels: np.ndarray
    lrs: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    config: dict
    theta0: dict | None = None
    version: str = ddref.__version__
    classes: tuple | None = None     # class names, so figures need not load the data set
    soft_labels: np.ndarray | None = None   # learned label distributions (S, n, K), ddref.labels

    def save(self, path):
        arrays = {"images": self.images, "labels": self.labels, "lrs": self.lrs,
                  "mean": self.mean, "std": self.std,
                  "config": np.array(json.dumps(self.config)), "version": np.array(self.version)}
        if self.classes is not None:
            arrays["classes"] = np.array([str(c) for c in self.classes])
        if self.soft_labels is not None:
            arrays["soft_labels"] = self.soft_labels
        for k, v in (self.theta0 or {}).items():
            arrays[f"theta0/{k}"] = np.asarray(v)
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path, num_classes=None):
        """Read and check a saved set.  ``num_classes`` (when known) bounds the labels."""
        path = Path(path)
        arrays = load_npz(path, "distilled set")
        missing = [k for k in DISTILLED_KEYS if k not in arrays]
        if missing:
            raise SavedFileError(f"{path} is not a distilled set: it lacks {', '.join(missing)}; "
                                 f"make one with `ddref distill`.")
        config = json_field(arrays, "config", path, "distilled set")
        if not isinstance(config, dict):
            raise SavedFileError(f"{path} is not a usable distilled set: its config is not a "
                                 f"JSON object; make it again with `ddref distill`.")
        theta0 = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("theta0/")}
        classes = tuple(str(c) for c in arrays["classes"]) if "classes" in arrays else None
        distilled = cls(images=arrays["images"], labels=arrays["labels"], lrs=arrays["lrs"],
                        mean=arrays["mean"], std=arrays["std"], config=config,
                        theta0=theta0 or None, version=str(arrays["version"]), classes=classes,
                        soft_labels=arrays.get("soft_labels"))
        distilled.check(num_classes, source=path)
        return distilled

    def check(self, num_classes=None, source="distilled set"):
        """One sentence for anything that would make training on this set meaningless."""
        def fail(problem):
            raise SavedFileError(f"{source}: {problem}; it cannot be used — make it again with "
                                 f"`ddref distill`.")

        for name in ("images", "lrs", "mean", "std"):
            if getattr(self, name).dtype.kind != "f":
                fail(f"its {name} are {getattr(self, name).dtype}, not floating-point numbers")
        if self.images.ndim != 5 or self.lrs.ndim != 2 or self.lrs.shape[1] != self.images.shape[0]:
            fail(f"it has images {self.images.shape} and lrs {self.lrs.shape}, where images "
                 f"(steps, n, C, H, W) and lrs (epochs, steps) are needed")
        n, channels = self.images.shape[1], self.images.shape[2]
        if self.labels.shape != (n,) or self.labels.dtype.kind not in "iu":
            fail(f"it has {n} images per step but labels of shape {self.labels.shape} and type "
                 f"{self.labels.dtype}")
        if n and (self.labels.min() < 0 or (num_classes is not None and self.labels.max() >= num_classes)):
            bound = f"0..{num_classes - 1}" if num_classes is not None else "0 or above"
            fail(f"its labels run {self.labels.min()}..{self.labels.max()}, outside {bound}")
        if self.mean.shape != (channels,) or self.std.shape != (channels,) or not (self.std > 0).all():
            fail(f"its normalisation (mean {self.mean.shape}, std {self.std.shape}) does not fit "
                 f"{channels}-channel images with positive std")
        for name, array in (("images", self.images), ("learning rates", self.lrs),
                            ("normalisation", np.concatenate([self.mean, self.std]))):
            if not np.isfinite(array).all():
                fail(f"its {name} contain NaN or inf")
        if self.soft_labels is not None:
            from ddref.labels import check_soft_labels

            problem = check_soft_labels(self.soft_labels, *self.images.shape[:2], num_classes,
                                        self.config.get("label_form", "softmax"))
            if problem:
                fail(problem)
        if not (self.lrs > 0).all():
            fail(f"its learning rates include {self.lrs.min():.3g}, and a learned learning rate "
                 f"is always positive")
        for key, value in (self.theta0 or {}).items():
            if value.dtype.kind != "f" or not np.isfinite(value).all():
                fail(f"its θ0 entry {key!r} is not a finite floating-point array")
        return self

    def check_theta0(self, shapes, source="distilled set"):
        """θ0, when saved, must have exactly the model's parameters with the model's shapes."""
        if self.theta0 is None:
            return self
        got = {k: tuple(v.shape) for k, v in self.theta0.items()}
        want = {k: tuple(v) for k, v in shapes.items()}
        if got != want:
            missing = sorted(set(want) - set(got))
            wrong = sorted(k for k in set(want) & set(got) if got[k] != want[k])
            extra = sorted(set(got) - set(want))
            detail = "; ".join(part for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"mis-shaped {', '.join(f'{k} {got[k]} (want {want[k]})' for k in wrong)}" if wrong else "",
                f"unknown {', '.join(extra)}" if extra else "") if part)
            raise SavedFileError(f"{source}: its θ0 does not fit the model ({detail}); it cannot "
                                 f"be used — make it again with `ddref distill`.")
        return self
