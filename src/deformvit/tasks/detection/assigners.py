"""Label assignment shared by the dense detectors: Adaptive Training Sample Selection.

ATSS (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive
Training Sample Selection", CVPR 2020, Algorithm 1) picks the positives of each ground-truth box from
its statistics instead of a fixed IoU threshold:

1. on every pyramid level, the ``topk`` anchors whose centres are closest (L2) to the box centre
   are candidates;
2. the box's IoU threshold is the mean plus the standard deviation of the candidates' IoUs;
3. a candidate is positive when its IoU reaches the threshold and its centre lies inside the box;
4. an anchor that is positive for several boxes goes to the one it overlaps most.

ATSS assigns its anchors this way, and RepPoints v2 the boxes of its initial point sets.
"""
from typing import Sequence

import torch
from torchvision.ops import box_iou

__all__ = ['atss_assign']

# how far (in pixels) an anchor centre must lie inside a box to count as inside, as mmdetection's ATSSAssigner
INSIDE_MARGIN = 0.01


def atss_assign(anchors: torch.Tensor, num_per_level: Sequence[int], gt_boxes: torch.Tensor, topk: int = 9
                ) -> torch.Tensor:
    """The ground-truth box each anchor is assigned to by ATSS, or -1 for background.

    Args:
        anchors: (N, 4) boxes ``x1, y1, x2, y2`` of every level, finest level first.
        num_per_level: how many of ``anchors`` each level has (summing to N).
        gt_boxes: (M, 4) ground-truth boxes ``x1, y1, x2, y2``.
        topk: candidates per level and box (fewer where a level has fewer anchors).

    Returns:
        LongTensor (N,): the index in ``gt_boxes`` of each anchor's box, -1 where it is background.

    The standard deviation is the sample's (Bessel-corrected), zero for a single candidate.
    """
    if sum(num_per_level) != len(anchors):
        raise ValueError(f'num_per_level sums to {sum(num_per_level)}; expected the number of anchors, {len(anchors)}')
    if topk < 1:
        raise ValueError(f'topk {topk}: expected at least one candidate per level')
    num_anchors, num_boxes = len(anchors), len(gt_boxes)
    assigned = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_boxes == 0 or num_anchors == 0:
        return assigned
    anchors, gt_boxes = anchors.float(), gt_boxes.float()
    ious = box_iou(anchors, gt_boxes)  # (N, M)
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # (N, 2)
    distances = torch.cdist(anchor_centres, (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2)  # (N, M)
    candidates, start = [], 0
    for count in num_per_level:
        k = min(topk, count)
        if k:
            closest = distances[start:start + count].topk(k, dim=0, largest=False).indices  # (k, M)
            candidates.append(closest + start)
        start += count
    candidates = torch.cat(candidates)  # (C, M): anchor indices per box
    candidate_ious = ious.gather(0, candidates)  # (C, M)
    spread = candidate_ious.std(0) if len(candidates) > 1 else torch.zeros_like(candidate_ious[0])
    threshold = candidate_ious.mean(0) + spread  # (M,)
    x, y = anchor_centres[candidates, 0], anchor_centres[candidates, 1]  # (C, M)
    inside = torch.stack([x - gt_boxes[:, 0], y - gt_boxes[:, 1], gt_boxes[:, 2] - x, gt_boxes[:, 3] - y],
                         -1).amin(-1) > INSIDE_MARGIN  # (C, M)
    positive = (candidate_ious >= threshold) & inside  # (C, M)
    claimed = torch.full_like(ious, -1.0)  # (N, M): the IoU where the box claims the anchor, -1 elsewhere
    box_index = torch.arange(num_boxes, device=anchors.device).expand_as(candidates)
    claimed[candidates[positive], box_index[positive]] = candidate_ious[positive]
    best, best_box = claimed.max(1)
    return torch.where(best >= 0, best_box, assigned)
