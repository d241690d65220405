"""The bench's workload, shared by run.py and memory.py (no torch here): a pre-labeling task is a caption
and three questions about one image; an interactive question is typed into a question box."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

CAPTION_TOKENS, ANSWER_TOKENS = 20, 10  # forced: random weights would stop anywhere
QUESTIONS = ("what is in the picture?", "how many people are there?", "is it raining?")
TASK_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="caption" toName="image"/>
  <TextArea name="q1" toName="image" question="{}"/>
  <TextArea name="q2" toName="image" question="{}"/>
  <TextArea name="q3" toName="image" question="{}"/>
</View>""".format(*QUESTIONS)
# interactive mode: the annotator types a question into `ask`, BLIP answers into `answer`
ASK_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="ask" toName="image"/>
  <TextArea name="answer" toName="image" question="#ask"/>
</View>"""


def random_image(side: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth image of a camera's size: decodes to width x height x 3 bytes like a photo, but its
    JPEG stays small (noise at 12 MP would make a 10 MB file per task)."""
    small = np.random.default_rng(seed).integers(0, 256, (height // 64, width // 64, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def data_uri(image: Image.Image, kind: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buf.getvalue()).decode()
