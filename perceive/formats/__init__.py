"""Grounded text formats: one module per format, each with ``parse`` and ``render``.

- ``chatrex``: ``<ground>phrase</ground><objects><obj3></objects>`` (ChatRex, RexSeek)
- ``refvlm``:  ``<Phrase>..</Phrase>(<Unit>box</Unit>[0]<REF>)`` (REF-VLM's triplets)
- ``mvp``:     MVP-LM instructions and ``{caption}. The perception result is <PER>``
- ``coords``:  ``phrase [x0, y0, x1, y1]`` and Qwen2.5-VL ``bbox_2d`` JSON (the baseline)
"""

from perceive.formats import chatrex, coords, mvp, refvlm

__all__ = ["chatrex", "coords", "mvp", "refvlm"]
