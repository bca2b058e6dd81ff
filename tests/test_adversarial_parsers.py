"""Parsers against hostile answers (issue 41, item 5): size, digits, depth, odd characters.

Every parser returns a result with problems and never raises, in time linear in the text (the bound here,
2 s for 200 KB, is generous: the linear parsers take a few tens of milliseconds, the quadratic ones took
seconds to minutes), and whatever it returns can be written as strict JSON. ``perceive parse`` exits 0 or 1
with at most one line on stderr, never a traceback.
"""

import json
import os
import random
import subprocess
import sys
import time

import pytest

from perceive.formats import chatrex, coords, mvp, refvlm

SECONDS = 2.0
SIZE = 200_000


def timed(parse, *args, **kwargs):
    """``parse(*args, **kwargs)``, asserting it took under SECONDS."""
    start = time.perf_counter()
    result = parse(*args, **kwargs)
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS, f"{parse.__module__}.{parse.__name__} took {elapsed:.2f} s"
    return result


def strict_json(result) -> str:
    """The result as strict JSON: raises on NaN or Infinity."""
    data = result.to_json() if hasattr(result, "to_json") else vars(result)
    return json.dumps(data, allow_nan=False)


def repeated(piece: str, size: int = SIZE) -> str:
    return piece * (size // len(piece) + 1)


def shuffled(tokens: list[str], seed: int, size: int = SIZE) -> str:
    """A deterministic jumble of a format's own markup, ``size`` characters or a little more."""
    rng = random.Random(seed)
    out, n = [], 0
    while n < size:
        out.append(rng.choice(tokens))
        n += len(out[-1])
    return "".join(out)


CHATREX_TOKENS = ["<ground>", "</ground>", "<objects>", "</objects>", "<g>", "</g>", "<o>", "</o>", "<obj1>", "<obj"]
CHATREX_TOKENS += ["77>", "None", "cat ", "\n", ",", "\x00", "\ud800", "<", ">", "9" * 50]
REFVLM_TOKENS = ["<Phrase>", "</Phrase>", "(", ")", "<Unit>", "</Unit>", "box", ", ", "[0]", "[", "]", "<REF>"]
REFVLM_TOKENS += [
    "<Task>",
    "</Task>",
    "\n",
    "- Name: ",
    "Unit: ",
    "Num: 2",
    "<v>",
    "</v>",
    "<VRT>",
    "dog ",
    "\x00",
    "\ud800",
]
COORDS_TOKENS = ["[", "]", "1", "-", ".", ", ", " ", "cat ", "\n", "99999", "\x00", "\ud800"]
JSON_TOKENS = ["[", "]", "{", "}", '"', "\\", '"bbox_2d": ', '"label": ', "1", ", ", ": ", "```json", "```", "\x00"]
MVP_TOKENS = [mvp.PER, mvp.RESULT_LEAD, mvp.WORD_TASK, "cat", ", ", ".", "\x00", "\ud800"]

PARSERS = {
    "chatrex": lambda t: chatrex.parse(t, num_boxes=10),
    "refvlm": refvlm.parse,
    "coords": coords.parse,
    "coords-bins": lambda t: coords.parse(t, units="bins"),
    "qwen-json": coords.parse_json,
    "mvp-response": mvp.parse_response,
    "mvp-prompt": mvp.parse_prompt,
}
LARGE_INPUTS = {
    "chatrex": [
        repeated("<ground>"),
        repeated("<ground>a</ground>"),
        repeated("<g>a</g><o><obj1></o>"),
        "<g>a</g><o>" + repeated("junk<obj1>"),
        repeated("<obj1>"),
        "<obj" + "1" * SIZE,
        repeated("<obj" + "1" * 1000),
        shuffled(CHATREX_TOKENS, 0),
        shuffled(CHATREX_TOKENS, 1),
    ],
    "refvlm": [
        repeated("<Phrase>"),
        repeated("</Phrase>"),
        "<Phrase>a</Phrase>(<Unit>" + repeated("<Unit>"),
        "<Phrase>a</Phrase>(<Unit>box</Unit>" + repeated("[0]") + ")",
        repeated("<Phrase>a</Phrase>(<Unit>box</Unit>[0]<REF>)"),
        "<v>" + repeated("junk<VRT>"),
        repeated(")"),
        "(" + " " * SIZE,
        "[" + "1" * SIZE,
        "<Task>\nUnit decode (True).\n" + repeated("- Name: a Unit: box Num: 1\n") + "</Task>",
        shuffled(REFVLM_TOKENS, 0),
        shuffled(REFVLM_TOKENS, 1),
    ],
    "coords": [
        repeated("[1, "),
        repeated("a [1,2,3,4]"),
        "[" + "1" * SIZE,
        "[" + " " * SIZE,
        "[1" + " " * SIZE + "," + " " * SIZE,
        repeated("[1."),
        repeated("x\n") + "[1, 2, 3, 4]",
        shuffled(COORDS_TOKENS, 0),
        shuffled(COORDS_TOKENS, 1),
    ],
    "qwen-json": [
        repeated("{}x"),
        repeated("{a"),
        repeated("```json"),
        "```json " + " " * SIZE,
        repeated('"'),
        '"' + repeated('\\"'),  # an escaped quote at every other character
        "[" * SIZE,
        '["' + "[" * SIZE + '"]',
        "[" + ",".join(['{"bbox_2d": [1, 2, 3, 4], "label": "cup"}'] * 5000) + "]",
        shuffled(JSON_TOKENS, 0),
        shuffled(JSON_TOKENS, 1),
    ],
    "mvp-response": [repeated(mvp.PER), repeated(mvp.RESULT_LEAD), shuffled(MVP_TOKENS, 0)],
    "mvp-prompt": [mvp.WORD_TASK + repeated("a,"), mvp.SENTENCE_TASK + repeated(" "), shuffled(MVP_TOKENS, 1)],
}
LARGE_INPUTS["coords-bins"] = LARGE_INPUTS["coords"]


@pytest.mark.parametrize(
    ("name", "i"), [(name, i) for name, inputs in LARGE_INPUTS.items() for i in range(len(inputs))]
)
def test_200_kb_of_markup_parses_in_linear_time(name, i):
    text = LARGE_INPUTS[name][i]
    assert len(text) >= SIZE
    result = timed(PARSERS[name], text)
    strict_json(result)
    # a problem per 3 characters of "{}x" or "[0]" is some 12 characters of report per character
    assert sum(len(p) for p in result.problems) < 20 * len(text), "the problems grow faster than the text"
    if name != "refvlm":  # refvlm quotes the text of a unit group whole (linear still: once or twice a group)
        assert all(len(p) < 300 for p in result.problems), "a problem copies the input"


@pytest.mark.parametrize("name", list(PARSERS))
@pytest.mark.parametrize("text", ["", "\x00", "\x00" * 1000, "\ud800", "\udfff<PER>\ud800", b"bytes", None])
def test_odd_input_gives_a_result_not_an_exception(name, text):
    result = PARSERS[name](text)
    if isinstance(text, str):
        strict_json(result)
    else:
        assert any("expected text" in p for p in result.problems)


def test_chatrex_40000_distinct_indices():
    # 11 s before (a list membership test per index)
    n = 40_000
    text = "<ground>dots</ground><objects>" + "".join(f"<obj{k}>" for k in range(n)) + "</objects>"
    a = timed(chatrex.parse, text, num_boxes=n)
    assert a.groups[0].indices == tuple(range(n)) and a.problems == ()


def test_chatrex_repeats_of_a_long_phrase_are_reported_without_copying_it():
    phrase = "a" * 100_000
    a = timed(chatrex.parse, f"<g>{phrase}</g><o>" + "<obj1>" * 20_000 + "</o>")
    assert a.groups[0].phrase == phrase and a.groups[0].indices == (1,)
    assert len(a.problems) == 19_999 and all("repeated" in p and len(p) < 120 for p in a.problems)


def test_chatrex_many_phrases_after_long_text():
    # each closing tag joined all the text read so far
    piece = "some words of a caption <g>a</g><o><obj1></o>"
    a = timed(chatrex.parse, repeated(piece), num_boxes=2)
    assert len(a.groups) == SIZE // len(piece) + 1 and a.problems == ()
    assert all(a.text[slice(*g.span)] == "a" for g in a.groups)


@pytest.mark.parametrize(
    ("text", "num_boxes", "expected"),
    [
        ("<obj" + "9" * 5000 + ">", None, "(5000 digits) in a bare reference is out of range"),
        ("<g>a</g><o><obj" + "9" * 5000 + "></o>", 4, "(5000 digits) in an objects block is out of range"),
        ("<g>a</g><o><obj" + "9" * 10 + "></o>", None, "(10 digits) in an objects block is out of range"),
    ],
)
def test_chatrex_index_of_thousands_of_digits_is_out_of_range(text, num_boxes, expected):
    a = timed(chatrex.parse, text, num_boxes)
    assert a.refs == () and all(g.indices == () for g in a.groups)
    assert any(expected in p for p in a.problems), a.problems
    assert all(len(p) < 120 for p in a.problems)


def test_chatrex_leading_zeros_do_not_count_as_digits():
    a = chatrex.parse("<g>a</g><o><obj" + "0" * 5000 + "7></o>", num_boxes=8)
    assert a.groups[0].indices == (7,) and a.problems == ()


def test_chatrex_reads_ascii_digits_only():
    a = chatrex.parse("<g>a</g><o><obj١></o>")  # an Arabic-Indic one: not an object token
    assert a.groups[0].indices == () and any("inside the objects block" in p for p in a.problems)


@pytest.mark.parametrize("digits", [400, 5000, 100_000])
@pytest.mark.parametrize("units", ["pixels", "bins"])
def test_coordinate_too_large_for_a_float_is_a_problem_not_infinity(digits, units):
    a = timed(coords.parse, "cat [1, 2, " + "9" * digits + ", 4] dog [1, 2, 3, 4]", units=units)
    assert [b.phrase for b in a.boxes] == ["dog"]
    assert any("too large for a float" in p and len(p) < 150 for p in a.problems), a.problems
    json.dumps(a.to_json(), allow_nan=False)


@pytest.mark.parametrize(
    ("coordinate", "expected"),
    [
        ("9" * 400, "too large for a float"),  # an int: float() raises OverflowError
        ("9" * 5000, "non-finite"),  # int() refuses more than 4,300 digits
        ("9" * 400 + ".5", "non-finite"),
        ("1e400", "non-finite"),
        ("NaN", "non-finite"),
        ("-Infinity", "non-finite"),
    ],
)
def test_qwen_json_coordinate_that_is_not_a_finite_float(coordinate, expected):
    text = f'[{{"bbox_2d": [1, 2, 3, {coordinate}], "label": "cat"}}, {{"bbox_2d": [1, 2, 3, 4], "label": "dog"}}]'
    a = timed(coords.parse_json, text)
    assert [b.phrase for b in a.boxes] == ["dog"]
    assert any(expected in p and len(p) < 150 for p in a.problems), a.problems
    json.dumps(a.to_json(), allow_nan=False)


def test_qwen_json_label_of_100000_nested_lists():
    # json.loads raised RecursionError, and so did the per-object fallback
    deep = "[" * 100_000 + "]" * 100_000
    text = f'[{{"bbox_2d": [1, 2, 3, 4], "label": "cup"}}, {{"bbox_2d": [5, 6, 7, 8], "label": {deep}}}]'
    a = timed(coords.parse_json, text)
    assert [(b.phrase, b.box) for b in a.boxes] == [("cup", (1.0, 2.0, 3.0, 4.0))]
    assert any("nested too deep" in p for p in a.problems), a.problems
    assert any("unreadable object" in p for p in a.problems), a.problems


@pytest.mark.parametrize("opening", ["[", "{", '{"a": ', '[{"a": '])
def test_qwen_json_deep_nesting_of_any_kind(opening):
    a = timed(coords.parse_json, opening * 100_000)
    assert a.boxes == () and a.problems


def test_qwen_json_depth_within_the_limit_and_brackets_in_strings_are_read():
    label = "[" * 1000 + '\\"]' + "{" * 1000  # in a string, escaped quote and all: not nesting
    nested = "[" * (coords.MAX_JSON_DEPTH - 2) + "1" + "]" * (coords.MAX_JSON_DEPTH - 2)  # 100 deep in all
    text = f'[{{"bbox_2d": [1, 2, 3, 4], "label": "{label}", "extra": {nested}}}]'
    a = timed(coords.parse_json, text)
    assert a.problems == () and a.boxes[0].phrase == json.loads(f'"{label}"')
    too_deep = text.replace(nested, "[" + nested + "]")
    assert any("nested too deep" in p for p in coords.parse_json(too_deep).problems)


def test_refvlm_deep_phrases_and_many_refs():
    a = timed(refvlm.parse, "<Phrase>" * 25_000 + "x" + "</Phrase>" * 25_000 + "(<Unit>box</Unit>[0]<REF>)")
    assert len(a.triplets) == 25_000 and a.triplets[0].groups and a.problems == ()
    b = timed(refvlm.parse, "<Phrase>dots</Phrase>(<Unit>box</Unit>" + "".join(f"[{k}]<REF>" for k in range(20_000)))
    assert b.triplets[0].groups[0].labels == tuple(range(20_000)) and b.num_refs == 20_000


@pytest.mark.parametrize(
    "text",
    [
        "<Phrase>a</Phrase>(<Unit>box</Unit>[" + "9" * 5000 + "]<REF>)",
        "<Task>\nUnit decode (True).\n- Name: a Unit: box Num: " + "9" * 5000 + "\n</Task>",
    ],
)
def test_refvlm_number_of_thousands_of_digits_is_a_problem(text):
    assert refvlm.parse(text).problems


# Each run starts Python and imports transformers (about 2 s): they are started together, once.
CLI_CASES = {
    "invalid utf-8": ("chatrex", b"a cat\n<g>caf\xe9</g><o><obj1></o>"),
    "5000-digit index": (
        "chatrex",
        ("caf\u00e9 <g>\u732b</g><o><obj0><obj" + "9" * 5000 + "></o> <obj" + "9" * 5000 + ">").encode(),
    ),
    "deep json label": (
        "qwen-json",
        ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": ' + "[" * 100_000 + "]" * 100_000 + "}]").encode(),
    ),
    "400-digit coordinate": ("coords", ("cat [1, 2, " + "9" * 400 + ", 4]").encode()),
}


@pytest.fixture(scope="module")
def cli_runs() -> dict[str, tuple[int, bytes, str]]:
    """``perceive parse`` on each of CLI_CASES: exit status, stdout, stderr. Stdout is declared ASCII, so that
    output which follows the locale instead of writing UTF-8 fails."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "perceive.cli", "parse", "--format", fmt],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for name, (fmt, _) in CLI_CASES.items()
    }
    runs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(CLI_CASES[name][1], timeout=120)
        runs[name] = (proc.returncode, out, err.decode("utf-8", "replace"))
    return runs


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_exits_0_or_1_with_at_most_one_line_and_no_traceback(cli_runs, name):
    returncode, _, stderr = cli_runs[name]
    assert returncode in (0, 1) and "Traceback" not in stderr and len(stderr.splitlines()) <= 1, stderr


def test_cli_refuses_invalid_utf8_with_one_line(cli_runs):
    returncode, stdout, stderr = cli_runs["invalid utf-8"]
    assert returncode == 1 and stdout == b""
    assert stderr == (
        "perceive parse: error: stdin is not UTF-8: byte 0xe9 at line 2, byte 7 (invalid continuation byte); "
        "convert it first, e.g. with iconv -t utf-8\n"
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [("5000-digit index", "out of range"), ("deep json label", "too deep"), ("400-digit coordinate", "too large")],
)
def test_cli_reports_problems_as_strict_utf8_json(cli_runs, name, expected):
    returncode, stdout, stderr = cli_runs[name]
    assert returncode == 0 and stderr == ""

    def refuse(constant):
        raise AssertionError(f"{constant} in the output")

    result = json.loads(stdout.decode("utf-8"), parse_constant=refuse)
    assert any(expected in p for p in result["problems"]), result["problems"]
    if name == "5000-digit index":
        assert result["text"].startswith("caf\u00e9 \u732b") and result["groups"][0]["indices"] == [0]
