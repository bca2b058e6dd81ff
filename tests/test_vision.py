import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, ConvNextConfig

from perceive.models.image_processing import IMAGE_MEAN, ImageFrame, dual_resolution_pixels, square_pixels
from perceive.models.vision import DualVisionEncoder


def test_image_frame_round_trip():
    f = ImageFrame(200, 100)
    boxes = np.array([[10, 20, 150, 90]])
    assert np.allclose(f.to_pixels(f.normalize(boxes)), boxes)


def test_images_are_padded_at_the_right_and_bottom_so_boxes_keep_their_shape():
    image = np.full((20, 40, 3), 255, dtype=np.uint8)  # wide: padded below
    pixels, frames = dual_resolution_pixels([image], low=8, high=16)
    assert frames[0].side == 40 and pixels["pixel_low"].shape == (1, 3, 8, 8)
    rgb = pixels["rgb_high"][0]
    assert rgb.shape == (3, 16, 16) and float(rgb[:, :7].min()) == 1.0 and float(rgb[:, 9:].max()) == 0.0
    # the normalised tensors are the [0, 1] ones less ImageNet's mean over its deviation
    square = square_pixels([image], 16)
    assert torch.allclose(square, pixels["pixel_high"]) and square[0, 0, 15, 0] == pytest.approx(-IMAGE_MEAN[0] / 0.229)
    with pytest.raises(ValueError, match="uint8"):
        dual_resolution_pixels([image.astype(np.float32)], 8, 16)


def test_the_dual_encoder_gives_a_token_per_vit_patch_and_a_pyramid():
    vit = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           patch_size=16, image_size=64)  # fmt: skip
    convnext = ConvNextConfig(hidden_sizes=[8, 16, 32], depths=[1, 1, 1], num_stages=3)
    encoder = DualVisionEncoder(vit, convnext).eval()
    assert encoder.grid == 4 and encoder.token_channels == 32 + 32 and encoder.pyramid_channels == [8, 16, 32]
    with torch.no_grad():
        tokens, levels = encoder(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 128, 128))
    assert tokens.shape == (2, 16, 64)
    assert [tuple(lv.shape) for lv in levels] == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8)]
