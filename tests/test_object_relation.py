import math

import pytest
import torch
import torch.nn as nn

from perceive.models.chatrex.object_relation import ObjectRelationEncoder, pair_geometry


def test_pair_geometry_by_hand():
    # box 0: the left half's top quarter; box 1: a square whose left half lies inside box 0
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.25], [0.25, 0.0, 0.75, 0.5]]])
    g = pair_geometry(boxes)
    assert g.shape == (1, 2, 2, 9)
    seen_from_0 = g[0, 0, 1]
    assert seen_from_0[0].item() == pytest.approx(4 * 0.25)  # centre 0.5 right of 0.25, x4
    assert seen_from_0[1].item() == pytest.approx(4 * 0.125)
    assert seen_from_0[2].item() == pytest.approx(0.0)  # same width
    assert seen_from_0[3].item() == pytest.approx(math.log(2) / 4)  # twice as tall
    assert seen_from_0[4].item() == pytest.approx(-4 * 0.25)  # they overlap by a quarter of the image along x
    assert seen_from_0[5].item() == pytest.approx(-4 * 0.25)
    inter, a0, a1 = 0.25 * 0.25, 0.5 * 0.25, 0.5 * 0.5
    assert seen_from_0[6].item() == pytest.approx(inter / (a0 + a1 - inter))
    assert seen_from_0[7].item() == pytest.approx(inter / a0)  # share of box 0 inside box 1
    assert seen_from_0[8].item() == pytest.approx(inter / a1)
    # seen from the other box, offsets and log ratios flip sign, gaps and IoU stay, the two shares swap
    seen_from_1 = g[0, 1, 0]
    assert torch.allclose(seen_from_1[:4], -seen_from_0[:4])
    assert torch.allclose(seen_from_1[4:7], seen_from_0[4:7])
    assert torch.allclose(seen_from_1[7:], seen_from_0[7:].flip(0))
    assert g[0, 0, 0, 6].item() == pytest.approx(1.0)  # each box is itself


def _random_boxes(b, k, generator):
    xy = torch.rand(b, k, 2, generator=generator) * 0.8
    return torch.cat([xy, xy + 0.05 + torch.rand(b, k, 2, generator=generator) * 0.15], dim=-1)


def test_relation_layers_treat_an_images_boxes_as_a_set_and_ignore_padding():
    torch.manual_seed(0)
    enc = ObjectRelationEncoder(32, 2, 4).eval()
    g = torch.Generator().manual_seed(0)
    boxes, tokens = _random_boxes(1, 5, g), torch.randn(1, 5, 32, generator=g)
    mask = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        out = enc(tokens, boxes, mask)
        order = torch.tensor([3, 0, 4, 1, 2])
        assert torch.allclose(enc(tokens[:, order], boxes[:, order], mask), out[:, order], atol=1e-5)
        # two padded boxes, with junk in them, change nothing and stay zero; an image without boxes is all zero
        padded_boxes = torch.cat([boxes, _random_boxes(1, 2, g)], 1)
        padded_tokens = torch.cat([tokens, torch.randn(1, 2, 32, generator=g)], 1)
        padded_mask = torch.tensor([[True] * 5 + [False] * 2])
        padded = enc(torch.cat([padded_tokens, padded_tokens]), torch.cat([padded_boxes, padded_boxes]),
                     torch.cat([padded_mask, torch.zeros_like(padded_mask)]))  # fmt: skip
    assert torch.allclose(padded[0, :5], out[0], atol=1e-5)
    assert torch.equal(padded[0, 5:], torch.zeros(2, 32)) and torch.equal(padded[1], torch.zeros(7, 32))
    # each token reads the others: moving one box changes the tokens of the rest
    moved = boxes.clone()
    moved[0, 0] += 0.1
    with torch.no_grad():
        assert not torch.allclose(enc(tokens, moved, mask)[0, 1:], out[0, 1:], atol=1e-4)


def test_relation_layers_learn_what_no_box_alone_can_tell():
    """Whether a box is the leftmost of its image: a box's own token cannot say; one relation layer learns it."""

    def scenes(n, generator):
        boxes = _random_boxes(n, 6, generator)
        mask = torch.rand(n, 6, generator=generator) > 0.2
        mask[:, :2] = True
        cx = ((boxes[..., 0] + boxes[..., 2]) / 2).masked_fill(~mask, 9)
        return boxes, mask, (cx == cx.min(1, keepdim=True).values).float()

    accuracy = {}
    for layers in (0, 1):
        torch.manual_seed(0)
        enc, embed, head = ObjectRelationEncoder(32, layers, 4), nn.Linear(4, 32), nn.Linear(32, 1)
        opt = torch.optim.Adam([*enc.parameters(), *embed.parameters(), *head.parameters()], 3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(120):
            boxes, mask, leftmost = scenes(32, g)
            logit = head(enc(embed(boxes), boxes, mask)).squeeze(-1)
            loss = nn.functional.binary_cross_entropy_with_logits(logit[mask], leftmost[mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
        boxes, mask, leftmost = scenes(500, torch.Generator().manual_seed(2))
        with torch.no_grad():
            said = head(enc(embed(boxes), boxes, mask)).squeeze(-1) > 0
        accuracy[layers] = float((said.float() == leftmost)[mask].float().mean())
    # about one box in five is the leftmost: a box alone does little better than always saying no
    assert accuracy[0] < 0.85 and accuracy[1] > 0.95, accuracy


def test_relation_layers_are_checked():
    with pytest.raises(ValueError, match="multiple of their heads"):
        ObjectRelationEncoder(30, 1, 4)
