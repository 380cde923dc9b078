"""Predict which experts a later MoE layer will use (estimators stage).

Public API (see each module's docstring):
    Estimator, SourceState, Predictor,
    layer_pairs, collect_parts,
    predict_target, target_logits          estimators.predictors (one target from its parts,
                                           Estimator.target_parts: a compiler fuses it once
                                           for every layer)
    load_estimator, save_estimator,
    router_fingerprint, read_config        estimators.checkpoint (checkpoint format v1)
    compute_metrics, MetricAccumulator     estimators.metrics
The `train` command: estimators.cli (python -m estimators); from Python,
run_train(TrainRun(...)) and run_evaluate(EvaluateRun(...)) with an
estimators.config.EstimatorConfig inside.
"""

from .checkpoint import load_estimator, read_config, router_fingerprint, save_estimator
from .predictors import (KINDS, PREDICTORS, Estimator, Predictor, SourceState, collect_parts, layer_pairs,
                         predict_target, target_logits)

__all__ = ["Estimator", "Predictor", "SourceState", "KINDS", "PREDICTORS", "collect_parts", "layer_pairs",
           "predict_target", "target_logits",
           "load_estimator", "read_config", "save_estimator", "router_fingerprint"]
