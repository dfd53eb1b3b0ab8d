"""Networks written by hand: parameters are plain dicts of arrays, a model is a pair of
pure functions ``init(rng) -> params`` and ``apply(params, x) -> logits``, built from the
layers of :mod:`ddref.layers` (differentiable to any order by autograd, which Algorithm 1
needs: the meta-gradient differentiates through the inner step's gradient again).

The MLP, LeNet and ConvNet also describe themselves as ``layers`` (:mod:`ddref.fused_layers`),
which :mod:`ddref.fused` turns into hand-written fast passes; tests check both agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


from ddref import backend, fused_layers as fused  # the layer descriptions of ddref.fused's fast path
from ddref.fused_layers import matmul  # noqa: F401  (nn.matmul, as before)
from ddref.layers import (INIT_SCHEMES, INSTANCE_NORM_EPS, avg_pool2x2_nhwc, col2im,  # noqa: F401
                          conv2d, conv2d_nhwc, dense, flatten, im2col, init_weight,
                          instance_norm_nhwc, instance_standardise_nhwc, max_pool2x2,
                          max_pool2x2_nhwc, relu, to_nchw, to_nhwc)

# ---------------------------------------------------------------------------- models


class ShapeError(ValueError):
    """An input whose shape the model cannot take."""


@dataclass(frozen=True)
class Model:
    """A network: ``init(rng, dtype)`` draws parameters, ``apply(params, x)`` gives logits."""

    name: str
    input_shape: tuple          # (C, H, W)
    num_classes: int
    init: Callable
    apply: Callable

    def check_input(self, x_shape):
        """Raise :class:`ShapeError` with one clear sentence if images of ``x_shape`` do not fit."""
        _check_images(self.name, self.input_shape, x_shape)


def _check_images(name, input_shape, x_shape):
    got = tuple(x_shape[-3:])
    if got != tuple(input_shape):
        raise ShapeError(
            f"model {name!r} takes images of shape {tuple(input_shape)} (C, H, W) "
            f"but got {got}; choose a model built for this data set "
            f"(e.g. build_model(name, dataset.image_shape, dataset.num_classes)).")


def _model(name, input_shape, num_classes, shapes, forward, layers=None):
    """A :class:`Model` whose ``apply`` first checks the image shape (one cheap comparison),
    then runs ``forward``.  ``layers`` describes the same network for the hand-written
    gradient of :mod:`ddref.fused` (tests/test_fused.py checks that both agree)."""
    input_shape = tuple(input_shape)

    def apply(params, x):
        if tuple(x.shape[1:]) != input_shape:
            raise ShapeError(
                f"model {name!r} takes a batch of images of shape (N, {', '.join(map(str, input_shape))}) "
                f"but got an array of shape {tuple(x.shape)}; pass images shaped (N, C, H, W) from the "
                f"data set the model was built for.")
        return forward(params, x)

    apply.__doc__ = forward.__doc__
    apply.input_shape = input_shape
    if layers is not None:
        apply.layers = tuple(layers)
    return Model(name, input_shape, num_classes, _make_init(shapes), apply)


def _init_params(rng, shapes, scheme, scale, dtype):
    """Weights from ``scheme``; biases (1-D shapes) start at zero, as in the original code."""
    rng = backend.rng(rng)
    params = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            params[key] = backend.zeros(shape, dtype=dtype)
        else:
            params[key] = init_weight(rng, shape, scheme, scale, dtype)
    return params


def _make_init(shapes):
    def init(rng, dtype="float64", scheme="xavier", scale=1.0):
        return _init_params(rng, shapes, scheme, scale, dtype)

    init.shapes = shapes
    return init


def mlp(input_shape, hidden=(128,), num_classes=10):
    """A fully connected ReLU network: flatten → dense → relu → … → dense (logits)."""
    sizes = [math.prod(input_shape), *hidden, num_classes]
    shapes = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"w{i}"], shapes[f"b{i}"] = (n_in, n_out), (n_out,)
    n_layers = len(sizes) - 1

    def apply(params, x):
        h = flatten(x)
        for i in range(n_layers):
            h = dense(h, params[f"w{i}"], params[f"b{i}"])
            if i < n_layers - 1:
                h = relu(h)
        return h

    layers = [fused.Flatten()] + [fused.Dense(f"w{i}", f"b{i}", relu=i < n_layers - 1)
                                  for i in range(n_layers)]
    return _model("mlp", input_shape, num_classes, shapes, apply, layers)


def lenet(input_shape=(1, 28, 28), num_classes=10):
    """LeNet as in the original code: conv 6@5×5 (pad 2 for 28×28, 0 for 32×32) → relu → pool →
    conv 16@5×5 → relu → pool → 120 → 84 → classes."""
    c, h, w = input_shape
    if (h, w) not in ((28, 28), (32, 32)):
        raise ShapeError(
            f"lenet takes 28×28 or 32×32 images but got {h}×{w}; use the mlp model for this data set."
        )
    pad = 2 if h == 28 else 0
    shapes = {"c1w": (6, c, 5, 5), "c1b": (6,), "c2w": (16, 6, 5, 5), "c2b": (16,),
              "f1w": (400, 120), "f1b": (120,), "f2w": (120, 84), "f2b": (84,),
              "f3w": (84, num_classes), "f3b": (num_classes,)}

    def apply(params, x):
        h = to_nhwc(x)
        h = max_pool2x2_nhwc(relu(conv2d_nhwc(h, params["c1w"], params["c1b"], pad=pad)))
        h = max_pool2x2_nhwc(relu(conv2d_nhwc(h, params["c2w"], params["c2b"])))
        h = relu(dense(flatten(h), params["f1w"], params["f1b"]))
        h = relu(dense(h, params["f2w"], params["f2b"]))
        return dense(h, params["f3w"], params["f3b"])

    layers = [fused.ToCHWN(), fused.ConvReluPool("c1w", "c1b", pad), fused.ConvReluPool("c2w", "c2b"),
              *_classifier_layers()]
    return _model("lenet", input_shape, num_classes, shapes, apply, layers)


def _classifier_layers():
    """flatten → dense+relu → dense+relu → dense: the fully connected end of lenet and convnet."""
    return [fused.FlattenCHWN(), fused.Dense("f1w", "f1b", relu=True), fused.Dense("f2w", "f2b", relu=True),
            fused.Dense("f3w", "f3b")]


def convnet(input_shape=(3, 32, 32), num_classes=10):
    """A small AlexNet-like convnet for 32×32 colour images (the paper's CIFAR-10 network, scaled
    down): [conv 5×5 pad 2 → relu → pool] × 2 with 32 and 64 channels → 384 → 192 → classes."""
    c, h, w = input_shape
    if (h, w) != (32, 32):
        raise ShapeError(
            f"convnet takes 32×32 images but got {h}×{w}; use "
            f"{'lenet' if (h, w) == (28, 28) else 'the mlp model'} for this data set."
        )
    shapes = {"c1w": (32, c, 5, 5), "c1b": (32,), "c2w": (64, 32, 5, 5), "c2b": (64,),
              "f1w": (64 * 8 * 8, 384), "f1b": (384,), "f2w": (384, 192), "f2b": (192,),
              "f3w": (192, num_classes), "f3b": (num_classes,)}

    def apply(params, x):
        h = to_nhwc(x)
        h = max_pool2x2_nhwc(relu(conv2d_nhwc(h, params["c1w"], params["c1b"], pad=2)))
        h = max_pool2x2_nhwc(relu(conv2d_nhwc(h, params["c2w"], params["c2b"], pad=2)))
        h = relu(dense(flatten(h), params["f1w"], params["f1b"]))
        h = relu(dense(h, params["f2w"], params["f2b"]))
        return dense(h, params["f3w"], params["f3b"])

    layers = [fused.ToCHWN(), fused.ConvReluPool("c1w", "c1b", 2), fused.ConvReluPool("c2w", "c2b", 2),
              *_classifier_layers()]
    return _model("convnet", input_shape, num_classes, shapes, apply, layers)


# ---------------------------------------------------------------------------- convnet3 (Zhao et al.)
# The ConvNet of Dataset Condensation (Zhao, Mopuri & Bilen 2021) and of DSA, DM and KIP's
# convolutional rows.

def convnet3_first_pad(channels):
    """The first convolution's padding: 3 for one-channel images (28×28 → 32×32, as DC's code
    pads MNIST-like images), else 1."""
    return 3 if channels == 1 else 1


def convnet3_feature_sizes(input_shape):
    """The (H, W) of the maps after each of convnet3's three blocks: the 3×3 convolution keeps
    the size (padding 1; the first block's padding from :func:`convnet3_first_pad` adds 4 to
    each side length for one-channel images), the pooling halves it, rounding down.
    A ShapeError when a map vanishes."""
    c, h, w = input_shape
    pad = convnet3_first_pad(c)
    h, w = h + 2 * pad - 2, w + 2 * pad - 2
    sizes = []
    for block in (1, 2, 3):
        h, w = h // 2, w // 2
        if h < 1 or w < 1:
            smallest = 4 if pad == 3 else 8
            raise ShapeError(
                f"convnet3 halves the maps three times, so {input_shape[1]}×{input_shape[2]} images "
                f"leave no features after block {block}; it needs images of at least "
                f"{smallest}×{smallest} pixels ({c} channel{'s' if c > 1 else ''}): use the mlp "
                f"model for this data set.")
        sizes.append((h, w))
    return sizes


def convnet3(input_shape=(3, 32, 32), num_classes=10, width=128):
    """ConvNet-3, the field's standard network (Zhao et al. 2021, DC's ``ConvNet`` with its
    defaults: depth 3, width 128, ReLU, instance norm, average pooling):

        [conv 3×3 (``width`` channels) → instance norm (γ, β) → relu → 2×2 average pool] × 3
        → flatten → linear classifier.

    Padding is 1, except the first convolution on one-channel images pads 3, as DC's code
    does: 28×28 MNIST / Fashion-MNIST images become 32×32 maps (32 → 16 → 8 → 4) and the
    classifier sees 4·4·width features, as on 32×32 colour images.  8×8 digits give
    12 → 6 → 3 → 1 (1·1·width features).

    Initialisation: the convolution and classifier weights by the chosen scheme (xavier by
    default, like the other models; DC uses PyTorch's defaults), biases zero, γ = 1, β = 0.
    The convolution biases are kept as DC keeps them, though instance norm cancels them (their
    gradient is exactly zero).  The classifier reads the features in NHWC order (DC: NCHW),
    a fixed permutation of its weights.
    """
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"convnet3's width must be a positive whole number of channels, got {width!r}.")
    c = input_shape[0]
    pad1 = convnet3_first_pad(c)
    fh, fw = convnet3_feature_sizes(input_shape)[-1]
    shapes = {}
    for i, channels_in in enumerate((c, width, width), start=1):
        shapes[f"c{i}w"], shapes[f"c{i}b"] = (width, channels_in, 3, 3), (width,)
        shapes[f"n{i}g"], shapes[f"n{i}b"] = (width,), (width,)
    shapes["fw"], shapes["fb"] = (fh * fw * width, num_classes), (num_classes,)

    def apply(params, x):
        h = to_nhwc(x)
        for i, pad in ((1, pad1), (2, 1), (3, 1)):
            h = conv2d_nhwc(h, params[f"c{i}w"], params[f"c{i}b"], pad=pad)
            h = avg_pool2x2_nhwc(relu(instance_norm_nhwc(h, params[f"n{i}g"], params[f"n{i}b"])))
        return dense(flatten(h), params["fw"], params["fb"])

    apply.__doc__ = convnet3.__doc__
    plain = _model("convnet3", input_shape, num_classes, shapes, apply)

    def init(rng, dtype="float64", scheme="xavier", scale=1.0):
        params = _init_params(rng, shapes, scheme, scale, dtype)
        for i in (1, 2, 3):
            params[f"n{i}g"] = backend.ones((width,), dtype=dtype)      # γ = 1, β = 0
        return params

    init.shapes = shapes
    return Model(plain.name, plain.input_shape, plain.num_classes, init, plain.apply)


def linear(input_shape, num_classes=1):
    """Linear regression without bias, outputs = flatten(x) · w with w (D, K): the model of the
    paper's §3.4 (pair it with ``losses.squared_error``)."""
    shapes = {"w": (math.prod(input_shape), num_classes)}

    def apply(params, x):
        return matmul(flatten(x), params["w"])

    return _model("linear", input_shape, num_classes, shapes, apply)


MODELS = {"mlp": mlp, "lenet": lenet, "convnet": convnet, "linear": linear, "convnet3": convnet3}


def build_model(name, input_shape, num_classes=10, **options):
    """The model called ``name`` sized for images of ``input_shape`` (C, H, W)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}.")
    return MODELS[name](tuple(input_shape), num_classes=num_classes, **options)


def num_params(params) -> int:
    return sum(int(math.prod(p.shape)) for p in params.values())
