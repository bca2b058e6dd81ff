"""The released RexSeek folder's layout loads, and the loaded model computes what RexSeek's reference forward pass
computes: a tiny folder is written here in that layout (the published config.json's fields, two safetensors
shards with their index, Qwen's vocab.json / merges.txt with the 104 added tokens), and a straightforward
re-implementation of the reference (from the release's code: its preprocessing, CLIP's penultimate layer, timm's
ConvNeXt, torchvision's RoI Align, the sine box embedding, the prompt cut at its placeholders) is compared with
``perceive.load``'s model, step by step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_cli
from PIL import Image
from safetensors.torch import load_file, save_file
from test_boxes import roi_align_reference  # torchvision's RoI Align written out loop by loop

import perceive
from perceive.perceiver import ModelFolderError

ADDED = [f"<obj{k}>" for k in range(100)] + ["<ground>", "</ground>", "<objects>", "</objects>"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DIMS, DEPTHS = (8, 16, 24, 32), (1, 1, 2, 1)  # ConvNeXt-L's are (192, 384, 768, 1536), (3, 3, 27, 3)
CLIP = {"width": 64, "layers": 3, "patch": 14, "side": 2}  # ViT-L/14-336: 1024 wide, 24 layers, 24 x 24 patches
QUESTION = "Please detect the person in a red shirt in this image. Answer the question with object indexes."
CORPUS = ["user assistant system " + QUESTION + " <ground>the person</ground><objects><obj1></objects>\n"] * 40


def write_tokenizer(folder: Path, added_tokens: list[str] = ADDED, corpus: list[str] = CORPUS) -> int:
    """Qwen's tokenizer files as released (vocab.json, merges.txt, tokenizer_config.json, added_tokens.json), a BPE
    learned from ``corpus`` with ``added_tokens`` after it; returns the vocabulary's size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, initial_alphabet=alphabet)
    )
    tok.model.save(str(folder))
    base = tok.get_vocab_size()
    added = {t: k for k, t in enumerate(SPECIAL)} | {t: base + k for k, t in enumerate(added_tokens)}
    decoder = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                        "single_word": False} for t, i in added.items()}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "model_max_length": 2048, "added_tokens_decoder": decoder}))  # fmt: skip
    (folder / "added_tokens.json").write_text(json.dumps(added))
    return base + len(added_tokens)


def clip_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=CLIP["width"], intermediate_size=2 * CLIP["width"],
                            num_hidden_layers=CLIP["layers"], num_attention_heads=1,
                            image_size=CLIP["side"] * CLIP["patch"], patch_size=CLIP["patch"])  # fmt: skip


def released_weights(config: dict) -> dict[str, torch.Tensor]:
    """Random tensors under the release's names (RexSeek's module tree; the towers tiny)."""
    from transformers import CLIPVisionModel, Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    state = {f"model.{k}": v for k, v in Qwen2Model(Qwen2Config(**config)).state_dict().items()}
    clip = CLIPVisionModel(clip_config())
    # the release's names: transformers 4 kept CLIP's weights under vision_model.
    state |= {f"vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v
              for k, v in clip.state_dict().items() if "position_ids" not in k}  # fmt: skip

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape) * scale

    aux = "vision_tower_aux."
    state |= {aux + "vision_stem.0.weight": rand(DIMS[0], 3, 4, 4), aux + "vision_stem.0.bias": rand(DIMS[0]),
              aux + "vision_stem.1.weight": 1 + rand(DIMS[0]), aux + "vision_stem.1.bias": rand(DIMS[0])}  # fmt: skip
    for s, (dim, depth) in enumerate(zip(DIMS, DEPTHS, strict=True)):
        stage = f"{aux}vision_stages.{s}."
        if s:
            before = DIMS[s - 1]
            state |= {stage + "downsample.0.weight": 1 + rand(before), stage + "downsample.0.bias": rand(before),
                      stage + "downsample.1.weight": rand(dim, before, 2, 2),
                      stage + "downsample.1.bias": rand(dim)}  # fmt: skip
        for b in range(depth):
            block = f"{stage}blocks.{b}."
            state |= {block + "conv_dw.weight": rand(dim, 1, 7, 7), block + "conv_dw.bias": rand(dim),
                      block + "norm.weight": 1 + rand(dim), block + "norm.bias": rand(dim),
                      block + "mlp.fc1.weight": rand(4 * dim, dim), block + "mlp.fc1.bias": rand(4 * dim),
                      block + "mlp.fc2.weight": rand(dim, 4 * dim), block + "mlp.fc2.bias": rand(dim),
                      block + "ramma": rand(dim, scale=0.5)}  # fmt: skip
    hidden = config["hidden_size"]
    for name, width in (("mm_projector", CLIP["width"] + DIMS[-1]), ("mm_object_projector", sum(DIMS))):
        state |= {f"{name}.0.weight": rand(hidden, width), f"{name}.0.bias": rand(hidden),
                  f"{name}.2.weight": rand(hidden, hidden), f"{name}.2.bias": rand(hidden)}  # fmt: skip
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # saved, and tied
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("RexSeek-3B")
    vocab = write_tokenizer(root)
    llm = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": vocab + 3, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
           "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu"}  # fmt: skip
    config = {"architectures": ["RexSeekQwenForCausalLM"], "auto_map": {
        "AutoConfig": "modeling_rexseek.RexSeekQwenConfig",
        "AutoModelForCausalLM": "modeling_rexseek.RexSeekQwenForCausalLM"},
        "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad", "initializer_range": 0.02, "max_window_layers": 70, "mm_hidden_size": 2560,
        "mm_patch_merge_type": "flat", "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "rexseek_qwen",
        "object_hidden_size": 2880, "rope_scaling": None, "sliding_window": None, "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right", "torch_dtype": "float32", "transformers_version": "4.48.0",
        "use_cache": True, "use_mm_proj": True, "use_sliding_window": False, "vis_during_training_prob": 0.0,
        **llm}  # fmt: skip
    (root / "config.json").write_text(json.dumps(config, indent=2))
    state = released_weights(llm)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(root / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * 4 for v in state.values())},
             "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}  # fmt: skip
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "repetition_penalty": 1.05}))
    # the release's own code: loading must never run it
    (root / "modeling_rexseek.py").write_text(f"open({str(root / 'RAN')!r}, 'w').write('ran')\n")
    return root


# ----------------------------------------------------------------------------- the reference, written from its code


def reference_inputs(image: np.ndarray, boxes: list[list[float]], aux: int, clip: int):
    """prepare_input_for_rexseek: centred square of the mean colour, bicubic to ``aux``, CLIP-normalised; CLIP's
    input resized bilinearly from it; boxes shifted by the padding and scaled."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    if w > h:
        square = Image.new("RGB", (w, w), tuple(int(x * 255) for x in mean))
        square.paste(pil, (0, (w - h) // 2))
        pad = (0, (w - h) // 2)
    else:
        square = Image.new("RGB", (h, h), tuple(int(x * 255) for x in mean))
        square.paste(pil, ((h - w) // 2, 0))
        pad = ((h - w) // 2, 0)
    array = np.asarray(square.resize((aux, aux), Image.BICUBIC)).astype(np.float32) / 255
    pixels = torch.tensor((array - np.array(mean)) / np.array(std), dtype=torch.float32).permute(2, 0, 1)[None]
    low = F.interpolate(pixels, size=[clip, clip], mode="bilinear", align_corners=False)
    scale = aux / max(w, h)
    gt = torch.tensor([[(b[0] + pad[0]) * scale, (b[1] + pad[1]) * scale, (b[2] + pad[0]) * scale,
                        (b[3] + pad[1]) * scale] for b in boxes])  # fmt: skip
    return pixels, low, gt


def reference_convnext(state: dict, x: torch.Tensor) -> list[torch.Tensor]:
    def ln2d(x, prefix):
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), state[prefix + "weight"], state[prefix + "bias"],
                            1e-6).permute(0, 3, 1, 2)  # fmt: skip

    p = "vision_tower_aux."
    x = ln2d(F.conv2d(x, state[p + "vision_stem.0.weight"], state[p + "vision_stem.0.bias"], stride=4),
             p + "vision_stem.1.")  # fmt: skip
    outs = []
    for s in range(4):
        stage = f"{p}vision_stages.{s}."
        if s:
            x = F.conv2d(ln2d(x, stage + "downsample.0."), state[stage + "downsample.1.weight"],
                         state[stage + "downsample.1.bias"], stride=2)  # fmt: skip
        b = 0
        while f"{stage}blocks.{b}.ramma" in state:
            k = f"{stage}blocks.{b}."
            r = x
            y = F.conv2d(x, state[k + "conv_dw.weight"], state[k + "conv_dw.bias"], padding=3, groups=x.shape[1])
            y = F.layer_norm(
                y.permute(0, 2, 3, 1), (x.shape[1],), state[k + "norm.weight"], state[k + "norm.bias"], 1e-6
            )
            y = F.linear(F.gelu(F.linear(y, state[k + "mlp.fc1.weight"], state[k + "mlp.fc1.bias"])),
                         state[k + "mlp.fc2.weight"], state[k + "mlp.fc2.bias"])  # fmt: skip
            x = y.permute(0, 3, 1, 2) * state[k + "ramma"].reshape(1, -1, 1, 1) + r
            b += 1
        outs.append(x)
    return outs


def reference_roi_align_mean(fmap: torch.Tensor, box: torch.Tensor, scale: float, size: int = 7) -> torch.Tensor:
    """torchvision's roi_align (aligned=False, sampling_ratio=-1), sample by sample, averaged over its bins."""
    pooled = roi_align_reference(fmap[None].double().numpy(), [(0, *box.tolist())], (size, size), scale, -1, False)
    return torch.tensor(pooled[0], dtype=torch.float32).mean(dim=(1, 2))


def reference_sine(box01: torch.Tensor, dim: int) -> torch.Tensor:
    w, h = box01[2] - box01[0], box01[3] - box01[1]
    cx, cy = box01[0] + w / 2, box01[1] + h / 2
    dim_t = torch.arange(dim, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / dim)
    parts = []
    for c in (cy, cx, w, h):
        p = c * 2 * math.pi / dim_t
        parts.append(torch.stack((p[0::2].sin(), p[1::2].cos()), dim=-1).flatten())
    return torch.cat(parts)


def reference_answer(folder: Path, image: np.ndarray, boxes: list[list[float]], question: str, steps: int):
    """(image tokens, object tokens, first logits, greedy tokens) as RexSeek's code computes them."""
    from transformers import CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    config = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state |= load_file(str(folder / shard))
    side = CLIP["side"] * CLIP["patch"]
    pixels, low, gt = reference_inputs(image, boxes, 32 * CLIP["side"], side)
    clip = CLIPVisionModel(clip_config())
    nested = any(k.startswith("vision_model.") for k in clip.state_dict())
    prefix = "vision_tower.vision_tower." if nested else "vision_tower.vision_tower.vision_model."
    missing, unexpected = clip.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()
                                                if k.startswith(prefix)}, strict=False)  # fmt: skip
    assert not unexpected and all("position_ids" in k for k in missing)
    with torch.no_grad():
        low_feat = clip(low, output_hidden_states=True).hidden_states[-2][:, 1:]
        levels = reference_convnext(state, pixels)

        def mlp(name: str, x: torch.Tensor) -> torch.Tensor:
            x = F.gelu(F.linear(x, state[f"{name}.0.weight"], state[f"{name}.0.bias"]))
            return F.linear(x, state[f"{name}.2.weight"], state[f"{name}.2.bias"])

        high = levels[-1].flatten(2).transpose(1, 2)
        image_tokens = mlp("mm_projector", torch.cat([low_feat, high], -1))[0]
        size = levels[0].shape[-2:]
        fmap = torch.cat([levels[0]] + [F.interpolate(lv, size=size, mode="bilinear", align_corners=False)
                                        for lv in levels[1:]], 1)[0]  # fmt: skip
        aux = 32 * CLIP["side"]
        objects = torch.stack([reference_roi_align_mean(fmap, b, size[-1] / aux)
                               + reference_sine(b / aux, fmap.shape[0] // 4) for b in gt])  # fmt: skip
        objects = mlp("mm_object_projector", objects)

        tokenizer = Qwen2Tokenizer.from_pretrained(str(folder))
        text = "<|im_start|>user\n" + "<image>\n" + "".join(f"<obj{k}><objfeat>" for k in range(len(boxes))) + "\n"
        text += question + "<|im_end|>\n<|im_start|>assistant\n"
        pieces, k = [], 0
        import re

        for chunk in re.split(r"(<image>|<objfeat>)", text):
            if chunk == "<image>":
                pieces.append(image_tokens)
            elif chunk == "<objfeat>":
                pieces.append(objects[k : k + 1])
                k += 1
            elif chunk:
                ids = torch.tensor(tokenizer.encode(chunk, add_special_tokens=False))
                pieces.append(state["model.embed_tokens.weight"][ids])
        llm = Qwen2ForCausalLM(
            Qwen2Config(**{k: v for k, v in config.items() if k not in ("architectures", "auto_map", "model_type")})
        )
        missing, unexpected = llm.load_state_dict({k: v for k, v in state.items() if k.startswith("model.")},
                                                  strict=False)  # fmt: skip
        assert not unexpected and missing == ["lm_head.weight"]
        llm.tie_weights()
        llm.eval()
        embeds = torch.cat(pieces)[None]
        first = llm(inputs_embeds=embeds).logits[0, -1]
        tokens = []
        logits = first
        for _ in range(steps):  # greedy, with the generation config's repetition penalty 1.05 and end tokens
            scores = logits.clone()
            for t in set(tokens):
                scores[t] = scores[t] * 1.05 if scores[t] < 0 else scores[t] / 1.05
            t = int(scores.argmax())
            if t in (2, 0):
                break
            tokens.append(t)
            embeds = torch.cat([embeds, state["model.embed_tokens.weight"][t][None, None]], 1)
            logits = llm(inputs_embeds=embeds).logits[0, -1]
    return image_tokens, objects, first, tokens


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)  # wider than tall: padded above and below
    boxes = [[2.0, 3.0, 20.0, 30.0], [30.5, 1.0, 55.0, 39.0], [10.0, 10.0, 12.0, 12.5]]
    return image, boxes


def test_the_released_layout_loads_and_computes_the_reference_forward_pass(folder, scene):
    image, boxes = scene
    perceiver = perceive.load(folder)
    assert type(perceiver).__name__ == "RexSeekPerceiver" and not (folder / "RAN").exists()
    model = perceiver.model
    assert (model.aux_size, model.clip_size) == (64, 28)
    want_image, want_objects, want_first, want_tokens = reference_answer(folder, image, boxes, QUESTION, steps=12)
    from perceive.models.rexseek.processing_rexseek import box_inputs, image_inputs, prompt_ids

    aux, clip = image_inputs(image, model.aux_size, model.clip_size)
    frames = box_inputs(np.array(boxes), image.shape[1], image.shape[0], model.aux_size)
    got_image, got_objects = model.encode(aux[None], clip[None], [frames])
    torch.testing.assert_close(got_image[0], want_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_objects[0], want_objects, atol=1e-4, rtol=1e-4)
    embeds = model.embed(prompt_ids(perceiver.tokenizer, QUESTION, len(boxes)), got_image[0], got_objects[0])
    logits, _ = model(embeds[None])
    torch.testing.assert_close(logits[0], want_first, atol=1e-4, rtol=1e-4)
    assert perceiver.generate(embeds, 12) == want_tokens
    [answer] = perceiver.ask_batch([image], [QUESTION], [boxes], max_new_tokens=12)
    assert answer.text == perceiver.tokenizer.decode(want_tokens, skip_special_tokens=False)
    assert [o.box for o in answer.objects] == [boxes[o.index] for o in answer.objects]


def test_answers_are_read_into_the_given_boxes(folder, scene):
    """A loaded model's text is parsed as RexSeek writes it; its indices name the boxes given."""
    image, boxes = scene
    perceiver = perceive.load(folder)
    perceiver.generate = lambda embeds, n: perceiver.tokenizer.encode(  # type: ignore[method-assign]
        "<ground>the person</ground><objects><obj2><obj0></objects>", add_special_tokens=False
    )
    answer = perceiver.ask(image, QUESTION, boxes=boxes)
    assert [(o.phrase, o.index, o.box) for o in answer.objects] == [
        ("the person", 2, boxes[2]),
        ("the person", 0, boxes[0]),
    ]
    with pytest.raises(ValueError, match="boxes you give"):
        perceiver.ask(image, QUESTION)
    with pytest.raises(ValueError, match="1 to 100 boxes"):
        perceiver.ask(image, QUESTION, boxes=[[0, 0, 1, 1]] * 101)


def test_perceive_ask_runs_a_rexseek_folder(folder, scene, tmp_path):
    image, boxes = scene
    Image.fromarray(image).save(tmp_path / "im.png")
    done = run_cli("ask", "--model", folder, tmp_path / "im.png", QUESTION, "--boxes", json.dumps(boxes), "--json")
    assert done.returncode == 0, done.stderr
    assert "answer" in json.loads(done.stdout) and not (folder / "RAN").exists()


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


def test_broken_folders_get_one_line_naming_the_file(folder, tmp_path):
    gone = _copy(folder, tmp_path / "gone")
    (gone / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"lists model-00002-of-00002\.safetensors, not in"):
        perceive.load(gone)
    cut = _copy(folder, tmp_path / "cut")
    shard = cut / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelFolderError, match="not a complete safetensors file"):
        perceive.load(cut)
    extra = _copy(folder, tmp_path / "extra")
    state = load_file(str(extra / "model-00002-of-00002.safetensors"))
    state["box_encoder.weight"] = torch.zeros(2)
    save_file(state, str(extra / "model-00002-of-00002.safetensors"))
    with pytest.raises(ModelFolderError, match=r"1 unexpected: box_encoder\.weight"):
        perceive.load(extra)
    pickled = _copy(folder, tmp_path / "pickled")
    for f in pickled.glob("model*"):
        f.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelFolderError, match=r"no model.safetensors.*found: .*pytorch_model.bin"):
        perceive.load(pickled)
    tokens = _copy(folder, tmp_path / "tokens")
    config = json.loads((tokens / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        k: v for k, v in config["added_tokens_decoder"].items() if v["content"] != "<obj7>"
    }
    (tokens / "tokenizer_config.json").write_text(json.dumps(config))
    added = json.loads((tokens / "added_tokens.json").read_text())
    del added["<obj7>"]
    (tokens / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(ModelFolderError, match="lacks RexSeek's tokens <obj7>"):
        perceive.load(tokens)
    assert not any((tmp_path / name / "RAN").exists() for name in ("gone", "cut", "extra", "pickled", "tokens"))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "upn_large.pth").write_bytes(b"a pickle, never opened")
    with pytest.raises(FileNotFoundError, match=r"config.json is missing \(found: upn_large.pth\)"):
        perceive.load(unknown)
