"""Write the bundled tiny calibration set: 12 generated images (shapes, digits, words) + questions.

    python eval_data/calibration/make_tiny.py [--out eval_data/calibration/tiny]

Deterministic: every image is drawn from a fixed table with PIL's default bitmap font (no RNG,
no system fonts), saved as PNG without metadata, so re-running writes byte-identical files.
The questions file is in LLaVA's eval format (`question_id`, `image`, `text`, `category`), the
format `llava.eval.model_vqa_loader` reads and `llava-fitprune fit --question-file` takes.
"""
from __future__ import annotations

import argparse
import json
import math
import os

from PIL import Image, ImageDraw

SIZE = 336  # LLaVA-1.5's input resolution (the processor resizes anything else)

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "black": (20, 20, 20), "white": (250, 250, 250),
}

# (background, [(shape, colour, x, y, size)], text written on the image or "", question, category)
SAMPLES = [
    ("white", [("circle", "red", 168, 168, 80)], "", "What colour is the circle?", "colour"),
    ("white", [("square", "blue", 90, 90, 50), ("square", "blue", 240, 240, 50)], "",
     "How many squares are there?", "count"),
    ("yellow", [("triangle", "green", 168, 150, 90)], "", "What shape is in the image?", "shape"),
    ("white", [("circle", "orange", 80, 250, 40), ("square", "purple", 250, 80, 40)], "",
     "Is the circle on the left or on the right?", "position"),
    ("black", [], "7", "What digit is written in the image?", "text"),
    ("white", [("star", "purple", 168, 168, 100)], "", "Describe this picture.", "describe"),
    ("blue", [("circle", "white", 100, 100, 30), ("circle", "white", 236, 100, 30),
              ("circle", "white", 168, 240, 30)], "", "How many circles are there?", "count"),
    ("white", [], "RED", "Read the text in the image.", "text"),
    ("green", [("square", "yellow", 168, 168, 110)], "", "What colour is the square?", "colour"),
    ("white", [("triangle", "black", 90, 260, 50), ("star", "red", 250, 90, 50)], "",
     "Which shape is at the top?", "position"),
    ("orange", [("circle", "blue", 168, 120, 60)], "42", "What number is written below the circle?", "text"),
    ("white", [("square", "green", 60, 60, 30), ("triangle", "red", 168, 168, 40),
               ("circle", "purple", 276, 276, 30)], "", "Answer with a single word: what is in the middle?",
     "shape"),
]


def _star(x: int, y: int, r: int) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):  # alternate outer / inner radius, 36 degrees apart
        rad = r if i % 2 == 0 else r * 0.45
        ang = math.pi / 2 + i * math.pi / 5
        pts.append((x + rad * math.cos(ang), y - rad * math.sin(ang)))
    return pts


def draw(background: str, shapes, text: str) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), COLOURS[background])
    d = ImageDraw.Draw(img)
    for shape, colour, x, y, r in shapes:
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif shape == "square":
            d.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        elif shape == "triangle":
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        elif shape == "star":
            d.polygon(_star(x, y, r), fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    if text:
        ink = COLOURS["white"] if background in ("black", "blue", "green") else COLOURS["black"]
        small = Image.new("RGB", (8 * len(text) + 4, 14), COLOURS[background])
        ImageDraw.Draw(small).text((2, 1), text, fill=ink)  # PIL's built-in bitmap font
        scale = min(8, (SIZE - 40) // small.width)
        big = small.resize((small.width * scale, small.height * scale), Image.NEAREST)
        top = SIZE - big.height - 20 if shapes else (SIZE - big.height) // 2
        img.paste(big, ((SIZE - big.width) // 2, top))
    return img


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny"))
    args = p.parse_args(argv)
    image_dir = os.path.join(args.out, "images")
    os.makedirs(image_dir, exist_ok=True)
    lines = []
    for i, (bg, shapes, text, question, category) in enumerate(SAMPLES):
        name = f"tiny_{i:02d}.png"
        draw(bg, shapes, text).save(os.path.join(image_dir, name), format="PNG", optimize=True)
        lines.append({"question_id": i, "image": name, "text": question, "category": category})
    with open(os.path.join(args.out, "questions.jsonl"), "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    print(f"wrote {len(lines)} questions and images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
