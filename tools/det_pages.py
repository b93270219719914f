"""Rendered pages of text lines for the PP-OCR text detector, with their true boxes, and
the detection score (DB post-processing, then one-to-one matching at an IoU threshold).

`hard_pages` draws pages that are harder than clean black-on-white text: a tinted paper
colour with a brightness gradient, dark ink of varied colour, line heights of 24-44 px
and varied spacing, then the whole page rotated by up to +-3 degrees, blurred (Gaussian,
sigma 0.3-1.2 px) and given Gaussian pixel noise (sigma 0.02-0.06 of the range). The true
region of a line is the rectangle of its ink (rows and columns with ink) rotated with the
page. Texts are seeded synthetic lines (`text_lines`); `exclude` keeps texts used
elsewhere (the calibration pages) off these pages.

`detections` / `detection_masks` threshold the probability map at 0.3 (DB's default),
keep connected regions of mean probability >= 0.6 (box_thresh) and grow each by DB's
unclip distance (ratio 1.5: area * 1.5 / perimeter); `f_scores` matches them one to one
to the true lines (greedy by IoU, ICDAR style) at each IoU threshold asked for. On the
rotated pages the IoU is that of pixel regions (`region_ious`: the grown region and the
line's rotated rectangle), the raster form of ICDAR's polygon IoU, so a rotated line is
not judged by an axis-aligned box.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnxforge.sample_inputs import fonts, render_line, text_lines

Box = tuple[float, float, float, float]
SIZE = 640


def hard_pages(count: int, seed: int, exclude: set[str] = frozenset()
               ) -> tuple[list[np.ndarray], list[np.ndarray], set[str]]:
    """`count` pages as [640, 640, 3] arrays in [0, 1], the true text regions of each
    page as a label image (line k's pixels are k, background 0) and the texts used."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    font_paths = fonts()
    texts = [t for t in text_lines(40 * count, seed=seed) if t not in exclude]
    used: set[str] = set()
    pages, truth = [], []
    for _ in range(count):
        paper = rng.uniform(0.65, 1.0, 3)
        ramp = np.linspace(-1, 1, SIZE)[:, None] * rng.uniform(-0.15, 0.15)
        ramp = ramp + np.linspace(-1, 1, SIZE)[None, :] * rng.uniform(-0.1, 0.1)
        page = np.clip(paper[None, None, :] + ramp[:, :, None], 0, 1)
        labels = np.zeros((SIZE, SIZE), np.int32)
        y, k = 30, 0
        while texts:
            h = int(rng.integers(24, 45))
            if y + h > SIZE - 30:
                break
            text = texts.pop(0)
            width = int(rng.integers(300, 581))
            line = render_line(text, font_paths[int(rng.integers(len(font_paths)))], h,
                               width)[0].transpose(1, 2, 0) * 0.5 + 0.5
            padding = line.mean(2) == 0.5  # render_line's canvas right of the text
            ink_alpha = np.where(padding, 0.0, 1.0 - line.mean(2))
            cols = np.nonzero((ink_alpha > 0.5).any(0))[0]
            if cols.size == 0:
                continue
            w = int(cols.max()) + 1
            x = int(rng.integers(30, max(31, SIZE - 30 - w)))
            ink = rng.uniform(0.0, 0.3, 3)
            region = page[y:y + h, x:x + w]
            a = ink_alpha[:, :w, None]
            page[y:y + h, x:x + w] = region * (1 - a) + ink[None, None, :] * a
            k += 1
            rows = np.nonzero((ink_alpha[:, :w] > 0.5).any(1))[0]
            labels[y + rows.min():y + rows.max() + 1, x + int(cols.min()):x + w] = k
            used.add(text)
            y += h + int(rng.integers(10, 26))
        angle = float(rng.uniform(-3, 3))
        page = ndimage.rotate(page, angle, axes=(1, 0), reshape=False, order=1, mode="nearest")
        labels = ndimage.rotate(labels, angle, axes=(1, 0), reshape=False, order=0, cval=0)
        page = ndimage.gaussian_filter(page, sigma=(rng.uniform(0.3, 1.2),) * 2 + (0,))
        page = np.clip(page + rng.normal(0, rng.uniform(0.02, 0.06), page.shape), 0, 1)
        pages.append(page.astype(np.float32))
        truth.append(labels)
    return pages, truth, used


def detections(prob: np.ndarray) -> list[Box]:
    """DB post-processing of one probability map: axis-aligned boxes of the text regions,
    unclipped."""
    return [box for box, _ in _regions(prob)]


def detection_masks(prob: np.ndarray) -> list[np.ndarray]:
    """DB post-processing of one probability map: each text region's pixels grown by the
    unclip distance (area * 1.5 / perimeter of the region itself, so a rotated line grows
    like its rotated rectangle), as page-size masks."""
    from scipy import ndimage

    out = []
    for _, (region, mask, d) in _regions(prob):
        pad = int(np.ceil(d)) + 1
        y0, x0 = max(region[0].start - pad, 0), max(region[1].start - pad, 0)
        y1, x1 = min(region[0].stop + pad, prob.shape[0]), min(region[1].stop + pad, prob.shape[1])
        window = np.zeros((y1 - y0, x1 - x0), bool)
        window[region[0].start - y0:region[0].stop - y0,
               region[1].start - x0:region[1].stop - x0] = mask
        grown = ndimage.distance_transform_edt(~window) <= d
        full = np.zeros(prob.shape, bool)
        full[y0:y1, x0:x1] = grown
        out.append(full)
    return out


def _regions(prob: np.ndarray):
    """(unclipped box, (slices, region mask, unclip distance)) of each region kept."""
    from scipy import ndimage

    labels, _ = ndimage.label(prob > 0.3)
    out = []
    for k, region in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[region] == k
        if mask.sum() < 9 or prob[region][mask].mean() < 0.6:
            continue
        y0, y1, x0, x1 = region[0].start, region[0].stop, region[1].start, region[1].stop
        d = (x1 - x0) * (y1 - y0) * 1.5 / (2 * ((x1 - x0) + (y1 - y0)))
        # the region's own area and perimeter (boundary pixels) for the mask form
        edge = mask & ~ndimage.binary_erosion(mask)
        d_mask = float(mask.sum()) * 1.5 / max(float(edge.sum()), 1.0)
        out.append(((x0 - d, y0 - d, x1 + d, y1 + d), (region, mask, d_mask)))
    return out


def iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def region_ious(prob: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """IoU of every true line (label image, `hard_pages`) with every detection of one page:
    pixel IoU of the grown region and the line's rotated rectangle; [lines, detections]."""
    lines = int(labels.max())
    sizes = np.bincount(labels.ravel(), minlength=lines + 1)[1:]
    masks = detection_masks(prob)
    m = np.zeros((lines, len(masks)))
    for j, mask in enumerate(masks):
        inter = np.bincount(labels[mask], minlength=lines + 1)[1:]
        m[:, j] = inter / np.maximum(sizes + mask.sum() - inter, 1)
    return m


def box_ious(prob: np.ndarray, boxes: Sequence[Box]) -> np.ndarray:
    """IoU of every true axis-aligned box with every unclipped detection box of one page."""
    dets = detections(prob)
    return np.array([[iou(b, d) for d in dets] for b in boxes]).reshape(len(boxes), len(dets))


def f_scores(pages: Sequence[np.ndarray], thresholds: Sequence[float] = (0.5, 0.7),
             iou_name: str = "region IoU") -> dict[str, float]:
    """From one IoU matrix [true lines, detections] per page: the F-score (%) at each IoU
    threshold (one-to-one greedy matching, each true line takes its best free detection),
    and the mean IoU of the lines matched at the first threshold."""
    out: dict[str, float] = {}
    for t in thresholds:
        matched, found, total, ious = 0, 0, 0, []
        for m in pages:
            found += m.shape[1]
            total += m.shape[0]
            free = list(range(m.shape[1]))
            for k in range(m.shape[0]):
                best = max(free, key=lambda j: m[k, j], default=None)
                if best is not None and m[k, best] >= t:
                    matched += 1
                    ious.append(m[k, best])
                    free.remove(best)
        precision, recall = matched / max(found, 1), matched / max(total, 1)
        out[f"F@{t:g} %"] = 100 * 2 * precision * recall / max(precision + recall, 1e-12)
        if t == thresholds[0]:
            out[iou_name] = float(np.mean(ious)) if ious else 0.0
    return out
