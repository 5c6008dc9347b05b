"""Inter-pixel relation mining from CAMs (Sec. 4.2).

Confident foreground and confident background areas are taken from the high-resolution CAMs with
two thresholds, each label map is refined by a dense CRF on the RGB image, and the two refined maps
are combined into one relation label map: class id where the refined foreground map names a class,
0 where both refined maps say background, 255 (ignore) in the uncertain band between them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .pairs import IGNORE_LABEL

__all__ = ["IGNORE_LABEL", "crf_refine_labels", "mine_relations"]


def crf_refine_labels(
    image: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    *,
    gt_prob: float = 0.7,
    gaussian_sxy: float = 3.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 50.0,
    bilateral_srgb: float = 5.0,
    bilateral_compat: float = 10.0,
    iterations: int = 10,
) -> np.ndarray:
    """Refine a hard label map with a fully connected CRF (pydensecrf) on the RGB image.

    The unary term comes from the labels themselves (``unary_from_labels`` with ``gt_prob`` and
    every label, 0 included, treated as certain); the pairwise terms are a Gaussian smoothness
    kernel and a bilateral appearance kernel. Defaults are the official IRNet settings.

    Args:
        image: uint8 [H, W, 3] RGB image (any memory layout; copied to a contiguous buffer).
        labels: int [H, W], values in 0..n_labels−1.
        n_labels: number of labels (≥ 1). With a single label there is nothing to decide and the
            input is returned unchanged.
        gt_prob: probability the unary assigns to the given label, in (0, 1).
        gaussian_sxy, gaussian_compat: spatial std (pixels) and weight of the Gaussian kernel.
        bilateral_sxy, bilateral_srgb, bilateral_compat: spatial std (pixels), colour std (0..255
            units) and weight of the bilateral kernel.
        iterations: mean-field inference steps.

    Returns:
        int64 [H, W] refined labels in 0..n_labels−1.
    """
    # Heavy optional dependency: imported where used, so the rest of the package imports without it.
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got {image.shape}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match image {image.shape[:2]}")
    if n_labels < 1:
        raise ValueError("n_labels must be at least 1")
    if n_labels == 1:
        return labels.astype(np.int64)

    height, width = labels.shape
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    unary = unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    rgb = np.array(image, dtype=np.uint8, order="C", copy=True)  # pydensecrf rejects read-only buffers
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=rgb, compat=bilateral_compat)
    q = np.asarray(crf.inference(iterations), dtype=np.float32)
    return q.reshape(n_labels, height, width).argmax(axis=0).astype(np.int64)


def _thresholded_argmax(cams: np.ndarray, threshold: float) -> np.ndarray:
    """Argmax over [threshold constant, cams]: 0 = below threshold, k = CAM channel k − 1."""
    padded = np.concatenate([np.full((1,) + cams.shape[1:], threshold, dtype=cams.dtype), cams], 0)
    return padded.argmax(axis=0)


def mine_relations(
    image: np.ndarray,
    high_res_cams,
    class_ids: Sequence[int] | np.ndarray,
    *,
    fg_threshold: float = 0.30,
    bg_threshold: float = 0.05,
    **crf_params,
) -> np.ndarray:
    """Mine the relation label map of one image from its high-resolution CAMs (Sec. 4.2).

    fg map = argmax over [fg_threshold, CAMs], bg map = argmax over [bg_threshold, CAMs]; both are
    refined with :func:`crf_refine_labels` (K + 1 labels) and combined.

    Args:
        image: uint8 [H, W, 3] RGB image.
        high_res_cams: float [K, H, W] CAMs in [0, 1] of the tagged classes (numpy array or torch
            tensor; a tensor is copied to the CPU).
        class_ids: K class ids (1..C) of the CAM channels, in order.
        fg_threshold: CAM score above which a pixel is confident foreground.
        bg_threshold: CAM score below which (for every class) a pixel is confident background.
        **crf_params: keyword arguments of :func:`crf_refine_labels` (gt_prob, iterations,
            gaussian_sxy, ...), the paper's values by default.

    Returns:
        uint8 [H, W]: the class id where the refined fg map names a class, 0 where both refined maps
        say background, 255 (ignore) elsewhere.
    """
    if hasattr(high_res_cams, "detach"):  # torch tensor: the CRF runs on the CPU anyway
        high_res_cams = high_res_cams.detach().cpu().numpy()
    cams = np.asarray(high_res_cams, dtype=np.float32)
    keys = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise ValueError(f"high_res_cams {cams.shape} do not match {keys.shape[0]} class ids")
    if cams.shape[1:] != np.asarray(image).shape[:2]:
        raise ValueError(f"high_res_cams {cams.shape[1:]} do not match image {np.asarray(image).shape[:2]}")
    if np.any(keys < 1) or np.any(keys >= IGNORE_LABEL):
        raise ValueError("class ids must lie in 1..254")

    # Channel k of the padded maps is background (k = 0) or class keys[k − 1].
    lookup = np.concatenate([[0], keys]).astype(np.uint8)
    n_labels = keys.shape[0] + 1
    fg = lookup[crf_refine_labels(image, _thresholded_argmax(cams, fg_threshold), n_labels, **crf_params)]
    bg = lookup[crf_refine_labels(image, _thresholded_argmax(cams, bg_threshold), n_labels, **crf_params)]

    relations = fg.copy()
    relations[fg == 0] = IGNORE_LABEL
    relations[(fg == 0) & (bg == 0)] = 0
    return relations
