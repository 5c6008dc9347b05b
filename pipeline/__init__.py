"""irn-ray: instance and semantic pseudo-labels from image-level tags (IRNet, CVPR 2019) on Ray."""

__version__ = "0.1.0"
