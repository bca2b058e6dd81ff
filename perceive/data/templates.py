"""The question templates of each paradigm, as its paper or released code writes them.

ChatRex's are its supplementary Tab. 9; ``{obj}`` is one phrase, several joined by ``PHRASE_SEPARATOR``,
or ``<objK>`` references. Models read these to recognise a question's form (a grounding question's
phrases, say); the data's task builders fill them in.
"""

from __future__ import annotations

CHATREX_TEMPLATES = {  # ChatRex, supplementary Tab. 9
    "detect": "Please detect {obj} in this image. Answer the question with object indexes.",
    "caption_brief": "Please briefly describe this image and detect all the mentioned objects. "
    "Answer with grounded object indexes.",
    "caption_detailed": "Please provide a detailed description of the image and detect all the mentioned objects. "
    "Answer the question with grounded object indexes.",
    "region_category": (
        "What is the category name of {obj}? Answer the question with its category name in free format."
    ),
    "region_phrase": (
        "Can you provide me with a short phrase description of {obj}? Answer the question with short phrases."
    ),
    "region_brief": "Can you provide me with a brief description of {obj}? Answer the question with brief description.",
    "region_sentence": "Can you provide a one sentence description of {obj} in the image? "
    "Answer the question with one sentence description.",
    "count": "How many {obj} are there in this image? "
    "Answer the question with the number of objects and locate them with object indexes.",
    "conversation": "Answer the question in grounded format. Question: {question}",
}
PHRASE_SEPARATOR = "; "
