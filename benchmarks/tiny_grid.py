"""The README's picture of the embedded tiny model: prompts in, a labelled grid of what it draws out.

    python benchmarks/tiny_grid.py [--out docs/tiny_grid.png]

Rows of prompts: single shapes in combinations held out of training (fluxrt.shapes.HELDOUT), then two-shape and
two-tone-background prompts of the training distribution. Each prompt is drawn with seed 0 at the model's defaults
(64x64, its steps), scaled up 3x without smoothing, with its caption underneath.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

import fluxrt
from fluxrt.tiny import TRAINED

PROMPTS = (
    "a large red star at the center on a white background",
    "a large green circle at the top left on a gray background",
    "a large blue triangle at the bottom right on a white background",
    "a large yellow square at the top right on a black background",
    "a small purple circle at the bottom left on a gray and white background",
    "a large orange star at the top on a black background",
    "a large blue circle at the left and a small yellow star at the right on a white background",
    "a large purple square at the top left and a large orange triangle at the bottom right on a black and gray "
    "background",
)
SCALE, COLUMNS, CAPTION_HEIGHT = 3, 4, 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/tiny_grid.png"))
    args = parser.parse_args(argv)
    pipe = fluxrt.FluxPipeline.from_pretrained(TRAINED, device="cpu", compile=False, progress=False)
    images = pipe(list(PROMPTS), seed=0)
    side = images[0].width * SCALE
    rows = -(-len(images) // COLUMNS)
    grid = Image.new("RGB", (COLUMNS * side, rows * (side + CAPTION_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
        x, y = (i % COLUMNS) * side, (i // COLUMNS) * (side + CAPTION_HEIGHT)
        grid.paste(image.resize((side, side), Image.NEAREST), (x, y))
        draw.multiline_text((x + 3, y + side + 2), "\n".join(textwrap.wrap(prompt, 34)[:5]), fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
