"""`blip-eval MODEL_DIR DATA`: accuracy of a build's FP16 and INT8 parts on your labeled data.

DATA is JSONL, one object per line, image paths relative to the file:

    {"image": "img/1.jpg", "question": "how many people?", "answers": ["2", "2", "two", ...]}
    {"image": "img/1.jpg", "captions": ["two people on a beach", ...]}

- VQA accuracy is the standard VQA metric: an answer is right in proportion to how many humans gave
  it, min(#matching / 3, 1), averaged over the ten leave-one-out subsets of the human answers, after
  the usual normalisation (lower case, punctuation, articles, number words to digits).
- Caption overlap is the unigram F1 of the generated caption with its best-matching reference.
No torch is needed: this runs on the serving runtime.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from backend.runtime.blip import Blip
from backend.runtime.manifest import ModelDirError

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def normalize_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation (the common subset of its rules)."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = _PERIOD.sub("", _PUNCT.sub("", text.replace("'", "")))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    pred = normalize_answer(prediction)
    humans = [normalize_answer(a) for a in human_answers]
    if len(humans) < 2:
        return min(sum(h == pred for h in humans) / 3, 1.0)
    scores = [
        min(sum(h == pred for h in others) / 3, 1.0)
        for others in itertools.combinations(humans, len(humans) - 1)
    ]
    return sum(scores) / len(scores)


def caption_overlap(prediction: str, references: list[str]) -> float:
    def f1(a: list[str], b: list[str]) -> float:
        common = sum((Counter(a) & Counter(b)).values())
        return 0.0 if not common else 2 * common / (len(a) + len(b))

    pred = normalize_answer(prediction).split()
    return max((f1(pred, normalize_answer(r).split()) for r in references), default=0.0)


@dataclass
class Labeled:
    image: Path
    questions: list[tuple[str, list[str]]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


def read_jsonl(path: str | Path) -> list[Labeled]:
    path = Path(path)
    by_image: dict[Path, Labeled] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = (path.parent / row["image"]).resolve()
            item = by_image.setdefault(image, Labeled(image))
            if "question" in row:
                item.questions.append((str(row["question"]), [str(a) for a in row["answers"]]))
            if "captions" in row:
                item.captions.extend(str(c) for c in row["captions"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: {e!r}; see `blip-eval --help` for the format") from None
    return list(by_image.values())


def evaluate(blip: Blip, data: list[Labeled], batch: int = 16) -> dict[str, float | int]:
    vqa, overlap = [], []
    for start in range(0, len(data), batch):
        chunk = data[start : start + batch]
        images = []
        for item in chunk:
            with Image.open(item.image) as im:
                images.append(im.convert("RGB"))
        embeds = blip.encode(images)
        if any(item.questions for item in chunk) and "answer" in blip.tasks:
            answers = blip.answer(embeds, [[q for q, _ in item.questions] for item in chunk])
            for item, row in zip(chunk, answers):
                vqa += [vqa_accuracy(a.text, humans) for a, (_, humans) in zip(row, item.questions)]
        with_captions = [i for i, item in enumerate(chunk) if item.captions]
        if with_captions:
            captions = blip.caption(embeds[with_captions])
            overlap += [caption_overlap(c.text, chunk[i].captions) for c, i in zip(captions, with_captions)]
    result: dict[str, float | int] = {"questions": len(vqa), "captions": len(overlap)}
    if vqa:
        result["vqa_accuracy"] = sum(vqa) / len(vqa)
    if overlap:
        result["caption_overlap"] = sum(overlap) / len(overlap)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="blip-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model_dir")
    p.add_argument("data", help="JSONL of images with questions and human answers and/or reference captions")
    p.add_argument("--device", default="CPU")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    try:
        data = read_jsonl(args.data)
        probe = Blip(args.model_dir, device=args.device, precision="fp16")
        results = {"fp16": evaluate(probe, data)}
        if "int8" in probe.manifest.precisions:
            results["int8"] = evaluate(Blip(args.model_dir, device=args.device, precision="int8"), data)
    except (OSError, ValueError, ModelDirError) as e:
        print(f"blip-eval: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'':<12}{'VQA accuracy':>14}{'caption overlap':>17}")
    for precision, r in results.items():
        vqa = f"{r['vqa_accuracy']:.2%}" if "vqa_accuracy" in r else "-"
        cap = f"{r['caption_overlap']:.2%}" if "caption_overlap" in r else "-"
        print(f"{precision.upper():<12}{vqa:>14}{cap:>17}")
    first = next(iter(results.values()))
    print(f"({first['questions']} questions, {first['captions']} captioned images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
