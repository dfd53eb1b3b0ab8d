"""Dataset Condensation with Distribution Matching (DM; Zhao & Bilen, WACV 2023).

The synthetic set should have the same distribution as the real one in the embedding spaces
of many random networks.  DM matches the first moment (the mean embedding, an empirical
maximum mean discrepancy with a linear kernel) per class, under a freshly sampled network
ψθ each iteration:

    L_DM(S) = Σ_c ‖ (1/|T_c|) Σ_i ψθ(x_i)  −  (1/|S_c|) Σ_j ψθ(x̃_j) ‖²                (paper eq. 4)

with x_i the real images of class c in the batch, x̃_j the synthetic ones and ψθ the network
without its final linear layer (:func:`embed`).  θ is not trained: a new θ ~ p(θ0) is drawn
every outer iteration and never updated, so the gradient w.r.t. S is first-order (no
gradient of a gradient, no unrolling); this is what makes DM cheap.

Where this differs from the official code (VICO-UoE/DatasetCondensation, main_DM.py):
- The embedding is the network up to its last hidden layer for every ddref model: for the
  MLP the last hidden ReLU; for LeNet and the convnet the 84- / 192-unit ReLU before the
  classifier.  The official ConvNet embeds its convolutional features (its classifier is a
  single linear layer, so that is also "all but the last linear layer"); the official LeNet
  and MLP have no ``embed`` (DM was run with ConvNet only).
- No augmentation (the official DM applies DSA to both sides with a shared seed).
- The official loss sums per class, then the caller divides the *printed* value by the number
  of classes; the loss differentiated is the sum, as here.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from ddref import backend, losses, nn

PAPER = {
    "lr_images": 1.0,         # SGD on the synthetic images ...
    "momentum_images": 0.5,   # ... with momentum 0.5
    "batch_real": 256,        # real images per class per iteration
    "iterations": 20000,      # outer iterations (a fresh random network each)
    "init": "real",           # the synthetic images start as random real images
}

EMBEDDED_MODELS = ("mlp", "lenet", "convnet", "convnet3")


def _name(model):
    return getattr(model, "name", model)


def _unknown(model_name):
    return ValueError(f"DM has no embedding for model {model_name!r}: choose one of "
                      f"{', '.join(EMBEDDED_MODELS)} (or add the model to ddref.methods.dm.embed).")


def _mlp_layers(params):
    return sum(1 for k in params if k.startswith("w") and k[1:].isdigit())


def head_keys(model_name, params):
    """The names of the final linear layer's (weight, bias) in ``params``: what :func:`embed`
    leaves out, so that  dense(embed(x), w, b) == model.apply(params, x)."""
    model_name = _name(model_name)
    if model_name == "mlp":
        last = _mlp_layers(params) - 1
        return f"w{last}", f"b{last}"
    if model_name in ("lenet", "convnet"):
        return "f3w", "f3b"
    if model_name == "convnet3":
        return "fw", "fb"
    raise _unknown(model_name)


def embed(model_name, params, x):
    """ψθ(x): the network ``model_name`` without its final linear layer, images (N, C, H, W) →
    features (N, F), with the parameter names of ddref.nn ('mlp': w0, b0, …; 'lenet' and
    'convnet': c1w, …, f3b; 'convnet3': c1w, …, n3b, its features the flattened maps).
    Differentiable by autograd w.r.t. x."""
    model_name = _name(model_name)
    if model_name == "mlp":
        h = nn.flatten(x)
        for i in range(_mlp_layers(params) - 1):
            h = nn.relu(nn.dense(h, params[f"w{i}"], params[f"b{i}"]))
        return h
    if model_name in ("lenet", "convnet"):
        if model_name == "lenet":
            pads = (2 if x.shape[2] == 28 else 0, 0)       # as nn.lenet: pad 2 for 28×28 only
        else:
            pads = (2, 2)
        h = nn.to_nhwc(x)
        h = nn.max_pool2x2_nhwc(nn.relu(nn.conv2d_nhwc(h, params["c1w"], params["c1b"], pad=pads[0])))
        h = nn.max_pool2x2_nhwc(nn.relu(nn.conv2d_nhwc(h, params["c2w"], params["c2b"], pad=pads[1])))
        h = nn.relu(nn.dense(nn.flatten(h), params["f1w"], params["f1b"]))
        return nn.relu(nn.dense(h, params["f2w"], params["f2b"]))
    if model_name == "convnet3":     # as nn.convnet3 up to its classifier: DC's ConvNet.embed
        h = nn.to_nhwc(x)
        pad1 = nn.convnet3_first_pad(x.shape[1])
        for i, pad in ((1, pad1), (2, 1), (3, 1)):
            h = nn.conv2d_nhwc(h, params[f"c{i}w"], params[f"c{i}b"], pad=pad)
            h = nn.avg_pool2x2_nhwc(nn.relu(nn.instance_norm_nhwc(h, params[f"n{i}g"], params[f"n{i}b"])))
        return nn.flatten(h)
    raise _unknown(model_name)


def class_means(features, labels, num_classes):
    """The mean feature of each class, (num_classes, F), as (Yᵀ F) / counts with Y the one-hot
    labels: one matrix product instead of a loop over classes.  Rows of absent classes are 0."""
    labels = backend.to_numpy(labels)
    onehot = (labels[:, None] == np.arange(num_classes)[None, :]).astype(getval(features).dtype)
    counts = np.maximum(onehot.sum(axis=0), 1.0)
    return nn.matmul(backend.asarray((onehot / counts).T), features)


def _check_labels(labels, num_classes, name):
    return np.unique(backend.to_numpy(losses.class_labels(labels, num_classes, name)))


def dm_loss(model_name, params, x_syn, y_syn, x_real, y_real, num_classes):
    """L_DM(S) = Σ_c ‖mean_i ψθ(x_real_i) − mean_j ψθ(x̃_j)‖² over the classes c of y_syn.

    params: a freshly initialised network (constants); x_syn (n, C, H, W), y_syn (n,) int: the
    synthetic set; x_real, y_real: a real batch with images of every class in y_syn.
    Differentiate w.r.t. x_syn with autograd (first order).
    """
    syn_classes = _check_labels(y_syn, num_classes, "y_syn")
    real_classes = _check_labels(y_real, num_classes, "y_real")
    missing = sorted(set(syn_classes.tolist()) - set(real_classes.tolist()))
    if missing:
        raise ValueError(f"the real batch has no images of class(es) {missing} that the synthetic "
                         f"set has; sample the real batch per class (e.g. 256 images of each).")
    mean_real = class_means(embed(model_name, params, getval(x_real)), y_real, num_classes)
    mean_syn = class_means(embed(model_name, params, x_syn), y_syn, num_classes)
    rows = backend.asarray(syn_classes)
    return anp.sum((mean_real[rows] - mean_syn[rows]) ** 2)
