# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""jkfac: K-FAC and KFC for JAX, as an optax transform."""

from jkfac.accumulation import MultiSteps, MultiStepsState
from jkfac.adaptive import QuadraticModelState, scale_by_quadratic_model
from jkfac.averaging import PolyakAveraging, PolyakState, averaged_params, polyak_average
from jkfac.burn_in import burn_in
from jkfac.diagnostics import Diagnostics, diagnostics, format_diagnostics
from jkfac.estimator import Estimator, estimator
from jkfac.layers import Layer, Param
from jkfac.losses import (register_bernoulli_predictive, register_categorical_predictive,
                          register_gaussian_predictive, sigmoid_cross_entropy,
                          softmax_cross_entropy, squared_error)
from jkfac.preconditioner import ScaleByKFACState, scale_by_kfac
from jkfac.schedules import growing_batch_size, growing_batch_sizes
from jkfac.statistics import Statistics
from jkfac.tags import register_conv, register_dense, register_scale_and_shift
from jkfac.transform import KFACState, kfac
from jkfac.trust_region import KLClipState, scale_by_kl_clip

__version__ = "0.1.0"

__all__ = [
    "Diagnostics", "Estimator", "KFACState", "KLClipState", "Layer", "MultiSteps",
    "MultiStepsState", "Param", "PolyakAveraging", "PolyakState", "QuadraticModelState",
    "ScaleByKFACState", "Statistics", "averaged_params", "burn_in", "diagnostics", "estimator",
    "format_diagnostics", "growing_batch_size", "growing_batch_sizes", "kfac", "polyak_average",
    "register_bernoulli_predictive", "register_categorical_predictive", "register_conv",
    "register_dense", "register_gaussian_predictive", "register_scale_and_shift",
    "scale_by_kfac", "scale_by_kl_clip", "scale_by_quadratic_model", "sigmoid_cross_entropy",
    "softmax_cross_entropy", "squared_error",
]
