import pytest
import torch

from perceive.models.object_encoder import ObjectEncoder, box_coordinates, box_position_embedding


def test_position_embedding():
    e = box_position_embedding(torch.tensor([[0.1, 0.2, 0.5, 0.9]]), 32)
    assert e.shape == (1, 32) and torch.isfinite(e).all()
    with pytest.raises(ValueError):
        box_position_embedding(torch.zeros(1, 4), 30)


def test_box_coordinates_are_centre_and_size_about_unit_scale():
    c = box_coordinates(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.5, 0.75, 0.5]]))
    assert torch.equal(c, torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 0.0]]))


def _pyramid(channels=(8, 16, 32), size=64, seed=1):
    torch.manual_seed(seed)
    levels = [torch.randn(2, c, size // s, size // s) for c, s in zip(channels, (4, 8, 16), strict=True)]
    return levels, torch.rand(2, 3, size, size)


@pytest.mark.parametrize("pooling, rgb_level", [("mean", True), ("flatten", True), ("mean", False)])
def test_object_features_have_their_shapes_and_padding_is_zero(pooling, rgb_level):
    encoder = ObjectEncoder([8, 16, 32], object_dim=24, position_dim=16, output_size=3, rgb_level=rgb_level,
                            pooling=pooling)  # fmt: skip
    levels, rgb = _pyramid()
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6], [0.2, 0.3, 0.9, 0.8], [0, 0, 0, 0]]] * 2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    feats, grid = encoder(levels, rgb, boxes, mask)
    channels = 8 + 16 + 32 + (3 if rgb_level else 0)
    assert feats.shape == (2, 3, 24)
    assert grid.shape == (2, 3, channels * (9 if pooling == "flatten" else 1)) == (2, 3, encoder.grid_channels)
    assert not feats[~mask].any() and feats[mask].abs().sum(-1).gt(0).all()
    # a box's features do not depend on the other boxes beside it
    alone, _ = encoder([lv[:1] for lv in levels], rgb[:1], boxes[:1, :1], mask[:1, :1])
    assert torch.allclose(alone[0, 0], feats[0, 0], atol=1e-6)


def test_the_pooling_is_checked():
    with pytest.raises(ValueError, match="roi_pooling"):
        ObjectEncoder([8], 8, 8, pooling="max")


@pytest.mark.parametrize("pooling", ["mean", "flatten"])
def test_flattened_rois_keep_the_layout_that_the_mean_averages_away(pooling):
    encoder = ObjectEncoder([8, 16, 32], object_dim=24, position_dim=16, output_size=4, pooling=pooling).eval()
    levels, rgb = _pyramid()
    box = torch.tensor([[[0.25, 0.3, 0.75, 0.6]]] * 2)  # centred left-right: a mirror maps it onto itself
    mask = torch.ones(2, 1, dtype=torch.bool)
    with torch.no_grad():
        feats, _ = encoder(levels, rgb, box, mask)
        mirrored, _ = encoder([lv.flip(-1) for lv in levels], rgb.flip(-1), box, mask)
    if pooling == "mean":  # the same cells in another order: the same mean
        assert torch.allclose(feats, mirrored, atol=1e-5)
    else:
        assert not torch.allclose(feats, mirrored, atol=1e-3)
