"""Do a ``--glyphs`` model's glyphs follow SM-MNIST's digits, each the same digit all along?

For a checkpoint trained with ``--glyphs 2`` on SM-MNIST, the test sequences are rendered again
with their digits' true centres (``data_prep.sm_mnist.generate``: the test split that
``cdsvae eval --seed S`` scores, seed S + 10000 from the test pool). From the posterior means, each glyph's
centre per frame (``GlyphDecoder.centres``) is matched to the nearest digit:

- ``centre_error_px``: the distance to that digit's centre (pixels);
- ``consistent``: the share of sequences where each glyph stays on one digit and the two glyphs on
  different digits, over the frames where the digits' centres are more than ``--apart`` pixels
  apart (closer, which is which cannot be told from the frame);
- ``switches_per_sequence``: how often a glyph moves to the other digit between two such frames;
- ``matched_consistent``: ``consistent`` for the glyphs as the posterior matched them to the places
  frame by frame (``Encoding.glyph_order``): glyph k at the place it takes in each frame. This is
  what s_k reads, so it says how often the matching keeps each glyph's glimpses on one digit;
- with ``--judge``: the judge's accuracy of both digits at once on the reconstructions (posterior
  means, each glyph drawn at the place the posterior matched it to: ``Encoding.glyph_order``),
  over all sequences, the consistent ones and the others; ``both_digits_real``: the judge on the
  test videos themselves; with two glyphs, ``both_digits_drawn_apart``: each sequence's two glyphs
  (drawn from the posterior mean of s) placed apart, in the top-left and bottom-right quarters of
  every frame where they cannot overlap, beside ``real_digits_apart``: test digits placed the same
  way (what the judge manages on such frames). Drawn apart right but reconstructed wrong: the
  placing or the overlaps; drawn apart wrong: the digits' identity in s and in the drawing.
  ``per_digit``: for each digit, the share of its appearances (as either head's digit) judged
  right, in the reconstructions, drawn apart and real apart. ``both_digits_by_overlap``: both
  digits right in the test videos themselves and in their reconstructions, by the share of the
  sequence's frames in which the digits' centres are closer than ``--apart`` pixels (``by_overlap``).
- with ``--judge`` and two glyphs, ``both_digits_along``: where fixed-static generations lose
  their pairs, the drawings or the prior's paths. Both digits right for pairs of real test-pool
  digits (random pairs, ``real_along``) and for each sequence's two glyphs (``glyphs_along``),
  each drawn along the test videos' true paths and along the prior's draws (z_1:T ~ p(z),
  ``prior_paths``: glyph k at place k, as ``generate`` draws them). The glyphs along the prior's
  draws are the fixed-static protocol of ``cdsvae eval``.

Since the nineteenth session the model matches the glyphs to z_t's places frame by frame
(``cdsvae.match_glyphs``), so a place that changes digits no longer mixes two digits in s;
``consistent`` still says how often z_t's places keep theirs.

    python bench/glyph_tracking.py --ckpt RUN/last.pt --data-dir MNIST --judge judge_mm32.pt [--refine-steps N]

The posterior means are ``cdsvae.CDSVAE.encode``'s: refined by the checkpoint's ``refine_steps``,
or by ``--refine-steps N`` (0: the encoder's means).

bench/RESULTS.md (nineteenth session): z_t's places exchange the digits where the digits overlap.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cdsvae  # noqa: E402


def tracking(centres: np.ndarray, trajectories: np.ndarray, apart: float = 6.0) -> dict:
    """``centres`` (N, T, K, 2) of the glyphs and ``trajectories`` (N, T, D, 2) of the digits, in
    pixels: per sequence whether the glyphs track the digits consistently (see the module's
    docstring), the nearest-digit distance and the switches. Returns arrays over sequences."""
    distance = np.linalg.norm(centres[:, :, :, None] - trajectories[:, :, None], axis=-1)   # (N, T, K, D)
    nearest = distance.argmin(-1)
    digits_apart = np.linalg.norm(trajectories[:, :, 0] - trajectories[:, :, 1], axis=-1) > apart
    consistent = np.zeros(len(centres), dtype=bool)
    for n, (chosen, seen) in enumerate(zip(nearest, digits_apart)):
        chosen = chosen[seen]
        consistent[n] = len(chosen) > 0 and bool((chosen == chosen[0]).all()) and len(set(chosen[0])) == len(chosen[0])
    both_seen = digits_apart[:, 1:] & digits_apart[:, :-1]
    switches = ((nearest[:, 1:] != nearest[:, :-1]).any(-1) & both_seen).sum(1)
    return {"consistent": consistent, "switches": switches, "error": distance.min(-1)}


APART = torch.tensor([[-0.5, -0.5], [0.5, 0.5]])   # glyph centres in [-1, 1]: the frame's diagonal quarters


@torch.no_grad()
def drawn_apart(model: cdsvae.CDSVAE, static: torch.Tensor, frames: int) -> torch.Tensor:
    """(N, T, C, H, W): the two glyphs of each s (N, Ds) placed at ``APART`` in all T frames."""
    decoder = model.frame_decoder
    glyphs = decoder.drawn(static)                                   # (N K, C, g, g)
    placed = decoder.placed(glyphs, APART.repeat(len(static), 1))
    frame = torch.sigmoid(decoder.union(placed))
    return frame[:, None].expand(-1, frames, -1, -1, -1)


def real_apart(images: np.ndarray, labels: np.ndarray, count: int, size: int, frames: int, seed: int = 0):
    """``count`` videos of two pool digits (random pairs) standing still at ``APART``, as uint8
    (N, T, H, W, 1), and their labels (digit_low, digit_high)."""
    from data_prep import sm_mnist

    rng = np.random.default_rng(seed)
    digits = sm_mnist._resize(images, size // 2)
    pairs = rng.integers(len(digits), size=(count, 2))
    frame = np.zeros((count, size, size), dtype=np.uint8)
    half = size // 2
    frame[:, :half, :half] = digits[pairs[:, 0]]
    frame[:, half:, half:] = digits[pairs[:, 1]]
    videos = np.repeat(frame[:, None, :, :, None], frames, axis=1)
    return videos, {"digit_low": labels[pairs].min(1), "digit_high": labels[pairs].max(1)}


def heads_right(judge, frames: torch.Tensor, labels: dict) -> np.ndarray:
    """(N, 2): whether the judge gets digit_low and digit_high of each video right."""
    judged = cdsvae.judge_probabilities(judge, frames)
    return np.stack([judged[f].argmax(1) == labels[f] for f in ("digit_low", "digit_high")], axis=1)


def per_digit(right: np.ndarray, labels: dict) -> dict:
    """The share of each digit's appearances (as digit_low or digit_high) judged right."""
    digits = np.stack([labels["digit_low"], labels["digit_high"]], axis=1)
    return {int(d): round(float(right[digits == d].mean()), 3) for d in np.unique(digits)}


def real_along(images: np.ndarray, labels: np.ndarray, paths: np.ndarray, size: int, seed: int = 0):
    """Videos (N, T, H, W, 1) uint8 of two pool digits (random pairs) drawn as the generator draws
    them, digit k with its centre at ``paths[n, t, k]`` (pixels, x then y; rounded to whole pixels
    and kept inside the frame), and their labels (digit_low, digit_high)."""
    from data_prep import sm_mnist

    rng = np.random.default_rng(seed)
    digits = sm_mnist._resize(images, size // 2)
    pairs = rng.integers(len(digits), size=(len(paths), 2))
    corners = np.clip(np.rint(paths - size / 4), 0, size // 2).astype(int)     # top-left corners
    videos = np.zeros((*paths.shape[:2], size, size), dtype=np.uint8)
    for n, t, k in np.ndindex(*paths.shape[:3]):
        x, y = corners[n, t, k]
        canvas = videos[n, t, y:y + size // 2, x:x + size // 2]
        np.maximum(canvas, digits[pairs[n, k]], out=canvas)
    return videos[..., None], {"digit_low": labels[pairs].min(1), "digit_high": labels[pairs].max(1)}


@torch.no_grad()
def glyphs_along(model: cdsvae.CDSVAE, static: torch.Tensor, paths: np.ndarray) -> torch.Tensor:
    """(N, T, C, H, W): the K glyphs of each s (N, Ds) drawn with glyph k's centre at
    ``paths[n, t, k]`` (pixels, x then y), as the decoder draws them (pixel probabilities)."""
    decoder, size = model.frame_decoder, model.cfg.frame_shape[-1]
    N, T, K = paths.shape[:3]
    glyphs = decoder.drawn(static).view(N, 1, K, *decoder.glyph_shape).expand(N, T, -1, -1, -1, -1)
    centres = torch.as_tensor(paths, dtype=torch.float32).flatten(0, 2) / size * 2 - 1
    frames = torch.sigmoid(decoder.union(decoder.placed(glyphs.flatten(0, 2), centres)))
    return frames.view(N, T, *model.cfg.frame_shape)


def place_pixels(model: cdsvae.CDSVAE, dynamic: torch.Tensor) -> torch.Tensor:
    """(B, T, K, 2): the centres of z_t's K places for z (B, T, Dz), in pixels (x then y)."""
    B, T = dynamic.shape[:2]
    centres = model.frame_decoder.centres(dynamic.flatten(0, 1))
    return ((centres + 1) / 2 * model.cfg.frame_shape[-1]).view(B, T, model.cfg.glyphs, 2)


@torch.no_grad()
def prior_paths(model: cdsvae.CDSVAE, count: int, frames: int, seed: int = 0) -> np.ndarray:
    """(count, frames, K, 2): z_1:T drawn from the prior, as the centres of its K places in pixels."""
    generator = torch.Generator().manual_seed(seed)
    return place_pixels(model, cdsvae.sample_dynamic(model, count, frames, generator=generator)).numpy()


OVERLAP_BINS = ("none", "(0, 0.2)", "[0.2, 0.5)", "[0.5, 1]")   # the share of a sequence's frames


def by_overlap(right: dict, trajectories: np.ndarray, apart: float = 6.0) -> dict:
    """Both digits right, by how much of the sequence the digits overlap: the share of its frames
    whose digits' centres are closer than ``apart`` pixels (``trajectories`` (N, T, 2, 2)), in the
    bins of ``OVERLAP_BINS``; ``right`` maps names (e.g. real, reconstructed) to (N,) booleans."""
    share = (np.linalg.norm(trajectories[:, :, 0] - trajectories[:, :, 1], axis=-1) < apart).mean(1)
    bins = np.digitize(share, [1e-9, 0.2, 0.5])
    return {name: {"sequences": int((bins == b).sum()),
                   **{what: float(hits[bins == b].mean()) if (bins == b).any() else None for what, hits in right.items()}}
            for b, name in enumerate(OVERLAP_BINS)}


@torch.no_grad()
def glyph_centres(model: cdsvae.CDSVAE, videos: np.ndarray, judge=None, labels=None, batch: int = 250):
    """From the posterior means, in pixels: the centre of each of z_t's K places per frame
    (N, T, K, 2), the same reordered by the matched glyph order (glyph k's centre in every frame),
    and with a judge, whether it gets digit_low and digit_high right (N, 2) in each reconstruction
    and, with two glyphs, in the two drawn apart (``drawn_apart``; else None); last, the posterior
    means of s (N, Ds)."""
    model.eval()
    apart = model.cfg.glyphs == len(APART)
    centres, matched, heads, heads_apart, statics = [], [], [], [], []
    for start in range(0, len(videos), batch):
        x = cdsvae.to_frames(videos[start:start + batch], "cpu")
        encoding = model.encode(x)
        T = x.shape[1]
        places = place_pixels(model, encoding.dynamic_mean)
        centres.append(places.numpy())
        statics.append(encoding.static_mean)
        matched.append(torch.gather(places, 2, encoding.glyph_order[..., None].expand(-1, -1, -1, 2)).numpy())
        if judge is not None:
            reconstruction = model.decode(encoding.static_mean, encoding.dynamic_mean, encoding.glyph_order)
            these = {f: labels[f][start:start + len(x)] for f in ("digit_low", "digit_high")}
            heads.append(heads_right(judge, reconstruction, these))
            if apart:
                heads_apart.append(heads_right(judge, drawn_apart(model, encoding.static_mean, T), these))
    joined = lambda arrays: np.concatenate(arrays) if arrays else None   # noqa: E731
    return joined(centres), joined(matched), joined(heads), joined(heads_apart), torch.cat(statics)


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data-dir", required=True, help="folder of MNIST IDX files")
    parser.add_argument("--judge")
    parser.add_argument("--count", type=int, default=1000, help="test sequences to score")
    parser.add_argument("--apart", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0, help="the data seed, as cdsvae eval's --seed")
    parser.add_argument("--refine-steps", type=int, help="as cdsvae eval's: the posterior means refined by N steps "
                        "(default: the checkpoint's)")
    args = parser.parse_args()
    from data_prep import sm_mnist

    try:
        model = cdsvae.load_model(Path(args.ckpt), "cpu", args.refine_steps)
    except cdsvae.UserError as error:
        fail(str(error))
    if not model.cfg.glyphs:
        fail(f"{args.ckpt} has no glyphs; expected a checkpoint trained with --glyphs K")
    if model.cfg.glyph_dynamic:
        fail(f"{args.ckpt} draws its glyphs from z_t too (--glyph-dynamic); expected one whose glyphs s alone draws")
    try:
        pools = sm_mnist.digit_pools(args.data_dir)
    except sm_mnist.MnistError as error:
        fail(str(error))
    videos, labels, trajectories = sm_mnist.generate(
        *pools["test"], cdsvae.GENERATED["sm-mnist"]["test"], args.seed + 10_000, size=model.cfg.frame_shape[-1])
    count = min(args.count, len(videos))
    judge = cdsvae.load_judge(args.judge) if args.judge else None
    centres, matched, heads, heads_apart, static = glyph_centres(model, videos[:count], judge, labels)
    found = tracking(centres, trajectories[:count], args.apart)
    consistent = found["consistent"]
    report = {"ckpt": args.ckpt, "refine_steps": model.cfg.refine_steps, "sequences": count, "centre_error_px": float(np.median(found["error"])),
              "consistent": float(consistent.mean()), "switches_per_sequence": float(found["switches"].mean()),
              "matched_consistent": float(tracking(matched, trajectories[:count], args.apart)["consistent"].mean())}
    if heads is not None:
        right, shown = heads.all(1), {f: labels[f][:count] for f in ("digit_low", "digit_high")}
        report["both_digits_reconstructed"] = {"all": float(right.mean()),
                                               "consistent": float(right[consistent].mean()) if consistent.any() else None,
                                               "others": float(right[~consistent].mean()) if (~consistent).any() else None}
        real_right = heads_right(judge, cdsvae.to_frames(videos[:count], "cpu"), shown).all(1)
        report["both_digits_real"] = float(real_right.mean())
        report["both_digits_by_overlap"] = by_overlap({"real": real_right, "reconstructed": right},
                                                      trajectories[:count], args.apart)
        report["per_digit"] = {"reconstructed": per_digit(heads, shown)}
        if heads_apart is not None:
            still, still_labels = real_apart(*pools["test"], count, model.cfg.frame_shape[-1], videos.shape[1], args.seed)
            real = heads_right(judge, cdsvae.to_frames(still, "cpu"), still_labels)
            report["both_digits_drawn_apart"] = float(heads_apart.all(1).mean())
            report["real_digits_apart"] = float(real.all(1).mean())
            report["per_digit"].update(drawn_apart=per_digit(heads_apart, shown), real_apart=per_digit(real, still_labels))
            size, frames = model.cfg.frame_shape[-1], videos.shape[1]
            paths = {"real trajectories": trajectories[:count], "prior's draws": prior_paths(model, count, frames, args.seed)}
            along = {"real digits": {}, "glyphs": {}}
            for name, path in paths.items():
                pairs, pair_labels = real_along(*pools["test"], path, size, args.seed)
                along["real digits"][name] = float(heads_right(judge, cdsvae.to_frames(pairs, "cpu"), pair_labels).all(1).mean())
                along["glyphs"][name] = float(np.concatenate([
                    heads_right(judge, glyphs_along(model, static[rows], path[rows]), {f: v[rows] for f, v in shown.items()})
                    for rows in (slice(start, start + 250) for start in range(0, count, 250))]).all(1).mean())
            report["both_digits_along"] = along
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
