"""REF-VLM (ref-vlm.txt, Sec. IV): a language model reads the image, the question and any visual prompts, and answers
in TRP triplets; the last-layer hidden state of every ``<REF>`` becomes a query of the decoder its unit names.

1. The dual vision encoder (``perceive.models.vision``): the ViT's tokens, projected, take the ``<image>``
   placeholders; the ConvNeXt pyramid goes through an FPN (``perceive.models.pixel_decoder``) into per-pixel
   embeddings at stride 4 and the memory the decoders attend to (strides 16 and 8).
2. Mask-guided aggregation (Sec. IV-B, Eq. 1-3): a prompt's mask, normalised by its area, pools the global features
   (the ViT's and the ConvNeXt's last level, side by side) per grid cell and over the whole mask; a cosine position
   term (alpha = 1) is added and the image's projector maps them into the ``<region>`` placeholders.
3. The router (Sec. IV-C): each ``<REF>`` state goes to the decoders of its unit (``box``, ``mask``, ``keypoint``;
   ``box, keypoint`` to two); a decoder with no ``<REF>`` in a batch still runs, its loss times zero.
4. The unit decoders: ``<REF>`` queries attend to the memory and to the sample's other ``<REF>`` queries (DETR's and
   MaskFormer's decoder layers); heads after every layer (deep supervision):
   box: a regressed ``cxcywh`` box (DETR, L1 x 5 + GIoU x 2) and the box's area painted over per-pixel embeddings
   (BCE + dice; ``box_readout="dense"`` reads the box from it); mask: query dot per-pixel embeddings (BCE + dice);
   keypoint: one query-conditioned heatmap per keypoint over the per-pixel embeddings (cross-entropy at the labelled
   point) and a visibility logit.
5. With ``query_seed`` (the third attempt, ``docs/experiments/refvlm.md``): MVP-LM's query enhancement per ``<REF>``.
   Each ``<REF>`` state scores every memory token; the softmax of the scores pools the memory into the query's start
   (plus the memory inside the sample's visual prompts), and the scores learn where the ``<REF>`` s phrase's targets
   are (BCE + dice against their masks, or their boxes' areas, at the memory's resolution).
6. Parallel grouped Hungarian matching: the ``<REF>`` s of one phrase are matched with that phrase's targets only,
   by the summed costs of the decoders their unit names (``perceive.models.matching``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel, Qwen2ForCausalLM

from perceive.boxes import convert
from perceive.models.matching import (
    HungarianMatcher,
    MatchWeights,
    box_losses,
    dice_cost,
    dice_loss,
    mask_bce_cost,
    mask_bce_loss,
)
from perceive.models.pixel_decoder import MLP, PixelDecoder, left_aligned, sine_positions
from perceive.models.refvlm.configuration_refvlm import RefVlmConfig
from perceive.models.vision import DualVisionEncoder

UNITS = ("box", "mask", "keypoint")


@dataclass
class UnitPredictions:
    """One decoder layer's outputs for one unit, ``[B, Q, ...]`` over the padded queries: ``boxes`` (cxcywh),
    ``areas`` (box areas' logits), ``masks`` (mask logits), ``heatmaps`` ``[B, Q, K, h, w]`` and ``visible``
    ``[B, Q, K]`` (keypoints); a unit fills only its own."""

    boxes: torch.Tensor | None = None
    areas: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    heatmaps: torch.Tensor | None = None
    visible: torch.Tensor | None = None


@dataclass
class Routed:
    """One decoder's share of a batch: ``index[b]`` the ``<REF>`` ordinals of sample b it decodes, in order."""

    index: list[list[int]]
    layers: list[UnitPredictions] = field(default_factory=list)  # one per decoder layer; the last is final


@dataclass
class Selection:
    """Per sample: ``scores`` ``[R, M]`` each ``<REF>``'s logits over the memory tokens, ``seeds`` ``[R, D]`` the
    memory they pool (plus the visual prompts'), where the ``<REF>`` queries start."""

    scores: list[torch.Tensor]
    seeds: list[torch.Tensor]


@dataclass
class RefVlmOutput:
    loss: torch.Tensor | None
    losses: dict[str, torch.Tensor]
    units: dict[str, Routed]
    lm_logits: torch.Tensor | None = None
    ref_states: list[torch.Tensor] | None = None  # per sample: [R, H] the <REF>s' last-layer states


def box_area_targets(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``[T, size, size]``: each normalised cxcywh box's coverage of every cell of a ``size`` grid (exact)."""
    xyxy = convert(boxes.float(), "cxcywh", "xyxy").clamp(0, 1) * size
    cells = torch.arange(size, dtype=torch.float32, device=boxes.device)
    cover_x = (torch.minimum(xyxy[:, 2:3], cells + 1) - torch.maximum(xyxy[:, 0:1], cells)).clamp(0, 1)
    cover_y = (torch.minimum(xyxy[:, 3:4], cells + 1) - torch.maximum(xyxy[:, 1:2], cells)).clamp(0, 1)
    return cover_y[:, :, None] * cover_x[:, None, :]


def cosine_positions(n: int, channels: int, temperature: float, device: torch.device) -> torch.Tensor:
    """``[n, channels]``: Eq. 2's ``cos(n / s^(2c/C))``."""
    pos = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    c = torch.arange(channels, dtype=torch.float32, device=device)[None]
    return torch.cos(pos / temperature ** (2 * c / channels))


class RefDecoderLayer(nn.Module):
    """Cross-attention to the text (when the decoder reads it) and to the image memory, self-attention among a
    sample's ``<REF>`` queries, a feed-forward network."""

    def __init__(self, dim: int, heads: int, ffn: int, reads_text: bool) -> None:
        super().__init__()
        self.text_cross = nn.MultiheadAttention(dim, heads, batch_first=True) if reads_text else None
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4 if reads_text else 3))

    def forward(
        self, q: torch.Tensor, memory: torch.Tensor, m_pos: torch.Tensor, padding: torch.Tensor,
        text: torch.Tensor | None = None, text_padding: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        if self.text_cross is not None and text is not None:
            read = self.text_cross(q, text, text, key_padding_mask=text_padding, need_weights=False)[0]
            q = self.norms[3](q + read)
        q = self.norms[0](q + self.cross(q, memory + m_pos, memory, need_weights=False)[0])
        q = self.norms[1](q + self.self_attn(q, q, q, key_padding_mask=padding, need_weights=False)[0])
        return self.norms[2](q + self.ffn(q))


class UnitDecoder(nn.Module):
    """One unit's decoder: ``<REF>`` states in, each layer's normalised query states out."""

    def __init__(self, lm_width: int, config: RefVlmConfig) -> None:
        super().__init__()
        d = config.decoder_dim
        self.in_proj = MLP([lm_width, d, d])
        self.layers = nn.ModuleList(
            RefDecoderLayer(d, config.decoder_heads, config.decoder_ffn, config.text_cross_attention)
            for _ in range(config.decoder_layers)
        )
        self.norm = nn.LayerNorm(d)

    def forward(
        self, refs: torch.Tensor, padding: torch.Tensor, memory: torch.Tensor, m_pos: torch.Tensor,
        text: torch.Tensor | None = None, text_padding: torch.Tensor | None = None, start: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:  # fmt: skip
        q = self.in_proj(refs)
        if start is not None:
            q = q + start
        out = []
        for layer in self.layers:
            q = layer(q, memory, m_pos, padding, text, text_padding)
            out.append(self.norm(q))
        return out


class RefVlmPreTrainedModel(PreTrainedModel):
    config_class = RefVlmConfig
    base_model_prefix = "refvlm"

    def _init_weights(self, module: nn.Module) -> None:  # the parts initialise themselves
        pass


class RefVlmForConditionalGeneration(RefVlmPreTrainedModel):
    def __init__(self, config: RefVlmConfig) -> None:
        super().__init__(config)
        d, lm_width, k = config.decoder_dim, config.text().hidden_size, config.num_keypoints
        self.vision = DualVisionEncoder(config.vision(), config.convnext())
        self.projector = nn.Sequential(nn.Linear(self.vision.token_channels, lm_width), nn.GELU(),
                                       nn.Linear(lm_width, lm_width))  # fmt: skip
        self.language_model = Qwen2ForCausalLM(config.text())
        self.pixel_decoder = PixelDecoder(self.vision.pyramid_channels, d)
        self.level_embed = nn.Embedding(len(self.vision.pyramid_channels) - 1, d)
        self.decoders = nn.ModuleDict({u: UnitDecoder(lm_width, config) for u in UNITS})
        self.text_proj = nn.Linear(lm_width, d) if config.text_cross_attention else None
        self.selector = MLP([lm_width, d, d]) if config.query_seed else None
        self.memory_key = nn.Linear(d, d) if config.query_seed else None
        self.box_head = MLP([d, d, d, 4])
        self.area_head = MLP([d, d, d])
        self.mask_head = MLP([d, d, d])
        self.keypoint_head = MLP([d, d, k * d])
        self.visible_head = MLP([d, d, k])
        self.matcher = HungarianMatcher(MatchWeights(cls=1.0))  # the summed unit costs come in as one matrix
        self.box_costs = HungarianMatcher(MatchWeights(0.0, 0.0, 0.0, config.l1_weight, config.giou_weight))
        self.post_init()

    # -- inputs ----------------------------------------------------------------------------------------------------
    def encode_image(self, pixel_low: torch.Tensor, pixel_high: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the image gives every part: the LM's image tokens, the global features visual prompts pool from,
        the per-pixel embeddings and the decoders' memory (flattened levels with their positions)."""
        tokens, levels = self.vision(pixel_low, pixel_high)
        b, g, r = tokens.shape[0], self.config.image_grid, self.config.prompt_resolution
        vit = tokens[..., : self.vision.vit.config.hidden_size].transpose(1, 2).reshape(b, -1, g, g)
        globals_ = torch.cat([F.interpolate(vit, size=(r, r), mode="bilinear", align_corners=False),
                              F.adaptive_avg_pool2d(levels[-1], r)], 1)  # fmt: skip
        mask_features, memory = self.pixel_decoder(levels)
        flat, pos = [], []
        for i, level in enumerate(memory):
            h, w = level.shape[-2:]
            flat.append(level.flatten(2).transpose(1, 2))
            pos.append(sine_positions(h, w, level.shape[1], level.device).to(level.dtype) + self.level_embed.weight[i])
        sizes = torch.tensor([level.shape[-2:] for level in memory], device="cpu")  # shapes, read as Python ints
        return {"image_tokens": self.projector(tokens), "globals": globals_, "mask_features": mask_features,
                "memory": torch.cat(flat, 1), "memory_pos": torch.cat(pos, 0)[None], "memory_sizes": sizes}  # fmt: skip

    def memory_maps(self, maps: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """``[N, M]``: ``[N, H, W]`` maps averaged over each memory level's cells (``sizes`` ``[L, 2]``), flattened
        in the memory's order."""
        x = maps.float()[:, None]
        return torch.cat([F.adaptive_avg_pool2d(x, (int(h), int(w))).flatten(1) for h, w in sizes], 1)

    def region_tokens(self, globals_: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Mask-guided aggregation of one image's ``[C, R, R]`` global features by ``[P, R, R]`` prompt masks:
        ``[P, g*g + 1, C]`` (a token per grid cell, then the whole mask's), position term added (Eq. 1-3)."""
        cfg = self.config
        g, r = cfg.prompt_grid, cfg.prompt_resolution
        c = globals_.shape[0]
        m = masks.float() / masks.float().flatten(1).sum(-1).clamp(min=1e-6)[:, None, None]
        cell = r // g
        x = globals_.reshape(c, g, cell, g, cell)
        mm = m.reshape(-1, g, cell, g, cell).to(x.dtype)
        cells = torch.einsum("cahbw,pahbw->pabc", x, mm).reshape(len(masks), g * g, c)
        whole = torch.einsum("crs,prs->pc", globals_, m.to(globals_.dtype))[:, None]
        v = torch.cat([cells, whole], 1)
        return v + cosine_positions(g * g + 1, c, cfg.prompt_temperature, v.device).to(v.dtype)

    def embed(self, input_ids: torch.Tensor, image: dict[str, torch.Tensor],
              prompt_masks: list[torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """The LM's input embeddings: image tokens at ``<image>``, each prompt's tokens at its ``<region>`` run."""
        cfg = self.config
        emb = self.language_model.get_input_embeddings()(input_ids).clone()
        tokens = image["image_tokens"]
        slots = input_ids == cfg.image_token_id
        per_sample = slots.sum(1)
        if not bool((per_sample == tokens.shape[1]).all()):
            raise ValueError(f"each sample needs {tokens.shape[1]} <image> tokens, got {per_sample.tolist()}")
        emb[slots] = tokens.reshape(-1, tokens.shape[-1]).to(emb.dtype)
        regions = input_ids == cfg.region_token_id
        for b in range(len(input_ids)):
            masks = prompt_masks[b] if prompt_masks is not None else None
            n = 0 if masks is None else len(masks)
            found = int(regions[b].sum())
            if found != n * cfg.region_tokens:
                raise ValueError(f"sample {b} has {found} <region> slots for {n} visual prompts ({cfg.region_tokens} "
                                 f"each)")  # fmt: skip
            if n:
                assert masks is not None
                v = self.projector(self.region_tokens(image["globals"][b], masks))
                emb[b, regions[b]] = v.reshape(-1, v.shape[-1]).to(emb.dtype)
        return emb

    # -- decoding ----------------------------------------------------------------------------------------------------
    def route(self, ref_units: list[torch.Tensor]) -> dict[str, Routed]:
        """The latent-embeddings router: each decoder's ``<REF>`` ordinals per sample, by the units they name."""
        return {u: Routed([[int(r) for r in units[:, j].nonzero().flatten()] for units in ref_units])
                for j, u in enumerate(UNITS)}  # fmt: skip

    def text_memory(self, states: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the decoders read of the text: ``states`` ``[B, L, H]`` (the LM's, averaged over its layers) at the
        positions ``keep`` ``[B, L]`` marks, projected and left-aligned, with their padding mask; None when the
        decoders read no text."""
        if self.text_proj is None:
            return None
        text, padding = left_aligned(states, keep)
        return self.text_proj(text), padding

    def text_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens whose states the decoders read: every token but the image's, the end token and padding (the
        same ones generation has when the decoders run)."""
        keep = input_ids != self.config.image_token_id
        if self.config.eos_token_id is not None:
            keep &= input_ids != self.config.eos_token_id
        return keep if attention_mask is None else keep & attention_mask.bool()

    def select(self, ref_states: list[torch.Tensor], image: dict[str, torch.Tensor],
               prompt_masks: list[torch.Tensor] | None = None) -> Selection | None:  # fmt: skip
        """Where each ``<REF>`` query starts (``query_seed``; None without it): the memory pooled by the softmax of
        its state's scores over the memory tokens, plus the memory inside the sample's visual prompts (``[P, R, R]``
        each, pooled together)."""
        if self.selector is None or self.memory_key is None:
            return None
        memory = image["memory"]
        keys = self.memory_key(memory)
        scale = 1 / math.sqrt(keys.shape[-1])
        scores, seeds = [], []
        for b, states in enumerate(ref_states):
            s = self.selector(states.to(keys.dtype)) @ keys[b].T * scale
            seed = s.softmax(-1) @ memory[b]
            masks = prompt_masks[b] if prompt_masks is not None else None
            if masks is not None and len(masks):
                w = self.memory_maps(masks.amax(0, keepdim=True), image["memory_sizes"])[0]
                seed = seed + (w / w.sum().clamp(min=1e-6)).to(memory.dtype) @ memory[b]
            scores.append(s)
            seeds.append(seed)
        return Selection(scores, seeds)

    def decode(self, ref_states: list[torch.Tensor], ref_units: list[torch.Tensor], image: dict[str, torch.Tensor],
               text: tuple[torch.Tensor, torch.Tensor] | None = None,
               selection: Selection | None = None) -> dict[str, Routed]:  # fmt: skip
        """Run every unit decoder on the ``<REF>`` states routed to it (``ref_units[b]`` ``[R, 3]`` bool per REF:
        box, mask, keypoint), reading ``text`` (``text_memory``) too, each query started at its ``selection`` seed
        when given. A decoder with no query still runs once on a zero query (its outputs left empty)."""
        routed = self.route(ref_units)
        b = len(ref_states)
        width = ref_states[0].shape[-1] if b else self.config.text().hidden_size
        feats = image["mask_features"]
        for u, r in routed.items():
            q = max(1, max((len(i) for i in r.index), default=0))
            refs = feats.new_zeros((b, q, width))
            start = feats.new_zeros((b, q, self.config.decoder_dim)) if selection is not None else None
            padding = torch.ones((b, q), dtype=torch.bool, device=feats.device)
            for s, idx in enumerate(r.index):
                if idx:
                    refs[s, : len(idx)] = ref_states[s][idx].to(refs.dtype)
                    if start is not None and selection is not None:
                        start[s, : len(idx)] = selection.seeds[s][idx].to(start.dtype)
                    padding[s, : len(idx)] = False
            padding[padding.all(-1), 0] = False  # a sample with no query attends to its zero slot, never to nothing
            words, word_padding = text if text is not None else (None, None)
            states = self.decoders[u](refs, padding, image["memory"], image["memory_pos"], words, word_padding, start)
            for state in states:
                r.layers.append(self.heads(u, state, feats))
        return routed

    def heads(self, unit: str, q: torch.Tensor, feats: torch.Tensor) -> UnitPredictions:
        if unit == "box":
            return UnitPredictions(boxes=self.box_head(q).sigmoid(),
                                   areas=torch.einsum("bqd,bdhw->bqhw", self.area_head(q), feats))  # fmt: skip
        if unit == "mask":
            return UnitPredictions(masks=torch.einsum("bqd,bdhw->bqhw", self.mask_head(q), feats))
        k = self.config.num_keypoints
        kernels = self.keypoint_head(q).reshape(*q.shape[:2], k, -1)
        return UnitPredictions(heatmaps=torch.einsum("bqkd,bdhw->bqkhw", kernels, feats), visible=self.visible_head(q))

    # -- forward -----------------------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_low: torch.Tensor,
        pixel_high: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        ref_units: list[torch.Tensor],
        prompt_masks: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        targets: list[dict[str, torch.Tensor]] | None = None,
        **_: object,
    ) -> RefVlmOutput:
        """Teacher-forced: ``ref_units[b]`` ``[R, 3]`` the units of each ``<REF>`` of sample b (in order). With
        ``labels`` (the answer's tokens, -100 elsewhere) and ``targets`` (per sample: ``boxes`` ``[T, 4]``
        normalised cxcywh, ``masks`` ``[T, h, w]``, ``has_mask`` ``[T]``, ``keypoints`` ``[T, K, 3]`` normalised
        x, y and visibility, ``groups`` ``[T]`` each target's phrase, ``ref_groups`` ``[R]`` each ``<REF>``'s) the
        losses are computed."""
        image = self.encode_image(pixel_low, pixel_high)
        emb = self.embed(input_ids, image, prompt_masks)
        lm = self.language_model(inputs_embeds=emb, attention_mask=attention_mask, labels=labels,
                                 output_hidden_states=True, use_cache=False)  # fmt: skip
        hidden = lm.hidden_states[-1]
        ref_states = [hidden[b, input_ids[b] == self.config.ref_token_id] for b in range(len(input_ids))]
        for b, (states, units) in enumerate(zip(ref_states, ref_units, strict=True)):
            if len(states) != len(units):
                raise ValueError(f"sample {b} has {len(states)} <REF> tokens but {len(units)} units")
        mean_states = torch.stack(lm.hidden_states).mean(0)
        text = self.text_memory(mean_states, self.text_positions(input_ids, attention_mask))
        selection = self.select(ref_states, image, prompt_masks)
        routed = self.decode(ref_states, ref_units, image, text, selection)
        losses: dict[str, torch.Tensor] = {}
        loss = None
        if labels is not None:
            losses["lm"] = lm.loss
            loss = self.config.lm_loss_weight * lm.loss
        if targets is not None:
            found = self.unit_losses(routed, ref_units, targets)
            if selection is not None:
                found["grounding"] = self.grounding_loss(selection, image["memory_sizes"], targets)
            for name, value in found.items():
                losses[name] = value
                loss = value if loss is None else loss + value
        return RefVlmOutput(loss, losses, routed, lm.logits, ref_states)

    # -- training ----------------------------------------------------------------------------------------------------
    def pair_costs(
        self, routed: dict[str, Routed], b: int, units: torch.Tensor, t: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``[R, T]``: each ``<REF>`` of sample ``b`` against each target, the costs of its units' decoders summed."""
        cfg = self.config
        n_refs, n_t = len(units), len(t["boxes"])
        device = t["boxes"].device
        cost = torch.zeros((n_refs, n_t), device=device)
        for u in UNITS:
            refs = routed[u].index[b]
            if not refs:
                continue
            p = routed[u].layers[-1]
            rows = torch.arange(len(refs), device=device)
            if u == "box":
                assert p.boxes is not None
                c = self.box_costs.cost(torch.zeros((len(refs), n_t), device=device), p.boxes[b, rows], None,
                                        t["boxes"], None)  # fmt: skip
            elif u == "mask":
                assert p.masks is not None
                pm, tm = p.masks[b, rows].flatten(1).float().detach(), t["masks"].flatten(1).float()
                c = cfg.mask_bce_weight * mask_bce_cost(pm, tm) + cfg.dice_weight * dice_cost(pm, tm)
            else:
                assert p.heatmaps is not None
                c = keypoint_cost(p.heatmaps[b, rows].detach(), t["keypoints"]) * cfg.l1_weight
            cost[torch.tensor(refs, device=device)] += c.float()
        return cost

    def unit_losses(self, routed: dict[str, Routed], ref_units: list[torch.Tensor],
                    targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:  # fmt: skip
        """Every decoder layer's losses after grouped matching (the last layer's assignment for all layers)."""
        cfg = self.config
        device = routed["box"].layers[0].boxes.device  # type: ignore[union-attr]
        zero = torch.zeros((), device=device)
        total = {"box": zero, "mask": zero, "keypoint": zero}
        counts = dict.fromkeys(UNITS, 0)
        for b, (units, t) in enumerate(zip(ref_units, targets, strict=True)):
            if not len(units) or not len(t["boxes"]):
                continue
            cost = self.pair_costs(routed, b, units, t)
            qi, ti = self.matcher.match(cost, query_groups=t["ref_groups"], target_groups=t["groups"])
            for u in UNITS:
                refs = routed[u].index[b]
                slot = {r: s for s, r in enumerate(refs)}
                pairs = [(slot[int(q)], int(k)) for q, k in zip(qi, ti, strict=True) if int(q) in slot]
                if not pairs:
                    continue
                qs = torch.tensor([p[0] for p in pairs], device=device)
                ts = torch.tensor([p[1] for p in pairs], device=device)
                counts[u] += len(pairs)
                for p in routed[u].layers:
                    total[u] = total[u] + self.pair_loss(u, p, b, qs, ts, t)
        out = {}
        weights = {"box": cfg.box_loss_weight, "mask": cfg.mask_loss_weight, "keypoint": cfg.keypoint_loss_weight}
        for u in UNITS:
            # a decoder without targets still joins the graph (its loss times zero), as the paper's router does
            idle = sum(v.sum() for p in routed[u].layers for v in vars(p).values() if v is not None) * 0.0
            out[u] = weights[u] * total[u] / max(1, counts[u]) + idle
        return out

    def grounding_loss(self, selection: Selection, sizes: torch.Tensor,
                       targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:  # fmt: skip
        """The selection scores' BCE + dice against where each ``<REF>``'s phrase's targets are (their masks, or
        their boxes' areas for targets without one) on the memory's cells, averaged over the ``<REF>`` s."""
        cfg = self.config
        total = (
            selection.scores[0].new_zeros((), dtype=torch.float32)
            if selection.scores
            else torch.zeros((), device="cpu")
        )
        count = 0
        for scores, t in zip(selection.scores, targets, strict=True):
            if not len(scores) or not len(t["boxes"]):
                total = total + scores.sum() * 0.0
                continue
            size = t["masks"].shape[-1]
            cover = torch.where(t["has_mask"][:, None, None], t["masks"].float(), box_area_targets(t["boxes"], size))
            maps = self.memory_maps(cover, sizes)  # [T, M]
            same = (t["ref_groups"][:, None] == t["groups"][None]).float()  # [R, T]
            goal = (maps[None] * same[..., None]).amax(1)  # [R, M]: the union of the phrase's targets
            total = total + self.dense_loss(scores.float(), goal)
            count += len(scores)
        return cfg.grounding_loss_weight * total / max(1, count)

    def dense_loss(self, logits: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """Summed over rows: BCE x ``mask_bce_weight`` + dice x ``dice_weight`` of ``[N, P]`` logits against ``[N, P]``
        targets in [0, 1] (masks, box areas, the selection's cells)."""
        cfg = self.config
        return cfg.mask_bce_weight * mask_bce_loss(logits, goal) + cfg.dice_weight * dice_loss(logits, goal)

    def pair_loss(self, unit: str, p: UnitPredictions, b: int, qs: torch.Tensor, ts: torch.Tensor,
                  t: dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        cfg = self.config
        if unit == "box":
            assert p.boxes is not None and p.areas is not None
            l1, giou = box_losses(p.boxes[b, qs].float(), t["boxes"][ts].float())
            area = box_area_targets(t["boxes"][ts], p.areas.shape[-1]).flatten(1)
            logits = p.areas[b, qs].flatten(1).float()
            return cfg.l1_weight * l1 + cfg.giou_weight * giou + self.dense_loss(logits, area)
        if unit == "mask":
            assert p.masks is not None
            keep = t["has_mask"][ts]
            if not bool(keep.any()):
                return p.masks.new_zeros(())
            logits = p.masks[b, qs[keep]].flatten(1).float()
            goal = t["masks"][ts[keep]].flatten(1).float()
            return self.dense_loss(logits, goal)
        assert p.heatmaps is not None and p.visible is not None
        return keypoint_loss(p.heatmaps[b, qs].float(), p.visible[b, qs].float(), t["keypoints"][ts].float())


def keypoint_cells(keypoints: torch.Tensor, size: int) -> torch.Tensor:
    """``[..., K]`` flat cell index of normalised keypoints on a ``size`` grid."""
    xy = (keypoints[..., :2].clamp(0, 1 - 1e-6) * size).long()
    return xy[..., 1] * size + xy[..., 0]


def expected_points(heatmaps: torch.Tensor) -> torch.Tensor:
    """``[..., K, 2]`` normalised (x, y): each heatmap's softmax-weighted cell centre (soft-argmax)."""
    h, w = heatmaps.shape[-2:]
    prob = heatmaps.flatten(-2).float().softmax(-1).reshape(heatmaps.shape)
    xs = (torch.arange(w, dtype=torch.float32, device=heatmaps.device) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float32, device=heatmaps.device) + 0.5) / h
    return torch.stack([(prob.sum(-2) * xs).sum(-1), (prob.sum(-1) * ys).sum(-1)], -1)


def keypoint_cost(heatmaps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[Q, T]``: mean L1 distance between each query's expected keypoints and each target's labelled ones."""
    pts = expected_points(heatmaps)  # [Q, K, 2]
    labelled = (targets[..., 2] > 0).float()  # [T, K]
    dist = (pts[:, None] - targets[None, ..., :2]).abs().sum(-1)  # [Q, T, K]
    return (dist * labelled[None]).sum(-1) / labelled.sum(-1).clamp(min=1)[None]


def keypoint_loss(heatmaps: torch.Tensor, visible: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed over pairs: the heatmaps' cross-entropy at each labelled keypoint's cell (averaged over the labelled
    keypoints) and the visibility's BCE (labelled v > 0 is visible, as the released code counts it)."""
    n, k, h, w = heatmaps.shape
    labelled = targets[..., 2] > 0
    cells = keypoint_cells(targets, w)
    ce = F.cross_entropy(heatmaps.reshape(n * k, h * w), cells.reshape(-1), reduction="none").reshape(n, k)
    located = (ce * labelled).sum(-1) / labelled.sum(-1).clamp(min=1)
    seen = F.binary_cross_entropy_with_logits(visible, labelled.float(), reduction="none").mean(-1)
    return (located + seen).sum()
