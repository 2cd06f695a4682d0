"""onnxcam: class activation maps for any ONNX image classifier.

The package follows the data's way:

    model.py       load and inspect: logits, spatial layers, layouts
    autodiff/      reverse-mode autodiff emitting standard ONNX ops (engine + VJP rules)
    surgery.py     rewrite: seed input, activation and gradient outputs, batch, cache
    runtime.py     onnxruntime sessions, CUDA when really usable
    head.py        the head after a layer: CAM weights, cut points for one-pass multi-target
    methods.py     maps from activations and gradients (Grad-CAM and relatives)
    perturbation.py  Score-CAM and Ablation-CAM, batched through the same session
    pixel.py       pixel-space maps: saliency, SmoothGrad, guided backprop, integrated gradients
    images.py      images in; labels.py class names; visualize.py maps out; metrics.py how maps agree with boxes
    evaluation/    how good explanations are: localization, faithfulness, sanity, report
    explainer.py   the Python API; cli.py the command line; demo.py the bundled demo
    runner.py      folders streamed batch by batch, resumable; distributed.py the same on Ray
    export.py      self-explaining models: heatmap computed in the exported ONNX graph
    dense.py       segmentation regions and detection anchors as seeds on a dense output
"""

from .dense import DetectionTarget, SegmentationTarget
from .errors import ImageError, LayerError, ModelError, OnnxcamError, OnnxcamWarning, TargetError, UnsupportedOpError
from .explainer import ChannelImportance, Explainer, Explanation, Options
from .export import export_explained, save_explained
from .images import Preprocess, load_image
from .labels import load_labels
from .methods import METHODS
from .model import Layer

__version__ = "0.1.0"
__all__ = ["SegmentationTarget", "DetectionTarget", "ChannelImportance", "Explainer", "Explanation", "Options", "export_explained", "save_explained", "Layer", "METHODS", "Preprocess", "load_image", "load_labels", "ImageError",
           "LayerError", "ModelError", "OnnxcamError", "OnnxcamWarning", "TargetError", "UnsupportedOpError"]
