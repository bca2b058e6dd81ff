import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perceive.formats import coords, mvp
from perceive.formats.coords import TextBox


def test_word_instruction_round_trip_and_spans():
    ins = mvp.word_instruction(["apple", "banana", "orange"])
    assert ins.text == "apple, banana, orange"
    assert [ins.text[slice(*s)] for s in ins.spans] == ["apple", "banana", "orange"]
    prompt = mvp.render_prompt(ins)
    assert prompt.startswith(mvp.WORD_TASK)
    assert mvp.parse_prompt(prompt) == ins
    assert mvp.parse_prompt(prompt + ".").categories == ins.categories


def test_sentence_instruction_round_trip():
    ins = mvp.sentence_instruction("the person holding a red cup")
    assert mvp.parse_prompt(mvp.render_prompt(ins)) == ins


def test_response_round_trip_and_problems():
    text = mvp.render_response("Two circles on grass")
    assert text == "Two circles on grass. The perception result is <PER>"
    r = mvp.parse_response(text)
    assert r.caption == "Two circles on grass" and r.per_offset == text.index("<PER>") and r.problems == ()
    assert mvp.parse_response("just words").problems
    assert "2 <PER>" in mvp.parse_response("x. The perception result is <PER><PER>").problems[0]


@pytest.mark.parametrize("bad", [[], [""], ["a,b"]])
def test_word_instruction_rejects_bad_categories(bad):
    with pytest.raises(ValueError):
        mvp.word_instruction(bad)


@given(
    st.lists(st.text(alphabet="abcxyz -", min_size=1, max_size=10).map(str.strip).filter(bool), min_size=1, max_size=6)
)
def test_word_round_trip_property(cats):
    ins = mvp.word_instruction(cats)
    assert mvp.parse_prompt(mvp.render_prompt(ins)) == ins


def test_quantization_documented_error_bound():
    size = (480, 640)
    for box in [(0, 0, 640, 480), (12.3, 40.7, 57.1, 88.9), (639.9, 479.9, 640, 480)]:
        q = coords.quantize(box, size)
        assert all(0 <= v <= 999 for v in q)
        back = coords.dequantize(q, size)
        for v, b, e in zip(box, back, (640, 480, 640, 480), strict=True):
            assert abs(v - b) <= e / 2000 + 1e-9
    assert coords.quantize((0, 0, 640, 480), size) == (0, 0, 999, 999)
    assert coords.dequantize((0, 0, 999, 999), (1000, 1000)) == (0.5, 0.5, 999.5, 999.5)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError):
        coords.quantize((0, 0, math.nan, 1), (10, 10))
    with pytest.raises(ValueError):
        coords.quantize((0, 0, 1, 1), (0, 10))


def test_parse_phrases_and_shared_phrase():
    a = coords.parse("red circle [12, 40, 57, 88]; squares [1, 2, 3, 4], [5, 6, 7, 8]")
    assert [(b.phrase, b.box) for b in a.boxes] == [
        ("red circle", (12, 40, 57, 88)),
        ("squares", (1, 2, 3, 4)),
        ("squares", (5, 6, 7, 8)),
    ]


def test_parse_reports_bad_boxes():
    a = coords.parse("x [5, 5, 1, 1] y [0, 0, 1200, 3] z [1, 2, 3", units="bins")
    assert a.boxes == ()
    assert [p.split()[0] for p in a.problems] == ["box", "box", "text"]
    assert "incomplete" in a.problems[2]
    assert coords.parse("x [0, 0, 700, 3]", size=(100, 100)).problems


@given(
    st.lists(
        st.tuples(st.sampled_from(["red circle", "cup", "a b"]), st.tuples(*[st.integers(0, 500)] * 4)), max_size=6
    )
)
def test_render_parse_round_trip(items):
    boxes = [TextBox(p, (min(a, c), min(b, d), max(a, c), max(b, d))) for p, (a, b, c, d) in items]
    assert list(coords.parse(coords.render(boxes)).boxes) == boxes
    assert list(coords.parse_json(coords.render_json(boxes)).boxes) == boxes


def test_json_truncated_and_malformed():
    good = '[{"bbox_2d": [1, 2, 3, 4], "label": "cup"}, {"bbox_2d": [5, 6, 7, 8], "label": "ball"}, {"bbox_2d": [1'
    a = coords.parse_json("```json\n" + good)
    assert [b.phrase for b in a.boxes] == ["cup", "ball"]
    assert a.problems
    b = coords.parse_json('[{"bbox_2d": [1, 2, "x", 4]}, {"bbox_2d": [1, 2]}, 7, {"bbox_2d": [4, 4, 1, 1]}]')
    assert b.boxes == () and len(b.problems) == 4


@given(st.text(max_size=200))
def test_never_raises(text):
    coords.parse(text)
    coords.parse_json(text)
    mvp.parse_prompt(text)
    mvp.parse_response(text)
