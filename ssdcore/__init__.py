"""The SSD300 contract shared by training and serving: spec, default boxes, classes, postprocess.

numpy-only (``ssdcore.imaging`` also needs Pillow): the gateway imports this without torch.
"""

from ssdcore.anchors import default_boxes
from ssdcore.labels import COCO, ClassList
from ssdcore.postprocess import Detections, decode_raw_outputs, postprocess, postprocess_dense
from ssdcore.spec import REFERENCE_POSTPROCESS, SSD300, TENSOR_NAMES, Postprocess, SSD300Spec

__all__ = [
    "COCO",
    "REFERENCE_POSTPROCESS",
    "SSD300",
    "TENSOR_NAMES",
    "ClassList",
    "Detections",
    "Postprocess",
    "SSD300Spec",
    "decode_raw_outputs",
    "default_boxes",
    "postprocess",
    "postprocess_dense",
]
