"""The universal proposal network (UPN, ChatRex Sec. 3.1): class-agnostic boxes with scores at two
granularities, coarse (instances) and fine (parts).

ChatRex builds its UPN on T-Rex2, a DETR-style detector, which trains far too slowly on a CPU. This
one keeps ChatRex's two learned granularity prompts and its dot-product scoring (Eq. 2) but puts them
on a dense, centre-based head (CenterNet, Zhou et al. 2019) over a ConvNeXt feature pyramid: every
stride-4 location scores each granularity and regresses a box; peaks become proposals, suppressed per
granularity (and, with ``cross_granularity_iou``, across the two: both prompts fire on a held item or a
small part, and the language model would see one object twice), optionally refined by a second stage
that reads the box's surroundings (``box_refinement``: the centre cell alone sees too little of an
outline), the best ``max_proposals`` kept. Measurements: ``docs/experiments/upn.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import ConvNextConfig, ConvNextModel, PreTrainedModel

from perceive.boxes import convert, nms, roi_align
from perceive.models.upn.configuration_upn import GRANULARITIES, UpnConfig


class UpnModel(PreTrainedModel):
    config_class = UpnConfig
    base_model_prefix = "upn"
    main_input_name = "pixel_values"

    def __init__(self, config: UpnConfig) -> None:
        super().__init__(config)
        self.backbone = ConvNextModel(
            ConvNextConfig(
                num_channels=3, hidden_sizes=config.hidden_sizes, depths=config.depths, num_stages=len(config.depths)
            )
        )
        d = config.head_dim
        self.lateral = nn.ModuleList(nn.Conv2d(c, d, 1) for c in config.hidden_sizes)
        self.embed = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.GELU(), nn.Conv2d(d, d, 3, padding=1))
        self.prompts = nn.Parameter(torch.randn(len(GRANULARITIES), d) * 0.02)  # coarse, fine
        self.score_bias = nn.Parameter(torch.full((len(GRANULARITIES),), -4.0))  # rare positives at start
        self.box = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.GELU(), nn.Conv2d(d, 4, 1))
        if config.box_refinement:
            g = config.refine_grid
            inputs = d * g * g + 3 * (2 * g) ** 2  # features, and the pixels at twice the grid for the outline
            self.refine = nn.Sequential(nn.Linear(inputs, 256), nn.GELU(), nn.Linear(256, 4))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixel_values`` ``[B, 3, S, S]`` normalised. Returns stride-4 maps: ``scores`` (logits,
        ``[B, 2, S/4, S/4]``), ``boxes`` (``[B, 4, S/4, S/4]``: centre offset in cells and log size in
        cells) and ``features`` (``[B, head_dim, S/4, S/4]``, what box refinement reads)."""
        feats = self.backbone(pixel_values, output_hidden_states=True).hidden_states[1:]
        size = feats[0].shape[-2:]
        fused = sum(
            F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size else lat(f)
            for lat, f in zip(self.lateral, feats, strict=True)
        )
        emb = self.embed(fused)
        scores = torch.einsum("bdhw,gd->bghw", emb, self.prompts) / math.sqrt(emb.shape[1])
        scores = scores + self.score_bias[None, :, None, None]
        return {"scores": scores, "boxes": self.box(fused), "features": fused}

    def refine_deltas(self, features: torch.Tensor, pixel_values: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """Corrections ``[K, 4]`` (dx / w, dy / h, log w ratio, log h ratio) of ``rois`` ``[K, 5]`` (batch
        index, xyxy pixels) from the ``features`` of ``forward`` and its input ``pixel_values``."""
        if not self.config.box_refinement:
            raise ValueError("this UPN has no box refinement (config.box_refinement is False)")
        box = convert(rois[:, 1:], "xyxy", "cxcywh")
        box = torch.cat([box[:, :2], box[:, 2:].clamp(min=1.0) * self.config.refine_context], dim=1)
        window = torch.cat([rois[:, :1], convert(box, "cxcywh", "xyxy")], dim=1)
        g = self.config.refine_grid
        grid = roi_align(features, window, g, 1 / self.config.stride, 2, aligned=True)
        pixels = roi_align(pixel_values, window, 2 * g, 1.0, 2, aligned=True)
        return self.refine(torch.cat([grid.flatten(1), pixels.flatten(1)], dim=1))

    @staticmethod
    def apply_deltas(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """``boxes`` ``[K, 4]`` xyxy moved and resized by ``deltas`` (as ``refine_deltas``); size changes are
        capped at a factor of e either way, so one wild output cannot make a box of the whole image."""
        box = convert(boxes, "xyxy", "cxcywh")
        size = box[:, 2:].clamp(min=1.0)
        moved = torch.cat([box[:, :2] + deltas[:, :2] * size, size * deltas[:, 2:].clamp(-1, 1).exp()], dim=1)
        return convert(moved, "cxcywh", "xyxy")

    @staticmethod
    def target_deltas(boxes: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """The ``deltas`` that ``apply_deltas`` needs to turn ``boxes`` into ``truth`` (both ``[K, 4]`` xyxy)."""
        box, true = convert(boxes, "xyxy", "cxcywh"), convert(truth, "xyxy", "cxcywh")
        size, true_size = box[:, 2:].clamp(min=1.0), true[:, 2:].clamp(min=1.0)
        return torch.cat([(true[:, :2] - box[:, :2]) / size, (true_size / size).log()], dim=1)

    # ------------------------------------------------------------------------------------------
    # training targets and loss
    # ------------------------------------------------------------------------------------------

    def targets(self, boxes: list[torch.Tensor], granularity: list[torch.Tensor], map_size: int) -> dict:
        """Gaussian centre heatmaps and regression targets from per-image ``xyxy`` pixel boxes."""
        s = self.config.stride
        b = len(boxes)
        # drawn box by box on the CPU, then moved where the boxes are
        heat = torch.zeros(b, len(GRANULARITIES), map_size, map_size, device="cpu")
        reg = torch.zeros(b, 4, map_size, map_size, device="cpu")
        mask = torch.zeros(b, map_size, map_size, dtype=torch.bool, device="cpu")
        ys = torch.arange(map_size, dtype=torch.float32, device="cpu")[:, None]
        xs = torch.arange(map_size, dtype=torch.float32, device="cpu")[None, :]
        for i, (bx, gr) in enumerate(zip(boxes, granularity, strict=True)):
            for (x0, y0, x1, y1), g in zip(bx.tolist(), gr.tolist(), strict=True):
                w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
                cx, cy = (x0 + x1) / 2 / s, (y0 + y1) / 2 / s
                ix, iy = min(map_size - 1, int(cx)), min(map_size - 1, int(cy))
                sigma = max(0.5, 0.12 * math.sqrt(w * h) / s)
                gauss = torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma**2))
                heat[i, g] = torch.maximum(heat[i, g], gauss)
                reg[i, :, iy, ix] = torch.tensor([cx - ix, cy - iy, math.log(w / s), math.log(h / s)], device="cpu")
                mask[i, iy, ix] = True
        device = boxes[0].device if boxes else torch.device("cpu")
        return {"heat": heat.to(device), "reg": reg.to(device), "mask": mask.to(device)}

    def loss(self, out: dict[str, torch.Tensor], targets: dict) -> dict[str, torch.Tensor]:
        """CenterNet's penalty-reduced focal loss on the heatmaps and L1 on the boxes at centres."""
        pred = out["scores"].sigmoid().clamp(1e-4, 1 - 1e-4)
        heat = targets["heat"].to(pred)
        pos = heat.eq(1).float()
        pos_loss = -(torch.log(pred) * (1 - pred) ** 2 * pos).sum()
        neg_loss = -(torch.log(1 - pred) * pred**2 * (1 - heat) ** 4 * (1 - pos)).sum()
        n = pos.sum().clamp(min=1)
        m = targets["mask"]
        reg_pred = out["boxes"].permute(0, 2, 3, 1)[m]
        reg_true = targets["reg"].to(pred).permute(0, 2, 3, 1)[m]
        box_loss = F.l1_loss(reg_pred, reg_true, reduction="sum") / n if len(reg_true) else pred.sum() * 0
        return {"heatmap": (pos_loss + neg_loss) / n, "box": box_loss, "loss": (pos_loss + neg_loss) / n + box_loss}

    def refinement_loss(
        self, out: dict[str, torch.Tensor], pixel_values: torch.Tensor, boxes: list[torch.Tensor]
    ) -> torch.Tensor:
        """L1 between the refinement's corrections and the true ones, for each true box (per image
        ``xyxy`` pixels) seen from three boxes: the first stage's own box at its centre cell (what a
        proposal of it looks like) and two random distortions of the truth (centre shifted up to 20% of
        the size, each side scaled by up to e^0.3), so the head learns the first stage's errors and
        larger ones."""
        m = out["boxes"].shape[-1]
        s = self.config.stride
        per_image: list[torch.Tensor] = []
        truth: list[torch.Tensor] = []
        for i, bx in enumerate(boxes):
            if not len(bx):
                continue
            bx = bx.float()
            ix = ((bx[:, 0] + bx[:, 2]) / 2 / s).long().clamp(0, m - 1)
            iy = ((bx[:, 1] + bx[:, 3]) / 2 / s).long().clamp(0, m - 1)
            first = self._cell_boxes(out["boxes"][i, :, iy, ix].detach().float(), ix, iy)
            size = (bx[:, 2:] - bx[:, :2]).repeat(2, 1)
            centre = ((bx[:, :2] + bx[:, 2:]) / 2).repeat(2, 1) + (torch.rand_like(size) - 0.5) * 0.4 * size
            jittered = convert(torch.cat([centre, size * ((torch.rand_like(size) - 0.5) * 0.6).exp()], dim=1),
                               "cxcywh", "xyxy")  # fmt: skip
            candidates = torch.cat([first, jittered])
            per_image.append(torch.cat([torch.full_like(candidates[:, :1], i), candidates], dim=1))
            truth.append(bx.repeat(3, 1))
        if not per_image:  # nothing to learn; a zero that a caller can still call backward() on
            return torch.zeros((), device=pixel_values.device, requires_grad=True)
        rois = torch.cat(per_image)
        deltas = self.refine_deltas(out["features"], pixel_values, rois)
        return F.l1_loss(deltas, self.target_deltas(rois[:, 1:], torch.cat(truth)))

    # ------------------------------------------------------------------------------------------
    # proposals
    # ------------------------------------------------------------------------------------------

    def _cell_boxes(self, reg: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor) -> torch.Tensor:
        """``[K, 4]`` xyxy pixel boxes from the box map's values ``reg`` ``[4, K]`` at cells (``iy``, ``ix``)."""
        s = self.config.stride
        centred = torch.stack([ix + reg[0], iy + reg[1], reg[2].clamp(max=8).exp(), reg[3].clamp(max=8).exp()], dim=1)
        return convert(centred * s, "cxcywh", "xyxy")

    @torch.no_grad()
    def propose(self, pixel_values: torch.Tensor, max_proposals: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Per image: ``boxes`` (``[N, 4]`` xyxy pixels of the input), ``scores`` and ``granularity``
        (0 coarse, 1 fine), sorted by score, N <= ``max_proposals``."""
        cfg = self.config
        cap = cfg.max_proposals if max_proposals is None else max_proposals
        out = self(pixel_values)
        heat = out["scores"].sigmoid()
        peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
        b, g, _, w = heat.shape
        # every image's candidates of both granularities first, so that refinement is one batched call
        all_boxes, all_scores, all_gran, all_image = [], [], [], []
        for i in range(b):
            for k in range(g):
                flat = peaks[i, k].flatten()
                top = torch.topk(flat, min(cfg.pre_nms_topk, flat.numel()))
                keep = top.values >= cfg.min_score
                idx, sc = top.indices[keep], top.values[keep]
                iy, ix = idx // w, idx % w
                all_boxes.append(self._cell_boxes(out["boxes"][i, :, iy, ix], ix, iy))
                all_scores.append(sc)
                all_gran.append(torch.full_like(sc, k, dtype=torch.long))
                all_image.append(torch.full_like(sc, i, dtype=torch.long))
        boxes, image = torch.cat(all_boxes), torch.cat(all_image)
        if cfg.box_refinement and len(boxes):
            rois = torch.cat([image[:, None].to(boxes.dtype), boxes], dim=1)
            boxes = self.apply_deltas(boxes, self.refine_deltas(out["features"], pixel_values, rois))
        per_image = torch.bincount(image, minlength=b).tolist()
        groups = zip(boxes.clamp(0, pixel_values.shape[-1]).split(per_image), torch.cat(all_scores).split(per_image),
                     torch.cat(all_gran).split(per_image), strict=True)  # fmt: skip
        results = []
        for boxes, scores, gran in groups:
            cross = cfg.cross_granularity_iou
            keep = nms(boxes, scores, cfg.nms_iou, labels=gran, max_keep=cap if cross is None else None)
            if cross is not None:
                keep = keep[nms(boxes[keep], scores[keep], cross, max_keep=cap)]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "granularity": gran[keep]})
        return results
