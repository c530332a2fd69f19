"""Triton kernels, installed as lowrank_engine.kernels. Reached only through lowrank_engine.ops."""
import importlib.util


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None and False  # kernels land with issue 3


def covariance_accumulate(A, B, C, X, Xp, weight):
    raise NotImplementedError


def lowrank_linear(x, V, U, bias):
    raise NotImplementedError


def lowrank_linear_grouped(x, V_cat, Us, biases):
    raise NotImplementedError
