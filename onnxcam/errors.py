"""Errors onnxcam raises on bad input.

Every error is meant to be read by a user at a terminal: one line that names the file, node
or op at fault and says what to do. The CLI prints ``error: <message>`` and exits non-zero;
it never shows a traceback for these.
"""

from __future__ import annotations


class OnnxcamError(Exception):
    """Base class: a problem with the user's input, explained in one line."""


class ModelError(OnnxcamError):
    """The model file is missing, unreadable or not a usable classifier."""


class LayerError(OnnxcamError):
    """The requested layer does not exist or is not a spatial activation."""


class UnsupportedOpError(OnnxcamError):
    """Ops on the gradient path have no VJP rule.

    ``nodes`` lists ``(op_type, node_name)`` for every such node, so a caller can report all of
    them at once instead of one per attempt.
    """

    def __init__(self, message: str, nodes: list[tuple[str, str]]):
        super().__init__(message)
        self.nodes = nodes


class ImageError(OnnxcamError):
    """An image file is missing or cannot be decoded."""


class TargetError(OnnxcamError):
    """A target class is out of range or not found in the labels."""


class OnnxcamWarning(UserWarning):
    """Something the user should know that does not stop the work (a cache entry rebuilt, a
    provider that runs part of the graph on the CPU, an image decoded reduced, an all-zero
    map). The CLI prints each as one ``warning: <message>`` line."""
