"""Configuration of REF-VLM (ref-vlm.txt): a language model answering in TRP triplets whose ``<REF>`` tokens drive
box, mask and keypoint decoders, with visual prompts pooled into the question, and its named sizes."""

from __future__ import annotations

import copy

from transformers import PretrainedConfig

from perceive.models.vision import DualEncoderParts

BOX_READOUTS = ("dense", "regression")


class RefVlmConfig(DualEncoderParts, PretrainedConfig):
    """The shared dual vision encoder (CLIP ViT tokens for the language model, ConvNeXt pyramid for the decoders), a
    Qwen2 language model, the visual-prompt encoder and one decoder per unit. What each choice measured:
    ``docs/experiments/refvlm.md``.

    Args:
        vision_config, convnext_config, text_config: the parts' transformers configurations as dicts.
        low_resolution, high_resolution: the ViT's and the ConvNeXt's input sizes in pixels.
        prompt_grid, prompt_resolution: a visual prompt becomes ``prompt_grid**2`` cell tokens plus one whole-mask
            token, pooled from the global features resampled to ``prompt_resolution`` cells a side (Eq. 1-3).
        prompt_temperature: the cosine position term's temperature ``s`` (Eq. 2; alpha is 1).
        decoder_dim, decoder_layers, decoder_heads, decoder_ffn: each unit decoder's width, layers (cross-attention
            to the image memory, self-attention among the sample's ``<REF>`` queries, a feed-forward network),
            heads and MLP width.
        text_cross_attention: the unit decoders also attend to the language model's states (averaged over its layers)
            of the question and the answer, beside the image; False is the paper's form, where the ``<REF>`` state is
            all the decoders read of the text (``docs/experiments/refvlm.md``: from scratch it did not learn).
        query_seed: each ``<REF>`` query starts from the image memory its state selects (a softmax over the memory
            tokens, trained to point at the phrase's targets) plus the memory inside the visual prompts: MVP-LM's
            query enhancement per ``<REF>``. False is the paper's form.
        box_readout: ``"regression"`` (the paper's DETR-style head: each query regresses its box) or ``"dense"``
            (the box decoder also paints its box's area over per-pixel embeddings; the box is that area's extent).
            Both heads train; this picks which one answers.
        num_keypoints: keypoints per person ``<REF>`` (COCO's 17).
        lm_loss_weight, box_loss_weight, mask_loss_weight, keypoint_loss_weight: the released code's 1 / 0.5 / 0.5 / 1.
        grounding_loss_weight: the weight of ``query_seed``'s selection loss (BCE + dice, like the masks').
        l1_weight, giou_weight, mask_bce_weight, dice_weight: the terms inside the box and mask losses (and costs).
        image_token_id, region_token_id, ref_token_id: the tokenizer's ids of ``<image>``, ``<region>``, ``<REF>``.
    """

    model_type = "refvlm"

    def __init__(
        self,
        vision_config: dict | None = None,
        convnext_config: dict | None = None,
        text_config: dict | None = None,
        low_resolution: int = 128,
        high_resolution: int = 256,
        prompt_grid: int = 2,
        prompt_resolution: int = 16,
        prompt_temperature: float = 10000.0,
        decoder_dim: int = 128,
        decoder_layers: int = 2,
        decoder_heads: int = 4,
        decoder_ffn: int = 256,
        text_cross_attention: bool = True,
        query_seed: bool = False,
        box_readout: str = "dense",
        num_keypoints: int = 17,
        lm_loss_weight: float = 1.0,
        box_loss_weight: float = 0.5,
        mask_loss_weight: float = 0.5,
        keypoint_loss_weight: float = 1.0,
        grounding_loss_weight: float = 0.5,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_bce_weight: float = 5.0,
        dice_weight: float = 5.0,
        image_token_id: int = 0,
        region_token_id: int = 0,
        ref_token_id: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if box_readout not in BOX_READOUTS:
            raise ValueError(f"box_readout must be one of {BOX_READOUTS}, got {box_readout!r}")
        if decoder_layers < 1 or decoder_dim % decoder_heads:
            raise ValueError(f"decoder_layers must be >= 1 and decoder_heads must divide decoder_dim, got "
                             f"{decoder_layers} layers, {decoder_heads} heads, width {decoder_dim}")  # fmt: skip
        if prompt_grid < 1 or prompt_resolution % prompt_grid:
            raise ValueError(f"prompt_grid must be >= 1 and divide prompt_resolution, got {prompt_grid} and "
                             f"{prompt_resolution}")  # fmt: skip
        self.vision_config = dict(vision_config or {})
        self.convnext_config = dict(convnext_config or {})
        self.text_config = dict(text_config or {})
        self.low_resolution = low_resolution
        self.high_resolution = high_resolution
        self.prompt_grid = prompt_grid
        self.prompt_resolution = prompt_resolution
        self.prompt_temperature = prompt_temperature
        self.decoder_dim = decoder_dim
        self.decoder_layers = decoder_layers
        self.decoder_heads = decoder_heads
        self.decoder_ffn = decoder_ffn
        self.text_cross_attention = text_cross_attention
        self.query_seed = query_seed
        self.box_readout = box_readout
        self.num_keypoints = num_keypoints
        self.lm_loss_weight = lm_loss_weight
        self.box_loss_weight = box_loss_weight
        self.mask_loss_weight = mask_loss_weight
        self.keypoint_loss_weight = keypoint_loss_weight
        self.grounding_loss_weight = grounding_loss_weight
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight
        self.mask_bce_weight = mask_bce_weight
        self.dice_weight = dice_weight
        self.image_token_id = image_token_id
        self.region_token_id = region_token_id
        self.ref_token_id = ref_token_id

    @property
    def region_tokens(self) -> int:
        """The tokens one ``<region>`` becomes: a token per grid cell and one for the whole mask."""
        return self.prompt_grid**2 + 1


REFVLM_TINY = {
    "vision_config": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "patch_size": 32, "attn_implementation": "eager"},
    "convnext_config": {"hidden_sizes": [32, 64, 128], "depths": [1, 1, 2]},
    # the world tokenizer's size replaces vocab_size when a model is built
    "text_config": {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False,
                    "vocab_size": 512, "attn_implementation": "eager"},
    "low_resolution": 128,
    "high_resolution": 256,
}  # fmt: skip

# REF-VLM's size (Sec. IV-D): CLIP ViT-L/14-336, a ConvNeXt-L pyramid (CLIP-ConvNeXt-512's shape), and Vicuna-7B's
# shape as a Qwen2 (perceive's one LM family); DETR's and MaskFormer's 6 decoder layers, 256 wide.
REFVLM_7B = {
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "patch_size": 14, "projection_dim": 768},
    "convnext_config": {"hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3]},
    "text_config": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
                    "vocab_size": 32000, "tie_word_embeddings": False},
    "low_resolution": 336,
    "high_resolution": 512,
    "prompt_grid": 4,
    "prompt_resolution": 24,
    "decoder_dim": 256,
    "decoder_layers": 6,
    "decoder_heads": 8,
    "decoder_ffn": 2048,
}  # fmt: skip

NAMED_CONFIGS = {"refvlm-tiny": REFVLM_TINY, "refvlm-7b": REFVLM_7B}


def named_config(name: str, **overrides) -> RefVlmConfig:
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(NAMED_CONFIGS)}")
    return RefVlmConfig(**{**copy.deepcopy(NAMED_CONFIGS[name]), **overrides})
