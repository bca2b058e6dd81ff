"""Configuration of the retrieval perception MLLM (ChatRex / RexSeek) and its named sizes."""

from __future__ import annotations

import copy

from transformers import CLIPVisionConfig, ConvNextConfig, PretrainedConfig, Qwen2Config

from perceive.models.modeling_upn import UpnConfig

ATTRIBUTES = {  # auxiliary targets of object features: name -> number of classes
    "category": 19,  # perceive.world.scene.category_table() things and parts
    "color": 8,
    "pattern": 3,
    "size": 3,
}
HOLDING_ATTRIBUTES = {  # what a person holds, read from the person's own box: none or an item; its colour
    "held_item": 4,  # none, then perceive.world.scene.ITEMS
    "held_item_color": 8,
}
# where each box's rank among the alike boxes of its image goes (perceive.models.object_order)
ORDER_EMBEDDINGS = ("none", "object_tokens", "pointer_keys", "pointer_reading")
POINTER_ORDER_EMBEDDINGS = ("pointer_keys", "pointer_reading")  # those the pointer reads, from encode_visual


class PerceiverConfig(PretrainedConfig):
    """The dual vision encoder (CLIP ViT at low resolution for image tokens, ConvNeXt at high resolution
    for object features), the object encoder, and a Qwen2 language model.

    ``layout`` is the prompt layout: ``"paper"`` (ChatRex Sec. 3.3: image, then ``<objK><roi>`` pairs,
    then the question) or ``"question_first"`` (image, question, then the pairs, so each object token
    can attend to the question). ``index_head`` is how the language model scores ``<objK>`` tokens:
    ``"vocab"`` (rows of the output embedding, as ChatRex) or ``"pointer"`` (the hidden state against
    each object token's own hidden state; the generated index is still the language model's).

    ``box_tokens`` is how a box enters the prompt: ``"pair"`` (ChatRex: an ``<objK>`` index token, then
    a ``<roi>`` token carrying the object's features) or ``"fused"`` (one ``<roi>`` token per box whose
    embedding is ``<objK>``'s plus the object's features: half the box tokens, the prompt's largest
    part; a tiny training step takes 0.91 s instead of 1.09). With ``index_token_features`` every other
    ``<objK>`` token, in the question or the answer, also carries object K's features (as REF-VLM
    substitutes region features for a region reference), so a question about ``<obj7>`` needs no
    search for box 7 and an answer sees which objects it has named so far. Their defaults (``"pair"``,
    False) keep checkpoints saved before the options existed working; the tiny configuration sets
    ``"fused"`` and True.

    ``roi_pooling`` is how a box's ``roi_output_size`` x ``roi_output_size`` RoI Align grid becomes one
    vector: ``"mean"`` (ChatRex: averaged over the grid) or ``"flatten"`` (the grid's cells kept in
    order, so the object encoder sees the object's layout). A small ConvNeXt trained from scratch
    does not encode shape in its channels: with mean pooling the tiny object encoder names the
    world's six shapes at chance (16.5% after 300 attribute-only steps), flattened 90.3%.

    ``prefix_attention`` is how the prompt's tokens attend to each other: ``"causal"`` (ChatRex, every
    token only to those before it) or ``"bidirectional"`` (the prompt up to the ``<assistant>`` token
    attends in both directions, as PaliGemma's prefix; the answer stays causal). Causally, an object
    token sees only the boxes before it, so "the leftmost circle" or "the person holding a cup"
    cannot be told by the box itself when the rival or the cup comes later in the shuffled list.
    Trained both ways, the tiny model's mean referring DF1 stayed at 57.5 (extreme-position
    expressions 29.5 -> 43.2, holding 43.5 -> 38.2), so the tiny configuration stays causal. Tried
    again with the holding heads and four questions a scene, it gave DF1 75.5 against 79.5 causal:
    the position kinds did not move (extreme 50.0, ordinal 38.0 both ways), negation fell 80.8 -> 58.0.

    ``index_softmax`` is what an answer step inside ``<objects>`` is normalised over in training:
    ``"vocabulary"`` (every token, as a plain language model) or ``"grammar"`` (what constrained
    decoding can choose there: the indices not yet used in the block and the stop token). Over the
    vocabulary, an index already listed stays a rival that the model must learn to push down, though
    decoding never offers it again; under the grammar, training scores the very choice decoding makes.
    Retrained with it, the tiny model's lists of alike objects stopped ending after the first:
    detection recall 77.2 -> 88.7, counting 65.2 -> 74.8, referring DF1 57.5 -> 60.9.

    With ``attribute_embedding`` each object token also carries what the attribute heads read in its
    features (their class probabilities, detached, through a linear layer), so a category, colour,
    pattern or size the heads tell apart reaches the language model as one clear direction instead of
    a faint one. It was built for circles and hexagons, which the tiny model's category head tells
    apart (43 of 46 on 40 held-out scenes) and its language model did not (24 of 46). The layer
    starts at the scale object tokens grow to (weights of standard deviation 1, columns of norm
    ~sqrt(hidden)): initialised like the other layers (0.02), its circle and hexagon columns stayed
    0.6 apart against tokens of norm 19 and the retrained model was still at chance (27 of 46). At
    the token's scale, region captions name the category 96.4% right instead of 90.2% and counting
    is exact 84.8% of the time instead of 80.0 (the tiny recipe retrained; its other MLLM seed:
    96.1% and 83.8%); the tiny configuration keeps it.

    With ``holding_attributes`` two more heads read what a person holds (nothing or one of the
    world's items, and the item's colour) from the person's own box, and the attribute embedding
    carries their reading too: causally a person's token cannot see a cup that comes later in the
    box list. They read the RoI grid detached, as probes: reading the shared object features, they
    cost the category head a sixth of the circles and hexagons it named right (298 -> 257 of 370)
    and region captions fell to 91.7%. ``coordinate_embedding`` adds the box's centre and size
    (``box_coordinates``) to each object token through a linear layer at the token's scale: the
    sine-cosine position is faint in trained tokens (moving it by a tenth of the image moved a token
    of norm 35 by 0.06). The tiny configuration has the first, not the second. Trained with the
    recipe (and ``attribute_loss_weight=0.75``, so each of the first four heads of six weighs what
    it did at 0.5 of four), the holding heads on the grid gave referring DF1 69.7 (68.3 without;
    holding 41.7 against 35.4, the heads naming 77% of persons' items right) but counting 81.2%
    (84.8%); with the shared features and the coordinates, position expressions stayed where they
    were (59.6 against 60.8 without the coordinates). With four questions a scene and 1.8x the
    steps, the heads on the grid gave DF1 79.5 against 76.6 (holding 78.5 against 44.8), counting
    90.0 against 91.0, so the tiny configuration now has them. README "Measured" has the runs.

    ``relation_layers`` (of ``relation_heads`` heads) are transformer layers over each image's
    object tokens before the language model reads them (``perceive.models.object_relation``): each
    box attends to the other boxes of its image, with an attention bias per head learnt from the
    pair's geometry (offsets, size ratios, gaps, overlap), so "the second circle from the left" or
    "the person holding a cup" can be read off a box's own token rather than worked out at the
    answer from tokens that each know only their own object. Two layers of eight heads, trained
    with the tiny recipe, did not help: position expressions stayed at 62 DF1, and next-to,
    holding and negation fell (referring DF1 70.4 against 76.6 without). The layers do not see the
    question, and each token mixes in its neighbours. The tiny configuration leaves them off.

    ``order_embedding`` gives each box where it stands among the alike boxes of its image
    (``perceive.models.object_order``): how many boxes of its category, and of its category and
    colour, lie before it from the left, the right, the top and the bottom, alike read from the
    attribute heads (detached) and the counts binned 0..3 and "4 or more". "The second red circle
    from the left" then asks for a box that says "one red circle to my left" rather than for a count
    over tokens that each know only their own box. With ``"object_tokens"`` the counts enter each
    object token through a linear layer at the token's scale; trained with the tiny recipe, extreme
    expressions rose 50.0 -> 86.4 DF1 but ordinal ones stayed (36.0), and the rest fell: referring
    DF1 77.2 against 79.5, rejection 87.8 and region category 94.5, both under their targets. With
    ``"pointer_keys"`` they enter only the pointer's keys, through a linear layer that starts at
    zero, so the language model reads the tokens it read without them; trained so, the other targets
    held (rejection 91.0, region category 96.9, counting 90.5) but extreme expressions rose only to
    56.8 (the counts grew to a ninth of the keys' norm) and referring DF1 was 77.9. With
    ``"pointer_reading"`` each box's index score gains its counts weighed by a reading of the query
    (a linear layer from the hidden state, starting at zero), as the anchor pointer reads its
    geometry: "the second red circle from the left" asks for the box whose count of red circles to
    its left is one, which a reading can weigh directly and a dot product with a key cannot.
    Trained with the tiny recipe beside the anchor pointer: extreme expressions 56.8 -> 81.8 DF1,
    ordinal 42.0 -> 68.0, referring DF1 84.1 -> 86.3, the other targets held (a second seed: extreme
    81.8 again, ordinal 34.0, DF1 83.7). The tiny configuration has it.

    With ``anchor_pointer`` (``perceive.models.anchor_pointer``; needs ``index_head="pointer"``) the
    pointer's query also attends over the boxes to pick an anchor, and each box's score gains a
    learnt reading of its geometry relative to that anchor (wholly left of, right of, above or below
    it; within 0, 0.1 or 0.2 of the image's width of it; boxes alike it, by the category head, between the
    two; its share inside the anchor; being the anchor), the reading starting at zero. "The circles
    to the left of the red square" is then a threshold on geometry, which one dot product between a
    query and each box's key is not. Trained with the tiny recipe: referring DF1 79.5 -> 84.1
    (relation 75.6 -> 79.3, next-to 56.3 -> 66.2; one seed), the other targets held. The tiny
    configuration has it.

    ``anchor_loss_weight`` and ``order_loss_weight`` teach those two readings from each referring
    expression directly, besides through the answer: at the ``<objects>`` token of an expression about
    another object ("next to the person in a red shirt"), a cross-entropy of the anchor pointer's
    choice against that object's boxes; at that of an extreme or ordinal one, a cross-entropy of the
    order reading, taken as logits over the order counts, against the count it asks for ("the second
    red circle from the left": one red circle to its left; ``perceive.train.data.order_target``).
    Both at 0.25 with the tiny recipe (MLLM seed 2, against the same run without): ordinal expressions
    34.0 -> 64.0 DF1, but the language model's own loss stayed a third higher throughout (0.165
    against 0.119 at the end) and everything else fell: referring DF1 83.7 -> 76.2, counting 90.0 ->
    80.0, region category 95.8 -> 92.3. The order loss alone at 0.25 (same seed) left the language
    model's loss where it was (0.124 against 0.119 over the last 280 steps) and taught ranks: ordinal 34.0 ->
    86.0, extreme 81.8 -> 95.5, relation 85.2 -> 89.2, position 74.4 -> 89.7, the other targets held;
    but negation fell 93.0 -> 60.5 and next-to 72.5 -> 59.9, so referring DF1 rose only 83.7 -> 84.9.
    On the recipe's seed 1 alike (ordinal 68.0 -> 88.0; negation 90.0 -> 56.3, next-to 71.8 -> 52.1;
    DF1 86.3 -> 83.3), and neither pulling the reading flat on expressions about no rank, nor detaching
    the loss's input, nor a weight of 0.05, nor a reading of its own stopped it (the README's rounds 18
    and 19). Kept off everything the answer uses (a reading or a probe of its own on the detached
    hidden state), it cost negation nothing but taught no ranks; left to the joint stage, it cost the
    extremes and next-to (round 20): the tiny configuration leaves both at 0.
    """

    model_type = "perceive_retrieval"

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
        roi_pooling: str = "mean",  # the default is how checkpoints saved before the option were built
        position_dim: int = 64,
        object_dim: int = 256,
        max_objects: int = 100,
        layout: str = "question_first",
        index_head: str = "pointer",
        box_tokens: str = "pair",  # the defaults of the two are how checkpoints saved before them were built
        index_token_features: bool = False,
        prefix_attention: str = "causal",  # the default is how checkpoints saved before the option were built
        index_softmax: str = "vocabulary",  # the default is how checkpoints saved before the option were trained
        attribute_embedding: bool = False,  # the defaults of the three: checkpoints saved before them
        holding_attributes: bool = False,
        coordinate_embedding: bool = False,
        relation_layers: int = 0,  # the default is how checkpoints saved before the option were built
        relation_heads: int = 4,
        order_embedding: str | bool = "none",  # the default is how checkpoints saved before the option were built
        anchor_pointer: bool = False,  # the default is how checkpoints saved before the option were built
        match_loss_weight: float = 1.0,
        attribute_loss_weight: float = 0.5,
        anchor_loss_weight: float = 0.0,  # the defaults of the two are how checkpoints saved before them were trained
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
        if roi_pooling not in ("mean", "flatten"):
            raise ValueError(f"roi_pooling must be 'mean' or 'flatten', got {roi_pooling!r}")
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
        self.attribute_embedding = attribute_embedding
        self.holding_attributes = holding_attributes
        self.coordinate_embedding = coordinate_embedding
        self.relation_layers = relation_layers
        self.relation_heads = relation_heads
        self.order_embedding = order_embedding
        self.anchor_pointer = anchor_pointer
        self.match_loss_weight = match_loss_weight
        self.attribute_loss_weight = attribute_loss_weight
        self.anchor_loss_weight = anchor_loss_weight
        self.order_loss_weight = order_loss_weight
        self.image_token_id = image_token_id
        self.roi_token_id = roi_token_id
        self.assistant_token_id = assistant_token_id
        self.obj_token_ids = list(obj_token_ids or [])

    def attribute_classes(self) -> dict[str, int]:
        """The attribute heads: name -> number of classes, in the order of the training targets' columns."""
        return {**ATTRIBUTES, **(HOLDING_ATTRIBUTES if self.holding_attributes else {})}

    def vision(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(**{**self.vision_config, "image_size": self.low_resolution})

    def convnext(self) -> ConvNextConfig:
        cfg = dict(self.convnext_config)
        cfg.setdefault("num_stages", len(cfg.get("depths", [3, 3, 9, 3])))
        return ConvNextConfig(**cfg)

    def text(self) -> Qwen2Config:
        return Qwen2Config(**self.text_config)

    def upn(self) -> UpnConfig:
        return UpnConfig(**self.upn_config)

    @property
    def image_grid(self) -> int:
        """Image tokens per side: the ViT's patch grid (the ConvNeXt map is pooled to it)."""
        v = self.vision()
        return int(v.image_size) // int(v.patch_size)  # type: ignore[arg-type]


TINY = {
    # 4 x 4 image tokens: the boxes carry the objects; 8 x 8 made prompts 1.5x as long and a step 1.4x slower.
    # Eager attention: at these lengths (about 110 tokens) PyTorch's CPU kernel for scaled dot-product
    # attention is the slower in bf16 (eager: a bf16 step 1.24x faster, a float32 one as fast; train_speed.py)
    "vision_config": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "patch_size": 32, "attn_implementation": "eager"},
    "convnext_config": {"hidden_sizes": [32, 64, 128], "depths": [1, 1, 1]},
    # the world tokenizer's size replaces vocab_size when a model is built. A fifth layer (+0.73 M parameters; the
    # checkpoint 29.4 MB of its 30) reads relations and extremes better (README, "Round 22")
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
    # what a person holds, read from its RoI grid (detached); six heads, so each of the first four weighs what it did
    # at 0.5 of four: holding expressions 44.8 -> 78.5 DF1
    "holding_attributes": True,
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


def named_config(name: str, **overrides) -> PerceiverConfig:
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(NAMED_CONFIGS)}")
    return PerceiverConfig(**{**copy.deepcopy(NAMED_CONFIGS[name]), **overrides})
