"""Reverse-mode autodiff over an ONNX graph, emitted as more ONNX.

Given a scalar-valued functional ``sum(seed * output)`` (``seed`` is a graph input shaped like
``output``), the engine appends nodes computing its gradient with respect to any tensors
``wrt``. It knows nothing about particular ops: each node's vector-Jacobian product comes from
a rule table (:mod:`onnxcam.autodiff.rules`), and the engine only

1. finds the nodes on a differentiable path from ``wrt`` to ``output`` (everything else is
   constant for the backward pass, so no graph cut is needed),
2. checks that every one of them has a rule, reporting *all* missing ones at once,
3. walks them in reverse topological order, calling each rule with the incoming gradients and
   summing the contributions of tensors read by several nodes (residual Adds, SiLU's x*s(x)).

It never guesses: a gradient that reaches a node output its rule does not handle (the second
output of LayerNormalization, say), or an input on the path for which the rule returns no
gradient, is an :class:`UnsupportedOpError`, not a
silent zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UnsupportedOpError
from .emitter import Emitter, Tensor
from .rules import NON_DIFFERENTIABLE, RULES, Rule, VJP

_FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}


def _is_float(tensor: gs.Tensor) -> bool:
    dtype = tensor.dtype
    if dtype is None:
        return True  # unknown: decided by the producing op (integer ops are NON_DIFFERENTIABLE)
    try:
        return np.dtype(dtype) in _FLOAT_DTYPES
    except TypeError:
        return False


def _carries_gradient(tensor: gs.Tensor) -> bool:
    """Float tensors, and the integers QuantizeLinear makes: the gradient passes straight
    through a QuantizeLinear -> DequantizeLinear pair (see their rules)."""
    return _is_float(tensor) or any(node.op == "QuantizeLinear" for node in tensor.inputs)


def differentiable_path(wrt: Iterable[gs.Tensor], output: gs.Tensor) -> tuple[list[gs.Node], set[str]]:
    """Nodes on a float path from any of ``wrt`` to ``output`` (graph order), and the names of
    the tensors on such paths: exactly the tensors that receive a gradient."""
    downstream: set[str] = set()
    stack = list(wrt)
    while stack:
        tensor = stack.pop()
        if tensor.name in downstream or not _carries_gradient(tensor):
            continue
        downstream.add(tensor.name)
        for node in tensor.outputs:
            if node.op not in NON_DIFFERENTIABLE:
                stack.extend(node.outputs)

    upstream: set[str] = set()
    stack = [output]
    while stack:
        tensor = stack.pop()
        if tensor.name in upstream:
            continue
        upstream.add(tensor.name)
        for node in tensor.inputs:
            stack.extend(node.inputs)

    on_path = downstream & upstream
    nodes = [
        node for node in _graph_order(output)
        if any(t.name in on_path for t in node.inputs) and any(t.name in on_path for t in node.outputs)
    ]
    return nodes, on_path


def _graph_order(output: gs.Tensor) -> list[gs.Node]:
    """The nodes ``output`` depends on, producers before consumers (iterative DFS)."""
    order: list[gs.Node] = []
    visited: set[int] = set()
    stack: list[tuple[gs.Node, bool]] = [(n, False) for n in output.inputs]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for tensor in node.inputs:
            for producer in tensor.inputs:
                if id(producer) not in visited:
                    stack.append((producer, False))
    return order


@dataclass
class GradientPlan:
    """What the engine will do, known before any node is emitted."""

    nodes: list[gs.Node]
    on_path: set[str]
    missing: list[gs.Node]
    min_opset: int


def plan(wrt: Sequence[gs.Tensor], output: gs.Tensor, rules: Mapping[str, Rule] = RULES) -> GradientPlan:
    """The path nodes, those without a rule, and the opset the rules need."""
    nodes, on_path = differentiable_path(wrt, output)
    missing = [n for n in nodes if n.op not in rules]
    min_opset = max([rules[n.op].min_opset for n in nodes if n.op in rules] + [13])
    return GradientPlan(nodes, on_path, missing, min_opset)


def describe_missing(missing: Sequence[gs.Node]) -> str:
    ops = sorted({n.op for n in missing})
    listed = ", ".join(f"{n.op} '{n.name}'" for n in missing[:12])
    more = f" and {len(missing) - 12} more" if len(missing) > 12 else ""
    return f"no gradient rule for op{'s' if len(ops) > 1 else ''} {', '.join(ops)} on the gradient path ({listed}{more})"


def _refuse(node: gs.Node, reason: str):
    raise UnsupportedOpError(f"cannot differentiate {node.op} '{node.name}': {reason}",
                             [(node.op, node.name)]) from None


def build_gradients(
    emitter: Emitter,
    output: gs.Tensor,
    seed: gs.Tensor,
    wrt: Sequence[gs.Tensor],
    rules: Mapping[str, Rule] = RULES,
) -> list[Tensor]:
    """Emit d(sum(seed * output))/d(w) for each w in ``wrt``; returns their tensors in order.

    Raises :class:`UnsupportedOpError` naming every path node that has no rule.
    """
    gradient_plan = plan(wrt, output, rules)
    if gradient_plan.missing:
        raise UnsupportedOpError(describe_missing(gradient_plan.missing),
                                 [(n.op, n.name) for n in gradient_plan.missing])
    on_path = gradient_plan.on_path

    grads: dict[str, Tensor] = {output.name: seed}
    for node in reversed(gradient_plan.nodes):
        incoming = [grads.get(t.name) for t in node.outputs]
        if all(g is None for g in incoming):
            continue
        rule = rules[node.op]
        if not rule.multi_output and any(g is not None for g in incoming[1:]):
            _refuse(node, "its rule only differentiates the first output, and a later one is on the gradient path")
        needs = [
            t.name in on_path and not isinstance(t, gs.Constant)
            for t in node.inputs
        ]
        try:
            contributions = list(rule(VJP(emitter, node, incoming, needs)))
        except NotImplementedError as exc:
            _refuse(node, str(exc))
        contributions += [None] * (len(needs) - len(contributions))
        for index, (tensor, need, grad) in enumerate(zip(node.inputs, needs, contributions)):
            if not need:
                continue
            if grad is None:
                _refuse(node, f"no gradient rule for its input {index} ('{tensor.name}'), "
                              "which is on the gradient path")
            previous = grads.get(tensor.name)
            grads[tensor.name] = grad if previous is None else emitter.add(previous, grad)

    return [grads[w.name] if w.name in grads else emitter.zeros_like(w) for w in wrt]
