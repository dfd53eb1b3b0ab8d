"""Dataset-distillation methods that came after Wang et al. (2018), as pure loss functions.

Each module holds one method's loss, written like its paper's equation, as a function of the
learned arrays (the synthetic images, and for KIP optionally their labels) that HIPS autograd
differentiates; the outer loop (Adam/SGD on the learned arrays, RNG, checkpoints) lives
elsewhere and knows nothing of any method.

    dc   Dataset Condensation with Gradient Matching   (Zhao, Mopuri & Bilen, ICLR 2021)
    dm   Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023)
    kip  Kernel Inducing Points                          (Nguyen, Chen & Lee, ICLR 2021)

Labels are integer class indices (N,) throughout (ddref's class-major synthetic labels);
KIP turns them into (centred) one-hot rows itself, since it may learn them.
"""

from ddref.methods import dc, dm, kip  # noqa: F401

__all__ = ["dc", "dm", "kip"]
