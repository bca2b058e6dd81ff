"""The released UPN (ChatRex's ``upn_large.pth``): a tiny checkpoint written here in the released key layout
loads with every tensor accounted for, and its proposals equal a straightforward re-implementation of the
released forward pass (``reference_forward`` below, written from ChatRex's ``chatrex/upn`` code: seq-first
decoder, windows attended one by one, deformable attention by explicit bilinear sampling as the CUDA kernel
does, not ``grid_sample``)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_cli

import perceive
from perceive.models.upn.released import ReleasedUpn, ReleasedUpnConfig, image_batch
from perceive.models.upn.released_loading import load_released_upn, read_weights
from perceive.perceiver import ModelFolderError

S = "backbone.model.backbone."
TINY = dict(embed=16, depths=(2, 2, 1, 1), heads=(1, 2, 2, 4), window=3, d=32, levels=5, points=2, ffn=48,
            enc=2, dec=2, queries=20)  # fmt: skip
HEADS = 8  # the released transformer's


# --------------------------------------------------------------------------------------------------
# the released layout, written from the released code's module tree


def released_relative_index(win: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid([torch.arange(win), torch.arange(win)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += win - 1
    rel[:, :, 1] += win - 1
    rel[:, :, 0] *= 2 * win - 1
    return rel.sum(-1)


def released_weights(seed: int = 0, t: dict = TINY) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    w: dict[str, torch.Tensor] = {}

    def linear(name, n_in, n_out, bias=True, scale=None):
        w[f"{name}.weight"] = rnd(n_out, n_in, scale=scale or 1.0 / math.sqrt(n_in))
        if bias:
            w[f"{name}.bias"] = rnd(n_out, scale=0.05)

    def norm(name, n):
        w[f"{name}.weight"], w[f"{name}.bias"] = rnd(n, scale=0.1, base=1.0), rnd(n, scale=0.05)

    def mlp(name, dims):
        for k, (a, b) in enumerate(itertools.pairwise(dims)):
            linear(f"{name}.layers.{k}", a, b)

    e, win, d, lv, p = t["embed"], t["window"], t["d"], t["levels"], t["points"]
    w[f"{S}patch_embed.proj.weight"], w[f"{S}patch_embed.proj.bias"] = rnd(e, 3, 4, 4, scale=0.15), rnd(e, scale=0.05)
    norm(f"{S}patch_embed.norm", e)
    for i, (depth, heads) in enumerate(zip(t["depths"], t["heads"], strict=True)):
        c = e * 2**i
        for j in range(depth):
            b = f"{S}layers.{i}.blocks.{j}."
            norm(b + "norm1", c)
            w[b + "attn.relative_position_bias_table"] = rnd((2 * win - 1) ** 2, heads, scale=0.5)
            w[b + "attn.relative_position_index"] = released_relative_index(win)
            linear(b + "attn.qkv", c, 3 * c)
            linear(b + "attn.proj", c, c)
            norm(b + "norm2", c)
            linear(b + "mlp.fc1", c, 4 * c)
            linear(b + "mlp.fc2", 4 * c, c)
        if i < len(t["depths"]) - 1:
            linear(f"{S}layers.{i}.downsample.reduction", 4 * c, 2 * c, bias=False)
            norm(f"{S}layers.{i}.downsample.norm", 4 * c)
        norm(f"{S}norm{i}", c)
    stages = [e * 2**i for i in range(len(t["depths"]))]
    for lvl in range(lv):
        k = 1 if lvl < len(stages) else 3
        n_in = stages[lvl] if lvl < len(stages) else (stages[-1] if lvl == len(stages) else d)
        w[f"input_proj.{lvl}.0.weight"] = rnd(d, n_in, k, k, scale=1.0 / math.sqrt(n_in * k * k))
        w[f"input_proj.{lvl}.0.bias"] = rnd(d, scale=0.05)
        norm(f"input_proj.{lvl}.1", d)

    def deformable(name):
        linear(f"{name}.sampling_offsets", d, HEADS * lv * p * 2, scale=0.05)
        w[f"{name}.sampling_offsets.bias"] = rnd(HEADS * lv * p * 2, scale=1.5)
        linear(f"{name}.attention_weights", d, HEADS * lv * p)
        linear(f"{name}.value_proj", d, d)
        linear(f"{name}.output_proj", d, d)

    T = "transformer."
    for n in range(t["enc"]):
        layer = f"{T}encoder.layers.{n}."
        deformable(layer + "self_attn")
        norm(layer + "norm1", d)
        linear(layer + "linear1", d, t["ffn"])
        linear(layer + "linear2", t["ffn"], d)
        norm(layer + "norm2", d)
    for n in range(t["dec"]):
        layer = f"{T}decoder.layers.{n}."
        deformable(layer + "cross_attn")
        norm(layer + "norm1", d)
        w[layer + "self_attn.in_proj_weight"] = rnd(3 * d, d, scale=1.0 / math.sqrt(d))
        w[layer + "self_attn.in_proj_bias"] = rnd(3 * d, scale=0.05)
        linear(layer + "self_attn.out_proj", d, d)
        norm(layer + "norm2", d)
        linear(layer + "linear1", d, t["ffn"])
        linear(layer + "linear2", t["ffn"], d)
        norm(layer + "norm3", d)
    norm(f"{T}decoder.norm", d)
    mlp(f"{T}decoder.ref_point_head", [2 * d, d, d])
    mlp(f"{T}decoder.ref_point_head_point", [d, d, d])
    w[f"{T}level_embed"] = rnd(lv, d, scale=0.5)
    w[f"{T}tgt_embed.weight"] = rnd(t["queries"], d, scale=1.0)
    linear(f"{T}enc_output", d, d)
    norm(f"{T}enc_output_norm", d)
    mlp(f"{T}enc_out_bbox_embed", [d, d, d, 4])
    w[f"{T}fine_grained_prompt.weight"] = rnd(1, d, scale=0.5)
    w[f"{T}coarse_grained_prompt.weight"] = rnd(1, d, scale=0.5)
    mlp("bbox_embed.0", [d, d, d, 4])
    shared = {k[len("bbox_embed.0.") :]: v for k, v in w.items() if k.startswith("bbox_embed.0.")}
    for k in range(t["dec"]):  # one MLP, saved under each of its names
        for rest, v in shared.items():
            w[f"bbox_embed.{k}.{rest}"] = v
            w[f"{T}decoder.bbox_embed.{k}.{rest}"] = v
    return w


# --------------------------------------------------------------------------------------------------
# the released forward pass, re-implemented from its code


def lin(w, name, x):
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def ln(w, name, x):
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], 1e-5)


def mlp(w, name, x):
    n = sum(1 for k in w if k.startswith(f"{name}.layers.") and k.endswith(".weight"))
    for k in range(n):
        x = lin(w, f"{name}.layers.{k}", x)
        x = F.relu(x) if k < n - 1 else x
    return x


def reference_swin(w, x, t):
    win, shift = t["window"], t["window"] // 2
    x = F.pad(x, (0, (4 - x.shape[3] % 4) % 4, 0, (4 - x.shape[2] % 4) % 4))
    x = F.conv2d(x, w[f"{S}patch_embed.proj.weight"], w[f"{S}patch_embed.proj.bias"], stride=4)
    b, _, h, wd = x.shape
    x = ln(w, f"{S}patch_embed.norm", x.flatten(2).transpose(1, 2))
    outs = []
    for i, (depth, heads) in enumerate(zip(t["depths"], t["heads"], strict=True)):
        c = t["embed"] * 2**i
        hp, wp = math.ceil(h / win) * win, math.ceil(wd / win) * win
        regions = torch.zeros(hp, wp)
        cnt = 0
        for hs in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
            for ws in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
                regions[hs, ws] = cnt
                cnt += 1
        for j in range(depth):
            blk = f"{S}layers.{i}.blocks.{j}."
            y = F.pad(ln(w, blk + "norm1", x).view(b, h, wd, c), (0, 0, 0, wp - wd, 0, hp - h))
            if j % 2:
                y = torch.roll(y, (-shift, -shift), (1, 2))
            out = torch.zeros_like(y)
            bias = w[blk + "attn.relative_position_bias_table"][w[blk + "attn.relative_position_index"].reshape(-1)]
            bias = bias.view(win * win, win * win, heads).permute(2, 0, 1)
            for r in range(0, hp, win):
                for col in range(0, wp, win):  # each window on its own
                    tokens = y[:, r : r + win, col : col + win].reshape(b, win * win, c)
                    q, k, v = lin(w, blk + "attn.qkv", tokens).view(b, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
                    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1) + bias
                    if j % 2:
                        lab = regions[r : r + win, col : col + win].reshape(-1)
                        attn = attn + (lab[None, :] - lab[:, None] != 0).float() * -100.0
                    mixed = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, win * win, c)
                    out[:, r : r + win, col : col + win] = lin(w, blk + "attn.proj", mixed).view(b, win, win, c)
            if j % 2:
                out = torch.roll(out, (shift, shift), (1, 2))
            x = x + out[:, :h, :wd].reshape(b, h * wd, c)
            x = x + lin(w, blk + "mlp.fc2", F.gelu(lin(w, blk + "mlp.fc1", ln(w, blk + "norm2", x))))
        outs.append(ln(w, f"{S}norm{i}", x).view(b, h, wd, c).permute(0, 3, 1, 2))
        if i < len(t["depths"]) - 1:
            z = F.pad(x.view(b, h, wd, c), (0, 0, 0, wd % 2, 0, h % 2))
            z = torch.cat([z[:, 0::2, 0::2], z[:, 1::2, 0::2], z[:, 0::2, 1::2], z[:, 1::2, 1::2]], -1)
            merged = ln(w, f"{S}layers.{i}.downsample.norm", z.view(b, -1, 4 * c))
            x = lin(w, f"{S}layers.{i}.downsample.reduction", merged)
            h, wd = (h + 1) // 2, (wd + 1) // 2
    return outs


def bilinear(value, shape, loc):
    """The CUDA kernel's sampling: ``value`` [B, HW, heads, d], ``loc`` [B, Q, heads, P, 2] -> [B, Q, heads, P, d]."""
    (h, wd), (b, q, heads, p, _) = shape, loc.shape
    x, y = loc[..., 0] * wd - 0.5, loc[..., 1] * h - 0.5
    x0, y0 = x.floor(), y.floor()
    out = 0
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
            inside = (xi >= 0) & (xi < wd) & (yi >= 0) & (yi < h)
            idx = (yi.clamp(0, h - 1) * wd + xi.clamp(0, wd - 1)).long()  # [B, Q, heads, P]
            idx = idx.permute(0, 2, 1, 3).reshape(b, heads, q * p, 1).expand(-1, -1, -1, value.shape[-1])
            got = value.permute(0, 2, 1, 3).gather(2, idx).view(b, heads, q, p, -1).permute(0, 2, 1, 3, 4)
            out = out + got * (weight * inside)[..., None]
    return out


def deformable(w, name, query, ref, memory, shapes, pad, points):
    b, q, d = query.shape
    lv = len(shapes)
    value = lin(w, f"{name}.value_proj", memory).masked_fill(pad[..., None], 0.0).view(b, -1, HEADS, d // HEADS)
    offsets = lin(w, f"{name}.sampling_offsets", query).view(b, q, HEADS, lv, points, 2)
    attn = lin(w, f"{name}.attention_weights", query).view(b, q, HEADS, lv * points).softmax(-1)
    attn = attn.view(b, q, HEADS, lv, points)
    if ref.shape[-1] == 2:
        norm = torch.tensor([[wd, h] for h, wd in shapes], dtype=query.dtype)
        loc = ref[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + offsets / points * ref[:, :, None, :, None, 2:] * 0.5
    out = 0
    start = 0
    for lvl, (h, wd) in enumerate(shapes):
        part = value[:, start : start + h * wd]
        out = out + (bilinear(part, (h, wd), loc[:, :, :, lvl]) * attn[:, :, :, lvl, :, None]).sum(3)
        start += h * wd
    return lin(w, f"{name}.output_proj", out.reshape(b, q, d))


def multihead(w, name, q, k, v):
    """``nn.MultiheadAttention`` on seq-first inputs, written out."""
    n, b, d = q.shape
    wq, wk, wv = w[f"{name}.in_proj_weight"].chunk(3)
    bq, bk, bv = w[f"{name}.in_proj_bias"].chunk(3)

    def split(x, wt, bs):
        return F.linear(x, wt, bs).view(n, b * HEADS, d // HEADS).transpose(0, 1)

    attn = (split(q, wq, bq) @ split(k, wk, bk).transpose(1, 2) / math.sqrt(d // HEADS)).softmax(-1)
    return lin(w, f"{name}.out_proj", (attn @ split(v, wv, bv)).transpose(0, 1).reshape(n, b, d))


def sine(mask, n, temperature):
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim = temperature ** (2 * (torch.arange(n, dtype=torch.float32) // 2) / n)
    px, py = x[..., None] / dim, y[..., None] / dim
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def sine_for_box(pos, n):
    dim = 10000 ** (2 * (torch.arange(n, dtype=torch.float32) // 2) / n)
    parts = []
    for k in (1, 0, 2, 3):
        e = pos[:, :, k, None] * 2 * math.pi / dim
        parts.append(torch.stack((e[:, :, 0::2].sin(), e[:, :, 1::2].cos()), dim=3).flatten(2))
    return torch.cat(parts, dim=2)


def inv_sig(x, eps=1e-3):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def reference_forward(w, pixels, mask, prompt, t=TINY):
    d, lv, points = t["d"], t["levels"], t["points"]
    feats = reference_swin(w, pixels, t)
    srcs, masks = [], []
    for lvl in range(lv):
        x = feats[lvl] if lvl < len(feats) else feats[-1] if lvl == len(feats) else srcs[-1]
        conv = F.conv2d(x, w[f"input_proj.{lvl}.0.weight"], w[f"input_proj.{lvl}.0.bias"],
                        stride=1 if lvl < len(feats) else 2, padding=0 if lvl < len(feats) else 1)  # fmt: skip
        srcs.append(F.group_norm(conv, 32, w[f"input_proj.{lvl}.1.weight"], w[f"input_proj.{lvl}.1.bias"]))
        masks.append(F.interpolate(mask[None].float(), size=conv.shape[-2:]).to(torch.bool)[0])
    shapes = [tuple(s.shape[-2:]) for s in srcs]
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    pad = torch.cat([m.flatten(1) for m in masks], 1)
    pos = torch.cat([sine(m, d // 2, 20).to(src.dtype).flatten(2).transpose(1, 2) + w["transformer.level_embed"][lvl]
                     for lvl, m in enumerate(masks)], 1)  # fmt: skip

    def ratio(m):
        return torch.stack([(~m[:, 0, :]).sum(1).float() / m.shape[2], (~m[:, :, 0]).sum(1).float() / m.shape[1]], -1)

    ratios = torch.stack([ratio(m) for m in masks], 1)
    refs = []
    for lvl, (h, wd) in enumerate(shapes):
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, wd - 0.5, wd), indexing="ij")
        refs.append(torch.stack((rx.reshape(-1)[None] / (ratios[:, None, lvl, 0] * wd),
                                 ry.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)), -1))  # fmt: skip
    ref_points = torch.cat(refs, 1)[:, :, None] * ratios[:, None]
    memory = src
    for n in range(t["enc"]):
        layer = f"transformer.encoder.layers.{n}."
        memory = ln(w, layer + "norm1", memory + deformable(w, layer + "self_attn", memory + pos, ref_points, memory,
                                                            shapes, pad, points))  # fmt: skip
        memory = ln(w, layer + "norm2", memory + lin(w, layer + "linear2", F.relu(lin(w, layer + "linear1", memory))))
    # gen_encoder_output_proposals
    proposals, start = [], 0
    b = memory.shape[0]
    for lvl, (h, wd) in enumerate(shapes):
        m = pad[:, start : start + h * wd].view(b, h, wd, 1)
        vh, vw = torch.sum(~m[:, :, 0, 0], 1), torch.sum(~m[:, 0, :, 0], 1)
        gy, gx = torch.meshgrid(torch.linspace(0, h - 1, h), torch.linspace(0, wd - 1, wd), indexing="ij")
        grid = torch.cat([gx[..., None], gy[..., None]], -1)[None].expand(b, -1, -1, -1) + 0.5
        grid = grid / torch.cat([vw[:, None], vh[:, None]], 1).view(b, 1, 1, 2)
        proposals.append(torch.cat((grid, torch.ones_like(grid) * 0.05 * 2.0**lvl), -1).view(b, -1, 4))
        start += h * wd
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(pad[..., None], float("inf"))
    proposals = proposals.masked_fill(~valid, float("inf"))
    out_mem = memory.masked_fill(pad[..., None], 0.0).masked_fill(~valid, 0.0)
    out_mem = ln(w, "transformer.enc_output_norm", lin(w, "transformer.enc_output", out_mem))
    prompt_feat = w[f"transformer.{prompt}_grained_prompt.weight"][0][None, None].repeat(b, 1, 1)
    topk = torch.topk((out_mem @ prompt_feat.transpose(-1, -2)).max(-1)[0], t["queries"], dim=1)[1]
    coords = mlp(w, "transformer.enc_out_bbox_embed", out_mem) + proposals
    refpoint = torch.gather(coords, 1, topk[..., None].repeat(1, 1, 4)).detach()
    # the decoder, seq-first
    tgt = w["transformer.tgt_embed.weight"][:, None, :].repeat(1, b, 1)
    reference = refpoint.transpose(0, 1).sigmoid()
    references, hs = [reference], []
    memory_sf = memory.transpose(0, 1)
    for n in range(t["dec"]):
        layer = f"transformer.decoder.layers.{n}."
        ref_in = reference[:, :, None] * torch.cat([ratios, ratios], -1)[None, :]
        query_pos = mlp(w, "transformer.decoder.ref_point_head", sine_for_box(ref_in[:, :, 0, :], d // 2))
        query_pos = query_pos + mlp(w, "transformer.decoder.ref_point_head_point", torch.zeros_like(query_pos)) * 0.0
        qk = tgt + query_pos
        tgt = ln(w, layer + "norm2", tgt + multihead(w, layer + "self_attn", qk, qk, tgt))
        cross = deformable(w, layer + "cross_attn", (tgt + query_pos).transpose(0, 1), ref_in.transpose(0, 1),
                           memory_sf.transpose(0, 1), shapes, pad, points).transpose(0, 1)  # fmt: skip
        tgt = ln(w, layer + "norm1", tgt + cross)
        tgt = ln(w, layer + "norm3", tgt + lin(w, layer + "linear2", F.relu(lin(w, layer + "linear1", tgt))))
        new_ref = (mlp(w, f"transformer.decoder.bbox_embed.{n}", tgt) + inv_sig(reference)).sigmoid()
        reference = new_ref.detach()
        references.append(new_ref)
        hs.append(ln(w, "transformer.decoder.norm", tgt).transpose(0, 1))
    last = t["dec"] - 1
    boxes = (mlp(w, f"bbox_embed.{last}", hs[last]) + inv_sig(references[last].transpose(0, 1))).sigmoid()
    return {"logits": (hs[last] @ prompt_feat.transpose(-1, -2))[..., 0], "boxes": boxes}


# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("upn") / "upn_tiny.pth"
    # wrapped as the release wraps it, with a non-tensor entry beside the weights
    torch.save({"model": released_weights(), "epoch": 11}, path)
    return path


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 255, (45, 70, 3), dtype=np.uint8), rng.integers(0, 255, (60, 40, 3), dtype=np.uint8)]


def test_the_released_layout_loads_with_every_tensor_used_and_matches_the_reference_forward_pass(checkpoint, images):
    proposer = load_released_upn(checkpoint)
    config = proposer.model.config
    assert (config.swin_embed_dim, config.swin_depths, config.swin_heads, config.swin_window) == (
        16,
        (2, 2, 1, 1),
        (1, 2, 2, 4),
        3,
    )
    assert (config.d_model, config.levels, config.points, config.ffn) == (32, 5, 2, 48)
    assert (config.encoder_layers, config.decoder_layers, config.num_queries) == (2, 2, 20)
    weights = read_weights(checkpoint)
    model = proposer.model.double()
    # two images of different shapes, each padded (below, right): the masks reach every stage
    pixels, padding = image_batch(images, 64, 100)
    assert pixels.shape == (2, 3, 96, 99) and padding[0, 64:].all() and padding[1, :, 64:].all()
    w = {k: v.double() if v.is_floating_point() else v for k, v in weights.items()}
    for prompt in ("fine", "coarse"):
        want = reference_forward(w, pixels.double(), padding, prompt)
        got = model(pixels.double(), padding, prompt)
        torch.testing.assert_close(got["logits"], want["logits"], atol=1e-8, rtol=1e-7)
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-8, rtol=1e-7)
        assert got["boxes"].min() >= 0 and got["boxes"].max() <= 1
    fine, coarse = (model(pixels.double(), padding, p)["logits"] for p in ("fine", "coarse"))
    assert not torch.allclose(fine, coarse)  # the prompt is read


def test_the_full_size_model_has_the_released_names_and_size():
    """701 names and 217.6 M parameters: what the release's own code builds (counted from ChatRex's code,
    docs/experiments/upn.md)."""
    with torch.device("meta"):
        model = ReleasedUpn(ReleasedUpnConfig())
    names = model.state_dict()
    box = [k for k in names if k.startswith("bbox_embed.")]
    blocks = sum(ReleasedUpnConfig().swin_depths)
    assert len(names) - len(box) + 2 * 6 * len(box) + blocks == 701
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 217.6


def test_proposals_are_boxes_of_the_image_best_first_and_survive_conversion(checkpoint, images, tmp_path):
    proposer = load_released_upn(checkpoint)
    proposer.model.config = replace(proposer.model.config, short_side=64, max_side=100)
    image = images[0]
    boxes, scores = proposer.propose(image, "fine", min_score=0.0, nms_iou=1.0)
    assert 0 < len(boxes) <= 20 and scores.shape == (len(boxes),)
    assert (np.diff(scores) <= 0).all() and (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0
    assert boxes[:, [0, 2]].max() <= image.shape[1] and boxes[:, [1, 3]].max() <= image.shape[0]
    # the model's own boxes, clipped: the same as its output read by hand
    out = proposer.model(*image_batch([image], 64, 100), "fine")
    raw = out["boxes"][0].detach() * torch.tensor([70, 45, 70, 45])
    raw = torch.cat([raw[:, :2] - raw[:, 2:] / 2, raw[:, :2] + raw[:, 2:] / 2], 1)
    order = out["logits"][0].argsort(descending=True)
    clipped = torch.stack([raw[order, 0].clamp(0, 70), raw[order, 1].clamp(0, 45), raw[order, 2].clamp(0, 70),
                           raw[order, 3].clamp(0, 45)], 1)  # fmt: skip
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    torch.testing.assert_close(torch.from_numpy(boxes), clipped[inside], atol=1e-4, rtol=1e-5)
    assert len(proposer.propose(image, "fine", min_score=0.0, nms_iou=1.0, max_boxes=3)[0]) == 3
    middle = float(np.median(scores))
    kept, kept_scores = proposer.propose(image, "fine", min_score=middle, nms_iou=0.5)
    assert (kept_scores >= middle).all() and 0 < len(kept) <= (scores >= middle).sum()
    # perceive convert writes safetensors that load to the same proposals
    target = tmp_path / "upn.safetensors"
    done = run_cli("convert", str(checkpoint), str(target))
    assert done.returncode == 0, done.stderr
    again = load_released_upn(target)
    again.model.config = proposer.model.config
    torch.testing.assert_close(torch.from_numpy(again.propose(image, "fine", 0.0, 1.0)[0]), torch.from_numpy(boxes))


def test_perceive_ask_answers_over_the_released_upn_proposals(checkpoint, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    path = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    done = run_cli("ask", str(path), "What is in the image?", "--upn", str(checkpoint), "--upn-min-score", "0",
                   "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    proposer = perceive.load_released_upn(checkpoint)
    boxes, scores = proposer.propose(np.asarray(Image.open(path).convert("RGB")), "fine", 0.0, 0.8)
    assert len(answer["proposals"]) == len(boxes) > 0
    np.testing.assert_allclose([p["box"] for p in answer["proposals"]], boxes, atol=0.006)  # JSON keeps 2 decimals
    np.testing.assert_allclose([p["score"] for p in answer["proposals"]], scores, atol=1e-3)
    # many images: each asked over its own proposals, unless its line gives boxes
    lines = [{"image": str(path), "id": "a"}, {"image": str(path), "id": "b", "boxes": [[1, 2, 30, 40]]}]
    (tmp_path / "many.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = run_cli("ask", "--images", str(tmp_path / "many.jsonl"), "--question", "What is in the image?", "--upn",
                   str(checkpoint), "--upn-min-score", "0", "--out", str(tmp_path / "out"), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(lines[0]["proposals"]) == len(boxes) and [p["box"] for p in lines[1]["proposals"]] == [[1, 2, 30, 40]]
    done = run_cli("ask", str(path), "Q?", "--upn", str(checkpoint), "--boxes", "[[1, 2, 3, 4]]")
    assert done.returncode == 1 and "not both" in done.stderr
    done = run_cli("ask", str(path), "Q?", "--upn", str(checkpoint), "--upn-min-score", "1.01")
    assert done.returncode == 1 and "found no box scoring at least 1.01" in done.stderr
    done = run_cli("ask", str(path), "Q?", "--upn", str(tmp_path / "absent.pth"))
    assert done.returncode == 1 and "no such file" in done.stderr and "Traceback" not in done.stderr


def test_files_that_do_not_fit_get_one_error_naming_what_is_wrong(tmp_path):
    good = released_weights()

    def fails(weights, pattern, name="bad.pth"):
        torch.save({"model": weights}, tmp_path / name)
        with pytest.raises(ModelFolderError, match=pattern):
            load_released_upn(tmp_path / name)

    fails({"layer.weight": torch.zeros(2)}, r"not a UPN checkpoint in the released layout: it lacks .*with: layer")
    fails({k: v for k, v in good.items() if k != "transformer.enc_output.bias"},
          r"1 missing: transformer\.enc_output\.bias")  # fmt: skip
    fails({**good, "transformer.extra.weight": torch.zeros(3)}, r"1 unexpected: transformer\.extra\.weight")
    fails({**good, "transformer.enc_output.bias": torch.zeros(5)},
          r"transformer\.enc_output\.bias \[5\] \(the released layout: \[32\]\)")  # fmt: skip
    fails({**good, "transformer.decoder.bbox_embed.1.layers.0.bias": torch.zeros(32)}, r"aliases .* differ")
    fails({k: v for k, v in good.items() if k != "bbox_embed.1.layers.2.weight"}, r"missing: bbox_embed\.1\.layers\.2")
    index = f"{S}layers.0.blocks.1.attn.relative_position_index"
    fails({**good, index: good[index].flip(0)}, r"relative_position_index is not the relative position index of a 3x3")
    with pytest.raises(FileNotFoundError):
        load_released_upn(tmp_path / "absent.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(ModelFolderError, match="not a readable safetensors file"):
        load_released_upn(tmp_path / "cut.safetensors")
