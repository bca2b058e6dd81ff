"""MVP-LM (mvp-lm.txt, Sec. 3): a language model reads the image and an instruction and answers ``{caption}. The
perception result is <PER>``; the ``<PER>`` hidden state and the instruction drive one query decoder that gives
every target's class, box and mask.

1. The dual vision encoder (``perceive.models.vision``): the ViT's tokens, projected, take the ``<image>``
   placeholders of the language model's input; the ConvNeXt pyramid goes through a small FPN (the pixel decoder)
   into per-pixel embeddings at stride 4 and the memory the queries attend to (strides 16 and 8).
2. Text embeddings: each category name of a word instruction (or the whole sentence of a sentence instruction) is
   its tokens' last hidden states, averaged, projected to the decoder's width.
3. Query enhancement (Sec. 3.2): the ``<PER>`` state, through an MLP, gives one base query per slot; every memory
   token is scored against the text embeddings and the top ``thing_queries`` are selected; a thing query is its
   base query plus its selected feature (``query_enhancement="paper"``) or the feature alone (``"selected"``, the
   released code). Stuff queries are base queries only.
4. The decoder (Mask2Former's layers: masked cross-attention over the memory levels in turn, with
   ``text_cross_attention`` a cross-attention to the instruction's token states, self-attention, a feed-forward
   network; dense attention rather than the paper's deformable attention, which is slow on CPU) with shared heads
   after every layer: similarity to the text embeddings (word: softmax over the categories and a background entry;
   sentence: one sigmoid logit), a box (``cxcywh``, normalised to the square frame) and a mask (query embedding dot
   per-pixel embeddings).
5. Training: Hungarian matching with thing queries matched to things only and stuff queries to stuff only; the
   losses of every layer and of the selected memory tokens (deep supervision), plus the response's LM loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel, Qwen2ForCausalLM

from perceive.boxes import convert
from perceive.models.matching import HungarianMatcher, MatchWeights, box_losses, dice_loss, mask_bce_loss
from perceive.models.mvp.configuration_mvp import MvpConfig
from perceive.models.pixel_decoder import MLP, PixelDecoder, left_aligned, sine_positions
from perceive.models.vision import DualVisionEncoder

NEG = -1e4  # the logit of a category slot that does not exist in a sample's padded list


@dataclass
class Predictions:
    """One prediction set of a batch: ``class_logits`` ``[B, Q, C]`` against each sample's C text embeddings (padded
    slots at ``NEG``), ``background`` ``[B, Q]``, ``boxes`` ``[B, Q, 4]`` normalised cxcywh, ``masks`` ``[B, Q, h, w]``
    logits at stride 4 of the high-resolution frame."""

    class_logits: torch.Tensor
    background: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor


@dataclass
class MvpOutput:
    loss: torch.Tensor | None
    losses: dict[str, torch.Tensor]
    predictions: list[Predictions]  # the selected memory tokens' first, then each decoder layer's; the last is final
    lm_logits: torch.Tensor | None = None


def token_anchors(h: int, w: int, device: torch.device) -> torch.Tensor:
    """``[h * w, 4]`` cxcywh boxes of a level's tokens: each cell's centre, twice its size (OpenSeeD's proposals)."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([cx, cy, torch.full_like(cx, 2 / w), torch.full_like(cy, 2 / h)], -1).reshape(-1, 4)


class DecoderLayer(nn.Module):
    """Masked cross-attention to one memory level, cross-attention to the instruction's tokens (when the decoder
    reads them), self-attention among the queries, a feed-forward network."""

    def __init__(self, dim: int, heads: int, ffn: int, reads_text: bool = False) -> None:
        super().__init__()
        self.text_cross = nn.MultiheadAttention(dim, heads, batch_first=True) if reads_text else None
        self.text_norm = nn.LayerNorm(dim) if reads_text else None
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(
        self,
        q: torch.Tensor,
        q_pos: torch.Tensor,
        memory: torch.Tensor,
        m_pos: torch.Tensor,
        blocked: torch.Tensor | None,
        words: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        q = self.norms[0](q + self.cross(q + q_pos, memory + m_pos, memory, attn_mask=blocked, need_weights=False)[0])
        if self.text_cross is not None and self.text_norm is not None and words is not None:
            tokens, padding = words
            read = self.text_cross(q + q_pos, tokens, tokens, key_padding_mask=padding, need_weights=False)[0]
            q = self.text_norm(q + read)
        k = q + q_pos
        q = self.norms[1](q + self.self_attn(k, k, q, need_weights=False)[0])
        return self.norms[2](q + self.ffn(q))


class MvpPreTrainedModel(PreTrainedModel):
    config_class = MvpConfig
    base_model_prefix = "mvp"

    def _init_weights(self, module: nn.Module) -> None:  # the parts initialise themselves
        pass


class MvpForConditionalGeneration(MvpPreTrainedModel):
    def __init__(self, config: MvpConfig) -> None:
        super().__init__(config)
        d, lm_width = config.decoder_dim, config.text().hidden_size
        self.vision = DualVisionEncoder(config.vision(), config.convnext())
        self.projector = nn.Sequential(nn.Linear(self.vision.token_channels, lm_width), nn.GELU(),
                                       nn.Linear(lm_width, lm_width))  # fmt: skip
        self.language_model = Qwen2ForCausalLM(config.text())
        self.pixel_decoder = PixelDecoder(self.vision.pyramid_channels, d)
        levels = len(self.vision.pyramid_channels) - 1
        self.level_embed = nn.Embedding(levels, d)
        self.memory_proj = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.text_proj = nn.Linear(lm_width, d)
        # the <PER> state's base query, made one per slot by each slot's own embedding
        self.per_mlp = MLP([lm_width, lm_width, d])
        self.query_embed = nn.Embedding(config.num_queries, d)
        self.query_pos = nn.Embedding(config.num_queries, d)
        self.layers = nn.ModuleList(
            DecoderLayer(d, config.decoder_heads, config.decoder_ffn, config.text_cross_attention)
            for _ in range(config.decoder_layers)
        )
        self.word_proj = nn.Linear(lm_width, d) if config.text_cross_attention else None
        self.decoder_norm = nn.LayerNorm(d)
        self.class_proj = nn.Linear(d, d)
        self.background = nn.Parameter(torch.randn(d) * 0.02)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.sentence_bias = nn.Parameter(torch.tensor(-2.0))
        self.box_head = MLP([d, d, d, 4])
        last = cast(nn.Linear, self.box_head.layers[-1])
        nn.init.zeros_(last.weight)  # each layer starts from the box it refines
        nn.init.zeros_(last.bias)
        self.mask_head = MLP([d, d, d])
        self.matcher = HungarianMatcher(MatchWeights(config.class_weight, config.mask_weight, config.dice_weight,
                                                     config.l1_weight, config.giou_weight))  # fmt: skip
        self.post_init()

    # -- the language model's side -------------------------------------------------------------------------------
    def encode_image(self, pixel_low: torch.Tensor, pixel_high: torch.Tensor) -> dict[str, torch.Tensor | list]:
        """What the image gives both sides: the LM's image tokens, the per-pixel embeddings and the memory levels."""
        tokens, levels = self.vision(pixel_low, pixel_high)
        mask_features, memory = self.pixel_decoder(levels)
        return {"image_tokens": self.projector(tokens), "mask_features": mask_features, "memory": memory}

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        emb = self.language_model.get_input_embeddings()(input_ids)
        slots = input_ids == self.config.image_token_id
        per_sample = slots.sum(1)
        if not bool((per_sample == image_tokens.shape[1]).all()):
            raise ValueError(f"each sample needs {image_tokens.shape[1]} <image> tokens, got {per_sample.tolist()}")
        emb = emb.clone()
        emb[slots] = image_tokens.reshape(-1, image_tokens.shape[-1]).to(emb.dtype)
        return emb

    def text_states(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The states names are pooled from: the last layer's, or the mean of every layer's and the input embeddings'
        (``text_layers="all"``, the released code's: a name's own embedding keeps its part whatever the context)."""
        if self.config.text_layers == "last":
            return hidden_states[-1]
        return torch.stack(hidden_states).mean(0)

    def text_embeddings(self, hidden: torch.Tensor, spans: torch.Tensor, span_valid: torch.Tensor) -> torch.Tensor:
        """``[B, C, d]`` unit text embeddings: each span ``[start, end)`` of ``spans`` ``[B, C, 2]`` averaged."""
        csum = F.pad(hidden.float().cumsum(1), (0, 0, 1, 0))  # [B, L + 1, H]
        start, end = spans[..., 0].clamp(min=0), spans[..., 1].clamp(min=1)
        gather = lambda idx: csum.gather(1, idx[..., None].expand(-1, -1, csum.shape[-1]))  # noqa: E731
        pooled = (gather(end) - gather(start)) / (end - start).clamp(min=1)[..., None].float()
        emb = F.normalize(self.text_proj(pooled.to(hidden.dtype)), dim=-1)
        return emb * span_valid[..., None]

    def instruction_tokens(self, hidden: torch.Tensor, spans: torch.Tensor,
                           span_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """What the decoder layers read of the instruction (``text_cross_attention``; None without it): the states
        of every token inside a valid span, projected, left-aligned, with their padding mask."""
        if self.word_proj is None:
            return None
        pos = torch.arange(hidden.shape[1], device=hidden.device)[None, None]
        inside = (pos >= spans[..., :1]) & (pos < spans[..., 1:]) & span_valid[..., None]  # [B, C, L]
        tokens, padding = left_aligned(hidden, inside.any(1))
        return self.word_proj(tokens), padding

    # -- the decoder ------------------------------------------------------------------------------------------------
    def predict(
        self, q: torch.Tensor, mask_features: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor,
        sentence: torch.Tensor, reference: torch.Tensor,
    ) -> Predictions:  # fmt: skip
        """The heads on queries ``q``; each box refines ``reference`` (``[B, Q, 4]`` cxcywh, DINO's iterative
        refinement: in logit space)."""
        qn = self.decoder_norm(q)
        logits, background = self.classify(qn, text, text_valid, sentence)
        boxes = (torch.logit(reference.detach().clamp(1e-4, 1 - 1e-4)) + self.box_head(qn)).sigmoid()
        masks = torch.einsum("bqd,bdhw->bqhw", self.mask_head(qn), mask_features)
        return Predictions(logits, background, boxes, masks)

    def classify(
        self, qn: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, sentence: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The similarity head: ``[B, Q, C]`` logits against the text embeddings and ``[B, Q]`` background logits."""
        c = F.normalize(self.class_proj(qn), dim=-1)
        scale = self.logit_scale.exp().clamp(max=100)
        logits = scale * torch.einsum("bqd,bcd->bqc", c, text.to(c.dtype))
        logits = logits + sentence[:, None, None].to(logits.dtype) * self.sentence_bias
        logits = logits.masked_fill(~text_valid[:, None, :], NEG)
        return logits, scale * (c @ F.normalize(self.background, dim=0).to(c.dtype))

    def _blocked(self, masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Mask2Former's attention mask: a query attends where its current mask is on; nowhere on: everywhere."""
        m = F.interpolate(masks.detach().float(), size=size, mode="bilinear", align_corners=False)
        blocked = (m.sigmoid() < 0.5).flatten(2)
        blocked[blocked.all(-1)] = False
        return blocked.repeat_interleave(self.config.decoder_heads, dim=0)

    def decode(
        self, per_state: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, sentence: torch.Tensor,
        mask_features: torch.Tensor, memory: list[torch.Tensor],
        words: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[Predictions]:  # fmt: skip
        """Every prediction set: the selected memory tokens' and each layer's; the layers read ``words``
        (``instruction_tokens``) when given."""
        cfg = self.config
        b, d = per_state.shape[0], cfg.decoder_dim
        flat, pos, sizes, anchors = [], [], [], []
        for i, level in enumerate(memory):
            h, w = level.shape[-2:]
            flat.append(level.flatten(2).transpose(1, 2))
            pos.append(sine_positions(h, w, d, level.device).to(level.dtype) + self.level_embed.weight[i])
            sizes.append((h, w))
            anchors.append(token_anchors(h, w, level.device))
        # the selection (Sec. 3.2): every memory token scored against the instruction's text embeddings
        tokens = self.memory_proj(torch.cat(flat, 1))
        score = self.classify(self.decoder_norm(tokens), text, text_valid, sentence)[0].max(-1).values
        k = min(cfg.thing_queries, tokens.shape[1])
        top = score.topk(k, dim=1).indices
        selected = tokens.gather(1, top[..., None].expand(-1, -1, d))
        anchor = torch.cat(anchors, 0)[top]  # [B, k, 4]: each selected token's own cell, a box to refine
        first = self.predict(selected, mask_features, text, text_valid, sentence, anchor)
        outputs = [first]
        base = self.per_mlp(per_state)[:, None] + self.query_embed.weight[None]
        things = selected.detach() if cfg.query_enhancement == "selected" else base[:, :k] + selected.detach()
        q = torch.cat([things, base[:, k:]], 1)
        q_pos = self.query_pos.weight[None, : q.shape[1]].expand(b, -1, -1)
        centre = torch.full((b, q.shape[1] - k, 4), 0.5, device=q.device, dtype=first.boxes.dtype)
        prev = self.predict(q, mask_features, text, text_valid, sentence, torch.cat([first.boxes, centre], 1))
        for i, layer in enumerate(self.layers):
            at = i % len(flat)
            blocked = self._blocked(prev.masks, sizes[at])
            q = layer(q, q_pos, flat[at], pos[at][None], blocked, words)
            prev = self.predict(q, mask_features, text, text_valid, sentence, prev.boxes)
            outputs.append(prev)
        return outputs

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_low: torch.Tensor,
        pixel_high: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        per_index: torch.Tensor,
        spans: torch.Tensor,
        span_valid: torch.Tensor,
        sentence: torch.Tensor,
        labels: torch.Tensor | None = None,
        targets: list[dict[str, torch.Tensor]] | None = None,
        **_: object,
    ) -> MvpOutput:
        """``per_index`` ``[B]``: where ``<PER>`` is; ``spans`` ``[B, C, 2]`` token spans of the categories (or of
        the sentence) with ``span_valid`` ``[B, C]``; ``sentence`` ``[B]`` bool. With ``labels`` (the response's
        tokens, -100 elsewhere) and ``targets`` (per sample: ``labels`` ``[T]`` category slots, ``boxes`` ``[T, 4]``
        normalised cxcywh, ``masks`` ``[T, h, w]`` at stride 4, ``stuff`` ``[T]`` bool) the losses are computed."""
        image = self.encode_image(pixel_low, pixel_high)
        emb = self.embed(input_ids, image["image_tokens"])  # type: ignore[arg-type]
        lm = self.language_model(inputs_embeds=emb, attention_mask=attention_mask, labels=labels,
                                 output_hidden_states=True, use_cache=False)  # fmt: skip
        hidden = lm.hidden_states[-1]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        per_state = hidden[rows, per_index]
        states = self.text_states(lm.hidden_states)
        text = self.text_embeddings(states, spans, span_valid)
        words = self.instruction_tokens(states, spans, span_valid)
        preds = self.decode(per_state, text, span_valid, sentence, image["mask_features"], image["memory"], words)  # type: ignore[arg-type]
        losses: dict[str, torch.Tensor] = {}
        loss = None
        if labels is not None:
            losses["lm"] = lm.loss
            loss = self.config.lm_loss_weight * lm.loss
        if targets is not None:
            for name, value in self.set_losses(preds, targets, span_valid, sentence).items():
                losses[name] = value
                loss = value if loss is None else loss + value
        return MvpOutput(loss, losses, preds, lm.logits)

    def set_losses(
        self, preds: list[Predictions], targets: list[dict[str, torch.Tensor]], span_valid: torch.Tensor,
        sentence: torch.Tensor,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Every prediction set's weighted losses after matching, summed over sets (deep supervision)."""
        cfg = self.config
        n_targets = max(1, sum(len(t["labels"]) for t in targets))
        total = {k: preds[0].boxes.new_zeros(()) for k in ("class", "mask", "dice", "l1", "giou")}
        for p in preds:
            q = p.boxes.shape[1]
            query_groups = (torch.arange(q, device=p.boxes.device) >= cfg.thing_queries).long()
            for b, t in enumerate(targets):
                c = int(span_valid[b].sum())
                logits = torch.cat([p.class_logits[b, :, :c], p.background[b, :, None]], -1).float()
                is_sentence = bool(sentence[b])
                if is_sentence:
                    prob = logits[:, 0].sigmoid()
                    class_cost = -prob[:, None].expand(q, len(t["labels"]))
                else:
                    class_cost = -logits.softmax(-1)[:, t["labels"]]
                masks = p.masks[b].flatten(1)
                tmasks = t["masks"].flatten(1).to(masks.dtype)
                qi, ti = self.matcher.match(class_cost, p.boxes[b], masks, t["boxes"], tmasks, query_groups,
                                            t["stuff"].long())  # fmt: skip
                if is_sentence:
                    goal = torch.zeros(q, device=logits.device)
                    goal[qi] = 1.0
                    weight = torch.full((q,), cfg.no_object_weight, device=logits.device)
                    weight[qi] = 1.0
                    bce = F.binary_cross_entropy_with_logits(logits[:, 0], goal, weight=weight, reduction="sum")
                    total["class"] = total["class"] + bce / weight.sum()
                else:
                    goal = torch.full((q,), c, dtype=torch.long, device=logits.device)
                    goal[qi] = t["labels"][ti]
                    weight = torch.ones(c + 1, device=logits.device)
                    weight[c] = cfg.no_object_weight
                    total["class"] = total["class"] + F.cross_entropy(logits, goal, weight=weight)
                if len(qi):
                    has_mask = (
                        t["has_mask"][ti]
                        if "has_mask" in t
                        else torch.ones(len(ti), dtype=torch.bool, device=ti.device)
                    )
                    mq, mt = qi[has_mask], ti[has_mask]  # a target known by its box alone teaches no mask
                    total["mask"] = total["mask"] + mask_bce_loss(masks[mq].float(), tmasks[mt].float()) / n_targets
                    total["dice"] = total["dice"] + dice_loss(masks[mq].float(), tmasks[mt].float()) / n_targets
                    l1, giou = box_losses(p.boxes[b, qi].float(), t["boxes"][ti].float())
                    total["l1"] = total["l1"] + l1 / n_targets
                    total["giou"] = total["giou"] + giou / n_targets
        weights = {"class": cfg.class_weight / len(targets), "mask": cfg.mask_weight, "dice": cfg.dice_weight,
                   "l1": cfg.l1_weight, "giou": cfg.giou_weight}  # fmt: skip
        return {k: weights[k] * v for k, v in total.items()}


def xyxy_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Normalised cxcywh -> normalised xyxy."""
    return convert(boxes, "cxcywh", "xyxy")
