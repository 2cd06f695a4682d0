"""Reverse-mode autodiff that emits standard ONNX ops: an engine and a table of VJP rules."""

from .emitter import Emitter
from .engine import GradientPlan, build_gradients, plan
from .opset import upgrade
from .rules import NON_DIFFERENTIABLE, RULES, Rule, VJP, guided_relu, rule

__all__ = ["Emitter", "GradientPlan", "build_gradients", "plan", "upgrade", "NON_DIFFERENTIABLE", "RULES",
           "Rule", "VJP", "guided_relu", "rule"]
