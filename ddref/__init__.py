"""ddref: a readable numpy + autograd reference implementation of Dataset Distillation.

Wang, Zhu, Torralba, Efros (2018), "Dataset Distillation", arXiv:1811.10959.
"""

__version__ = "0.1.0"
