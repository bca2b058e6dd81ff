import pytest
import torch

from perceive.models.chatrex.anchor_pointer import ANCHOR_GEOMETRY, NEAR_GAPS, AnchorPointer, anchor_geometry

LEFT, RIGHT, ABOVE, BELOW = range(4)
NEAR = {gap: 4 + i for i, gap in enumerate(NEAR_GAPS)}
NONE_BETWEEN, SOME_BETWEEN = 4 + len(NEAR_GAPS), 5 + len(NEAR_GAPS)
INSIDE, SELF = ANCHOR_GEOMETRY - 2, ANCHOR_GEOMETRY - 1

# a: a square on the left; b: one on the right, 0.3 further; c: between them along x, higher up;
# d: small, inside b; then one padding slot
BOXES = torch.tensor([[[0.1, 0.4, 0.2, 0.5], [0.5, 0.4, 0.6, 0.5], [0.3, 0.1, 0.4, 0.2], [0.52, 0.42, 0.55, 0.45],
                       [0.0, 0.0, 0.0, 0.0]]])  # fmt: skip
MASK = torch.tensor([[True, True, True, True, False]])
A, B, C, D, PAD = range(5)


def _geometry(alike=None):
    alike = torch.ones(1, 5, 5) if alike is None else alike
    return anchor_geometry(BOXES, MASK, alike, softness=1e-4)[0]  # entry (k, j): box k seen from anchor j


def test_sides_of_an_anchor():
    g = _geometry()
    assert g.shape == (5, 5, ANCHOR_GEOMETRY)
    assert g[A, B, LEFT] == 1 and g[A, B, RIGHT] == 0 and g[B, A, RIGHT] == 1 and g[B, A, LEFT] == 0
    assert g[C, B, ABOVE] == 1 and g[B, C, BELOW] == 1 and g[A, B, ABOVE] == 0
    # d lies inside b: neither left nor right of it, and all of it is inside b, a ninth of b inside d
    assert g[D, B, :4].sum() == 0 and g[D, B, INSIDE] == 1 and torch.isclose(g[B, D, INSIDE], torch.tensor(0.09))
    assert g[A, B, INSIDE] == 0


def test_nearness_and_what_lies_between():
    g = _geometry()
    assert [float(g[A, B, NEAR[gap]]) for gap in NEAR_GAPS] == [0.0, 0.0, 0.0]  # 0.3 apart along x
    # 0.1 apart: on the edge of near
    assert [float(g[A, C, NEAR[gap]]) for gap in NEAR_GAPS] == pytest.approx([0.0, 0.5, 1.0], abs=1e-3)
    assert g[D, B, NEAR[0.0]] == 1  # overlapping is nearest
    # c's centre lies between a's and b's; nothing lies between a and c
    assert (g[A, B, SOME_BETWEEN], g[A, B, NONE_BETWEEN]) == (1, 0)
    assert (g[A, C, SOME_BETWEEN], g[A, C, NONE_BETWEEN]) == (0, 1)
    # only boxes alike the candidate count: with c and d (whose centre is also short of b's) alike
    # nothing, nothing lies between a and b
    alike = torch.ones(1, 5, 5)
    alike[0, :, [C, D]] = 0
    g = _geometry(alike)
    assert (g[A, B, SOME_BETWEEN], g[A, B, NONE_BETWEEN]) == (0, 1)


def test_self_and_padding():
    g = _geometry()
    assert torch.equal(g[:4, :4, SELF], torch.eye(4))
    assert not g[PAD].any() and not g[:, PAD].any()


def test_scores_follow_the_anchor_the_query_picks():
    torch.manual_seed(0)
    pointer = AnchorPointer(8)
    hidden = torch.randn(1, 1, 8)
    anchor_keys = torch.zeros(1, 5, 8)
    with torch.no_grad():
        pointer.query.weight.copy_(torch.eye(8) * 100)
        pointer.query.bias.zero_()
        anchor_keys[0, B] = hidden[0, 0]  # the query picks b as its anchor
        pointer.reading.weight.zero_()
        pointer.reading.bias.zero_()
        pointer.reading.bias[LEFT] = 3.0  # and reads "left of the anchor"
        scores = pointer.scores(hidden, anchor_keys, _geometry()[None], MASK)
    assert scores.shape == (1, 1, 5)
    assert torch.allclose(scores[0, 0], torch.tensor([3.0, 0.0, 3.0, 0.0, 0.0]), atol=1e-4)  # a and c are left of b
    # no boxes at all: nothing to anchor on, and no NaN
    empty = pointer.scores(hidden, anchor_keys, torch.zeros(1, 5, 5, ANCHOR_GEOMETRY), torch.zeros(1, 5, dtype=bool))
    assert torch.equal(empty, torch.zeros(1, 1, 5))
