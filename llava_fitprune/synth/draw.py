"""Render a scene description (shapes + one written digit) to a PIL image."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (240, 200, 20), "purple": (140, 50, 180), "orange": (250, 130, 10),
}
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
STAR_POINTS = 5
STAR_INNER = 0.45  # inner radius / outer radius


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * STAR_POINTS):
        rad = r if k % 2 == 0 else r * STAR_INNER
        ang = -math.pi / 2 + k * math.pi / STAR_POINTS
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, size: float,
               fill=None) -> None:
    """Draw `shape` filling a size x size box centred on (cx, cy), in `colour` (or a raw `fill` value)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {tuple(COLOURS)}")
    r = size / 2
    fill = COLOURS[colour] if fill is None else fill
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        draw.polygon(_star(cx, cy, r), fill=fill)


def draw_text(draw: ImageDraw.ImageDraw, text: str, cx: float, cy: float, size: int, fill=INK) -> None:
    """Write `text` centred on (cx, cy) with Pillow's bundled font (no system fonts)."""
    font = ImageFont.load_default(size=size)
    draw.text((cx, cy), text, fill=fill, font=font, anchor="mm")


def render(scene: dict, image_size: int) -> Image.Image:
    """scene: {"shapes": [{"shape", "colour", "cx", "cy", "size"}], "text": {"value", "cx", "cy", "size"}}."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene["shapes"]:
        draw_shape(draw, s["shape"], s["colour"], s["cx"], s["cy"], s["size"])
    t = scene.get("text")
    if t is not None:
        draw_text(draw, t["value"], t["cx"], t["cy"], t["size"])
    return img


def object_map(scene: dict, image_size: int) -> Image.Image:
    """Mode "L" image: 0 where background, k+1 where shape k is drawn, len(shapes)+1 on the text's ink."""
    img = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(img)
    for k, s in enumerate(scene["shapes"]):
        draw_shape(draw, s["shape"], s["colour"], s["cx"], s["cy"], s["size"], fill=k + 1)
    t = scene.get("text")
    if t is not None:
        draw_text(draw, t["value"], t["cx"], t["cy"], t["size"], fill=len(scene["shapes"]) + 1)
    return img
