"""Configuration of MVP-LM (mvp-lm.txt): a language model whose ``<PER>`` token drives one box-and-mask query
decoder for word-based and sentence-based perception, and its named sizes."""

from __future__ import annotations

import copy

from transformers import PretrainedConfig

from perceive.models.vision import DualEncoderParts

QUERY_ENHANCEMENTS = ("paper", "selected")
TEXT_LAYERS = ("last", "all")


class MvpConfig(DualEncoderParts, PretrainedConfig):
    """The shared dual vision encoder (CLIP ViT tokens for the language model, ConvNeXt pyramid for the decoder), a
    Qwen2 language model, and the multi-granularity query decoder. What each choice measured:
    ``docs/experiments/mvp.md``.

    Args:
        vision_config, convnext_config, text_config: the parts' transformers configurations as dicts.
        low_resolution, high_resolution: the ViT's and the ConvNeXt's input sizes in pixels.
        decoder_dim, decoder_layers, decoder_heads, decoder_ffn: the query decoder's width, layers (each one
            masked cross-attention, self-attention and feed-forward, as Mask2Former's), heads and MLP width.
        thing_queries, stuff_queries: queries matched only with things (countable objects) and only with stuff
            (amorphous regions: sky, grass), as OpenSeeD separates them for panoptic segmentation.
        query_enhancement: ``"paper"`` (a thing query is the ``<PER>`` state's base query plus an image-memory
            feature selected by the instruction, Sec. 3.2) or ``"selected"`` (the selected feature alone, as the
            released code and the paper's "Caption dagger" ablation).
        text_layers: a name's embedding averages its tokens' states of the ``"last"`` layer (the paper) or of
            ``"all"`` layers and the input embeddings (the released code).
        text_cross_attention: every decoder layer also attends to the instruction's token states (the category
            names' or the sentence's), not only to their pooled embeddings; False is the paper's form.
        no_object_weight: the weight of the background class in the word classification loss.
        class_weight, mask_weight, dice_weight, l1_weight, giou_weight: matching costs and loss weights.
        lm_loss_weight: the weight of the response's language-model loss.
        referring_threshold: a sentence answer keeps every query whose target probability is above this (none
            above: "no target").
        object_threshold, overlap_threshold: panoptic merge (Mask2Former): queries above ``object_threshold``
            compete per pixel; a segment is kept when at least ``overlap_threshold`` of its mask survives.
        image_token_id, per_token_id: the tokenizer's ids of ``<image>`` and ``<PER>``.
    """

    model_type = "mvp"

    def __init__(
        self,
        vision_config: dict | None = None,
        convnext_config: dict | None = None,
        text_config: dict | None = None,
        low_resolution: int = 128,
        high_resolution: int = 256,
        decoder_dim: int = 128,
        decoder_layers: int = 3,
        decoder_heads: int = 4,
        decoder_ffn: int = 256,
        thing_queries: int = 24,
        stuff_queries: int = 8,
        query_enhancement: str = "paper",
        text_layers: str = "last",
        text_cross_attention: bool = False,
        no_object_weight: float = 0.1,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        lm_loss_weight: float = 1.0,
        referring_threshold: float = 0.5,
        object_threshold: float = 0.5,
        overlap_threshold: float = 0.8,
        image_token_id: int = 0,
        per_token_id: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if query_enhancement not in QUERY_ENHANCEMENTS:
            raise ValueError(f"query_enhancement must be one of {QUERY_ENHANCEMENTS}, got {query_enhancement!r}")
        if text_layers not in TEXT_LAYERS:
            raise ValueError(f"text_layers must be one of {TEXT_LAYERS}, got {text_layers!r}")
        if thing_queries < 1 or stuff_queries < 0:
            raise ValueError(f"thing_queries must be >= 1 and stuff_queries >= 0, got {thing_queries} and "
                             f"{stuff_queries}")  # fmt: skip
        if decoder_layers < 1 or decoder_dim % decoder_heads:
            raise ValueError(f"decoder_layers must be >= 1 and decoder_heads must divide decoder_dim, got "
                             f"{decoder_layers} layers, {decoder_heads} heads, width {decoder_dim}")  # fmt: skip
        self.vision_config = dict(vision_config or {})
        self.convnext_config = dict(convnext_config or {})
        self.text_config = dict(text_config or {})
        self.low_resolution = low_resolution
        self.high_resolution = high_resolution
        self.decoder_dim = decoder_dim
        self.decoder_layers = decoder_layers
        self.decoder_heads = decoder_heads
        self.decoder_ffn = decoder_ffn
        self.thing_queries = thing_queries
        self.stuff_queries = stuff_queries
        self.query_enhancement = query_enhancement
        self.text_layers = text_layers
        self.text_cross_attention = text_cross_attention
        self.no_object_weight = no_object_weight
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight
        self.lm_loss_weight = lm_loss_weight
        self.referring_threshold = referring_threshold
        self.object_threshold = object_threshold
        self.overlap_threshold = overlap_threshold
        self.image_token_id = image_token_id
        self.per_token_id = per_token_id

    @property
    def num_queries(self) -> int:
        return self.thing_queries + self.stuff_queries


MVP_TINY = {
    "vision_config": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "patch_size": 32, "attn_implementation": "eager"},
    "convnext_config": {"hidden_sizes": [32, 64, 128], "depths": [1, 1, 2]},
    # the world tokenizer's size replaces vocab_size when a model is built
    "text_config": {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False,
                    "vocab_size": 512, "attn_implementation": "eager"},
    "low_resolution": 128,
    "high_resolution": 256,
    # names pooled over every layer: shapes confused less (docs/experiments/mvp.md, attempt 2)
    "text_layers": "all",
}  # fmt: skip

# MVP-LM's real size as near as the shared encoders allow: the paper's Swin-B becomes a ConvNeXt-B of the same
# width and a CLIP ViT-L/14-336 gives the language model's image tokens; the LM is Phi-1.5-sized (24 layers, 2048
# wide) as a Qwen2 (perceive's one LM family); OpenSeeD's decoder: 9 layers, 256 wide, 300 thing and 100 stuff queries.
MVP_PHI = {
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "patch_size": 14, "projection_dim": 768},
    "convnext_config": {"hidden_sizes": [128, 256, 512, 1024], "depths": [3, 3, 27, 3]},
    "text_config": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 2048,
                    "vocab_size": 51200, "tie_word_embeddings": False},
    "low_resolution": 336,
    "high_resolution": 1024,
    "decoder_dim": 256,
    "decoder_layers": 9,
    "decoder_heads": 8,
    "decoder_ffn": 2048,
    "thing_queries": 300,
    "stuff_queries": 100,
}  # fmt: skip

NAMED_CONFIGS = {"mvp-tiny": MVP_TINY, "mvp-phi": MVP_PHI}


def named_config(name: str, **overrides) -> MvpConfig:
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(NAMED_CONFIGS)}")
    return MvpConfig(**{**copy.deepcopy(NAMED_CONFIGS[name]), **overrides})
