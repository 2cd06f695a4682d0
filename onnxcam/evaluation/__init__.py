"""Stage 5 (measure): how good are the explanations?

One module per metric family, each with its paper's definition in its docstring:

    annotations.py   ground truth: onnxcam JSON, PASCAL VOC / ImageNet XML, COCO JSON
    localization.py  weakly supervised boxes and pseudo-masks, IoU, MaxBoxAcc (Choe et al. 2020)
    pointing.py      pointing game, energy-based pointing game
    scoring.py       class scores of perturbed inputs, batched through one session
    confidence.py    Average Drop, Increase in Confidence (Grad-CAM++)
    curves.py        deletion / insertion AUC (RISE)
    road.py          ROAD, as pytorch-grad-cam
    faithfulness.py  rank correlation with occlusion sensitivity (Grad-CAM sec. 5.3)
    sanity.py        cascading model randomization (Adebayo et al. 2018)
    stats.py         Spearman, SSIM, bootstrap intervals
    run.py           evaluate(): every family over an annotated image set
    report.py        results.json and a self-contained HTML page
"""

from .annotations import Annotation, GroundTruthObject, load_annotations, load_label_map, match_images
from .localization import box_from_map, boxes_from_map, iou, max_box_acc, pseudo_mask
from .pointing import energy_pointing, peak, pointing_game, pointing_hit
from .run import FAMILIES, Evaluation, EvaluationConfig, evaluate

__all__ = ["Annotation", "GroundTruthObject", "load_annotations", "load_label_map", "match_images",
           "box_from_map", "boxes_from_map", "iou", "max_box_acc", "pseudo_mask", "energy_pointing", "peak",
           "pointing_game", "pointing_hit", "FAMILIES", "Evaluation", "EvaluationConfig", "evaluate"]
