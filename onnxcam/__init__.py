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
    images.py      images in; visualize.py maps out; metrics.py how maps agree with boxes
    evaluation/    how good explanations are: localization, faithfulness, sanity, report
    explainer.py   the Python API; cli.py the command line; demo.py the bundled demo
    export.py      self-explaining models: heatmap computed in the exported ONNX graph
"""

from .errors import ImageError, LayerError, ModelError, OnnxcamError, TargetError, UnsupportedOpError
from .explainer import ChannelImportance, Explainer, Explanation, Options
from .export import export_explained, save_explained
from .images import Preprocess, load_image
from .methods import METHODS
from .model import Layer

__version__ = "0.1.0"
__all__ = ["ChannelImportance", "Explainer", "Explanation", "Options", "export_explained", "save_explained", "Layer", "METHODS", "Preprocess", "load_image", "ImageError",
           "LayerError", "ModelError", "OnnxcamError", "TargetError", "UnsupportedOpError"]
