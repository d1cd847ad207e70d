"""The synthetic "shapes" image-caption dataset of sdbatch's built-in demo model (issue 14).

Each 64x64 RGB image holds one filled, anti-aliased shape on a plain background. Attributes:
shape (circle, axis-aligned square, triangle pointing up), shape colour and background colour
(two different colours of `COLORS`), size (bounding box about 40% or 70% of the side) and
position (a quadrant's centre, or the image centre; a large shape is always centred).

About 10% of the (shape, colour, background) triples are held out of the rows, chosen from the
seed so that no two held-out triples share a pair of attributes: every held-out combination is
new only as a whole, each of its pairs is seen in training. The table's Parquet key-value
metadata lists them (`read_metadata`). Row i depends only on (seed, i), so the first N rows of a
longer table are the N-row table, byte for byte.

The prompt grammar the model answers to, and that `parse_prompt` reads, is
"a [small|large] <colour> <shape> on a <colour> background[, <position>]".
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SIDE = 64  # image side, pixels
SUPERSAMPLE = 4  # shapes are drawn at SIDE * SUPERSAMPLE and the coverage downsampled (anti-aliasing)
SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES = {"small": 0.40, "large": 0.70}  # bounding-box side / image side
# bounding-box centre / image side
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
SIZE_JITTER = 0.06  # the drawn size varies by up to this fraction either way
POSITION_JITTER = 2.0  # and the centre by up to this many pixels in x and y
HELD_OUT_FRACTION = 0.1
P_LARGE = 1 / 3  # share of large (always centred) shapes among the rows
P_OMIT_SIZE = 0.3  # share of captions that leave out the size
P_OMIT_POSITION = 0.3  # ... and the position
METADATA_KEY = b"sdbatch.shapes"
FORMAT_VERSION = 1

Triple = tuple[str, str, str]  # (shape, colour, background)


@dataclass(frozen=True)
class Attributes:
    """What an image shows, or what a prompt asks for (None: the prompt does not say)."""

    shape: str
    color: str
    background: str
    size: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("shape", self.shape, SHAPES), ("color", self.color, COLORS),
                                     ("background", self.background, COLORS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.color == self.background:
            raise ValueError(f"the shape and the background must differ in colour, both are {self.color}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)} or None, got {self.size!r}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)} or None, got {self.position!r}")
        if self.size == "large" and self.position not in (None, "center"):
            raise ValueError(f"a large shape is always at the center, not {self.position}")

    @property
    def triple(self) -> Triple:
        return (self.shape, self.color, self.background)


# ---------------------------------------------------------------------------------------------
# triples and the held-out split


def all_triples() -> list[Triple]:
    """Every (shape, colour, background) with two different colours: 3 * 6 * 5 = 90, in a fixed order."""
    return [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if c != b]


def held_out_triples(seed: int) -> list[Triple]:
    """The round(10%) triples (9) kept out of the training rows of the dataset made with `seed`.

    Drawn from the seed in a fixed order, skipping any that shares (shape, colour), (shape,
    background) or (colour, background) with one already taken, so each pair of a held-out
    triple is seen in training. Sorted. Raises ValueError for a negative seed.
    """
    _check_seed(seed)
    triples = all_triples()
    want = round(HELD_OUT_FRACTION * len(triples))
    taken: list[Triple] = []
    for i in np.random.default_rng([seed, 0xFEED]).permutation(len(triples)):
        if not any(_shares_pair(triples[i], t) for t in taken):
            taken.append(triples[i])
            if len(taken) == want:
                break
    return sorted(taken)


def _shares_pair(a: Triple, b: Triple) -> bool:
    return sum(x == y for x, y in zip(a, b)) >= 2


def seen_triples(seed: int) -> list[Triple]:
    """The triples that the rows of the dataset made with `seed` use (all but the held-out ones)."""
    held = set(held_out_triples(seed))
    return [t for t in all_triples() if t not in held]


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


# ---------------------------------------------------------------------------------------------
# drawing


def shape_mask(shape: str, box: tuple[float, float, float, float], side: int = SIDE) -> np.ndarray:
    """Coverage of `shape` filling `box` = (x0, y0, x1, y1) in pixel units (pixel i spans [i, i+1)).

    Returns float32 (side, side) in [0, 1]: the shape drawn at SUPERSAMPLE times the size and
    downsampled with Lanczos (clipped to [0, 1]). The triangle points up with its base on the
    box's bottom edge; the circle is the ellipse inscribed in the box.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    k = SUPERSAMPLE
    x0, y0, x1, y1 = (v * k for v in box)
    big = Image.new("L", (side * k, side * k), 0)
    draw = ImageDraw.Draw(big)
    # Pillow fills the pixels whose centres lie inside; our edges are at pixel boundaries, so
    # the last pixel inside is x1 - 1 (for integer x1)
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    small = big.resize((side, side), resample=Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float32) / 255.0


def draw_image(shape: str, color: str, background: str, center: tuple[float, float], extent: float,
               side: int = SIDE) -> np.ndarray:
    """The picture: uint8 (side, side, 3), `shape` in `color` on `background`.

    center (x, y) and extent (the bounding box's side) in pixels. Every pixel is a mix of the
    two colours by the shape's coverage, so pixels wholly inside or outside have the exact RGB.
    """
    half = extent / 2
    alpha = shape_mask(shape, (center[0] - half, center[1] - half, center[0] + half, center[1] + half), side)
    fg = np.asarray(COLORS[color], dtype=np.float32)
    bg = np.asarray(COLORS[background], dtype=np.float32)
    return np.rint(bg + alpha[..., None] * (fg - bg)).astype(np.uint8)


def render(attrs: Attributes, rng: np.random.Generator | None = None, side: int = SIDE) -> np.ndarray:
    """uint8 (side, side, 3) of `attrs` (size None: small; position None: center).

    rng: jitter the size by up to SIZE_JITTER and the centre by up to POSITION_JITTER pixels
    (scaled to `side`); None draws the nominal geometry.
    """
    size = attrs.size or "small"
    fx, fy = POSITIONS[attrs.position or "center"]
    extent = SIZES[size] * side
    cx, cy = fx * side, fy * side
    if rng is not None:
        extent *= 1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        cx, cy = (v + rng.uniform(-POSITION_JITTER, POSITION_JITTER) * side / SIDE for v in (cx, cy))
    return draw_image(attrs.shape, attrs.color, attrs.background, (cx, cy), extent, side)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes (no metadata, so the same pixels give the same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# captions and prompts

_POSITION_PHRASES = {  # how a caption may say where: (suffix templates, prefix templates)
    "corner": ([", {p}", " in the {p}", " in the {p} corner", " at the {p}"], ["{p}: ", "in the {p} corner, "]),
    "center": ([", center", " in the center", " in the middle", ", centered"], ["centered: ", "in the middle, "]),
}


def caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A caption of `attrs` in one of several wordings, leaving out size and position at times.

    Every caption states shape, colour and background; the size word appears with probability
    1 - P_OMIT_SIZE, the position with 1 - P_OMIT_POSITION (when attrs has them).
    """
    size = attrs.size if attrs.size and rng.random() >= P_OMIT_SIZE else None
    position = attrs.position if attrs.position and rng.random() >= P_OMIT_POSITION else None
    thing = " ".join(w for w in (size, attrs.color, attrs.shape) if w)
    bg = attrs.background
    suffix = prefix = ""
    if position is not None:
        suffixes, prefixes = _POSITION_PHRASES["center" if position == "center" else "corner"]
        if rng.random() < 0.25:
            prefix = str(rng.choice(prefixes)).format(p=position)
        else:
            suffix = str(rng.choice(suffixes)).format(p=position)
    forms = [
        f"a {thing} on a {bg} background{suffix}",
        f"a {thing}{suffix} on a {bg} background",
        f"a {thing} on {bg}{suffix}",
        f"{thing}, {bg} background{suffix}",
        f"a {bg} background with a {thing}{suffix}",
        f"a {thing} against a {bg} background{suffix}",
        f"{bg} background, a {thing}{suffix}",
    ]
    if size is not None:  # the size word after the shape
        forms.append(f"a {attrs.color} {attrs.shape}, {size}, on a {bg} background{suffix}")
    return prefix + str(rng.choice(forms))


def prompt_text(attrs: Attributes) -> str:
    """The canonical prompt: "a [size ]<colour> <shape> on a <background> background[, <position>]"."""
    thing = " ".join(w for w in (attrs.size, attrs.color, attrs.shape) if w)
    where = f", {attrs.position}" if attrs.position else ""
    return f"a {thing} on a {attrs.background} background{where}"


_WORD = re.compile(r"[a-z]+")
_POSITION_RE = re.compile(r"\b(top|bottom)[\s-]+(left|right)\b|\b(center|centre|centered|centred|middle)\b")


def parse_prompt(text: str) -> Attributes:
    """Attributes named in a prompt of this dataset's grammar (any of its caption wordings).

    The shape colour is the last colour word before the shape word, the background the other
    one; "small"/"large" anywhere give the size; "top left" (also "top-left"), ..., "center"
    ("centre", "middle", "centered") the position. Raises ValueError naming the prompt when it
    has not exactly one shape word, two different colour words, at most one size and one position.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a string, got {type(text).__name__}")
    low = text.lower()
    words = _WORD.findall(low)

    def fail(why: str) -> ValueError:
        return ValueError(f"cannot read prompt {text!r}: {why}")

    shapes = [i for i, w in enumerate(words) if w in SHAPES]
    if len(shapes) != 1:
        raise fail(f"expected one of the words {', '.join(SHAPES)} once, found {len(shapes)}")
    colors = [(i, w) for i, w in enumerate(words) if w in COLORS]
    if len(colors) != 2 or colors[0][1] == colors[1][1]:
        raise fail(f"expected two different colour words of {', '.join(COLORS)}, found {[w for _, w in colors]}")
    before = [(i, w) for i, w in colors if i < shapes[0]]
    if not before:
        raise fail(f"no colour word before {words[shapes[0]]!r}")
    color = before[-1][1]
    background = next(w for _, w in colors if w != color)
    sizes = [w for w in words if w in SIZES]
    if len(sizes) > 1:
        raise fail(f"more than one size word: {sizes}")
    positions = set()
    for m in _POSITION_RE.finditer(low):
        positions.add(f"{m[1]} {m[2]}" if m[1] else "center")
    if len(positions) > 1:
        raise fail(f"more than one position: {sorted(positions)}")
    try:
        return Attributes(words[shapes[0]], color, background, sizes[0] if sizes else None,
                          positions.pop() if positions else None)
    except ValueError as e:
        raise fail(str(e)) from None


def evaluation_prompts(n: int, held_out: bool, seed: int = 0, data_seed: int = 0) -> list[str]:
    """n canonical prompts (`prompt_text`) of the seen or the held-out triples of `data_seed`.

    Triples cycle evenly (in an order drawn from `seed`); each prompt names a size with
    probability 2/3 and a position with probability about 1/2 (a large shape's only position is
    center). Deterministic given (n, held_out, seed, data_seed).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    _check_seed(seed)
    triples = held_out_triples(data_seed) if held_out else seen_triples(data_seed)
    rng = np.random.default_rng([seed, 0xE7A1, int(held_out)])
    order = [triples[i] for i in rng.permutation(len(triples))]
    out = []
    for i in range(n):
        size = [None, "small", "large"][rng.integers(3)]
        if size == "large":
            position = "center" if rng.random() < 0.5 else None
        else:
            position = None if rng.random() < 0.5 else list(POSITIONS)[rng.integers(len(POSITIONS))]
        out.append(prompt_text(Attributes(*order[i % len(order)], size, position)))
    return out


# ---------------------------------------------------------------------------------------------
# rows and the table


def row_attributes(seed: int, index: int, triples: list[Triple]) -> tuple[Attributes, np.random.Generator]:
    """Attributes of row `index` drawn from its own generator (seed, index), and that generator."""
    rng = np.random.default_rng([seed, index])
    triple = triples[rng.integers(len(triples))]
    if rng.random() < P_LARGE:
        size, position = "large", "center"
    else:
        size, position = "small", list(POSITIONS)[rng.integers(len(POSITIONS))]
    return Attributes(*triple, size, position), rng


def iter_rows(n: int, seed: int) -> Iterator[dict]:
    """The dataset's rows 0..n-1 as dicts: id, text, image (PNG bytes), and the attributes."""
    _check_seed(seed)
    triples = seen_triples(seed)
    for i in range(n):
        attrs, rng = row_attributes(seed, i, triples)
        image = render(attrs, rng)
        yield {"id": f"shapes-{seed}-{i:07d}", "text": caption(attrs, rng), "png": encode_png(image), **asdict(attrs)}


def huggingface_features() -> dict:
    """The `datasets` features of the table (stored under the b"huggingface" metadata key, so
    `datasets.load_dataset("parquet", ...)` decodes `image` to PIL images)."""
    string = {"dtype": "string", "_type": "Value"}
    cols = ["text", "id", "shape", "color", "background", "size", "position"]
    return {"info": {"features": {"image": {"_type": "Image"}, **{c: string for c in cols}}}}


def schema():
    """The Arrow schema: image struct<bytes: binary, path: string>, then string columns."""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema([("image", image), ("text", pa.string()), ("id", pa.string()),
                      *((c, pa.string()) for c in ("shape", "color", "background", "size", "position"))])


def build_table(n: int, seed: int, progress: bool = False):
    """The dataset as a pyarrow Table of n rows (see `schema`), with its key-value metadata.

    Metadata: b"sdbatch.shapes" -> JSON {"format", "seed", "rows", "held_out" (list of
    [shape, colour, background]), "colors", "sizes", "positions"}; b"huggingface" -> the features.
    """
    import pyarrow as pa
    from tqdm import tqdm

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"rows must be a positive integer, got {n!r}")
    rows = list(tqdm(iter_rows(n, seed), total=n, desc="drawing", unit="img", disable=not progress))
    cols = {
        "image": [{"bytes": r["png"], "path": f"{r['id']}.png"} for r in rows],
        **{c: [r[c] for r in rows] for c in ("text", "id", "shape", "color", "background", "size", "position")},
    }
    meta = {
        "format": FORMAT_VERSION,
        "seed": int(seed),
        "rows": n,
        "held_out": [list(t) for t in held_out_triples(seed)],
        "colors": {k: list(v) for k, v in COLORS.items()},
        "sizes": SIZES,
        "positions": list(POSITIONS),
    }
    table = pa.Table.from_pydict(cols, schema=schema())
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True),
                                          b"huggingface": json.dumps(huggingface_features())})


def write_dataset(out: str, n: int, seed: int, progress: bool = False) -> str:
    """Write the n-row table to `out` (a .parquet path or fsspec URI); returns the URI written.

    Row groups of 1024 rows, so readers (Ray Data) can split the file. Same (n, seed): same bytes.
    """
    import pyarrow.parquet as pq

    from sdbatch import storage

    fs, path = storage.url_to_fs(out)
    table = build_table(n, seed, progress)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=1024)
    storage.write_bytes(fs, path, buf.getvalue())
    return storage.to_uri(fs, path)


def read_metadata(uri: str) -> dict:
    """The b"sdbatch.shapes" metadata of a dataset file (held_out as a list of triples).

    Raises ValueError naming the file when it has none (not a shapes dataset).
    """
    from sdbatch import storage

    fs, path = storage.url_to_fs(uri)
    meta = storage.read_parquet_schema(fs, path).metadata or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{uri}: not a shapes dataset (no {METADATA_KEY.decode()} metadata)")
    out = json.loads(meta[METADATA_KEY])
    out["held_out"] = [tuple(t) for t in out["held_out"]]
    return out

