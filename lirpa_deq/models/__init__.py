"""Model builders for certified training: DEQ classifiers and explicit baselines (see registry)."""
from .architectures import cnn3, cnn7, conv_fc_deq, deq3, deq7, fc_deq
from .registry import MODELS, ModelEntry, build_model, model_entry

__all__ = ["MODELS", "ModelEntry", "build_model", "model_entry",
           "fc_deq", "conv_fc_deq", "deq3", "deq7", "cnn3", "cnn7"]
