"""Synthetic pictures and questions about them, for the vision demo and the modality-routing benchmark: a scene is a
small grid whose cells hold nothing or one coloured shape; questions ask for counts, the shape at a position and a
shape's colour, each answered by one word.

`random_scene` and `questions` need nothing but Python; `draw` renders a scene with Pillow (a PNG per scene), and
`write_chat_dataset` writes the pictures and chat JSONL in the form `seekmoe sft` reads, the user turn holding
OpenAI-style parts — `{"type": "image_url", "image_url": {"url": "file:///..." | "data:image/png;base64,..."}}` and
`{"type": "text", "text": ...}` — and the assistant turn the answer (questions from `balanced_questions`, each
kind asked alike). benchmarks/modality_routing.py encodes the same scenes as one "image token" per cell instead of
pixels, so a text model can learn the task without a vision tower.

    python -m seekmoe.vision_demo_data data/shapes --scenes 500 --questions 3     # images/*.png + data.jsonl
"""

from __future__ import annotations

import base64
import io
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS_3X3 = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NOTHING = "nothing"


@dataclass(frozen=True)
class Scene:
    """A grid x grid picture: `cells[r * grid + c]` is None (empty) or (colour, shape)."""

    grid: int
    cells: tuple[tuple[str, str] | None, ...]

    def objects(self) -> list[tuple[int, str, str]]:
        """(cell index, colour, shape) of every object, in reading order."""
        return [(i, c[0], c[1]) for i, c in enumerate(self.cells) if c is not None]


def position_name(cell: int, grid: int) -> str:
    """How a question names a cell: "top left" ... "bottom right" on a 3 x 3 grid, "row R column C" otherwise."""
    if grid == 3:
        return POSITIONS_3X3[cell]
    return f"row {cell // grid + 1} column {cell % grid + 1}"


def number(n: int) -> str:
    """A count as one word: "zero" ... "nine", digits from 10 on."""
    return NUMBERS[n] if n < len(NUMBERS) else str(n)


def random_scene(rng: random.Random, grid: int = 3, min_objects: int = 1, max_objects: int = 4,
                 colours: tuple[str, ...] = tuple(COLOURS), shapes: tuple[str, ...] = SHAPES) -> Scene:
    """A scene of `min_objects`..`max_objects` objects of random colour and shape in distinct random cells."""
    if not 1 <= min_objects <= max_objects <= grid * grid:
        raise ValueError(f"objects {min_objects}..{max_objects}: expected 1 <= min <= max <= {grid * grid} cells")
    cells: list[tuple[str, str] | None] = [None] * (grid * grid)
    for cell in rng.sample(range(grid * grid), rng.randint(min_objects, max_objects)):
        cells[cell] = (rng.choice(colours), rng.choice(shapes))
    return Scene(grid, tuple(cells))


def questions(scene: Scene, rng: random.Random | None = None, n: int | None = None,
              colours: tuple[str, ...] = tuple(COLOURS), shapes: tuple[str, ...] = SHAPES) -> list[tuple[str, str]]:
    """(question, one-word answer) pairs the scene answers: how many objects of each colour and of each shape, what
    is at each cell, and the colour of every shape the scene holds once. With `rng` and `n`, n of them at random."""
    objects = scene.objects()
    pairs = [(f"how many {colour} shapes are there", number(sum(c == colour for _, c, _ in objects)))
             for colour in colours]
    pairs += [(f"how many {shape}s are there", number(sum(s == shape for _, _, s in objects))) for shape in shapes]
    pairs += [(f"what is at the {position_name(i, scene.grid)}", NOTHING if cell is None else cell[1])
              for i, cell in enumerate(scene.cells)]
    for shape in shapes:
        holding = [c for _, c, s in objects if s == shape]
        if len(holding) == 1:
            pairs.append((f"what colour is the {shape}", holding[0]))
    if rng is not None and n is not None:
        pairs = rng.sample(pairs, min(n, len(pairs)))
    return pairs


def question_kind(question: str) -> str:
    """"count", "position" or "colour": which template a question of `questions` comes from."""
    return "count" if question.startswith("how many") else "position" if question.startswith("what is") else "colour"


def balanced_questions(scene: Scene, rng: random.Random, n: int = 1) -> list[tuple[str, str]]:
    """Up to n distinct (question, answer) pairs, each of a kind drawn alike (count, position, colour; kinds the
    scene has), a position question about an occupied cell half the time. Drawn from all of `questions` alike, most
    would ask what is at an empty cell, and a model answering "nothing" without looking would score well."""
    by_kind: dict[str, list[tuple[str, str]]] = {"count": [], "position": [], "colour": []}
    for pair in questions(scene):
        by_kind[question_kind(pair[0])].append(pair)
    chosen = []
    while len(chosen) < n and any(by_kind.values()):
        pool = by_kind[rng.choice([k for k, v in by_kind.items() if v])]
        if pool is by_kind["position"] and rng.random() < 0.5:
            pool = [p for p in pool if p[1] != NOTHING] or pool
        pair = rng.choice(pool)
        chosen.append(pair)
        for pairs in by_kind.values():
            if pair in pairs:
                pairs.remove(pair)
    return chosen


def draw(scene: Scene, size: int = 96, background: tuple[int, int, int] = (245, 245, 245)):
    """The scene as a `size` x `size` RGB Pillow image: each object a filled shape centred in its cell."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    cell = size / scene.grid
    margin = 0.18 * cell
    for i, colour, shape in scene.objects():
        x0, y0 = (i % scene.grid) * cell + margin, (i // scene.grid) * cell + margin
        x1, y1 = x0 + cell - 2 * margin, y0 + cell - 2 * margin
        fill = COLOURS[colour]
        if shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def png_bytes(image) -> bytes:
    """A Pillow image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image) -> str:
    """A Pillow image as a `data:image/png;base64,...` URL."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def chat_record(image_url: str, question: str, answer: str) -> dict:
    """One SFT record: a user turn of an image part and a text part, and the assistant's answer."""
    text = question[0].upper() + question[1:] + "?"
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": text}]},
                         {"role": "assistant", "content": answer}]}


def write_chat_dataset(out: str | Path, n_scenes: int, questions_per_scene: int = 3, seed: int = 0, grid: int = 3,
                       max_objects: int = 4, size: int = 96, inline: bool = False) -> Path:
    """Draw `n_scenes` scenes into `out/images/NNNNN.png` and write `out/data.jsonl`: `questions_per_scene` chat
    records per scene (`balanced_questions`), each image referenced by a file:// URL (or, with `inline`, embedded
    as a data URL and no PNG written). Returns the JSONL path."""
    if n_scenes < 1 or questions_per_scene < 1:
        raise ValueError(f"n_scenes={n_scenes}, questions_per_scene={questions_per_scene}: expected at least 1 each")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    path = out / "data.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(n_scenes):
            scene = random_scene(rng, grid, 1, max_objects)
            image = draw(scene, size)
            if inline:
                url = data_url(image)
            else:
                png = out / "images" / f"{i:05d}.png"
                image.save(png, format="PNG")
                url = png.resolve().as_uri()
            for question, answer in balanced_questions(scene, rng, questions_per_scene):
                f.write(json.dumps(chat_record(url, question, answer)) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m seekmoe.vision_demo_data OUT [--scenes N] ...`: write a dataset (see `write_chat_dataset`)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m seekmoe.vision_demo_data", description=main.__doc__)
    p.add_argument("out", help="folder for data.jsonl and images/")
    p.add_argument("--scenes", type=int, default=200, help="pictures to draw (default 200)")
    p.add_argument("--questions", type=int, default=3, help="questions per picture (default 3)")
    p.add_argument("--grid", type=int, default=3, help="cells per side (default 3)")
    p.add_argument("--max-objects", type=int, default=4, help="objects per picture at most (default 4)")
    p.add_argument("--size", type=int, default=96, help="picture side in pixels (default 96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inline", action="store_true", help="embed each picture as a data URL instead of a PNG file")
    args = p.parse_args(argv)
    try:
        path = write_chat_dataset(args.out, args.scenes, args.questions, args.seed, args.grid, args.max_objects,
                                  args.size, args.inline)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
