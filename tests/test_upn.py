import math

import pytest
import torch

from perceive.models.upn.configuration_upn import UpnConfig
from perceive.models.upn.modeling_upn import UpnModel


def test_upn_shapes_loss_proposals_and_save_load(tmp_path):
    torch.manual_seed(0)
    upn = UpnModel(UpnConfig(image_size=64, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], head_dim=16, max_proposals=7))
    x = torch.randn(2, 3, 64, 64)
    out = upn(x)
    assert out["scores"].shape == (2, 2, 16, 16) and out["boxes"].shape == (2, 4, 16, 16)
    tg = upn.targets([torch.tensor([[4.0, 4.0, 20.0, 30.0]]), torch.zeros(0, 4)], [torch.tensor([0]),
                     torch.zeros(0, dtype=torch.long)], 16)  # fmt: skip
    assert tg["heat"][0, 0].max() == 1.0 and tg["mask"].sum() == 1
    loss = upn.loss(out, tg)
    assert torch.isfinite(loss["loss"])
    props = upn.propose(x)
    assert all(len(p["boxes"]) <= 7 and (p["scores"][:-1] >= p["scores"][1:]).all() for p in props)
    upn.save_pretrained(tmp_path)
    again = UpnModel.from_pretrained(tmp_path)
    assert torch.allclose(again(x)["scores"], out["scores"])


def test_upn_cross_granularity_suppression():
    """A fine box that nearly repeats a better coarse box goes; a distant fine box stays."""
    cfg = dict(image_size=64, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], head_dim=16, min_score=0.1)
    scores = torch.full((1, 2, 16, 16), -10.0)
    scores[0, 0, 5, 5] = 3.0  # coarse peak
    scores[0, 1, 5, 6] = 2.0  # fine peak one cell (4 px) to the right: IoU 28/36 = 0.78 with the coarse box
    scores[0, 1, 12, 12] = 1.0  # fine peak far away
    boxes = torch.zeros(1, 4, 16, 16)
    boxes[0, :2] = 0.5  # centred in the cell
    boxes[0, 2:] = math.log(32 / 4)  # 32 x 32 px boxes
    outputs = {"scores": scores, "boxes": boxes}

    def proposals(threshold):
        upn = UpnModel(UpnConfig(**cfg, cross_granularity_iou=threshold))
        upn.forward = lambda pixel_values: outputs
        return upn.propose(torch.zeros(1, 3, 64, 64))[0]

    assert proposals(None)["granularity"].tolist() == [0, 1, 1]
    kept = proposals(0.7)
    assert kept["granularity"].tolist() == [0, 1] and kept["boxes"][1, 0] > 32  # the distant one
    assert len(proposals(0.8)["boxes"]) == 3  # 0.78 is not above 0.8
    with pytest.raises(ValueError, match="cross_granularity_iou"):
        UpnConfig(cross_granularity_iou=1.5)


def test_box_refinement_deltas_round_trip_and_are_capped():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 8.0, 8.0]])
    truth = torch.tensor([[12.0, 18.0, 36.0, 50.0], [1.0, 2.0, 9.0, 12.0]])
    deltas = UpnModel.target_deltas(boxes, truth)
    assert torch.allclose(deltas[0], torch.tensor([4 / 20, -6 / 40, math.log(24 / 20), math.log(32 / 40)]))
    assert torch.allclose(UpnModel.apply_deltas(boxes, deltas), truth, atol=1e-5)
    wild = UpnModel.apply_deltas(boxes[:1], torch.tensor([[0.0, 0.0, 50.0, -50.0]]))
    assert torch.allclose(wild[0, 2] - wild[0, 0], torch.tensor(20 * math.e)), wild  # at most e times wider
    assert torch.allclose(wild[0, 3] - wild[0, 1], torch.tensor(40 / math.e))


def test_box_refinement_learns_and_survives_save_load(tmp_path):
    """A few steps of the refinement (first stage frozen) on one scene lower its loss, the proposals
    change with it, and a saved UPN proposes the same boxes after loading."""
    cfg = UpnConfig(image_size=64, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], head_dim=16, min_score=0.0,
                    box_refinement=True, refine_grid=3)  # fmt: skip
    torch.manual_seed(0)
    upn = UpnModel(cfg)
    x = torch.zeros(1, 3, 64, 64)
    x[0, :, 10:26, 20:50] = 1.0  # a 30 x 16 px bright rectangle
    truth = [torch.tensor([[20.0, 10.0, 50.0, 26.0]])]
    before = upn.propose(x)[0]["boxes"]
    params = [p for n, p in upn.named_parameters() if n.startswith("refine.")]
    opt = torch.optim.Adam(params, lr=3e-3)
    with torch.no_grad():
        out = upn(x)
    losses = []
    for _ in range(60):
        loss = upn.refinement_loss(out, x, truth)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    after = upn.propose(x)[0]["boxes"]
    assert after.shape == before.shape and not torch.allclose(after, before)
    assert upn.refinement_loss(out, x, [torch.zeros(0, 4)]).item() == 0.0  # no objects: nothing to learn
    # refinement runs once over a batch's candidates: each image gets what it gets alone
    other = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    batched = upn.propose(torch.cat([other, x]))
    alone = upn.propose(other)[0]
    assert len(alone["boxes"]) and torch.allclose(batched[0]["boxes"], alone["boxes"], atol=1e-5)
    assert torch.allclose(batched[1]["boxes"], after, atol=1e-5)
    upn.save_pretrained(tmp_path)
    again = UpnModel.from_pretrained(tmp_path)
    assert torch.allclose(again.propose(x)[0]["boxes"], after)
    with pytest.raises(ValueError, match="box refinement"):
        UpnModel(UpnConfig(image_size=64, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], head_dim=16)).refine_deltas(
            out["features"], x, torch.zeros(1, 5)
        )
    with pytest.raises(ValueError, match="refine_context"):
        UpnConfig(refine_context=0.5)
