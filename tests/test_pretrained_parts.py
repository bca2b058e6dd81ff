"""Models built from local pretrained parts (``perceive train --vision-tower DIR --convnext DIR --language-model DIR``):
tiny folders written here by transformers' ``save_pretrained`` in the hubs' layouts (a whole CLIP with its text half,
a SigLIP vision model with its pooling head, a ConvNeXt classifier, a Qwen2 with Qwen's tokenizer files and padded
embedding rows) fill every tensor of the parts they replace, the tokenizer keeps the folder's ids and gains perceive's
tokens, and a model trained from them loads and answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_rexseek import write_tokenizer  # Qwen's tokenizer files as released, a BPE learned from a corpus

import perceive
from perceive.models.pretrained_parts import PretrainedParts
from perceive.perceiver import ModelFolderError
from perceive.tokenization import OBJ_TOKENS, SPECIAL_TOKENS
from perceive.train.data import world_model_options
from perceive.train.trainer import build_model

CORPUS = ["Please detect the red circle and the person in a blue shirt in this image. True False (box, mask)\n"] * 40
PADDING_ROWS = 8  # Qwen's embedding tables have more rows than its tokenizer has tokens


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from transformers import (
        CLIPConfig,
        CLIPModel,
        ConvNextConfig,
        ConvNextForImageClassification,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 64, "patch_size": 16}  # fmt: skip
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    SiglipVisionModel(SiglipVisionConfig(**vision)).save_pretrained(root / "siglip")
    convnext = ConvNextConfig(hidden_sizes=[8, 16, 32], depths=[1, 1, 1], num_stages=3, num_labels=5)
    ConvNextForImageClassification(convnext).save_pretrained(root / "convnext")
    (root / "qwen").mkdir()
    size = write_tokenizer(root / "qwen", added_tokens=[], corpus=CORPUS)
    lm = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=size + PADDING_ROWS, max_position_embeddings=2048,
                     tie_word_embeddings=True)  # fmt: skip
    Qwen2ForCausalLM(lm).save_pretrained(root / "qwen")
    return {"clip": root / "clip", "siglip": root / "siglip", "convnext": root / "convnext", "qwen": root / "qwen"}


def chatrex_from(parts: PretrainedParts, tokenizer):
    return build_model("tiny", tokenizer, parts, **world_model_options(None, [["category"]]))


def test_the_folders_fill_every_tensor_of_the_parts_they_replace(folders):
    from transformers import AutoTokenizer

    parts = PretrainedParts(folders["clip"], folders["convnext"], folders["qwen"])
    tokenizer = parts.tokenizer()
    model = chatrex_from(parts, tokenizer)
    config = model.config
    # the folders' configurations replace the named size's; the ViT's input size is the model's low resolution
    assert config.low_resolution == 64 and config.image_grid == 4
    assert config.vision_config["model_type"] == "clip_vision_model" and config.vision_config["hidden_size"] == 32
    assert config.convnext_config["hidden_sizes"] == [8, 16, 32] and config.text_config["hidden_size"] == 64
    clip, convnext, qwen = tensors(folders["clip"]), tensors(folders["convnext"]), tensors(folders["qwen"])
    for key, value in model.vision.vit.state_dict().items():  # transformers 4 and the whole model: vision_model.*
        assert torch.equal(value, clip[f"vision_model.{key}"]), key
    for key, value in model.vision.convnext.state_dict().items():
        assert torch.equal(value, convnext[f"convnext.{key}"]), key
    lm = model.language_model.state_dict()
    for key, value in qwen.items():
        if key != "model.embed_tokens.weight":
            assert torch.equal(lm[key], value), key

    # the tokenizer keeps the folder's ids and gains perceive's tokens after them; the table grows to hold them
    original = AutoTokenizer.from_pretrained(str(folders["qwen"]))
    text = "Please detect the red circle in this image."
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    new = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert min(new) >= len(original) and config.text_config["vocab_size"] == len(tokenizer)
    table, read = model.language_model.get_input_embeddings().weight, qwen["model.embed_tokens.weight"]
    assert len(tokenizer) > len(read) > len(original)
    assert torch.equal(table[: len(original)], read[: len(original)])
    mean = read[: len(original)].mean(dim=0)
    for token in (OBJ_TOKENS[0], OBJ_TOKENS[99], "<image>"):  # a new row starts at the mean of the pretrained rows
        assert torch.allclose(table[tokenizer.convert_tokens_to_ids(token)], mean, atol=1e-6)
    assert model.language_model.get_output_embeddings().weight is table  # the folder's tied table stays tied


def test_a_siglip_tower_gives_the_image_tokens_without_its_pooling_head(folders):
    from transformers import SiglipVisionModel

    from perceive.models.mvp.configuration_mvp import MvpConfig
    from perceive.train.mvp import build_mvp_model, mvp_tokenizer

    tokenizer = mvp_tokenizer(["a red circle"])
    model = build_mvp_model("mvp-tiny", tokenizer, PretrainedParts(vision_tower=folders["siglip"]))
    assert isinstance(model.vision.vit, SiglipVisionModel) and not hasattr(model.vision.vit, "head")
    siglip = tensors(folders["siglip"])
    assert any(k.startswith("head.") for k in siglip)  # the folder's head is passed over
    for key, value in model.vision.vit.state_dict().items():
        assert torch.equal(value, siglip[key]), key
    tokens, _ = model.vision(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 256, 256))
    assert tokens.shape[1] == 16  # no class token: the 4 x 4 patches
    again = MvpConfig.from_dict(model.config.to_dict())  # a saved model rebuilds a SigLIP, not a CLIP
    assert type(again.vision()).__name__ == "SiglipVisionConfig"


def test_a_trained_model_from_local_parts_loads_and_answers(folders, tmp_path):
    from perceive.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                "refvlm-smoke",
                "--out",
                str(out),
                "--vision-tower",
                str(folders["clip"]),
                "--convnext",
                str(folders["convnext"]),
                "--language-model",
                str(folders["qwen"]),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out / "recipe.json").read_text())["parts"]["language_model"] == str(folders["qwen"])
    perceiver = perceive.load(out / "model")
    assert type(perceiver.tokenizer).__name__ == "Qwen2Tokenizer"
    # Qwen spells numbers digit by digit; TRP's counts are one token each, so they are added
    assert len(perceiver.tokenizer("12", add_special_tokens=False)["input_ids"]) == 1
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    answer = perceiver.ask(image, "Please detect the red circle in this image.")
    assert answer.text and "Ġ" not in answer.text  # decoded as Qwen decodes, not as byte-level tokens joined


def test_folders_that_do_not_fit_get_one_error_naming_what_was_found(folders, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"--vision-tower .* has no config.json \(found: nothing\)"):
        PretrainedParts(vision_tower=tmp_path / "absent")
    with pytest.raises(ModelFolderError, match="model_type 'convnext' is no vision tower"):
        PretrainedParts(vision_tower=folders["convnext"]).config_overrides()
    with pytest.raises(ModelFolderError, match="model_type 'clip' is not 'qwen2'"):
        PretrainedParts(language_model=folders["clip"]).config_overrides()

    pickled = shutil.copytree(folders["convnext"], tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match=r"no model.safetensors .*pytorch_model.bin.*\.bin and \.pth"):
        chatrex_from(PretrainedParts(convnext=pickled), mvp_world_tokenizer())

    # a tensor too many, one missing and one of another shape: each listed by name
    odd = shutil.copytree(folders["convnext"], tmp_path / "odd")
    weights = tensors(odd)
    weights["convnext.extra.weight"] = torch.zeros(2)
    del weights["convnext.layernorm.bias"]
    weights["convnext.layernorm.weight"] = torch.zeros(7)
    save_file(weights, str(odd / "model.safetensors"))
    with pytest.raises(ModelFolderError) as error:
        chatrex_from(PretrainedParts(convnext=odd), mvp_world_tokenizer())
    message = str(error.value)
    assert "1 missing: layernorm.bias" in message and "1 unexpected: convnext.extra.weight" in message
    assert "convnext.layernorm.weight [7] (the model's: [32])" in message

    from perceive.cli import main

    assert main(["train", "--config", "smoke", "--out", str(tmp_path / "run"), "--language-model",
                 str(tmp_path / "absent")]) == 1  # fmt: skip
    assert "--language-model" in capsys.readouterr().err


def mvp_world_tokenizer():
    from perceive.train.mvp import mvp_tokenizer

    return mvp_tokenizer(["a red circle"])


def test_a_checkpoint_of_tied_embeddings_reads_back(folders, tmp_path):
    from perceive.train.checkpoint import load_checkpoint, save_checkpoint

    parts = PretrainedParts(language_model=folders["qwen"])
    tokenizer = parts.tokenizer()
    model = chatrex_from(parts, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path, 1, model, optimizer, {})
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert "language_model.lm_head.weight" in f.keys()  # noqa: SIM118
    with torch.no_grad():
        model.language_model.get_input_embeddings().weight.zero_()
    load_checkpoint(path, model, optimizer)
    assert model.language_model.get_input_embeddings().weight.abs().sum() > 0
    assert model.language_model.get_output_embeddings().weight is model.language_model.get_input_embeddings().weight


def test_the_papers_sizes_take_their_parts_from_the_folders(folders):
    """``--config chatrex-7b`` (``mvp-phi``, ``refvlm-7b``) with the three folders: the parts are the folders', the
    rest the paper's (ChatRex's vocabulary index head and layout, MVP-LM's 300 + 100 queries, REF-VLM's decoders)."""
    from perceive.train.mvp import MVP_RECIPES, build_mvp_model
    from perceive.train.refvlm import ONE_TOKEN_CHOICES, REFVLM_RECIPES, REFVLM_TOKENS, build_refvlm_model
    from perceive.train.trainer import RECIPES

    parts = PretrainedParts(folders["siglip"], folders["convnext"], folders["qwen"])
    qwen = tensors(folders["qwen"])["model.layers.1.mlp.up_proj.weight"]
    chatrex = build_model(RECIPES["chatrex-7b"].model, parts.tokenizer(), parts,
                          **world_model_options(None, [["category"]]))  # fmt: skip
    assert (chatrex.config.layout, chatrex.config.index_head, chatrex.config.high_resolution) == ("paper", "vocab", 768)
    mvp = build_mvp_model(MVP_RECIPES["mvp-phi"].model, parts.tokenizer(["<PER>"]), parts)
    assert mvp.config.num_queries == 400 and mvp.config.low_resolution == 64
    trp_tokenizer = parts.tokenizer([*REFVLM_TOKENS, *ONE_TOKEN_CHOICES])
    refvlm = build_refvlm_model(REFVLM_RECIPES["refvlm-7b"].model, trp_tokenizer, parts)
    assert refvlm.config.decoder_layers == 6
    for model in (chatrex, mvp, refvlm):
        assert type(model.vision.vit).__name__ == "SiglipVisionModel"
        assert torch.equal(model.language_model.state_dict()["model.layers.1.mlp.up_proj.weight"], qwen)


def test_a_folder_defined_by_its_own_code_is_refused_without_running_it(tmp_path):
    """ChatRex-7B's release defines its model in Python files inside the folder (``auto_map``; its architecture is
    not in ChatRex's public code): perceive names that and never imports them."""
    remote = {"AutoModelForCausalLM": "modeling_chatrex.ChatRexForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatrex_7b", "auto_map": remote}))
    (tmp_path / "modeling_chatrex.py").write_text("open(__file__ + '.RAN', 'w').close()\n")
    with pytest.raises(ModelFolderError, match=r"defined by the code inside the folder.*never runs\); known: chatrex"):
        perceive.load(tmp_path)
    assert not list(tmp_path.glob("*.RAN"))
