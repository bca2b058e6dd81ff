import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perceive import boxes as B


def test_conversions_round_trip():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 1.0, 1.0]])
    for fmt in ("xywh", "cxcywh"):
        assert torch.allclose(B.convert(B.convert(xyxy, "xyxy", fmt), fmt, "xyxy"), xyxy)
    assert B.convert(xyxy, "xyxy", "xywh")[0].tolist() == [10, 20, 40, 60]
    assert B.convert(xyxy, "xyxy", "cxcywh")[0].tolist() == [30, 50, 40, 60]
    norm = B.normalize(xyxy, (100, 200))
    assert norm[0].tolist() == pytest.approx([0.05, 0.2, 0.25, 0.8])
    assert torch.allclose(B.denormalize(norm, (100, 200)), xyxy)


@pytest.mark.parametrize(
    "bad, msg",
    [
        (torch.zeros(3, 3), r"\[\.\.\., 4\]"),
        (torch.zeros(3, 4, dtype=torch.long), "floating-point"),
    ],
)
def test_bad_shapes_raise_value_error(bad, msg):
    with pytest.raises(ValueError, match=msg):
        B.convert(bad, "xyxy", "xywh")


def test_clip_area_iou_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    iou = B.box_iou(a, b)[0]
    assert iou[0].item() == pytest.approx(25 / 175)
    assert iou[1].item() == 0 and iou[2].item() == 1
    giou = B.generalized_box_iou(a, b)[0]
    assert giou[0].item() == pytest.approx(25 / 175 - (225 - 175) / 225)
    assert giou[1].item() == pytest.approx(0 - (900 - 200) / 900)
    assert B.clip(torch.tensor([[-5.0, 3.0, 120.0, 70.0]]), (50, 100)).tolist() == [[0, 3, 100, 50]]
    assert B.area(torch.tensor([[0.0, 0.0, 2.0, 3.0], [5.0, 5.0, 4.0, 9.0]])).tolist() == [6, 0]


def test_giou_is_differentiable():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]], requires_grad=True)
    B.generalized_box_iou(a, torch.tensor([[5.0, 5.0, 15.0, 15.0]])).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_nms_agnostic_class_aware_and_cap():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 9.0]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert B.nms(boxes, scores, 0.5).tolist() == [3, 2]
    labels = torch.tensor([0, 1, 0, 0])
    assert B.nms(boxes, scores, 0.5, labels=labels).tolist() == [3, 1, 2]
    assert B.nms(boxes, scores, 0.5, labels=labels, max_keep=2).tolist() == [3, 1]
    assert B.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    with pytest.raises(ValueError, match="scores"):
        B.nms(boxes, scores[:2], 0.5)


def _nms_reference(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        # compared in the boxes' float32, as nms does (an IoU of exactly 0.1 is 0.1f > 0.1 in float64)
        if all(bool(B.box_iou(boxes[i : i + 1], boxes[j : j + 1])[0, 0] <= thr) for j in keep):
            keep.append(i)
    return keep


def test_nms_keeps_a_box_whose_iou_equals_the_threshold():
    boxes = torch.tensor([[0, 0, 2, 18], [0, 0, 19, 12]], dtype=torch.float32)  # IoU 24 / 240 = 0.1
    assert B.nms(boxes, torch.tensor([1.0, 0.5]), 0.1).tolist() == [0, 1]
    assert B.nms(boxes, torch.tensor([1.0, 0.5]), 0.09).tolist() == [0]


def test_one_to_one_matching_lets_the_best_covered_object_choose_first():
    # rows: a flag, the arm holding it, a ball; columns: proposals
    iou = torch.tensor([
        [0.60, 0.55, 0.00],  # the flag: proposal 0 fits it, but fits the arm better
        [0.90, 0.10, 0.00],
        [0.00, 0.00, 0.49],  # the ball's only proposal is under the threshold
    ])  # fmt: skip
    assert B.match_one_to_one(iou) == [1, 0, None]
    assert B.match_one_to_one(iou, threshold=0.58) == [None, 0, None]  # its second choice is too loose
    assert B.match_one_to_one(iou, threshold=0.49) == [1, 0, 2]  # the threshold counts as a match
    assert B.match_one_to_one(iou[:, :1]) == [None, 0, None]  # one proposal stands for one object
    assert B.match_one_to_one(torch.zeros(3, 0)) == [None, None, None]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(1, 20), st.integers(1, 20)),
        min_size=1,
        max_size=12,
    ),
    st.floats(0.1, 0.9),
)
def test_nms_matches_greedy_definition(raw, thr):
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in raw], dtype=torch.float32)
    scores = torch.linspace(1, 0, len(raw))[torch.randperm(len(raw), generator=torch.Generator().manual_seed(0))]
    assert B.nms(boxes, scores, thr).tolist() == _nms_reference(boxes, scores.tolist(), thr)


def test_masks_boxes_and_rle_round_trip():
    mask = np.zeros((20, 30), dtype=bool)
    mask[3:9, 5:17] = True
    mask[15, 29] = True
    t = torch.from_numpy(mask)
    assert B.masks_to_boxes(t[None]).tolist() == [[5, 3, 30, 16]]
    rle = B.mask_to_rle(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [20, 30]
    assert (B.rle_to_mask(rle) == mask).all()
    unc = B.mask_to_uncompressed_rle(mask)
    assert sum(unc["counts"]) == 600
    assert (B.rle_to_mask(unc) == mask).all()
    assert B.rle_area(rle) == mask.sum() and B.rle_to_box(rle) == [5, 3, 30, 16]
    box_mask = B.box_to_mask([5, 3, 17, 9], (20, 30))
    assert box_mask.sum() == 6 * 12 and B.masks_to_boxes(box_mask[None]).tolist() == [[5, 3, 17, 9]]
    full = np.ones((2, 2), dtype=bool)
    assert B.mask_to_uncompressed_rle(full)["counts"] == [0, 4]
    with pytest.raises(ValueError, match="sum"):
        B.rle_to_mask({"size": [2, 2], "counts": [1, 1]})


# ----- RoI Align -----------------------------------------------------------------------------


def _bilinear(fmap, y, x):
    h, w = fmap.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * fmap[y0][x0]
        + (1 - ly) * lx * fmap[y0][x1]
        + ly * (1 - lx) * fmap[y1][x0]
        + ly * lx * fmap[y1][x1]
    )


def roi_align_reference(inp, rois, out_size, scale, sampling_ratio, aligned):
    """torchvision's definition, written out loop by loop in plain Python."""
    ph, pw = out_size
    result = np.zeros((len(rois), inp.shape[1], ph, pw))
    off = 0.5 if aligned else 0.0
    for r, (b, x0, y0, x1, y1) in enumerate(rois):
        sx, sy = x0 * scale - off, y0 * scale - off
        rw, rh = x1 * scale - off - sx, y1 * scale - off - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw)
        count = max(gh * gw, 1)  # a grid of 0 (or fewer) samples: the loops add nothing, the bin is 0
        for c in range(inp.shape[1]):
            fmap = inp[int(b), c]
            for i in range(ph):
                for j in range(pw):
                    acc = 0.0
                    for iy in range(gh):
                        y = sy + i * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            x = sx + j * bw + (ix + 0.5) * bw / gw
                            acc += _bilinear(fmap, y, x)
                    result[r, c, i, j] = acc / count
    return result


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_matches_brute_force_definition(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(0)
    inp = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)
    rois = torch.tensor(
        [
            [0, 1.3, 2.2, 7.9, 8.1],
            [1, -2.0, -1.5, 4.0, 3.0],  # partly outside the map
            [1, 9.5, 6.0, 12.5, 10.2],  # beyond the right and bottom edges
            [0, 3.0, 3.0, 3.2, 3.1],  # smaller than a pixel
            [1, 0.0, 0.0, 22.0, 18.0],  # at spatial_scale 0.5 it covers the whole map
            [0, 5.0, 2.0, 5.0, 7.0],  # zero width: 1 pixel wide unaligned, an empty grid aligned and adaptive
        ],
        dtype=torch.float64,
    )
    for scale in (1.0, 0.5):
        got = B.roi_align(inp, rois, (3, 4), scale, sampling_ratio, aligned)
        want = roi_align_reference(inp.numpy(), rois.numpy(), (3, 4), scale, sampling_ratio, aligned)
        assert np.abs(got.numpy() - want).max() < 1e-5


@pytest.mark.parametrize("sampling_ratio", [0, -1])
def test_roi_align_zero_size_aligned_box_with_adaptive_sampling_is_zero(sampling_ratio):
    # torchvision: grid = ceil(size / out) = 0 samples along that side, count = max(gh * gw, 1), output 0
    g = torch.Generator().manual_seed(1)
    inp = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64) + 0.5  # no zeros to hide behind
    rois = torch.tensor(
        [
            [0, 4.3, 2.0, 4.3, 7.5],  # zero width
            [1, 1.0, 3.7, 8.0, 3.7],  # zero height
            [0, 4.3, 3.7, 4.3, 3.7],  # zero area: a point
            [1, 6.0, 5.0, 2.0, 1.0],  # negative size: ceil(-4 / 2) = -2, the loops run zero times
            [0, 6.0, 2.0, 2.0, 7.0],  # negative width, positive height
        ],
        dtype=torch.float64,
    )
    normal = torch.tensor([[1, 1.3, 2.2, 7.9, 8.1]], dtype=torch.float64)
    both = torch.cat([normal, rois, normal])  # empty groups must not disturb the others
    for scale in (1.0, 0.5):
        got = B.roi_align(inp, both, (2, 2), scale, sampling_ratio, aligned=True)
        assert (got[1:-1] == 0).all()
        want = roi_align_reference(inp.numpy(), both.numpy(), (2, 2), scale, sampling_ratio, True)
        assert (want[1:-1] == 0).all() and np.abs(want[0]).min() > 0
        assert np.abs(got.numpy() - want).max() < 1e-9
        assert torch.equal(got[0], got[-1])


def test_roi_align_zero_area_box_with_fixed_sampling_ratio_samples_the_point():
    g = torch.Generator().manual_seed(2)
    inp = torch.rand(1, 2, 9, 11, generator=g, dtype=torch.float64)
    roi = torch.tensor([[0, 4.3, 3.7, 4.3, 3.7]], dtype=torch.float64)
    got = B.roi_align(inp, roi, (2, 3), sampling_ratio=2, aligned=True)
    for c in range(2):
        point = _bilinear(inp[0, c].numpy(), 3.7 - 0.5, 4.3 - 0.5)
        assert torch.allclose(got[0, c], torch.full((2, 3), point, dtype=torch.float64), atol=1e-12)
    want = roi_align_reference(inp.numpy(), roi.numpy(), (2, 3), 1.0, 2, True)
    assert np.abs(got.numpy() - want).max() < 1e-9


def test_roi_align_constant_and_linear_ramp_analytic():
    h, w = 16, 20
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    ramp = (2.0 * xs + 3.0 * ys + 1.0)[None, None]
    const = torch.full((1, 1, h, w), 7.0, dtype=torch.float64)
    box = torch.tensor([[0, 2.5, 3.5, 14.5, 11.5]], dtype=torch.float64)  # edges on pixel centres
    # aligned=True: the RoI starts at x0 - 0.5; a linear function averages to its value at each bin centre.
    out = B.roi_align(ramp, box, (2, 3), aligned=True)
    x_start, y_start, bw, bh = 2.0, 3.0, 12.0 / 3, 8.0 / 2
    for i in range(2):
        for j in range(3):
            cx, cy = x_start + (j + 0.5) * bw, y_start + (i + 0.5) * bh
            assert out[0, 0, i, j].item() == pytest.approx(2 * cx + 3 * cy + 1, abs=1e-9)
    assert torch.allclose(B.roi_align(const, box, 4, aligned=False), torch.full((1, 1, 4, 4), 7.0, dtype=torch.float64))
    # aligned=False: the RoI spans x0..x1 exactly.
    out = B.roi_align(ramp, box, 1, aligned=False)
    assert out.item() == pytest.approx(2 * 8.5 + 3 * 7.5 + 1, abs=1e-9)


def test_roi_align_list_boxes_gradient_and_errors():
    inp = torch.rand(2, 4, 8, 8, requires_grad=True)
    boxes = [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([[1.0, 1.0, 6.0, 7.0], [2.0, 2.0, 3.0, 3.0]])]
    out = B.roi_align(inp, boxes, 2, sampling_ratio=2, aligned=True)
    as_tensor = torch.tensor([[0, 0, 0, 4, 4], [1, 1, 1, 6, 7], [1, 2, 2, 3, 3]], dtype=torch.float32)
    assert torch.allclose(out, B.roi_align(inp, as_tensor, 2, sampling_ratio=2, aligned=True))
    out.sum().backward()
    assert inp.grad is not None and inp.grad.abs().sum() > 0
    # an image with no RoI between two that have some: one call over all images, each RoI its own image's
    three = torch.rand(3, 4, 8, 8, requires_grad=True)
    boxes3 = [boxes[0], torch.zeros(0, 4), boxes[1]]
    out3 = B.roi_align(three, boxes3, 2, sampling_ratio=2, aligned=True)
    alone = [B.roi_align(three[i : i + 1].detach(), [b], 2, sampling_ratio=2, aligned=True)
             for i, b in enumerate(boxes3)]  # fmt: skip
    assert torch.allclose(out3, torch.cat(alone))
    out3.sum().backward()
    assert three.grad is not None and three.grad[1].abs().sum() == 0 and three.grad[2].abs().sum() > 0
    assert B.roi_align(inp, torch.zeros(0, 5), 3).shape == (0, 4, 3, 3)
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        B.roi_align(inp, torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="batch indices"):
        B.roi_align(inp, torch.tensor([[5.0, 0, 0, 1, 1]]), 2)
    with pytest.raises(ValueError, match="NaN"):
        B.roi_align(inp, torch.tensor([[0.0, 0, 0, math.nan, 1]]), 2)


def test_multi_level_roi_align():
    feats = [torch.rand(1, 8, 32, 32), torch.rand(1, 8, 16, 16), torch.rand(1, 8, 8, 8)]
    boxes = torch.tensor([[0, 10.0, 10.0, 60.0, 50.0], [0, 0.0, 0.0, 128.0, 128.0]])
    stacked = B.multi_level_roi_align(feats, boxes, 4, strides=[4, 8, 16], reduce="none")
    assert stacked.shape == (2, 3, 8, 4, 4)
    assert torch.allclose(stacked[:, 1], B.roi_align(feats[1], boxes, 4, 1 / 8, 2, True))
    assert torch.allclose(B.multi_level_roi_align(feats, boxes, 4, [4, 8, 16]), stacked.mean(1))
    assert B.multi_level_roi_align(feats, boxes, 4, [4, 8, 16], reduce="concat").shape == (2, 24, 4, 4)
    with pytest.raises(ValueError, match="one stride"):
        B.multi_level_roi_align(feats, boxes, 4, strides=[4, 8])
