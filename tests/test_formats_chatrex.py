import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perceive.formats import chatrex
from perceive.formats.chatrex import GroundedPhrase


def test_released_detection_answer():
    a = chatrex.parse(
        "<ground>red circle</ground><objects><obj3><obj7></objects>\n<ground>square</ground><objects><obj1></objects>",
        num_boxes=10,
    )
    assert a.text == "red circle\nsquare"
    assert a.groups == (GroundedPhrase("red circle", (3, 7), (0, 10)), GroundedPhrase("square", (1,), (11, 17)))
    assert a.problems == ()
    assert a.indices == [3, 7, 1]


def test_paper_spelling_and_inline_caption():
    a = chatrex.parse("A <g>man</g><o><obj26></o> rides <g>two horses</g><o><obj1><obj2></o>.", num_boxes=30)
    assert a.text == "A man rides two horses."
    assert [(g.phrase, g.indices) for g in a.groups] == [("man", (26,)), ("two horses", (1, 2))]
    assert a.text[slice(*a.groups[1].span)] == "two horses"
    assert a.problems == ()


def test_bare_references_stay_in_text():
    a = chatrex.parse("<obj0> is holding a cup and <obj2> is not.", num_boxes=3)
    assert a.refs == (0, 2)
    assert a.text == "<obj0> is holding a cup and <obj2> is not."
    assert a.groups == ()


def test_repeated_and_out_of_range_indices_are_dropped_and_reported():
    a = chatrex.parse("<ground>dogs</ground><objects><obj1><obj4><obj1><obj9></objects>", num_boxes=5)
    assert a.groups[0].indices == (1, 4)
    assert any("repeated" in p for p in a.problems)
    assert any("out of range" in p for p in a.problems)


def test_none_is_a_rejection_not_a_problem():
    a = chatrex.parse("<ground>purple star</ground><objects>None</objects>")
    assert a.groups == (GroundedPhrase("purple star", (), (0, 11)),)
    assert a.problems == ()
    assert chatrex.parse("<ground>x</ground><objects>none</objects>").problems == ()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("<ground>cat</ground><objects></objects>", "empty objects block"),
        ("<ground>cat</ground><objects><obj1>", "unclosed objects block"),
        ("<ground>cat", "unclosed phrase"),
        ("cat</ground>", "stray"),
        ("</objects>", "stray"),
        ("<ground>cat</ground> sat", "no objects block"),
        ("<objects><obj1></objects>", "without a grounded phrase"),
        ("<g>cat</g><o><obj1><o>", "instead of its closing tag"),
        ("<ground>cat</ground><objects><obj1> and <obj2></objects>", "inside the objects block"),
    ],
)
def test_malformed_answers_report_problems(text, needle):
    a = chatrex.parse(text, num_boxes=5)
    assert any(needle in p for p in a.problems), a.problems


def test_paper_typo_closing_tag_keeps_indices():
    a = chatrex.parse("<g>cat</g><o><obj1><obj2><o>")
    assert a.groups[0].indices == (1, 2)


def test_render_groups_and_spellings():
    assert chatrex.render_groups([("a", [1]), ("b", [])]) == (
        "<ground>a</ground><objects><obj1></objects>\n<ground>b</ground><objects>None</objects>"
    )
    assert chatrex.render_groups([("a", [1, 2])], spelling="paper") == "<g>a</g><o><obj1><obj2></o>"


def test_render_rejects_inconsistent_spans():
    with pytest.raises(ValueError, match="selects"):
        chatrex.render("a cat", [GroundedPhrase("dog", (1,), (2, 5))])
    with pytest.raises(ValueError, match="overlaps"):
        chatrex.render("a cat", [GroundedPhrase("a cat", (1,), (0, 5)), GroundedPhrase("cat", (1,), (2, 5))])


_word = st.text(alphabet="abcdefghij XYZ.,!?\n()[]", min_size=0, max_size=8)


@st.composite
def answers(draw):
    pieces = draw(st.lists(st.tuples(_word, _word, st.lists(st.integers(0, 99), unique=True, max_size=6)), max_size=5))
    tail = draw(_word)
    text, groups = "", []
    for before, phrase, indices in pieces:
        text += before
        groups.append(GroundedPhrase(phrase, tuple(indices), (len(text), len(text) + len(phrase))))
        text += phrase
    return text + tail, groups


@given(answers(), st.sampled_from(["released", "paper"]))
def test_render_then_parse_is_identity(answer, spelling):
    text, groups = answer
    parsed = chatrex.parse(chatrex.render(text, groups, spelling), num_boxes=100)
    assert parsed.text == text
    assert list(parsed.groups) == groups
    assert parsed.problems == ()


_PIECES = ["<ground>", "</ground>", "<objects>", "</objects>", "<g>", "</g>", "<o>", "</o>", "<obj1>", "<obj12>",
           "<obj999999999999>", "None", "<", ">", "obj", "a", " ", "\n"]  # fmt: skip


@given(st.lists(st.sampled_from(_PIECES), max_size=30).map("".join), st.one_of(st.none(), st.integers(0, 20)))
def test_adversarial_text_never_raises(text, num_boxes):
    a = chatrex.parse(text, num_boxes)
    for g in a.groups:
        assert 0 <= g.span[0] <= g.span[1] <= len(a.text)
        assert len(set(g.indices)) == len(g.indices)
        assert num_boxes is None or all(k < num_boxes for k in g.indices)


@given(st.text(max_size=200))
def test_random_text_never_raises(text):
    chatrex.parse(text, 5)


def test_cli_parse_prints_the_documented_json():
    out = subprocess.run(
        [sys.executable, "-m", "perceive.cli", "parse", "--format", "chatrex", "--num-boxes", "4"],
        input="<ground>cat</ground><objects><obj1><obj5></objects> and <obj2>",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(out)
    assert data == {
        "text": "cat and <obj2>",
        "groups": [{"phrase": "cat", "indices": [1], "span": [0, 3]}],
        "refs": [2],
        "problems": ["index 5 in an objects block is out of range (only 4 boxes)"],
    }


def test_cli_rejects_bad_arguments_with_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "perceive.cli", "parse", "--format", "chatrex", "--num-boxes", "x"],
        input="",
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
