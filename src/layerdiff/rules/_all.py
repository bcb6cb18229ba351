"""The shipped rules, in the order their suggestions are listed."""

from . import (
    activation_attribute, changed_weights, fp16_precision, frozen_shape, gelu_approximation,
    input_mutation,
    ort_optimisation, pixel_shuffle, resize_mode, training_mode,
)

RULES = [
    frozen_shape.RULE,
    training_mode.RULE,
    pixel_shuffle.RULE,
    resize_mode.RULE,
    gelu_approximation.RULE,
    fp16_precision.RULE,
    activation_attribute.RULE,
    changed_weights.RULE,
    ort_optimisation.RULE,
    input_mutation.RULE,
]
