import numpy as np
import pytest
from PIL import Image

from perceive.prompts import VisualPrompt, parse_prompt


def test_each_kind_parses_from_the_command_lines_form(tmp_path):
    assert parse_prompt("point:10,20").points == [(10.0, 20.0)]
    box = parse_prompt("box: 1, 2, 30.5, 40")
    assert box.kind == "box" and box.points == [(1.0, 2.0), (30.5, 40.0)]
    assert parse_prompt("scribble:1,1;5,5;9,2").points == [(1.0, 1.0), (5.0, 5.0), (9.0, 2.0)]
    mask = np.zeros((8, 10), dtype=np.uint8)
    mask[2:5, 3:7] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    parsed = parse_prompt(f"mask:{tmp_path / 'm.png'}")
    assert parsed.mask is not None and parsed.mask.sum() == 12 and parsed.mask.shape == (8, 10)
    parsed.check(10, 8)


@pytest.mark.parametrize("text, message", [
    ("dot:1,2", "KIND:VALUES"), ("point", "KIND:VALUES"), ("point:1", "x,y pairs"), ("point:1,2,3,4", "one x,y"),
    ("box:5,5,1,1", "x1 > x0"), ("box:1,2,3", "x,y pairs"), ("scribble:1,1", "at least two points"),
    ("point:a,b", "numbers"), ("point:nan,1", "finite"), ("mask:/no/such.png", "no such mask file"),
])  # fmt: skip
def test_bad_prompts_get_a_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt(text)


def test_a_prompt_must_fit_its_image(tmp_path):
    with pytest.raises(ValueError, match="outside the 64x32 image"):
        VisualPrompt("point", points=[(70, 5)]).check(64, 32)
    with pytest.raises(ValueError, match="mask prompt is 4x4; the image is 64x32"):
        VisualPrompt("mask", mask=np.ones((4, 4), dtype=bool)).check(64, 32)
    with pytest.raises(ValueError, match="empty"):
        VisualPrompt("mask", mask=np.zeros((4, 4), dtype=bool))
    (tmp_path / "not.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not an image"):
        parse_prompt(f"mask:{tmp_path / 'not.png'}")
