"""The shipped rules, in the order their suggestions are listed."""

from . import (
    activation_attribute, changed_weights, export_crash, float_drift, fp16_precision,
    frozen_shape, gelu_approximation, gridsample_opset, input_mutation,
    instrumentation_changed_result, names_lost, ort_optimisation, pixel_shuffle,
    preprocessing_mismatch, random_ops, reflect_pad, resize_mode, runtime_precision,
    training_mode,
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
    runtime_precision.RULE,
    input_mutation.RULE,
    reflect_pad.RULE,
    gridsample_opset.RULE,
    preprocessing_mismatch.RULE,
    # Before the two below: random draws explain a divergence they would misread.
    random_ops.RULE,
    float_drift.RULE,
    instrumentation_changed_result.RULE,
    export_crash.RULE,
    names_lost.RULE,
]
