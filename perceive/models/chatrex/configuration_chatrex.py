"""Configuration of the retrieval perception MLLM (ChatRex / RexSeek) and its named sizes."""

from __future__ import annotations

import copy

from transformers import PretrainedConfig

from perceive.models.object_encoder import POOLINGS
from perceive.models.upn.configuration_upn import UpnConfig
from perceive.models.vision import DualEncoderParts

# where each box's rank among the alike boxes of its image goes (perceive.models.chatrex.object_order)
ORDER_EMBEDDINGS = ("none", "object_tokens", "pointer_keys", "pointer_reading")
POINTER_ORDER_EMBEDDINGS = ("pointer_keys", "pointer_reading")  # those the pointer reads, from encode_visual


class ChatRexConfig(DualEncoderParts, PretrainedConfig):
    """The dual vision encoder (CLIP ViT at low resolution for image tokens, ConvNeXt at high resolution
    for object features), the object encoder, a Qwen2 language model that answers with box indices, and
    the UPN's configuration (``upn_config``). What each choice measured: ``docs/experiments/chatrex.md``.

    Args:
        vision_config, convnext_config, text_config, upn_config: the parts' transformers configurations
            (``CLIPVisionConfig``, ``ConvNextConfig``, ``Qwen2Config``, ``UpnConfig``) as dicts.
        low_resolution, high_resolution: the ViT's and the ConvNeXt's input sizes in pixels.
        roi_output_size, roi_rgb_level, roi_pooling, position_dim, object_dim: the object encoder
            (``perceive.models.object_encoder``): RoI grid size, the RGB image as one more level, ``"mean"``
            (ChatRex) or ``"flatten"`` the grid, the box embedding's and the object features' widths.
        max_objects: boxes a prompt can hold (the ``<objK>`` tokens).
        layout: ``"paper"`` (image, ``<objK><roi>`` pairs, question; ChatRex Sec. 3.3) or ``"question_first"``
            (the question before the boxes, so each object token can attend to it).
        index_head: how ``<objK>`` is scored: ``"vocab"`` (output-embedding rows, ChatRex) or ``"pointer"``
            (the hidden state against object K's own hidden state).
        box_tokens: ``"pair"`` (``<objK>`` then ``<roi>``, ChatRex) or ``"fused"`` (one token per box, both).
        index_token_features: every other ``<objK>`` (question or answer) also carries object K's features.
        prefix_attention: ``"causal"`` (ChatRex) or ``"bidirectional"`` (the prompt up to ``<assistant>``
            attends both ways, as PaliGemma's prefix; the answer stays causal).
        index_softmax: an answer step inside ``<objects>`` is normalised in training over the whole
            ``"vocabulary"`` or over what constrained decoding can choose there (``"grammar"``).
        attribute_heads: auxiliary classification heads on each object, name -> number of classes, in the
            order of the training data's label columns. They come from the training data, which declares
            what it labels (a COCO-only source: ``{"category": N}``), and are saved here.
        grid_attribute_heads: those of ``attribute_heads`` that read the box's whole RoI grid, detached, as
            probes (attributes about what surrounds an object, e.g. what a person holds).
        attribute_embedding: each object token also carries the heads' class probabilities (detached).
        coordinate_embedding: each object token also carries its box's centre and size.
        relation_layers, relation_heads: transformer layers over each image's object tokens with a
            geometry bias (``perceive.models.chatrex.object_relation``); 0 for none.
        order_embedding: where each box's rank among alike boxes goes: ``"none"``, ``"object_tokens"``,
            ``"pointer_keys"`` or ``"pointer_reading"`` (read into each index score by the query).
        order_groupings: the ways of being alike that ranks are counted by, each a list of attribute
            heads that must agree (e.g. ``[["category"], ["category", "color"]]``).
        alike_head: the attribute head whose agreement makes two boxes alike for the anchor pointer.
        anchor_pointer: the pointer's query also picks an anchor box and reads each box's geometry
            relative to it (``perceive.models.chatrex.anchor_pointer``).
        match_loss_weight, attribute_loss_weight: the per-box membership loss at each ``<objects>`` and
            the attribute heads' loss.
        anchor_loss_weight, order_loss_weight: teach the anchor pointer and the order reading from each
            expression directly (off in every shipped configuration).
        image_token_id, roi_token_id, assistant_token_id, obj_token_ids: the tokenizer's placeholder ids.
    """

    model_type = "chatrex"

    def __init__(
        self,
        vision_config: dict | None = None,
        convnext_config: dict | None = None,
        text_config: dict | None = None,
        upn_config: dict | None = None,
        low_resolution: int = 128,
        high_resolution: int = 256,
        roi_output_size: int = 4,
        roi_rgb_level: bool = True,
        roi_pooling: str = "mean",
        position_dim: int = 64,
        object_dim: int = 256,
        max_objects: int = 100,
        layout: str = "question_first",
        index_head: str = "pointer",
        box_tokens: str = "pair",
        index_token_features: bool = False,
        prefix_attention: str = "causal",
        index_softmax: str = "vocabulary",
        attribute_heads: dict[str, int] | list[list] | None = None,
        grid_attribute_heads: list[str] | None = None,
        attribute_embedding: bool = False,
        coordinate_embedding: bool = False,
        relation_layers: int = 0,
        relation_heads: int = 4,
        order_embedding: str | bool = "none",
        order_groupings: list[list[str]] | None = None,
        alike_head: str = "category",
        anchor_pointer: bool = False,
        match_loss_weight: float = 1.0,
        attribute_loss_weight: float = 0.5,
        anchor_loss_weight: float = 0.0,
        order_loss_weight: float = 0.0,
        image_token_id: int = 0,
        roi_token_id: int = 0,
        assistant_token_id: int = -1,
        obj_token_ids: list[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if layout not in ("paper", "question_first"):
            raise ValueError(f"layout must be 'paper' or 'question_first', got {layout!r}")
        if index_head not in ("vocab", "pointer"):
            raise ValueError(f"index_head must be 'vocab' or 'pointer', got {index_head!r}")
        if roi_pooling not in POOLINGS:
            raise ValueError(f"roi_pooling must be one of {POOLINGS}, got {roi_pooling!r}")
        if box_tokens not in ("pair", "fused"):
            raise ValueError(f"box_tokens must be 'pair' or 'fused', got {box_tokens!r}")
        if prefix_attention not in ("causal", "bidirectional"):
            raise ValueError(f"prefix_attention must be 'causal' or 'bidirectional', got {prefix_attention!r}")
        if index_softmax not in ("vocabulary", "grammar"):
            raise ValueError(f"index_softmax must be 'vocabulary' or 'grammar', got {index_softmax!r}")
        if isinstance(order_embedding, bool):  # how checkpoints saved before "pointer_keys" wrote it
            order_embedding = "object_tokens" if order_embedding else "none"
        if order_embedding not in ORDER_EMBEDDINGS:
            raise ValueError(f"order_embedding must be one of {ORDER_EMBEDDINGS}, got {order_embedding!r}")
        if order_embedding in POINTER_ORDER_EMBEDDINGS and index_head != "pointer":
            raise ValueError(f"order_embedding={order_embedding!r} adds to the pointer: it needs index_head='pointer'")
        if anchor_pointer and index_head != "pointer":
            raise ValueError("anchor_pointer adds to the pointer's scores: it needs index_head='pointer'")
        if anchor_loss_weight and not anchor_pointer:
            raise ValueError("anchor_loss_weight teaches the anchor pointer whom to read: it needs anchor_pointer")
        if order_loss_weight and order_embedding != "pointer_reading":
            raise ValueError("order_loss_weight teaches the order reading: it needs order_embedding='pointer_reading'")
        if relation_layers < 0 or relation_heads < 1:
            raise ValueError(f"relation_layers must be >= 0 and relation_heads >= 1, got {relation_layers} and "
                             f"{relation_heads}")  # fmt: skip
        heads = {str(k): int(v) for k, v in dict(attribute_heads or {}).items()}
        if any(n < 1 for n in heads.values()):
            raise ValueError(f"attribute_heads need at least one class each, got {heads}")
        groupings = [list(g) for g in (order_groupings or [[alike_head]])]
        needed = {"grid_attribute_heads": list(grid_attribute_heads or [])}
        if order_embedding != "none":
            needed["order_groupings"] = [h for g in groupings for h in g]
        if anchor_pointer:
            needed["alike_head"] = [alike_head]
        for option, names in needed.items():
            unknown = sorted(set(names) - set(heads))
            if unknown:
                raise ValueError(f"{option} names {unknown}, which attribute_heads ({sorted(heads) or 'none'}) lacks: "
                                 f"the training data must label them")  # fmt: skip
        if order_embedding != "none" and (not groupings or not all(groupings)):
            raise ValueError(f"order_groupings must be non-empty lists of attribute heads, got {groupings}")
        self.vision_config = dict(vision_config or {})
        self.convnext_config = dict(convnext_config or {})
        self.text_config = dict(text_config or {})
        self.upn_config = dict(upn_config or {})
        self.low_resolution = low_resolution
        self.high_resolution = high_resolution
        self.roi_output_size = roi_output_size
        self.roi_rgb_level = roi_rgb_level
        self.roi_pooling = roi_pooling
        self.position_dim = position_dim
        self.object_dim = object_dim
        self.max_objects = max_objects
        self.layout = layout
        self.index_head = index_head
        self.box_tokens = box_tokens
        self.index_token_features = index_token_features
        self.prefix_attention = prefix_attention
        self.index_softmax = index_softmax
        self.attribute_heads = heads
        self.grid_attribute_heads = list(grid_attribute_heads or [])
        self.attribute_embedding = attribute_embedding
        self.coordinate_embedding = coordinate_embedding
        self.relation_layers = relation_layers
        self.relation_heads = relation_heads
        self.order_embedding = order_embedding
        self.order_groupings = groupings
        self.alike_head = alike_head
        self.anchor_pointer = anchor_pointer
        self.match_loss_weight = match_loss_weight
        self.attribute_loss_weight = attribute_loss_weight
        self.anchor_loss_weight = anchor_loss_weight
        self.order_loss_weight = order_loss_weight
        self.image_token_id = image_token_id
        self.roi_token_id = roi_token_id
        self.assistant_token_id = assistant_token_id
        self.obj_token_ids = list(obj_token_ids or [])

    def to_dict(self) -> dict:
        """As ``PretrainedConfig.to_dict``, with ``attribute_heads`` as ``[name, classes]`` pairs: ``config.json`` is
        written with sorted keys, and the heads' order is the order of the label columns and of the
        attribute embedding's inputs."""
        out = super().to_dict()
        out["attribute_heads"] = [[k, v] for k, v in self.attribute_heads.items()]
        return out

    def upn(self) -> UpnConfig:
        return UpnConfig(**self.upn_config)


TINY = {
    # 4 x 4 image tokens: the boxes carry the objects; 8 x 8 made prompts 1.5x as long and a step 1.4x slower.
    # Eager attention: at these lengths (about 110 tokens) PyTorch's CPU kernel for scaled dot-product
    # attention is the slower in bf16 (eager: a bf16 step 1.24x faster, a float32 one as fast; train_speed.py)
    "vision_config": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "patch_size": 32, "attn_implementation": "eager"},
    "convnext_config": {"hidden_sizes": [32, 64, 128], "depths": [1, 1, 1]},
    # the world tokenizer's size replaces vocab_size when a model is built. A fifth layer (+0.73 M parameters; the
    # checkpoint 29.4 MB of its 30) reads relations and extremes better (docs/experiments/chatrex.md, "Round 22")
    "text_config": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 5, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": False,
                    "vocab_size": 512, "attn_implementation": "eager"},
    # proposals under 0.1 add no recall on the world (99.2% / 99.7% either way) but double the boxes
    # and a box repeating one of the other granularity is one object twice (0.7: 275 -> 48 such, same recall)
    # box refinement makes proposals tight (instances at IoU >= 0.75: 74.0% -> 92.3%), shaped as their objects
    "upn_config": {"image_size": 256, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 1], "head_dim": 64,
                   "min_score": 0.1, "cross_granularity_iou": 0.7, "box_refinement": True},
    "box_tokens": "fused",
    "index_token_features": True,
    "roi_pooling": "flatten",
    "index_softmax": "grammar",
    "attribute_embedding": True,
    # the attribute heads come from the training data; the world's six (with what a person holds, read from its
    # RoI grid) at 0.75, so each of the first four weighs what it did at 0.5 of four
    "attribute_loss_weight": 0.75,
    # a second pointer hop to an anchor box and the geometry relative to it: referring DF1 79.5 -> 84.1
    "anchor_pointer": True,
    # each box's order counts read into its index score by the query: referring DF1 84.1 -> 86.3 (extreme 56.8 ->
    # 81.8, ordinal 42.0 -> 68.0)
    "order_embedding": "pointer_reading",
    "low_resolution": 128,
    "high_resolution": 256,
    "object_dim": 256,
}  # fmt: skip

# ChatRex-7B (Sec. B.2): CLIP ViT-L/14 at 336 px, LAION ConvNeXt-L at 768 px, a Qwen2.5-7B language model;
# the UPN's backbone is sized like a ConvNeXt-B (the paper's is T-Rex2 on Swin-L).
CHATREX_7B = {
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "patch_size": 14, "projection_dim": 768},
    "convnext_config": {"hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3]},
    "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                    "vocab_size": 152064, "rope_theta": 1000000.0, "tie_word_embeddings": False},
    "upn_config": {"image_size": 768, "hidden_sizes": [128, 256, 512, 1024], "depths": [3, 3, 27, 3],
                   "head_dim": 256},
    "low_resolution": 336,
    "high_resolution": 768,
    "object_dim": 1024,
    "position_dim": 256,
    "roi_rgb_level": False,
    "roi_pooling": "mean",
    "layout": "paper",
    "index_head": "vocab",
    "box_tokens": "pair",
    "index_token_features": False,
    "index_softmax": "vocabulary",
}  # fmt: skip

NAMED_CONFIGS = {"tiny": TINY, "chatrex-7b": CHATREX_7B}


def named_config(name: str, **overrides) -> ChatRexConfig:
    """A named size (``NAMED_CONFIGS``) with ``overrides``; the data-given fields (``attribute_heads`` and what
    reads them) are overrides."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(NAMED_CONFIGS)}")
    return ChatRexConfig(**{**copy.deepcopy(NAMED_CONFIGS[name]), **overrides})
