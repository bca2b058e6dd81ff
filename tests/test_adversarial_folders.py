"""Broken model folders (issue 41): each is refused in one line naming the file, before anything is built or
loaded. The folders are copies of the shipped model, in its legacy format and as saved today, each broken in one
way; none may build the default configuration's 12 B parameters (a config ``{}`` once did, until killed at 24 GB).
"""

import copy
import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_runner import run_cli
from PIL import Image

import perceive
from perceive.models.chatrex.modeling_chatrex import ChatRexForConditionalGeneration
from perceive.models.chatrex.perceiver_chatrex import ChatRexPerceiver
from perceive.models.upn.configuration_upn import UpnConfig
from perceive.models.upn.modeling_upn import UpnModel
from perceive.perceiver import DEFAULT_MODEL, ModelFolderError, load
from perceive.tokenization import load_tokenizer

# a refusal reads a few headers and builds on the meta device; loading the shipped model takes about 1 s
FAST_S = 2.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The shipped folder (legacy format: ``perceive_retrieval``, old weight names) and the same model saved now."""
    shipped = perceive.load()
    new = tmp_path_factory.mktemp("saved") / "model"
    shipped.model.save_pretrained(new)
    shipped.tokenizer.save_pretrained(new)
    shipped.upn.save_pretrained(new / "upn")
    return {"legacy": DEFAULT_MODEL, "new": new}


def _edit_json(path: Path, change: Callable[[dict], object]) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _truncate(path: Path, size: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:size])


def _garbage(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(4096))


def _nested_too_deep(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def _more_tokens(folder: Path) -> None:
    tokenizer = load_tokenizer(folder)
    tokenizer.add_tokens(["unheard", "unseen"])
    tokenizer.save_pretrained(folder)


def _half(path: Path) -> None:
    _truncate(path, path.stat().st_size // 2)


def _one_byte_short(path: Path) -> None:
    _truncate(path, path.stat().st_size - 1)


def _main_type(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["model_type"]


# (name, the file broken, how, what the error says); ``how`` takes the broken file's path
BREAKS: list[tuple[str, str, Callable[[Path], object], str]] = [
    ("only its model_type", "config.json", lambda p: p.write_text(json.dumps({"model_type": _main_type(p.parent)})),
     "model.safetensors does not fit .*config.json: .*missing"),
    ("a string for a size", "config.json", lambda p: _edit_json(p, lambda c: c.update(low_resolution="big")),
     'field low_resolution: expected int, got "big"'),
    ("a number for text_config", "config.json", lambda p: _edit_json(p, lambda c: c.update(text_config=5)),
     "field text_config: expected dict | None, got 5"),
    ("a string inside text_config", "config.json",
     lambda p: _edit_json(p, lambda c: c["text_config"].update(hidden_size="big")), "field text_config: .*hidden_size"),
    ("a layer more than its weights", "config.json",
     lambda p: _edit_json(p, lambda c: c["text_config"].update(num_hidden_layers=6)),
     r"does not fit .*1\d* missing: language_model\.model\.layers\.5\."),
    ("a hundred thousand layers", "config.json",
     lambda p: _edit_json(p, lambda c: c["text_config"].update(num_hidden_layers=100_000)),
     r"describes 1000\d\d layers \(.*text_config\.num_hidden_layers 100000.*\), more than the \d+ tensors"),
    ("a wider language model", "config.json",
     lambda p: _edit_json(p, lambda c: c["text_config"].update(hidden_size=512)), "differently shaped"),
    ("more boxes than <objK> tokens", "config.json", lambda p: _edit_json(p, lambda c: c.update(max_objects=1000)),
     "field max_objects is 1000, not 1 to 100: each box is named by its own <objK> token"),
    ("no boxes", "config.json", lambda p: _edit_json(p, lambda c: c.update(max_objects=0)),
     "field max_objects is 0, not 1 to 100"),
    ("a placeholder past the vocabulary", "config.json",
     lambda p: _edit_json(p, lambda c: c.update(image_token_id=5000)), "field image_token_id is 5000, beyond the 366"),
    ("a placeholder on another token", "config.json", lambda p: _edit_json(p, lambda c: c["obj_token_ids"].reverse()),
     r"field obj_token_ids\[0\] is 365, but the tokenizer .* has <obj0> at 266"),
    ("an unknown layout", "config.json", lambda p: _edit_json(p, lambda c: c.update(layout="sideways")),
     "layout must be 'paper' or 'question_first'"),
    ("JSON nested too deeply", "config.json", _nested_too_deep, "not a configuration|names no model_type"),
    ("weights cut in half", "model.safetensors", _half, "is not a complete safetensors file"),
    ("weights one byte short", "model.safetensors", _one_byte_short, "is not a complete safetensors file"),
    ("weights of 100 bytes", "model.safetensors", lambda p: _truncate(p, 100), "is not a complete safetensors file"),
    ("garbage weights", "model.safetensors", _garbage, "is not a complete safetensors file"),
    ("no tokenizer at all", "tokenizer.json",
     lambda p: [p.unlink(), (p.parent / "tokenizer_config.json").unlink()], r"has no tokenizer \(tokenizer\.json\)"),
    ("no tokenizer.json", "tokenizer.json", lambda p: p.unlink(), r"has no tokenizer \(tokenizer\.json\)"),
    ("no tokenizer_config.json", "tokenizer_config.json", lambda p: p.unlink(), r"tokenizer_config\.json"),
    ("a tokenizer that is not JSON", "tokenizer.json", lambda p: p.write_text("{not json"),
     "is not a tokenizer that loads"),
    ("a tokenizer larger than the vocabulary", "tokenizer.json", lambda p: _more_tokens(p.parent),
     "the tokenizer has 368 tokens, but .*config.json gives the language model 366"),
    ("a UPN config of {}", "upn/config.json", lambda p: p.write_text("{}"), "model_type None is not 'perceive_upn'"),
    ("a UPN config of another model", "upn/config.json", lambda p: _edit_json(p, lambda c: c.update(model_type="bert")),
     "model_type 'bert' is not 'perceive_upn'"),
    ("a UPN config with only its model_type", "upn/config.json",
     lambda p: p.write_text('{"model_type": "perceive_upn"}'), "upn/model.safetensors does not fit .*upn/config.json"),
    ("a UPN size of the wrong type", "upn/config.json", lambda p: _edit_json(p, lambda c: c.update(head_dim="wide")),
     "field head_dim: expected int"),
    ("a UPN of a hundred thousand layers", "upn/config.json",
     lambda p: _edit_json(p, lambda c: c.update(depths=[1, 1, 100_000])), "describes 100002 layers"),
    ("a UPN config that is not JSON", "upn/config.json", lambda p: p.write_text("{"), "is not valid JSON"),
    ("UPN weights cut in half", "upn/model.safetensors", _half, "is not a complete safetensors file"),
]  # fmt: skip


@pytest.mark.parametrize("kind", ["legacy", "new"])
@pytest.mark.parametrize("name, broken, how, message", BREAKS, ids=[b[0] for b in BREAKS])
def test_a_broken_model_folder_is_refused_fast_in_one_line_naming_the_file(
    folders, tmp_path, kind, name, broken, how, message
):
    folder = tmp_path / "model"
    shutil.copytree(folders[kind], folder)
    how(folder / broken)
    start = time.perf_counter()
    with pytest.raises((ModelFolderError, FileNotFoundError), match=message) as e:
        load(folder)
    elapsed = time.perf_counter() - start
    text = str(e.value)
    assert "\n" not in text
    file = folder / broken
    assert str(file) in text or (broken.startswith("tokenizer") and str(file.parent) in text)  # the tokenizer's folder
    assert elapsed < FAST_S, f"{elapsed:.1f} s: was something large built?"


def test_a_legacy_folder_whose_config_says_chatrex_builds_nothing(tmp_path):
    """The legacy weights' old names and sizes against the default configuration: refused from the headers."""
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, folder)
    (folder / "config.json").write_text('{"model_type": "chatrex"}')
    start = time.perf_counter()
    fits = r"does not fit .*config\.json: \d+ missing: vision\.vit\..*unexpected: .*differently shaped"
    with pytest.raises(ModelFolderError, match=fits):
        load(folder)
    assert time.perf_counter() - start < FAST_S


def test_a_model_with_tied_embeddings_loads(micro_config, world_tokenizer, tmp_path):
    """Tied weights are saved once: the check of the weights' names takes either name as both."""
    config = copy.deepcopy(micro_config)
    config.text_config["tie_word_embeddings"] = True
    folder = tmp_path / "tied"
    ChatRexForConditionalGeneration(config).save_pretrained(folder)
    world_tokenizer.save_pretrained(folder)
    UpnModel(UpnConfig(**config.upn_config)).save_pretrained(folder / "upn")
    assert isinstance(load(folder), ChatRexPerceiver)


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, folder)
    (folder / "config.json").write_text('{"model_type": "perceive_retrieval"}')
    image = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), (120, 90, 30)).save(image)
    question = "Please detect circle in this image. Answer the question with object indexes."
    run = run_cli("ask", image, question, "--model", folder)
    assert run.returncode == 1 and run.stdout == ""
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("perceive ask: error: ")
    assert str(folder / "model.safetensors") in lines[0] and str(folder / "config.json") in lines[0]
