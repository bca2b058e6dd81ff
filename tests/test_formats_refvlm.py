import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perceive.formats import refvlm
from perceive.formats.refvlm import PlanEntry, TaskPlan, Triplet, UnitGroup


def test_issue_example():
    a = refvlm.parse("<Phrase>circles</Phrase>(<Unit>box</Unit>[0]<REF>[1]<REF>)")
    assert a.text == "circles"
    (t,) = a.triplets
    assert t.phrase == "circles" and t.units == ["box"] and t.ref_ordinals == [0, 1]
    assert t.groups[0].labels == (0, 1)
    assert a.problems == ()


def test_composite_units_and_ordinals_across_phrases():
    a = refvlm.parse(
        "There is <Phrase>a dog</Phrase>(<Unit>box, keypoint</Unit>[0]<REF>) and "
        "<Phrase>cats</Phrase>(<Unit>mask</Unit>[0]<REF>[1]<REF>[2]<REF>)."
    )
    assert a.text == "There is a dog and cats."
    dog, cats = a.triplets
    assert dog.units == ["box", "keypoint"] and dog.ref_ordinals == [0]
    assert cats.units == ["mask"] and cats.ref_ordinals == [1, 2, 3]
    assert a.text[slice(*cats.span)] == "cats"


def test_nested_phrases():
    a = refvlm.parse(
        "<Phrase><Phrase>dog</Phrase>(<Unit>box</Unit>[0]<REF>) in "
        "<Phrase>park</Phrase>(<Unit>mask</Unit>[0]<REF>)</Phrase>(<Unit>box</Unit>[0]<REF>)"
    )
    assert a.text == "dog in park"
    outer, dog, park = a.triplets
    assert (outer.phrase, outer.parent) == ("dog in park", None)
    assert (dog.phrase, dog.parent, dog.ref_ordinals) == ("dog", 0, [0])
    assert (park.phrase, park.parent, park.ref_ordinals) == ("park", 0, [1])
    assert outer.ref_ordinals == [2]


def test_task_plan_and_vrt_block():
    text = (
        "<Task>\nUnit decode (True). Class name, target unit and number:\n"
        "- Name: cats Unit: <Unit>box</Unit> Num: 2\n</Task>\n<v><VRT><VRT><VRT></v>\n"
        "<Phrase>cats</Phrase>(<Unit>box</Unit>[0]<REF>[1]<REF>)"
    )
    a = refvlm.parse(text)
    assert a.task == TaskPlan(True, (PlanEntry("cats", ("box",), 2),))
    assert a.vrt_count == 3
    assert a.text.strip() == "cats"
    assert a.problems == ()


def test_untagged_plan_lines_as_the_released_code_writes_them():
    # MacavityT/REF-VLM writes "Unit: box" as well as "Unit: <Unit>box</Unit>"
    text = (
        "<Task>\nUnit decode (True). Class name, target unit and number:\n"
        "- Name: circles Unit: box Num: 2\n</Task>\n"
        "<Phrase>circles</Phrase>(<Unit>box</Unit>[0]<REF>[1]<REF>)"
    )
    a = refvlm.parse(text)
    assert a.task == TaskPlan(True, (PlanEntry("circles", ("box",), 2),))
    assert a.problems == ()


def test_untagged_composite_unit_and_mixed_plan_lines():
    body = (
        "<Task>\nUnit decode (True). Class name, target unit and number:\n"
        "- Name: person Unit: box,  keypoint Num: 1\n"
        "- Name: red car Unit: <Unit>mask</Unit> Num: 3\n"
        "-  Name: dog Unit:mask Num:12\n"
        "</Task>\n"
    )
    a = refvlm.parse(body + "<Phrase>person</Phrase>(<Unit>box, keypoint</Unit>[0]<REF>)")
    assert a.task == TaskPlan(
        True,
        (
            PlanEntry("person", ("box", "keypoint"), 1),
            PlanEntry("red car", ("mask",), 3),
            PlanEntry("dog", ("mask",), 12),
        ),
    )
    assert a.problems == ()
    # render_plan still writes the tagged form, which parses back to the same plan
    assert "Unit: <Unit>box, keypoint</Unit> Num: 1" in refvlm.render_plan(a.task)
    assert refvlm.parse(refvlm.render_plan(a.task)).task == a.task


@pytest.mark.parametrize(
    "line",
    [
        "- Name: cats Unit: <Unit>box Num: 2",  # an unclosed tag
        "- Name: cats Unit: box Num: two",
        "- Name: cats Num: 2",
    ],
)
def test_malformed_plan_line_is_reported(line):
    a = refvlm.parse(f"<Task>\nUnit decode (True). Class name, target unit and number:\n{line}\n</Task>\n")
    assert a.task == TaskPlan(True, ())
    assert any("was not understood" in p for p in a.problems), a.problems
    assert any("lists none" in p for p in a.problems), a.problems


@pytest.mark.parametrize(
    "junk",
    [
        "- Name: " + "a " * 100_000,  # no "Unit:" at all
        "- Name: " * 25_000,  # every position starts a new entry
        "- Name: a Unit: <Unit>" * 9_100,  # many "Unit:" and no "</Unit>" or "Num:"
        "- Name: a" + " Unit: <Unit> Num:" * 11_200,  # one entry, its last "Num:" without a number
    ],
)
def test_huge_junk_plan_parses_fast_and_reports(junk):
    # the lazy-group regex this replaced took minutes on such a line
    text = f"<Task>\nUnit decode (True). Class name, target unit and number:\n{junk}\n</Task>\nok"
    assert len(junk) >= 200_000
    start = time.perf_counter()
    a = refvlm.parse(text)
    assert time.perf_counter() - start < 2.0
    assert a.task == TaskPlan(True, ()) and a.text == "ok"
    assert any("lists none" in p for p in a.problems)
    assert any("was not understood" in p for p in a.problems)
    assert all(len(p) < 200 for p in a.problems)  # the junk is not copied into the report


def test_plan_count_mismatch_is_reported():
    text = (
        refvlm.render_plan(TaskPlan(True, (PlanEntry("cats", ("box",), 3),)))
        + "<Phrase>cats</Phrase>(<Unit>box</Unit>[0]<REF>)"
    )
    assert any("task plan says 3" in p for p in refvlm.parse(text).problems)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("<Phrase>cat", "unclosed <Phrase>"),
        ("cat</Phrase>", "stray </Phrase>"),
        ("<Phrase>cat</Phrase>(<Unit>box</Unit>[0]", "not followed by <REF>"),
        ("<Phrase>cat</Phrase>(<Unit>box</Unit>)", "no <REF>"),
        ("<Phrase>cat</Phrase>(<Unit>blob</Unit>[0]<REF>)", "unknown unit"),
        ("a <REF> b", "stray <REF>"),
        ("(<Unit>box</Unit>[0]<REF>)", "does not follow a phrase"),
        ("<Task>\nUnit decode (True).", "unclosed <Task>"),
        ("<Phrase>cat</Phrase>(<Unit>box</Unit>[0]<REF> more", "not closed"),
    ],
)
def test_malformed_reports(text, needle):
    a = refvlm.parse(text)
    assert any(needle in p for p in a.problems), a.problems


def test_ref_token_positions_route_hidden_states():
    a = refvlm.parse("<Phrase>a</Phrase>(<Unit>box</Unit>[0]<REF>)<Phrase>b</Phrase>(<Unit>box</Unit>[0]<REF>[1]<REF>)")
    ids = [5, 9, 99, 7, 99, 3, 99]
    assert refvlm.ref_token_positions(ids, 99, a) == [[2], [4, 6]]
    with pytest.raises(ValueError, match="2 <REF> tokens"):
        refvlm.ref_token_positions([99, 99], 99, a)


_text = st.text(alphabet="abc xyz,.()[]!\n", max_size=8)


@st.composite
def flat_answers(draw):
    pieces = draw(
        st.lists(
            st.tuples(
                _text,
                _text,
                st.lists(
                    st.tuples(
                        st.lists(st.sampled_from(refvlm.KNOWN_UNITS), min_size=1, max_size=2, unique=True),
                        st.integers(1, 4),
                    ),
                    max_size=2,
                ),
            ),
            max_size=4,
        )
    )
    text, triplets, ordinal = "", [], 0
    for before, phrase, groups in pieces:
        text += before
        ugs = []
        for units, n in groups:
            ugs.append(UnitGroup(tuple(units), tuple(range(n)), tuple(range(ordinal, ordinal + n))))
            ordinal += n
        triplets.append(Triplet(phrase, (len(text), len(text) + len(phrase)), tuple(ugs)))
        text += phrase
    task = draw(st.one_of(st.none(), st.just(TaskPlan(False))))
    return text + draw(_text), triplets, task


@given(flat_answers())
def test_render_then_parse_is_identity(answer):
    text, triplets, task = answer
    parsed = refvlm.parse(refvlm.render(text, triplets, task))
    assert parsed.text == text
    assert list(parsed.triplets) == triplets
    assert [t.ref_ordinals for t in parsed.triplets] == [t.ref_ordinals for t in triplets]
    assert parsed.task == task


def test_nested_render_round_trip():
    text = "dog in park"
    trips = [
        Triplet("dog in park", (0, 11), (UnitGroup(("box",), (0,), (2,)),)),
        Triplet("dog", (0, 3), (UnitGroup(("box",), (0,), (0,)),), parent=0),
        Triplet("park", (7, 11), (UnitGroup(("mask",), (0,), (1,)),), parent=0),
    ]
    parsed = refvlm.parse(refvlm.render(text, trips))
    assert list(parsed.triplets) == trips


@given(
    st.lists(
        st.sampled_from(
            [
                "<Phrase>",
                "</Phrase>",
                "<Unit>",
                "</Unit>",
                "(",
                ")",
                "[0]",
                "[12]",
                "<REF>",
                "<Task>",
                "</Task>",
                "<v>",
                "</v>",
                "<VRT>",
                "box",
                ",",
                " ",
                "a",
            ]
        ),
        max_size=30,
    ).map("".join)
)
def test_adversarial_never_raises(text):
    a = refvlm.parse(text)
    all_ords = sorted(o for t in a.triplets for o in t.ref_ordinals)
    assert len(all_ords) == len(set(all_ords)) and all(0 <= o < a.num_refs for o in all_ords)


@given(st.text(max_size=200))
def test_random_never_raises(text):
    refvlm.parse(text)
