"""Attention methods for vision transformers: Attention Rollout and its gradient-weighted form.

Both read every self-attention's probabilities ``A_l = softmax(Q K^T / sqrt(d))`` (the Softmax
outputs, shape (N, heads, T, T), or (N*heads, T, T) in some exports), found in the graph by
:func:`find_attention`; the gradient-weighted form also reads their gradients
``dS/dA_l`` from the same rewritten session (:mod:`onnxcam.surgery` exposes any tensor), so
either method is one onnxruntime run.

* **Attention Rollout** (Abnar & Zuidema, ACL 2020, "Quantifying Attention Flow in
  Transformers"): with the residual connection as an identity,
  :math:`\\hat A_l = \\mathrm{rownorm}(\\tfrac12 E_h[A_l] + \\tfrac12 I)` and
  :math:`R = \\hat A_L \\hat A_{L-1} \\cdots \\hat A_1`. Class-agnostic.
* **Gradient-weighted rollout** (Chefer, Gur & Wolf, ICCV 2021, "Generic Attention-model
  Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", eqs. 5-6):
  :math:`R = I`, then for each layer in order :math:`\\bar A_l = E_h[(\\nabla A_l \\odot A_l)^+]`,
  :math:`R \\leftarrow R + \\bar A_l R`. ``\\nabla A_l`` is the gradient of the explained score
  ``s . logits`` (a class logit for a one-hot seed).

The map is the relevance of the patch tokens for the tokens the classifier reads: the CLS row
``R[0, P:]`` (the mean of the rows of every pooled prefix token, e.g. CLS and distillation for
DeiT; of all rows for mean-pooled models), reshaped to the token grid (:mod:`onnxcam.tokens`),
then scaled and resized like every other map (:func:`onnxcam.methods.scale_maps`).

Fused attention ops (onnxruntime's transformer optimizer writes ``com.microsoft`` Attention /
MultiHeadAttention; opset 23 has ``Attention``) hide the probabilities inside one node: they are
refused with the op named and how to export without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import OnnxcamError
from .tokens import TokenGrid, pooled_tokens

if TYPE_CHECKING:
    from .model import ModelGraph

#: Ops that compute attention in one node (their probabilities are not a graph tensor).
FUSED_ATTENTION = {
    ("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention"),
    ("com.microsoft", "PackedAttention"), ("com.microsoft", "PackedMultiHeadAttention"),
    ("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "DecoderMaskedMultiHeadAttention"),
    ("", "Attention"), ("ai.onnx", "Attention"),
}

UNFUSED_HINT = ("export the model without fused attention: torch.onnx.export(..., opset_version=18) "
                "(opset <= 22 writes MatMul + Softmax + MatMul) and skip onnxruntime's transformer "
                "optimizer (onnxruntime.transformers.optimizer), which fuses them")


def fused_hint(ops) -> str:
    """What to append to an autodiff "no rule" error when the ops are fused attention."""
    fused = sorted({op for op in ops if any(op == kind for _, kind in FUSED_ATTENTION)})
    return f"; {', '.join(fused)} is fused attention: {UNFUSED_HINT}" if fused else ""


@dataclass(frozen=True)
class AttentionLayers:
    """The self-attention probabilities of a model, in graph order, and how to read them."""

    names: tuple[str, ...]
    grid: TokenGrid
    rows: tuple[int, ...]


def fused_attention_nodes(graph: ModelGraph) -> list[tuple[str, str]]:
    """(op, node name) of every fused attention node."""
    return [(f"{n.domain or 'ai.onnx'}.{n.op_type}", n.name or n.output[0]) for n in graph.model.graph.node
            if (n.domain, n.op_type) in FUSED_ATTENTION]


def find_attention(graph: ModelGraph, logits: str) -> AttentionLayers:
    """Every Softmax over tokens whose output is multiplied by the values (``A V``) on the way
    to ``logits``; refuses fused attention, window attention and unknown token grids."""
    fused = fused_attention_nodes(graph)
    if fused:
        op, name = fused[0]
        raise OnnxcamError(f"{graph.source}: attention is fused into {op} node '{name}' "
                           f"({len(fused)} such nodes): its probabilities are not in the graph; {UNFUSED_HINT}")
    upstream = graph.ancestors(logits)
    names, sizes = [], set()
    for node in graph.model.graph.node:
        if node.op_type != "Softmax" or node.output[0] not in upstream:
            continue
        if not any(c.op_type == "MatMul" and c.input[0] == node.output[0]
                   for c in graph.consumers.get(node.output[0], [])):
            continue
        dims = graph.dims(node.output[0]) or ()
        if len(dims) not in (3, 4) or not isinstance(dims[-1], int) or dims[-1] != dims[-2]:
            continue
        names.append(node.output[0])
        sizes.add(dims[-1])
    if not names:
        raise OnnxcamError(f"{graph.source}: no self-attention (a Softmax over tokens followed by a MatMul "
                           "with the values) feeds the logits; attention methods apply to vision transformers")
    index = graph.token_index()
    grids = {t.grid for t in index.tensors.values() if t.grid is not None and t.tokens in sizes}
    if len(sizes) != 1 or not grids:
        ambiguous = [t for t in index.tensors.values() if t.grid is None and t.why and t.tokens in sizes]
        if ambiguous:
            from .tokens import ambiguous_error
            raise ambiguous_error(graph.source, ambiguous[0])
        raise OnnxcamError(f"{graph.source}: the attentions span {sorted(sizes)} tokens, not the token grid "
                           "of the image (window attention, as in Swin?): rollout needs global "
                           "self-attention; use a gradient method (gradcam) at the default layer")
    grid = sorted(grids, key=lambda g: g.prefix)[-1]
    rows = tuple(pooled_tokens(graph, index, upstream)) or tuple(range(grid.tokens))
    return AttentionLayers(tuple(names), grid, rows)


def per_head(array: np.ndarray, batch: int) -> np.ndarray:
    """Attention tensors as (N, heads, T, T), from (N, heads, T, T) or (N*heads, T, T)."""
    return array.reshape((batch, -1) + array.shape[-2:])


def rollout(attentions: list[np.ndarray], layers: AttentionLayers) -> np.ndarray:
    r"""Attention Rollout (Abnar & Zuidema 2020): :math:`R = \prod_l \hat A_l`,
    :math:`\hat A_l = \mathrm{rownorm}(\frac12 E_h[A_l] + \frac12 I)`. ``attentions`` are
    (N, heads, T, T) in graph order; returns the raw maps (N, h, w)."""
    eye = np.eye(attentions[0].shape[-1])
    return _patch_map(rollout_relevance([A.astype(np.float64) for A in attentions], eye), layers)


def gradient_rollout(attentions: list[np.ndarray], gradients: list[np.ndarray],
                     layers: AttentionLayers) -> np.ndarray:
    r"""Chefer, Gur & Wolf 2021: :math:`R \leftarrow R + E_h[(\nabla A_l \odot A_l)^+] R`, from
    :math:`R = I`. (N, heads, T, T) arrays in graph order; returns the raw maps (N, h, w)."""
    eye = np.eye(attentions[0].shape[-1])
    return _patch_map(gradient_rollout_relevance([A.astype(np.float64) for A in attentions],
                                                 [G.astype(np.float64) for G in gradients], eye), layers)


def rollout_relevance(attentions, eye):
    """The rollout recurrence on (N, heads, T, T) arrays; written with operators only, so the
    self-explaining export runs it unchanged on graph tensors (:class:`onnxcam.export.Traced`)."""
    relevance = eye
    for A in attentions:
        mixed = 0.5 * A.mean(axis=1) + 0.5 * eye
        relevance = (mixed / mixed.sum(axis=-1, keepdims=True)) @ relevance
    return relevance


def gradient_rollout_relevance(attentions, gradients, eye):
    """Chefer et al.'s recurrence, operators only (see :func:`rollout_relevance`)."""
    relevance = eye
    for A, G in zip(attentions, gradients):
        relevance = relevance + np.maximum(G * A, 0).mean(axis=1) @ relevance
    return relevance


def emit_patch_map(b, relevance, layers: AttentionLayers):
    """:func:`_patch_map` as graph nodes (``b`` an Emitter): rows gathered and averaged, the
    prefix columns sliced off, (N, h, w)."""
    rows = b.reduce_mean(b.op("Gather", relevance, b.ints(list(layers.rows)), axis=1), [1], keepdims=False)
    patches = b.slice(rows, [layers.grid.prefix], [np.iinfo(np.int64).max], [1])
    return b.reshape(patches, [0, layers.grid.h, layers.grid.w])


def _patch_map(relevance: np.ndarray, layers: AttentionLayers) -> np.ndarray:
    """Mean of the pooled tokens' rows over the patch columns, as (N, h, w)."""
    grid = layers.grid
    rows = relevance[:, list(layers.rows), grid.prefix:].mean(axis=1)
    return rows.reshape(len(relevance), grid.h, grid.w).astype(np.float32)
