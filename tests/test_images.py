import io

import numpy as np
import pytest
from PIL import Image

from perceive import images
from perceive.images import ImageError, load_image


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_formats_become_rgb_uint8(tmp_path):
    gray = Image.fromarray(np.full((4, 6), 100, dtype=np.uint8), mode="L")
    assert load_image(_png(gray)).shape == (4, 6, 3)
    rgba = Image.new("RGBA", (3, 3), (255, 0, 0, 0))  # fully transparent red
    assert (load_image(_png(rgba)) == 255).all()  # composited on white, not black
    deep = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    out = load_image(_png(deep))
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0 and out[0, 1, 0] == 255
    assert load_image(np.zeros((5, 5), dtype=np.float32)).shape == (5, 5, 3)
    p = tmp_path / "x.png"
    p.write_bytes(_png(Image.new("RGB", (7, 2))))
    assert load_image(p).shape == (2, 7, 3)


def test_exif_rotation_is_applied():
    im = Image.new("RGB", (6, 2), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue()).shape == (6, 2, 3)


@pytest.mark.parametrize("data, msg", [(b"", "empty"), (b"hello", "not an image"),
                                       (_png(Image.new("RGB", (50, 50)))[:60], "corrupt")])  # fmt: skip
def test_bad_bytes(data, msg):
    with pytest.raises(ImageError, match=msg):
        load_image(data)


def test_missing_file_and_decompression_bomb(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match="no such image"):
        load_image(tmp_path / "nope.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(_png(Image.new("RGB", (20, 20))))
    with pytest.raises(ImageError):
        load_image(np.zeros((0, 4, 3), dtype=np.uint8))
