"""Pixels of the toy world: backgrounds, five drawn kinds of thing, three styles.

`render(attrs)` turns a `toyworld.Attributes` into a 64x64 RGB image. It is a pure function of
the attributes (their `seed` field drives the random bits of the background), so the same
attributes always give the same pixels. Everything is flat colours drawn with PIL plus a few
numpy array operations, so one image costs well under a millisecond. `render_mask(attrs)` is the
mask of the drawn thing (white) against its background (black), for masked training.

Sizes are written in units of `u`, the object's scale (about 10 px), around a centre (cx, cy), so
that every drawing shrinks, grows and moves as one piece.
"""

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels: the SDXL VAE downsamples by 8, so 64 px -> 8x8 latents
_YY, _XX = np.mgrid[:SIZE, :SIZE]  # pixel coordinates, made once
_STROKES = (_XX + 2 * _YY) * 0.8  # the phase of the painting's diagonal brush strokes

# One RGB value per colour word. Attribute lists in toyworld.py pick from these.
PALETTE = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 210, 40),
    "green": (40, 160, 60), "blue": (40, 90, 220), "purple": (140, 60, 190),
    "brown": (120, 70, 30), "black": (25, 25, 25), "white": (240, 240, 240),
    "grey": (150, 150, 150), "pink": (250, 175, 170), "tan": (210, 160, 110),
    "blonde": (250, 230, 150),
}


def _shade(rgb, f):
    """The colour darkened (f < 1) or lightened (f > 1), clipped to 0..255."""
    return tuple(int(min(255, max(0, c * f))) for c in rgb)


def _box(cx, cy, x0, y0, x1, y1, u):
    """A PIL box given in units of u around (cx, cy)."""
    return [cx + x0 * u, cy + y0 * u, cx + x1 * u, cy + y1 * u]


# ----------------------------------------------------------------------------- backgrounds

def _vertical(top, bottom, y0=0, y1=SIZE):
    """(y1-y0, SIZE, 3) float array fading from colour `top` to colour `bottom`."""
    t = np.linspace(0.0, 1.0, y1 - y0)[:, None, None]
    band = (1 - t) * np.array(top, float) + t * np.array(bottom, float)
    return np.broadcast_to(band, (y1 - y0, SIZE, 3)).copy()


def background(context, rng):
    """(SIZE, SIZE, 3) uint8 array for one context; `rng` places the random details."""
    if context == "plain":
        light = rng.uniform(0.92, 1.05)  # a studio backdrop: flat warm beige
        return np.full((SIZE, SIZE, 3), np.array([205, 190, 170]) * light, np.uint8)
    h = int(rng.integers(24, 34))  # horizon height, varied so no context is one fixed picture
    img = np.zeros((SIZE, SIZE, 3))
    if context == "beach":
        img[:h] = _vertical((120, 190, 250), (180, 225, 250), 0, h)
        img[h:h + 8] = (30, 110, 200)  # the sea
        img[h + 8:] = _vertical((240, 215, 150), (225, 195, 120), h + 8, SIZE)
    elif context == "snow":
        img[:h] = _vertical((175, 195, 215), (215, 225, 235), 0, h)
        img[h:] = _vertical((250, 252, 255), (225, 232, 242), h, SIZE)
        ys, xs = rng.integers(0, SIZE, (2, 40))  # falling snowflakes
        img[ys, xs] = 255
    elif context == "forest":
        img[:] = _vertical((40, 95, 45), (25, 70, 30))
        for x in rng.integers(0, SIZE - 4, 5):  # tree trunks
            img[: h + 10, x:x + 4] = (85, 55, 30)
        img[h + 10:] = (55, 120, 45)  # the grass
    elif context == "city":
        img[:h + 12] = _vertical((170, 180, 195), (200, 205, 210), 0, h + 12)
        x = -int(rng.integers(0, 8))
        while x < SIZE:  # a row of buildings with lit windows
            w, top = int(rng.integers(9, 15)), int(rng.integers(2, h))
            img[top:h + 12, max(x, 0):x + w - 1] = (85, 90, 100)
            img[top + 2:h + 10:4, max(x + 2, 0):x + w - 3:3] = (250, 225, 120)
            x += w
        img[h + 12:] = (70, 70, 75)  # the street
    elif context == "night":
        img[:] = _vertical((10, 15, 45), (30, 35, 80))
        ys, xs = rng.integers(0, h, 25), rng.integers(0, SIZE, 25)
        img[ys, xs] = (250, 250, 210)  # stars
        mx, my = int(rng.integers(6, 58)), int(rng.integers(4, 12))
        img[(_YY - my) ** 2 + (_XX - mx) ** 2 < 20] = (250, 240, 180)  # the moon
    else:
        raise ValueError(f"unknown context {context!r}")
    return img.astype(np.uint8)


# ----------------------------------------------------------------------------- things

def _person(d, a, cx, cy, u):
    """Shirt, hair, face, eyes, mouth, then glasses and hat on top (drawing order = depth)."""
    skin, hair = PALETTE[a.skin], PALETTE[a.hair]
    cy = cy - 4  # the head sits above the centre, the shirt runs off the bottom
    d.ellipse(_box(cx, cy, -1.8, 0.8, 1.8, 4.5, u), fill=PALETTE[a.color])  # shirt
    d.ellipse(_box(cx, cy, -1.4, -1.35, 1.4, 0.8, u), fill=hair)  # hair behind the head
    d.ellipse(_box(cx, cy, -1.0, -0.95, 1.0, 1.0, u), fill=skin)  # face
    d.chord(_box(cx, cy, -1.05, -1.3, 1.05, -0.1, u), 180, 360, fill=hair)  # fringe
    for side in (-1, 1):
        ex, ey = cx + side * 0.42 * u, cy + 0.05 * u
        d.ellipse([ex - 0.34 * u, ey - 0.25 * u, ex + 0.34 * u, ey + 0.25 * u], fill=PALETTE["white"])
        if a.eyes is not None:  # None when sunglasses cover them
            d.ellipse([ex - 0.2 * u, ey - 0.2 * u, ex + 0.2 * u, ey + 0.2 * u],
                      fill=PALETTE[a.eyes])
        if a.glasses == "sunglasses":
            d.ellipse([ex - 0.4 * u, ey - 0.3 * u, ex + 0.4 * u, ey + 0.3 * u], fill=(15, 15, 15))
        elif a.glasses == "glasses":
            d.ellipse([ex - 0.42 * u, ey - 0.34 * u, ex + 0.42 * u, ey + 0.34 * u],
                      outline=PALETTE[a.glasses_color], width=max(2, round(0.2 * u)))
    if a.glasses != "none":
        rgb = (15, 15, 15) if a.glasses == "sunglasses" else PALETTE[a.glasses_color]
        d.line([cx - 0.1 * u, cy, cx + 0.1 * u, cy], fill=rgb, width=max(1, round(0.15 * u)))
    d.line([cx - 0.3 * u, cy + 0.55 * u, cx + 0.3 * u, cy + 0.55 * u], fill=(120, 30, 40),
           width=max(1, round(0.12 * u)))  # mouth
    if a.hat != "none":
        rgb = PALETTE[a.hat_color]
        if a.hat == "round":  # a bowler: dome and brim
            d.chord(_box(cx, cy, -1.05, -1.95, 1.05, -0.35, u), 180, 360, fill=rgb)
        elif a.hat == "tall":  # a top hat: tall box and brim
            d.rectangle(_box(cx, cy, -0.75, -2.5, 0.75, -1.0, u), fill=rgb)
        elif a.hat == "pointy":  # a wizard's cone
            d.polygon([(cx - 1.15 * u, cy - 0.95 * u), (cx + 1.15 * u, cy - 0.95 * u),
                       (cx, cy - 2.8 * u)], fill=rgb)
        if a.hat in ("round", "tall"):
            d.rectangle(_box(cx, cy, -1.35, -1.2, 1.35, -0.9, u), fill=_shade(rgb, 0.75))


def _dog(d, a, cx, cy, u):
    fur = PALETTE[a.color]
    dark = _shade(fur, 0.6) if a.color != "black" else (70, 70, 70)
    d.line([cx - 1.4 * u, cy - 0.1 * u, cx - 2.2 * u, cy - 1.0 * u], fill=fur,
           width=max(2, round(0.35 * u)))  # tail
    for x in (-1.3, -0.7, 0.4, 0.9):  # legs
        d.rectangle(_box(cx, cy, x, 0.3, x + 0.35, 1.8, u), fill=fur)
    d.ellipse(_box(cx, cy, -1.7, -0.6, 1.3, 0.8, u), fill=fur)  # body
    d.ellipse(_box(cx, cy, 0.5, -2.0, 2.1, -0.4, u), fill=fur)  # head
    d.ellipse(_box(cx, cy, 0.35, -1.9, 0.85, -0.6, u), fill=dark)  # ear
    d.ellipse(_box(cx, cy, 1.5, -1.2, 2.4, -0.5, u), fill=_shade(fur, 1.15))  # snout
    d.ellipse(_box(cx, cy, 2.15, -1.15, 2.5, -0.8, u), fill=(20, 20, 20))  # nose
    d.ellipse(_box(cx, cy, 1.3, -1.6, 1.55, -1.35, u), fill=(20, 20, 20))  # eye


def _cup(d, a, cx, cy, u):
    rgb = PALETTE[a.color]
    d.ellipse(_box(cx, cy, -1.7, 1.0, 1.7, 1.6, u), fill=(235, 235, 230),
              outline=(150, 150, 150))  # saucer
    d.ellipse(_box(cx, cy, 0.6, -0.8, 1.7, 0.6, u), outline=_shade(rgb, 0.8),
              width=max(2, round(0.3 * u)))  # handle
    d.polygon([(cx - 1.0 * u, cy - 1.2 * u), (cx + 1.0 * u, cy - 1.2 * u),
               (cx + 0.8 * u, cy + 1.3 * u), (cx - 0.8 * u, cy + 1.3 * u)], fill=rgb)  # body
    d.ellipse(_box(cx, cy, -1.0, -1.45, 1.0, -0.95, u), fill=(90, 50, 25),
              outline=_shade(rgb, 1.2))  # coffee seen over the rim


def _car(d, a, cx, cy, u):
    rgb = PALETTE[a.color]
    d.polygon([(cx - 1.2 * u, cy - 0.2 * u), (cx - 0.7 * u, cy - 1.1 * u),
               (cx + 0.9 * u, cy - 1.1 * u), (cx + 1.5 * u, cy - 0.2 * u)], fill=rgb)  # cabin
    d.polygon([(cx - 0.95 * u, cy - 0.3 * u), (cx - 0.6 * u, cy - 0.9 * u),
               (cx + 0.8 * u, cy - 0.9 * u), (cx + 1.2 * u, cy - 0.3 * u)],
              fill=(160, 210, 240))  # windows
    d.line([cx + 0.1 * u, cy - 1.0 * u, cx + 0.1 * u, cy - 0.2 * u], fill=rgb,
           width=max(1, round(0.15 * u)))
    d.rounded_rectangle(_box(cx, cy, -2.3, -0.3, 2.3, 0.8, u), radius=0.3 * u, fill=rgb)
    d.rectangle(_box(cx, cy, 2.0, -0.1, 2.3, 0.2, u), fill=(250, 240, 120))  # headlight
    for x in (-1.3, 1.3):  # wheels with hubcaps
        d.ellipse(_box(cx, cy, x - 0.55, 0.3, x + 0.55, 1.4, u), fill=(20, 20, 20))
        d.ellipse(_box(cx, cy, x - 0.2, 0.65, x + 0.2, 1.05, u), fill=(170, 170, 170))


def _backpack(d, a, cx, cy, u):
    rgb = PALETTE[a.color]
    dark = _shade(rgb, 0.7) if a.color != "black" else (80, 80, 80)
    d.arc(_box(cx, cy, -0.5, -1.9, 0.5, -0.9, u), 180, 360, fill=dark,
          width=max(2, round(0.2 * u)))  # handle loop
    d.rounded_rectangle(_box(cx, cy, -1.2, -1.4, 1.2, 1.6, u), radius=0.5 * u, fill=rgb)
    d.rounded_rectangle(_box(cx, cy, -0.8, 0.2, 0.8, 1.3, u), radius=0.25 * u, fill=dark)
    d.line([cx - 0.6 * u, cy + 0.45 * u, cx + 0.6 * u, cy + 0.45 * u],
           fill=_shade(dark, 0.6), width=1)  # pocket zip
    for x in (-1.05, 0.8):  # side straps
        d.rectangle(_box(cx, cy, x, -1.1, x + 0.25, 1.2, u), fill=dark)


DRAW = {"person": _person, "dog": _dog, "cup": _cup, "car": _car, "backpack": _backpack}


# ----------------------------------------------------------------------------- styles

def _painting(img, rng):
    """Soft edges, warm canvas tint, diagonal brush strokes and a gilt frame."""
    f = img.astype(np.float32)
    f = (f + np.roll(f, 1, 0) + np.roll(f, 1, 1) + np.roll(f, (1, 1), (0, 1))) / 4  # soften
    f = 0.8 * f + 0.2 * np.array([235, 205, 150], np.float32)  # canvas tint
    f += 12 * np.sin(_STROKES + rng.uniform(0, 6.3))[..., None]  # brush strokes
    framed = np.empty_like(f)
    framed[:] = (175, 130, 50)  # a 3 px gilt frame...
    framed[3:-3, 3:-3] = (90, 60, 25)  # ...with a dark inner edge
    framed[4:-4, 4:-4] = f[4:-4, 4:-4]
    return np.clip(framed, 0, 255).astype(np.uint8)


def _pixelart(img):
    """4x4 blocks (a 16x16 picture scaled up) with 5 levels per channel."""
    blocks = img.reshape(SIZE // 4, 4, SIZE // 4, 4, 3).astype(np.float32).mean(axis=(1, 3))
    levels = np.round(blocks / 255 * 4) * (255 / 4)  # (16, 16, 3) quantised colours
    return np.repeat(np.repeat(levels, 4, 0), 4, 1).astype(np.uint8)


def _draw_thing(img, a):
    """Draw the thing of `a` onto PIL image `img`, at its place and size."""
    DRAW[a.kind](ImageDraw.Draw(img), a, SIZE / 2 + a.dx, SIZE / 2 + 4 + a.dy, 10.0 * a.scale)


def render(a):
    """The 64x64 RGB PIL image of attributes `a` (a toyworld.Attributes): a pure function."""
    rng = np.random.default_rng(a.seed)
    img = Image.fromarray(background(a.context, rng))
    _draw_thing(img, a)
    if a.style == "photo":
        return img
    arr = np.asarray(img)
    arr = _painting(arr, rng) if a.style == "painting" else _pixelart(arr)
    return Image.fromarray(arr)


def render_mask(a):
    """The 64x64 mode-"L" PIL mask of the thing `render(a)` draws: 255 on it, 0 on the background.

    Exact for photo style (painting and pixel art soften and move the edges): the thing is drawn
    on pure black, which no drawn colour is, and PIL draws without anti-aliasing.
    """
    img = Image.new("RGB", (SIZE, SIZE))
    _draw_thing(img, a)
    return Image.fromarray(np.where(np.asarray(img).any(-1), 255, 0).astype(np.uint8), "L")
