"""Learning curves: the validation score of ``cdsvae train --eval-every N`` against wall-clock
minutes, one line per run, drawn with Pillow into a PNG.

    python bench/learning_curves.py runs/cdsvae=C-DSVAE runs/dsvae=DSVAE -o curves.png

Each argument is a run folder (its ``metrics.jsonl``), optionally ``=LABEL``. The score is the
one ``train`` logged: the judge's accuracy with ``--judge``, else the probe's (see
``cdsvae.validation_score``); ``--key`` plots one of its parts instead (e.g.
``fixed_dynamic/action``), for every curve or, as ``RUN_DIR=LABEL@KEY``, for one. Also prints
the points as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def read_curve(run: Path, key: str = "score") -> list:
    """(minutes, validation[key]) of every validation record of a run, in order."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file; expected a run folder written by 'cdsvae train --eval-every N'")
    points = []
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "validation" in record:
            if key not in record["validation"]:
                raise SystemExit(f"error: {path}: no '{key}' in its validation records; expected one of "
                                 f"{', '.join(record['validation'])}")
            points.append((float(record["minutes"]), float(record["validation"][key])))
    if not points:
        raise SystemExit(f"error: {path}: no validation records; expected a run trained with --eval-every N")
    return points


def plot(curves: dict, out: Path, title: str, width: int = 720, height: int = 440) -> None:
    left, right, top, bottom = 64, 170, 36, 52
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    max_minutes = max(m for points in curves.values() for m, _ in points) or 1.0
    low = min(0.0, min(s for points in curves.values() for _, s in points))

    def to_pixel(minutes, score):
        x = left + (width - left - right) * minutes / max_minutes
        y = height - bottom - (height - top - bottom) * (score - low) / (1.0 - low)
        return x, y

    for k in range(6):                                          # score grid 0, 0.2, ..., 1
        score = low + (1.0 - low) * k / 5
        _, y = to_pixel(0, score)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{score:.1f}", fill="black")
    tick = next(step * 10 ** power for power in range(-2, 6) for step in (1, 2, 5)
                if max_minutes / (step * 10 ** power) <= 6)           # a round step, at most 6 ticks
    for k in range(int(max_minutes / tick) + 1):                # minute ticks
        x, _ = to_pixel(k * tick, low)
        draw.line([(x, height - bottom), (x, height - bottom + 4)], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{k * tick:g}", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 10), title, fill="black")
    draw.text(((width - right) // 2, height - 20), "minutes of training", fill="black")
    for index, (label, points) in enumerate(curves.items()):
        colour = COLOURS[index % len(COLOURS)]
        pixels = [to_pixel(m, s) for m, s in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for x, y in pixels:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        legend_y = top + 8 + 18 * index
        draw.line([(width - right + 12, legend_y + 6), (width - right + 32, legend_y + 6)], fill=colour, width=3)
        draw.text((width - right + 38, legend_y), label, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR, RUN_DIR=LABEL or RUN_DIR=LABEL@KEY")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="validation score (model selection) vs wall-clock minutes")
    parser.add_argument("--key", default="score", help="which logged validation entry to plot, e.g. "
                        "fixed_dynamic/action (default: the score model selection uses)")
    args = parser.parse_args(argv)
    curves = {}
    for spec in args.runs:
        folder, _, label = spec.partition("=")
        label, _, key = label.partition("@")                  # RUN_DIR=LABEL@KEY: a key per curve
        curves[label or Path(folder).name] = read_curve(Path(folder), key or args.key)
    plot(curves, args.output, args.title)
    for label, points in curves.items():
        print(json.dumps({"run": label, "minutes": [m for m, _ in points], "score": [s for _, s in points]}))


if __name__ == "__main__":
    sys.exit(main())
