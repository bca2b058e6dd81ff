"""The retrieval perception MLLM (ChatRex, Sec. 3.2-3.3): boxes go in as object tokens, the language
model answers with their indices.

- Dual vision encoder (``perceive.models.vision``): image tokens from a CLIP ViT at low resolution, a
  feature pyramid from a ConvNeXt at high resolution; ``image_projector`` maps the tokens into the
  language model's width.
- Object encoder (``perceive.models.object_encoder``): one feature vector per box from the pyramid;
  ``object_projector`` maps it into the language model's width: one ``<roi>`` token per box, each after
  its ``<objK>`` index token (or, with ``box_tokens="fused"``, one token that is both). Attribute heads
  named by the training data classify each object; their reading can enter its token.
- Language model: transformers' Qwen2 with the extended vocabulary of ``perceive.tokenization``.

Losses: next-token cross-entropy on the answer, where a step that emits an object index is scored by
the probability of *any* not-yet-emitted member of its group (the order of indices within a group
carries no meaning, so training does not impose one); optionally a per-box membership loss at each
``<objects>`` token and the attribute heads' classification losses, which teach the object tokens what
the data labels early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel, Qwen2ForCausalLM
from transformers.masking_utils import create_causal_mask

from perceive.models.chatrex.anchor_pointer import AnchorPointer, anchor_geometry
from perceive.models.chatrex.configuration_chatrex import POINTER_ORDER_EMBEDDINGS, ChatRexConfig
from perceive.models.chatrex.object_order import order_feature_count, order_features
from perceive.models.chatrex.object_relation import ObjectRelationEncoder
from perceive.models.generation import CACHE_ARGUMENT, output_cache
from perceive.models.object_encoder import ObjectEncoder, box_coordinates
from perceive.models.vision import DualVisionEncoder


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


@dataclass
class ChatRexOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    cache: object | None = None  # the language model's KV cache, with use_cache
    pointer_keys: torch.Tensor | None = None
    # per-box inputs of the pointer's additions: with anchor_pointer the boxes' anchor keys and geometry,
    # with order_embedding="pointer_reading" their order features
    pointer_inputs: dict[str, torch.Tensor] | None = None


class ChatRexPreTrainedModel(PreTrainedModel):
    config_class = ChatRexConfig
    base_model_prefix = "chatrex"
    supports_gradient_checkpointing = False
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear) and any(
            module is getattr(self, name, None)
            for name in ("attribute_embedding", "coordinate_embedding", "order_embedding")
        ):
            # at the scale object tokens grow to (norm ~sqrt(hidden)): at 0.02 the heads' reading stayed a
            # whisper beside the features, and a full tiny run did not learn to hear it
            nn.init.normal_(module.weight, std=1.0)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and (
            module is getattr(self, "order_key", None)
            or module is getattr(self, "order_reading", None)
            or module is getattr(getattr(self, "anchor_pointer", None), "reading", None)
        ):
            # zero: the pointer starts as it would without these additions, and learns what of them to read
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ChatRexForConditionalGeneration(ChatRexPreTrainedModel):
    def __init__(self, config: ChatRexConfig) -> None:
        super().__init__(config)
        self.vision = DualVisionEncoder(config.vision(), config.convnext())
        self.language_model = Qwen2ForCausalLM(config.text())
        hidden = config.text().hidden_size
        self.image_projector = _mlp(self.vision.token_channels, hidden)
        self.object_encoder = ObjectEncoder(
            self.vision.pyramid_channels, config.object_dim, config.position_dim, config.roi_output_size,
            config.roi_rgb_level, config.roi_pooling,
        )  # fmt: skip
        self.object_projector = _mlp(config.object_dim, hidden)
        heads = config.attribute_heads
        grid = self.object_encoder.grid_channels
        self.attribute_heads = nn.ModuleDict(
            {k: nn.Linear(grid if k in config.grid_attribute_heads else config.object_dim, n) for k, n in heads.items()}
        )
        if config.attribute_embedding:
            self.attribute_embedding = nn.Linear(sum(heads.values()), hidden)
        if config.coordinate_embedding:
            self.coordinate_embedding = nn.Linear(4, hidden)
        order = order_feature_count(len(config.order_groupings))
        if config.order_embedding == "object_tokens":
            self.order_embedding = nn.Linear(order, hidden)
        if config.relation_layers:
            self.object_relation = ObjectRelationEncoder(hidden, config.relation_layers, config.relation_heads)
        if config.index_head == "pointer":
            self.pointer_query = nn.Linear(hidden, hidden)
            self.pointer_key = nn.Linear(hidden, hidden)
            if config.order_embedding == "pointer_keys":
                with torch.random.fork_rng():  # the other weights initialise as they would without it
                    self.order_key = nn.Linear(order, hidden)
            if config.order_embedding == "pointer_reading":
                with torch.random.fork_rng():
                    self.order_reading = nn.Linear(hidden, order)  # which counts the query asks for
            if config.anchor_pointer:  # last: its initialisation draws after every other weight's
                with torch.random.fork_rng():
                    self.anchor_pointer = AnchorPointer(hidden)
        self.post_init()

    # ------------------------------------------------------------------------------------------
    # encoders
    # ------------------------------------------------------------------------------------------

    def encode_image(self, pixel_low: torch.Tensor, pixel_high: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Image tokens ``[B, G*G, H]`` and the ConvNeXt pyramid (strides 4, 8, 16, ...)."""
        tokens, levels = self.vision(pixel_low, pixel_high)
        return self.image_projector(tokens), levels

    def encode_objects(
        self, levels: list[torch.Tensor], rgb_high: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """From normalised xyxy ``boxes`` ``[B, K, 4]`` (padding where ``box_mask`` is False): object
        features ``[B, K, object_dim]``, object tokens ``[B, K, H]``, the attribute heads' logits side by
        side ``[B, K, sum of classes]``, and what the pointer's additions read: with
        ``order_embedding="pointer_keys"`` or ``"pointer_reading"`` the object order features
        ``[B, K, order features]``, with ``anchor_pointer`` the alike head's probabilities (detached)
        ``[B, K, classes]``."""
        cfg = self.config
        obj, grid = self.object_encoder(levels, rgb_high, boxes, box_mask)
        # the grid heads read the RoI grid, detached: sharing the object features, the world's held-item heads
        # cost the category head a sixth of its circles and hexagons
        grid = grid.detach()
        heads = [head(grid if name in cfg.grid_attribute_heads else obj) for name, head in self.attribute_heads.items()]
        tokens = self.object_projector(obj)
        logits = torch.cat(heads, dim=-1) if heads else obj.new_zeros(*obj.shape[:2], 0)
        encoded = {"object_features": obj, "attribute_logits": logits}
        if cfg.attribute_embedding or cfg.order_embedding != "none" or cfg.anchor_pointer:
            # the heads' own reading, as given: the attribute loss alone decides what it says
            probs = {name: v.detach().softmax(dim=-1) for name, v in zip(self.attribute_heads, heads, strict=True)}
        if cfg.attribute_embedding:
            tokens = tokens + self.attribute_embedding(torch.cat(list(probs.values()), dim=-1)) * box_mask[..., None]
        if cfg.coordinate_embedding:
            tokens = tokens + self.coordinate_embedding(box_coordinates(boxes)) * box_mask[..., None]
        if cfg.order_embedding != "none":
            order = order_features(boxes, box_mask, [[probs[name] for name in g] for g in cfg.order_groupings])
            if cfg.order_embedding == "object_tokens":
                tokens = tokens + self.order_embedding(order) * box_mask[..., None]
            else:
                encoded["object_order"] = order
        if cfg.anchor_pointer:  # what makes boxes alike for the anchor geometry's "between"
            encoded["object_alike"] = probs[cfg.alike_head]
        if cfg.relation_layers:  # last, so the relation layers read the attributes' clear directions too
            tokens = self.object_relation(tokens, boxes, box_mask)
        return {**encoded, "object_tokens": tokens}

    def embed(
        self, input_ids: torch.Tensor, image_tokens: torch.Tensor, object_tokens: torch.Tensor, box_mask: torch.Tensor
    ) -> torch.Tensor:
        """Token embeddings with ``<image>`` and ``<roi>`` placeholders replaced by visual tokens (and, per
        ``box_tokens`` and ``index_token_features``, index embeddings and object tokens combined)."""
        table = self.language_model.get_input_embeddings()
        emb = table(input_ids)
        cfg = self.config
        if cfg.index_token_features:
            emb = emb + self._index_features(input_ids, object_tokens, box_mask).to(emb.dtype)
        if cfg.box_tokens == "fused":  # the k-th <roi> is <objK> and object k in one token
            index_ids = self._obj_ids(input_ids.device)[: object_tokens.shape[1]]
            object_tokens = object_tokens + table(index_ids)[None].to(object_tokens.dtype)
        img_pos = input_ids == cfg.image_token_id
        if img_pos.any():
            if int(img_pos.sum()) != image_tokens.shape[0] * image_tokens.shape[1]:
                raise ValueError("each prompt needs exactly one <image> placeholder per image token")
            emb = emb.masked_scatter(img_pos[..., None], image_tokens.to(emb.dtype))
        roi_pos = input_ids == cfg.roi_token_id
        if roi_pos.any():
            want = box_mask.sum(dim=1)
            if not torch.equal(roi_pos.sum(dim=1), want):
                raise ValueError(f"<roi> placeholders per prompt {roi_pos.sum(1).tolist()} != boxes {want.tolist()}")
            emb = emb.masked_scatter(roi_pos[..., None], object_tokens[box_mask].to(emb.dtype))
        return emb

    def embed_generated(
        self, token_ids: torch.Tensor, object_tokens: torch.Tensor, box_mask: torch.Tensor
    ) -> torch.Tensor:
        """Embeddings of generated tokens: placeholders mean nothing here, ``<objK>`` as in the prompt."""
        emb = self.language_model.get_input_embeddings()(token_ids)
        if self.config.index_token_features:
            emb = emb + self._index_features(token_ids, object_tokens, box_mask).to(emb.dtype)
        return emb

    def _obj_ids(self, device: torch.device) -> torch.Tensor:
        """The vocabulary ids of ``<obj0>``, ``<obj1>``, ...; built once (every forward and decoding step uses them)."""
        ids = getattr(self, "_obj_ids_tensor", None)
        if ids is None or ids.device != device:
            ids = torch.tensor(self.config.obj_token_ids, device=device)
            self._obj_ids_tensor = ids
        return ids

    def _index_lookup(self, device: torch.device) -> torch.Tensor:
        """Vocabulary id -> K for ``<objK>``, -1 for every other token; built once (decoding asks each step)."""
        table = getattr(self, "_index_lookup_table", None)
        if table is None or table.device != device:
            ids = self._obj_ids(device)
            vocab = self.config.text().vocab_size
            table = torch.full((vocab,), -1, device=device)
            table[ids] = torch.arange(len(ids), device=device)
            self._index_lookup_table = table
        return table

    def _index_features(
        self, input_ids: torch.Tensor, object_tokens: torch.Tensor, box_mask: torch.Tensor
    ) -> torch.Tensor:
        """``[B, T, H]``: object K's token at each ``<objK>`` of an existing box, zero elsewhere."""
        index = self._index_lookup(input_ids.device)[input_ids]  # [B, T]: K of an <objK> token, -1 otherwise
        k = object_tokens.shape[1]
        clamped = index.clamp(0, k - 1)
        present = (index >= 0) & (index < k) & torch.gather(box_mask, 1, clamped)
        picked = torch.gather(object_tokens, 1, clamped[..., None].expand(-1, -1, object_tokens.shape[-1]))
        return picked * present[..., None]

    # ------------------------------------------------------------------------------------------
    # logits over the vocabulary with the index head
    # ------------------------------------------------------------------------------------------

    def _logits(
        self,
        hidden: torch.Tensor,
        pointer_keys: torch.Tensor | None,
        box_mask: torch.Tensor,
        pointer_inputs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        logits = self.language_model.lm_head(hidden).float()
        obj_ids = self._obj_ids(hidden.device)
        k = box_mask.shape[1]
        if self.config.index_head == "pointer":
            assert pointer_keys is not None
            ptr = self.pointer_query(hidden) @ pointer_keys.transpose(1, 2) / math.sqrt(hidden.shape[-1])
            if self.config.anchor_pointer:
                assert pointer_inputs is not None
                ptr = ptr + self.anchor_pointer.scores(
                    hidden, pointer_inputs["anchor_keys"], pointer_inputs["anchor_geometry"], box_mask
                )
            if self.config.order_embedding == "pointer_reading":
                assert pointer_inputs is not None  # each box's counts, weighed by what the query asks for
                reading = self.order_reading(hidden).float()
                ptr = ptr + torch.einsum("bkf,btf->btk", pointer_inputs["object_order"].float(), reading)
            obj = torch.full((*hidden.shape[:2], len(obj_ids)), float("-inf"), device=hidden.device)
            obj[..., :k] = ptr.float()
        else:
            obj = logits[..., obj_ids].clone()
        allowed = torch.zeros(box_mask.shape[0], len(obj_ids), dtype=torch.bool, device=hidden.device)
        allowed[:, :k] = box_mask
        obj = obj.masked_fill(~allowed[:, None, :], float("-inf"))
        logits[..., obj_ids] = obj
        return logits

    def _pointer_keys(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        box_mask: torch.Tensor,
        boxes: torch.Tensor,
        visual: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """Object K's key: the language model's hidden state at its token, plus with
        ``order_embedding="pointer_keys"`` its order features (``encode_objects``'s ``object_order``);
        and what the pointer's additions read per box (``ChatRexOutput.pointer_inputs``): with
        ``anchor_pointer`` the boxes' anchor keys and ``anchor_geometry``, with
        ``order_embedding="pointer_reading"`` their order features."""
        if self.config.index_head != "pointer":
            return None, None
        roi_pos = input_ids == self.config.roi_token_id
        object_hidden = hidden.new_zeros(*box_mask.shape, hidden.shape[-1])
        object_hidden[box_mask] = hidden[roi_pos]
        keys = self.pointer_key(object_hidden)
        needs = {"object_order": self.config.order_embedding in POINTER_ORDER_EMBEDDINGS,
                 "object_alike": self.config.anchor_pointer}  # fmt: skip
        missing = [name for name, needed in needs.items() if needed and name not in visual]
        if missing:
            raise ValueError(f"this configuration's pointer reads {missing} of encode_visual's output")
        if self.config.order_embedding == "pointer_keys":
            keys = keys + self.order_key(visual["object_order"].to(keys.dtype)) * box_mask[..., None]
        inputs: dict[str, torch.Tensor] = {}
        if self.config.anchor_pointer:
            alike = visual["object_alike"].float()
            inputs["anchor_keys"] = self.anchor_pointer.key(object_hidden)
            inputs["anchor_geometry"] = anchor_geometry(boxes.float(), box_mask, alike @ alike.transpose(1, 2))
        if self.config.order_embedding == "pointer_reading":
            inputs["object_order"] = visual["object_order"]
        return keys, inputs or None

    def _attention(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        embeds: torch.Tensor,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor | dict:
        """The padding mask as given (causal), or with ``prefix_attention="bidirectional"`` transformers'
        mask in which the prompt up to its ``<assistant>`` token is one block that attends both ways.

        Only a whole prompt needs it: a generated token comes after the prefix, so the decoding loop's
        causal steps over the cached prefix see exactly what this mask lets them see."""
        if self.config.prefix_attention == "causal":
            return attention_mask
        assistant = input_ids == self.config.assistant_token_id
        if self.config.assistant_token_id < 0 or not assistant.any(dim=1).all():
            raise ValueError("prefix_attention='bidirectional' needs every prompt to end with the <assistant> "
                             "token, and the config's assistant_token_id set")  # fmt: skip
        prefix = assistant.long().cumsum(dim=1) - assistant.long() == 0  # up to and including the first one
        blocks = torch.where(prefix, 0, -1)  # block 0 attends within itself both ways; -1 stays causal
        # the cache (none yet) is passed by position: transformers 5.24 renamed its argument
        mask = create_causal_mask(self.language_model.config, embeds, attention_mask, None, position_ids=position_ids,
                                  block_sequence_ids=blocks)  # fmt: skip
        return {"full_attention": mask}

    # ------------------------------------------------------------------------------------------
    # forward with losses
    # ------------------------------------------------------------------------------------------

    def encode_visual(
        self,
        pixel_low: torch.Tensor,
        pixel_high: torch.Tensor,
        rgb_high: torch.Tensor,
        boxes: torch.Tensor,
        box_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Everything the language model needs from the pixels; reusable across questions on one image.

        With ``image_index`` prompts share images: prompt i reads pixel row ``image_index[i]``, prompts
        on one image give its boxes in the same order, and each image is encoded once."""
        if image_index is not None:
            first = self._first_prompts(image_index, pixel_low.shape[0], boxes, box_mask)
            visual = self.encode_visual(pixel_low, pixel_high, rgb_high, boxes[first], box_mask[first])
            return {k: v[image_index] for k, v in visual.items()}
        image_tokens, levels = self.encode_image(pixel_low, pixel_high)
        return {"image_tokens": image_tokens, **self.encode_objects(levels, rgb_high, boxes, box_mask)}

    @staticmethod
    def _first_prompts(
        image_index: torch.Tensor, images: int, boxes: torch.Tensor, box_mask: torch.Tensor
    ) -> torch.Tensor:
        """``[images]``: the first prompt on each image, after checking that ``image_index`` is sound."""
        b = boxes.shape[0]
        if image_index.shape != (b,) or int(image_index.min()) < 0 or int(image_index.max()) >= images:
            raise ValueError(f"image_index must give each of the {b} prompts a row of the {images} images")
        dev = image_index.device
        first = torch.full((images,), b, dtype=torch.long, device=dev).scatter_reduce(
            0, image_index, torch.arange(b, device=dev), reduce="amin", include_self=True
        )
        if int(first.max()) == b:
            raise ValueError("image_index leaves an image that no prompt reads")
        if not (torch.equal(boxes, boxes[first][image_index]) and torch.equal(box_mask, box_mask[first][image_index])):
            raise ValueError("prompts on one image must give its boxes in the same order")
        return first

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        boxes: torch.Tensor,
        box_mask: torch.Tensor,
        pixel_low: torch.Tensor | None = None,
        pixel_high: torch.Tensor | None = None,
        rgb_high: torch.Tensor | None = None,
        visual: dict[str, torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        index_sets: torch.Tensor | None = None,
        group_positions: torch.Tensor | None = None,
        group_members: torch.Tensor | None = None,
        choice_stop: torch.Tensor | None = None,
        choice_used: torch.Tensor | None = None,
        attribute_labels: torch.Tensor | None = None,
        group_anchors: torch.Tensor | None = None,
        group_order: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        image_index: torch.Tensor | None = None,
    ) -> ChatRexOutput:
        """``image_index``: the pixel row each prompt asks about, when prompts share images (None: one
        image a prompt). ``group_anchors`` ``[B, G, K]`` and ``group_order`` ``[B, G]``: what each group's
        expression tells the pointer's additions (``perceive.train.data.pointer_targets``), read by the
        anchor and order losses."""
        if visual is None:
            if pixel_low is None or pixel_high is None or rgb_high is None:
                raise ValueError("forward needs the pixel tensors or precomputed visual tokens")
            visual = self.encode_visual(pixel_low, pixel_high, rgb_high, boxes, box_mask, image_index)
        embeds = self.embed(input_ids, visual["image_tokens"], visual["object_tokens"], box_mask)
        mask = self._attention(input_ids, attention_mask, embeds, position_ids)
        out = self.language_model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                        use_cache=use_cache)  # fmt: skip
        hidden = out.last_hidden_state
        keys, pointer_inputs = self._pointer_keys(hidden, input_ids, box_mask, boxes, visual)
        logits = self._logits(hidden, keys, box_mask, pointer_inputs)
        losses: dict[str, torch.Tensor] = {}
        if labels is not None:
            if self.config.index_softmax == "vocabulary":
                choice_stop = choice_used = None
            losses["lm"] = self._answer_loss(logits, labels, index_sets, choice_stop, choice_used)
            if group_positions is not None and group_members is not None and self.config.match_loss_weight > 0:
                losses["match"] = self._match_loss(logits, group_positions, group_members, box_mask)
            if attribute_labels is not None and self.config.attribute_loss_weight > 0:
                losses["attributes"] = self._attribute_loss(visual["attribute_logits"], attribute_labels)
            if group_positions is not None and group_anchors is not None and self.config.anchor_loss_weight > 0:
                assert pointer_inputs is not None
                losses["anchor"] = self._anchor_loss(
                    hidden, group_positions, group_anchors, pointer_inputs["anchor_keys"], box_mask
                )
            if group_positions is not None and group_order is not None and self.config.order_loss_weight > 0:
                losses["order"] = self._order_loss(hidden, group_positions, group_order)
        loss = None
        if losses:
            loss = (
                losses["lm"]
                + self.config.match_loss_weight * losses.get("match", 0.0)
                + self.config.attribute_loss_weight * losses.get("attributes", 0.0)
                + self.config.anchor_loss_weight * losses.get("anchor", 0.0)
                + self.config.order_loss_weight * losses.get("order", 0.0)
            )
        return ChatRexOutput(loss, logits, losses, output_cache(out) if use_cache else None, keys, pointer_inputs)

    def _answer_loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        index_sets: torch.Tensor | None,
        choice_stop: torch.Tensor | None = None,
        choice_used: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of each next token; an index step counts any remaining member of its group.

        With ``choice_stop`` and ``choice_used`` (the processor's batch), a step inside an objects block
        is normalised over what constrained decoding can choose there (the unused indices and the stop
        token) instead of the whole vocabulary."""
        logits, labels = logits[:, :-1], labels[:, 1:]
        logp = logits.log_softmax(dim=-1)
        valid = labels != -100
        obj_ids = self._obj_ids(logits.device)
        if choice_stop is not None and choice_used is not None:
            stop, used = choice_stop[:, 1:], choice_used[:, 1:]
            k = used.shape[-1]
            obj = logits[..., obj_ids[:k]].masked_fill(used, float("-inf"))  # absent boxes are -inf already
            stop_logit = logits.gather(-1, stop.clamp(min=0)[..., None])
            grammar_logz = torch.logsumexp(torch.cat([obj, stop_logit], dim=-1), dim=-1)
            logp = torch.where((stop >= 0)[..., None], logits - grammar_logz[..., None], logp)
        token_lp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        if index_sets is not None:
            sets = index_sets[:, 1:]  # [B, T-1, K]: members still allowed at this step
            is_set = sets.any(dim=-1) & valid
            if is_set.any():
                obj_lp = logp[..., obj_ids[: sets.shape[-1]]].masked_fill(~sets, float("-inf"))
                token_lp = torch.where(is_set, torch.logsumexp(obj_lp, dim=-1), token_lp)
        return -(token_lp * valid).sum() / valid.sum().clamp(min=1)

    def _match_loss(
        self, logits: torch.Tensor, positions: torch.Tensor, members: torch.Tensor, box_mask: torch.Tensor
    ) -> torch.Tensor:
        """At each ``<objects>`` token: does each box belong to this group? (sigmoid of its index logit)"""
        obj_ids = self._obj_ids(logits.device)[: box_mask.shape[1]]
        valid = positions >= 0  # [B, G]
        if not valid.any():  # no group in this batch (a plain zero: logits hold -inf, and -inf * 0 is NaN)
            return torch.zeros((), device=logits.device)
        at_groups, rows = self._at_groups(logits, positions, valid)
        obj_logits = at_groups[:, obj_ids]  # [N, K]
        target = members[valid].float()
        mask = box_mask[rows]
        bce = F.binary_cross_entropy_with_logits(obj_logits.masked_fill(~mask, 0.0), target, reduction="none")
        return (bce * mask).sum() / mask.sum().clamp(min=1)

    @staticmethod
    def _at_groups(states: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``states`` ``[B, T, ...]`` (hidden states, logits) at the ``valid`` groups' ``<objects>`` tokens,
        where the first index is chosen: ``[N, ...]``, and each one's row of the batch ``[N]``."""
        rows = torch.arange(positions.shape[0], device=states.device)[:, None].expand_as(positions)[valid]
        return states[rows, positions[valid]], rows

    def _anchor_loss(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        anchors: torch.Tensor,
        anchor_keys: torch.Tensor,
        box_mask: torch.Tensor,
    ) -> torch.Tensor:
        """At each ``<objects>`` token of an expression about another object: cross-entropy of the anchor
        pointer's choice of anchor against that object's boxes (any of them)."""
        valid = (positions >= 0) & (anchors & box_mask[:, None, :]).any(dim=-1)
        if not valid.any():
            return torch.zeros((), device=hidden.device)
        states, rows = self._at_groups(hidden, positions, valid)
        logits = self.anchor_pointer.anchor_logits(states[:, None], anchor_keys[rows], box_mask[rows])[:, 0]
        wanted = logits.masked_fill(~anchors[valid], torch.finfo(torch.float32).min)
        return (logits.logsumexp(dim=-1) - wanted.logsumexp(dim=-1)).mean()

    def _order_loss(self, hidden: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """At each ``<objects>`` token of an extreme or ordinal expression: cross-entropy of the order
        reading, as logits over the order features, against the one the expression asks for. Adding a
        constant to every reading moves every box's score alike (each box's counts sum to a constant),
        so the softmax loses nothing the pointer uses."""
        valid = (positions >= 0) & (targets >= 0)
        if not valid.any():
            return torch.zeros((), device=hidden.device)
        states, _ = self._at_groups(hidden, positions, valid)
        return F.cross_entropy(self.order_reading(states).float(), targets[valid])

    def _attribute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the heads of each head's cross-entropy on the boxes it has a label for (-100: none);
        ``labels`` ``[B, K, heads]`` in ``config.attribute_heads``' order."""
        total = logits.sum() * 0
        sizes = list(self.config.attribute_heads.values())
        if not sizes:
            return total
        if labels.shape[-1] != len(sizes):
            raise ValueError(f"attribute_labels have {labels.shape[-1]} columns; the model has {len(sizes)} heads "
                             f"({', '.join(self.config.attribute_heads)})")  # fmt: skip
        for i, head_logits in enumerate(logits.split(sizes, dim=-1)):
            target = labels[..., i]
            if (target >= 0).any():
                total = total + F.cross_entropy(head_logits[target >= 0], target[target >= 0])
        return total / len(sizes)

    # ------------------------------------------------------------------------------------------
    # decoding
    # ------------------------------------------------------------------------------------------

    def begin_decoding(self, batch: dict) -> ChatRexDecoding:
        """A decoding session (``perceive.models.generation``) over a left-padded batch from
        ``ChatRexProcessor.collate(..., pad_left=True)``, with pixel tensors or with ``visual``, the output of
        ``encode_visual`` for the same boxes."""
        return ChatRexDecoding(self, batch)


_FORWARD_KEYS = ("input_ids", "attention_mask", "boxes", "box_mask")


class ChatRexDecoding:
    """The prompt's forward pass with a KV cache, then one token per sample per ``step``. Generated
    ``<objK>`` tokens carry object features as in the prompt, and every step's index scores read the
    prompt's pointer keys."""

    @torch.no_grad()
    def __init__(self, model: ChatRexForConditionalGeneration, batch: dict) -> None:
        self.model = model
        self.attention = batch["attention_mask"]
        position_ids = (self.attention.cumsum(-1) - 1).clamp(min=0)
        visual = batch.get("visual")
        if visual is None:  # encoded once here: generated <objK> tokens carry object features too
            visual = model.encode_visual(
                *(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask"))
            )
        self.visual, self.box_mask = visual, batch["box_mask"]
        inputs = {k: v for k, v in batch.items() if k in _FORWARD_KEYS}
        out = model(**inputs, visual=visual, position_ids=position_ids, use_cache=True)
        self.cache, self.keys, self.pointer_inputs = out.cache, out.pointer_keys, out.pointer_inputs
        self.logits = out.logits[:, -1]
        self.next_position = position_ids[:, -1] + 1

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        new = tokens[:, None]
        self.attention = torch.cat([self.attention, torch.ones_like(new)], dim=1)
        emb = self.model.embed_generated(new, self.visual["object_tokens"], self.box_mask)
        lm = self.model.language_model.model(inputs_embeds=emb, attention_mask=self.attention,
                                             position_ids=self.next_position[:, None], use_cache=True,
                                             **{CACHE_ARGUMENT: self.cache})  # fmt: skip
        self.cache = output_cache(lm)
        self.next_position = self.next_position + 1
        self.logits = self.model._logits(lm.last_hidden_state, self.keys, self.box_mask, self.pointer_inputs)[:, -1]
        return self.logits
