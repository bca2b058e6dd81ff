import torch
import torch.nn.functional as F

from perceive.models.chatrex.object_order import (
    ORDER_BINS,
    ORDER_DIRECTIONS,
    count_bins,
    order_counts,
    order_feature_count,
    order_feature_index,
    order_features,
)


def _box(cx: float, cy: float, half: float = 0.04) -> list[float]:
    return [cx - half, cy - half, cx + half, cy + half]


# three circles from left to right (the middle one lowest), a square among them, and one padding row
BOXES = torch.tensor([[_box(0.5, 0.8), _box(0.1, 0.5), _box(0.3, 0.2), _box(0.9, 0.3), _box(0.0, 0.0)]])
MASK = torch.tensor([[True, True, True, True, False]])
CATEGORY = torch.tensor([[0, 0, 1, 0, 0]])  # circle, circle, square, circle, (padding: a circle too)


def test_order_counts_by_hand():
    same = (CATEGORY[:, :, None] == CATEGORY[:, None, :]).float()
    counts = order_counts(BOXES, MASK, same)
    assert counts.shape == (1, 5, len(ORDER_DIRECTIONS))
    left, right, top, bottom = counts[0].round().long().T.tolist()
    # circles at x 0.5, 0.1, 0.9: the middle, first and last from the left; the padding row counts nowhere
    assert left == [1, 0, 0, 2, 0]
    assert right == [1, 2, 0, 0, 0]
    # circles at y 0.8, 0.5, 0.3: from the top the third, second and first
    assert top == [2, 1, 0, 0, 0]
    assert bottom == [0, 1, 0, 2, 0]
    # soft, but sure at the world's separations: every count within 0.02 of its whole number
    assert torch.allclose(counts, counts.round(), atol=0.02)
    # alike is a degree: half-alike boxes count half
    assert torch.allclose(order_counts(BOXES, MASK, same * 0.5), counts * 0.5)


def test_count_bins_spread_a_count_over_its_two_nearest_whole_numbers():
    bins = count_bins(torch.tensor([0.0, 2.0, 1.5, 3.75, 7.0, -0.2]))
    assert bins.shape == (6, ORDER_BINS)
    assert bins[0].tolist() == [1, 0, 0, 0, 0] and bins[1].tolist() == [0, 0, 1, 0, 0]
    assert torch.allclose(bins[2], torch.tensor([0, 0.5, 0.5, 0, 0]))
    assert torch.allclose(bins[3], torch.tensor([0, 0, 0, 0.25, 0.75]))
    assert bins[4].tolist() == [0, 0, 0, 0, 1]  # "4 or more"
    assert bins[5].tolist() == [1, 0, 0, 0, 0]
    assert torch.allclose(bins.sum(-1), torch.ones(6))


def test_order_features_count_by_category_and_by_category_and_colour():
    category = F.one_hot(CATEGORY, 3).float()
    color = F.one_hot(torch.tensor([[0, 1, 0, 0, 0]]), 2).float()  # the circle at x 0.1 is the only blue one
    feats = order_features(BOXES, MASK, [[category], [category, color]])
    assert feats.shape == (1, 5, order_feature_count(2)) == (1, 5, 2 * len(ORDER_DIRECTIONS) * ORDER_BINS)
    per = feats.reshape(1, 5, 2, len(ORDER_DIRECTIONS), ORDER_BINS).argmax(-1)[0]
    left = ORDER_DIRECTIONS.index("left")
    assert per[:, 0, left].tolist()[:4] == [1, 0, 0, 2]  # among circles
    assert per[:, 1, left].tolist()[:4] == [0, 0, 0, 1]  # among red circles: the blue one does not count
    assert torch.equal(feats[0, 4], count_bins(torch.zeros(8)).flatten())  # padding: no box before it
    # the column that says "one alike box to my left", for each grouping
    assert feats[0, 0, order_feature_index(0, "left", 1)] == 1 and feats[0, 3, order_feature_index(1, "left", 1)] == 1
    assert order_feature_index(1, "bottom", 9) == order_feature_count(2) - 1  # the last bin: "4 or more"
    # one grouping alone gives its own columns only
    assert torch.equal(order_features(BOXES, MASK, [[category]]), feats[..., : order_feature_count(1)])
