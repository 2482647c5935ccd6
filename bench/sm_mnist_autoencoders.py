"""Where SM-MNIST's digits are lost: autoencoders built from the model's own modules, trained
alone with the Bernoulli likelihood (no KL, no MI), time-budgeted on one core.

    python bench/sm_mnist_autoencoders.py frame --mnist-dir MNIST_DIR --minutes 6
    python bench/sm_mnist_autoencoders.py sequence --mnist-dir MNIST_DIR --minutes 6 \
        [--dynamic-dim 40] [--pool mean] [--decoder-mlp 256] [--one-digit | --ordered] [--curriculum 6]
        [--slots 2] [--broadcast 8] [--film] [--glyphs 2 [--heatmap] [--pairings] [--glimpses]] [--dynamic-sees-static]
        [--window 8]

- ``frame``: ConvFrameEncoder -> linear -> ConvFrameDecoder on single frames (batch 128
  frames): a free 40-number code per frame.
- ``sequence``: the model's structure as a deterministic autoencoder (batch 8 sequences of 15):
  s = the static posterior's mean (or, ``--pool mean``, a linear map of the frame features'
  mean over time), z_1:T = the dynamic posterior's mean rollout, the model's decoder.
  Data: ``--one-digit`` renders one moving digit instead of two; ``--ordered`` keeps the first
  digit in the left half of the x range and the second in the right half; ``--curriculum M``
  trains on one digit for the first M minutes, then on two; ``--window W`` trains on random
  W-frame windows. Decoder: ``--decoder-mlp H`` puts an MLP before the first 4x4 stage;
  ``--slots K`` splits s and z_t into K parts and draws each pair with one shared decoder, the
  frames combined as a union of the K drawings; ``--broadcast G`` is a spatial-broadcast decoder
  on a GxG grid; ``--film`` lets s modulate every decoder stage; ``--glyphs K`` lets s draw K
  glyphs that z_t places (one centre each, or with ``--heatmap`` a distribution over corners;
  ``--pairings`` makes each frame's likelihood the mixture over every assignment of the glyphs to
  z_t's places, so that s and z_t need no common order; ``--glimpses`` reads each glyph's part of
  s from the glimpses of the frames at that glyph's centres). Encoder:
  ``--dynamic-sees-static`` feeds s to the dynamic posterior's LSTM at every step.

Prints the test BCE per frame, a probe of the digits from s (sequence) or from the frame
features (frame), and writes a PNG (per sequence: input, reconstruction, and for ``sequence``
the reconstruction with the next sequence's s). Results: bench/RESULTS.md, fifth, sixth, seventh and
twelfth sessions.
"""
import argparse
import dataclasses
import inspect
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cdsvae  # noqa: E402
from cdsvae import union_logits  # noqa: E402
from data_prep import sm_mnist  # noqa: E402


VARIANTS = {
    # the second digit dropped (label: digit_high; digit_low is 0)
    "one-digit": {"for slot in range(2):": "for slot in range(1):"},
    # two digits, the first always in the left half of the x range, the second in the right half
    # (they bounce off the middle): the two identities come in a fixed order
    "ordered": {
        "for slot in range(2):": "for slot in range(2):\n            lo, hi = slot * (limit // 2), (slot + 1) * (limit // 2)",
        "x, y = rng.integers(0, limit + 1, 2)": "x, y = rng.integers(lo, hi + 1), rng.integers(0, limit + 1)",
        "if x < 0 or x > limit:": "if x < lo or x > hi:",
        "x = min(max(x, 0), limit)": "x = min(max(x, lo), hi)",
        "(1 if x == 0 else -1)": "(1 if x == lo else -1)",
    },
}


def variant_split(pool, count: int, seed: int, variant: str) -> cdsvae.Split:
    """SM-MNIST's renderer, changed as ``VARIANTS[variant]`` says."""
    source = inspect.getsource(sm_mnist.generate)
    for old, new in VARIANTS[variant].items():
        assert old in source, old
        source = source.replace(old, new)
    namespace = dict(vars(sm_mnist))
    exec(source, namespace)
    videos, labels, _ = namespace["generate"](*pool, count, seed, size=32, frames=15)
    return cdsvae.Split(videos, labels)


def mixture_nll(logits, frames):
    """-log p(x) per frame for p(x) = (1/P) sum_p Bernoulli(x; sigmoid(logits[p])): ``logits``
    (P, N, C, H, W), one drawing per assignment of glyphs to places; ``frames`` (N, C, H, W)."""
    target = frames.unsqueeze(0).expand_as(logits)
    nll = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).sum(-1)
    return -(torch.logsumexp(-nll, 0) - math.log(len(logits)))


class BroadcastDecoder(nn.Module):
    """Spatial broadcast decoder (Watters et al. 2019), then transposed convs up to the frame."""

    def __init__(self, cfg, grid: int, width: int = 64):
        super().__init__()
        self.grid = grid
        latent = cfg.static_dim + cfg.dynamic_dim
        ramp = torch.linspace(-1, 1, grid)
        self.register_buffer("coords", torch.stack(torch.meshgrid(ramp, ramp, indexing="ij"))[None])
        layers = [nn.Conv2d(latent + 2, width, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(width, width, 3, 1, 1),
                  nn.BatchNorm2d(width), nn.LeakyReLU(0.2)]
        size = grid
        while size < cfg.frame_shape[1] // 2:
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.LeakyReLU(0.2)]
            width, size = width // 2, size * 2
        layers += [nn.ConvTranspose2d(width, cfg.frame_shape[0], 4, 2, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, latent):
        tiled = latent[:, :, None, None].expand(-1, -1, self.grid, self.grid)
        return self.net(torch.cat([tiled, self.coords.expand(len(latent), -1, -1, -1)], 1))


class GlyphDecoder(cdsvae.GlyphDecoder):
    """The model's glyph decoder (``cdsvae.GlyphDecoder``: s draws K glyphs, z_t places them, a
    union combines them), with two bench options: ``heatmap`` (z_t gives each glyph a distribution
    over its top-left corners, the glyph drawn at each, weighted, instead of one centre) and an
    ``order`` of the glyphs for the pairings' mixture."""

    def __init__(self, cfg, slots: int, heatmap: bool = False):
        super().__init__(dataclasses.replace(cfg, glyphs=slots))
        self.heatmap = heatmap
        self.places = cfg.frame_shape[1] - self.glyph_size + 1      # top-left corners a glyph can take
        if heatmap:
            self.where = nn.Sequential(nn.Linear(cfg.dynamic_dim, 128), nn.LeakyReLU(0.2),
                                       nn.Linear(128, slots * self.places ** 2))

    def forward(self, latent, order=None):
        """Logits of the frames; ``order`` (a permutation of the K glyphs) says which glyph goes to
        which of z_t's places (default: glyph k to place k)."""
        static, dynamic = latent[:, :self.static_dim], latent[:, self.static_dim:]
        N, K = len(latent), self.slots
        glyphs = self.drawn(static)                                             # (N K, C, g, g)
        if order is not None:
            glyphs = glyphs.view(N, K, *glyphs.shape[1:])[:, list(order)].flatten(0, 1)
        if self.heatmap:       # a distribution over top-left corners; the glyph drawn at each, weighted
            where = torch.softmax(self.where(dynamic).view(N * K, -1), 1).view(1, N * K, self.places, self.places)
            placed = F.conv_transpose2d(where, glyphs, groups=N * K)
        else:
            placed = self.moved(glyphs, dynamic)
        return self.union(placed)

    def pairings(self, latent):
        """Logits (K!, N, C, H, W): the frames drawn with every assignment of glyphs to places."""
        return torch.stack([self(latent, order) for order in itertools.permutations(range(self.slots))])


class FilmDecoder(nn.Module):
    """The model's decoder with s also modulating every hidden stage, channel by channel
    (FiLM: h * (1 + scale(s)) + shift(s)): a multiplicative meeting of s and z_t."""

    def __init__(self, cfg):
        super().__init__()
        self.static_dim = cfg.static_dim
        self.stages = cdsvae.ConvFrameDecoder(cfg).net
        widths = [m.num_features for m in self.stages if isinstance(m, nn.BatchNorm2d)]
        self.film = nn.ModuleList(nn.Linear(cfg.static_dim, 2 * w) for w in widths)

    def forward(self, latent):
        static = latent[:, :self.static_dim]
        h, films = latent[:, :, None, None], iter(self.film)
        for layer in self.stages:
            h = layer(h)
            if isinstance(layer, nn.BatchNorm2d):
                scale, shift = next(films)(static)[:, :, None, None].chunk(2, 1)
                h = h * (1 + scale) + shift
        return h


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("frame", "sequence"))
    parser.add_argument("--mnist-dir", required=True)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--dynamic-dim", type=int, default=None)
    parser.add_argument("--pool", choices=("lstm", "mean"), default="lstm")
    parser.add_argument("--decoder-mlp", type=int, default=0)
    parser.add_argument("--one-digit", action="store_true")
    parser.add_argument("--ordered", action="store_true", help="two digits, one in each half of the x range")
    parser.add_argument("--curriculum", type=float, default=0.0, help="minutes on one digit first")
    parser.add_argument("--slots", type=int, default=1,
                        help="sequence: split s and z_t into K parts, decode each pair [s_k, z_k] with one shared "
                             "decoder and combine the frames as a union (p = 1 - prod(1 - p_k))")
    parser.add_argument("--broadcast", type=int, default=0,
                        help="spatial-broadcast decoder: [s, z_t] tiled on a GxG grid with x, y coordinates, "
                             "two 3x3 convs, then the model's transposed convs up to the frame")
    parser.add_argument("--dynamic-sees-static", action="store_true",
                        help="the dynamic posterior's LSTM also gets s at every step (DSVAE's 'full' q(z|x, f))")
    parser.add_argument("--window", type=int, default=0, help="train on random windows of W frames")
    parser.add_argument("--film", action="store_true", help="s also modulates every decoder stage (FiLM)")
    parser.add_argument("--glyphs", type=int, default=0,
                        help="glyph decoder: s draws K glyphs of half the frame's size, z_t gives their centres, "
                             "a spatial transformer moves them there (GlyphDecoder)")
    parser.add_argument("--heatmap", action="store_true",
                        help="with --glyphs: z_t gives each glyph a distribution over its top-left corners "
                             "(softmax), the glyph drawn at each, weighted (a transposed conv), instead of one centre")
    parser.add_argument("--pairings", action="store_true",
                        help="with --glyphs: p(x_t | s, z_t) is the mixture, with equal weights, over every "
                             "assignment of the K glyphs to z_t's K places, so that s and z_t need no common order")
    parser.add_argument("--glimpses", action="store_true",
                        help="with --glyphs (one centre each): s_k is read where glyph k goes, the mean over time "
                             "of a small encoder of the glimpse of x_t at glyph k's centre, so glyph k's identity "
                             "and its place come from the same spot and need no common order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the batches")
    parser.add_argument("--png", type=Path, default=Path("autoencoder.png"))
    args = parser.parse_args()
    if args.pairings and not args.glyphs:
        parser.error("--pairings needs --glyphs K")
    if args.glimpses and (not args.glyphs or args.heatmap or args.pairings):
        parser.error("--glimpses needs --glyphs K, without --heatmap and --pairings")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = cdsvae.load_dataset("sm-mnist", args.mnist_dir)
    one_digit_train = None
    if args.one_digit or args.curriculum:
        pools = sm_mnist.digit_pools(args.mnist_dir)
        one_digit_train = variant_split(pools["train"], 8000, 0, "one-digit").sequences
        if args.one_digit:
            data.train = variant_split(pools["train"], 8000, 0, "one-digit")
            data.test = variant_split(pools["test"], 2000, 10_000, "one-digit")
    if args.ordered:
        pools = sm_mnist.digit_pools(args.mnist_dir)
        data.train = variant_split(pools["train"], 8000, 0, "ordered")
        data.test = variant_split(pools["test"], 2000, 10_000, "ordered")
    # the preset's widths with the DCGAN decoder and q(s|x): the options below build their variants
    overrides = {"glyphs": 0, **({} if args.dynamic_dim is None else {"dynamic_dim": args.dynamic_dim})}
    cfg = cdsvae.Config(**{**cdsvae.preset("sm-mnist", "cpu"), **overrides}, frame_shape=(1, 32, 32), frames=15)
    model = cdsvae.CDSVAE(cfg)
    latent = cfg.static_dim + cfg.dynamic_dim
    projection = nn.Linear(cfg.feature_dim, latent)            # frame: the free code
    pooler = nn.Linear(cfg.feature_dim, cfg.static_dim)         # sequence --pool mean
    static_gates = nn.Linear(cfg.static_dim, 4 * cfg.hidden_dim, bias=False) if args.dynamic_sees_static else None
    if args.decoder_mlp:
        width = model.frame_decoder.net[0].out_channels
        model.frame_decoder.net[0] = nn.Sequential(
            nn.Flatten(), nn.Linear(latent, args.decoder_mlp), nn.LeakyReLU(0.2),
            nn.Linear(args.decoder_mlp, width * 16), nn.Unflatten(1, (width, 4, 4)))
    if args.broadcast:
        model.frame_decoder = BroadcastDecoder(cfg, args.broadcast)
    if args.film:
        model.frame_decoder = FilmDecoder(cfg)
    if args.glyphs:
        model.frame_decoder = GlyphDecoder(cfg, args.glyphs, args.heatmap)
    glimpse_encoder = None
    if args.glimpses:        # glimpse (g x g) -> the part of s of one glyph
        glimpse_encoder = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(32, 64, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(64 * (model.frame_decoder.glyph_size // 4) ** 2, 128), nn.LeakyReLU(0.2),
            nn.Linear(128, cfg.static_dim // args.glyphs))
    slot_decoder = None
    if args.slots > 1:
        slot_cfg = cdsvae.Config(**{**vars(cfg), "frame_shape": cfg.frame_shape,
                                    "static_dim": cfg.static_dim // args.slots, "dynamic_dim": cfg.dynamic_dim // args.slots})
        slot_decoder = cdsvae.ConvFrameDecoder(slot_cfg)
    optimizer = torch.optim.Adam([*model.parameters(), *projection.parameters(), *pooler.parameters(),
                                  *(static_gates.parameters() if static_gates else []),
                                  *(slot_decoder.parameters() if slot_decoder else []),
                                  *(glimpse_encoder.parameters() if glimpse_encoder else [])], 2e-3)

    def decode_logits(static, dynamic):
        if slot_decoder is None:
            return model.decode_logits(static, dynamic)
        B, T = dynamic.shape[:2]
        log_none = 0.0           # log prod_k (1 - p_k): no slot draws the pixel
        for s_k, z_k in zip(static.chunk(args.slots, 1), dynamic.chunk(args.slots, 2)):
            inputs = torch.cat([s_k.unsqueeze(1).expand(-1, T, -1), z_k], -1).flatten(0, 1)
            log_none = log_none - F.softplus(slot_decoder(inputs))
        return union_logits(log_none.clamp(max=-1e-6)).view(B, T, *log_none.shape[1:])

    def code(x):          # sequence: (static, dynamic) of (B, T, C, H, W)
        features = model.encode_frames(x)
        static = pooler(features.mean(1)) if args.pool == "mean" else model.static_posterior(features)[0]
        zeros = features.new_zeros(*features.shape[:2], cfg.dynamic_dim)
        if args.dynamic_sees_static:
            posterior = model.dynamic_posterior
            gates = posterior.input_proj(features) + static_gates(static).unsqueeze(1)
            dynamic = cdsvae.lstm_sample_rollout(gates, posterior.recurrent.weight, posterior.head.weight,
                                                 posterior.head.bias, zeros)[1]
        else:
            dynamic = model.dynamic_posterior(features, zeros)[1]
        if glimpse_encoder is not None:   # s_k: the mean over time of what is where glyph k goes
            B, T = dynamic.shape[:2]
            decoder = model.frame_decoder
            seen = glimpse_encoder(decoder.glimpses(x.flatten(0, 1), decoder.centres(dynamic.flatten(0, 1))))
            static = seen.view(B, T, args.glyphs, -1).mean(1).flatten(1)
        return static, dynamic

    def pairing_nll(static, dynamic, x):
        """-log of the mixture over the glyphs' assignments to places, per frame (B, T)."""
        B, T = dynamic.shape[:2]
        latent = torch.cat([static.unsqueeze(1).expand(B, T, -1), dynamic], -1).flatten(0, 1)
        return mixture_nll(model.frame_decoder.pairings(latent), x.flatten(0, 1)).view(B, T)

    def bce_per_frame(logits, x):
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / (x.numel() // 1024)

    def frames(sequences, index):   # frame: one random frame of each chosen sequence
        return cdsvae.to_frames(sequences[index], "cpu")[np.arange(len(index)), rng.integers(0, 15, len(index))]

    started, step = time.time(), 0
    while time.time() - started < 60 * args.minutes:
        step += 1
        if args.kind == "frame":
            x = frames(data.train.sequences, rng.integers(0, len(data.train.sequences), 128))
            loss = bce_per_frame(model.frame_decoder(projection(model.frame_encoder(x))), x)
        else:
            early = one_digit_train is not None and time.time() - started < 60 * args.curriculum
            source = one_digit_train if early else data.train.sequences
            x = cdsvae.to_frames(source[np.sort(rng.choice(len(source), 8, replace=False))], "cpu")
            if args.window:
                start = int(rng.integers(0, x.shape[1] - args.window + 1))
                x = x[:, start:start + args.window]
            if args.pairings:
                loss = pairing_nll(*code(x), x).sum() / (x.numel() // 1024)
            else:
                loss = bce_per_frame(decode_logits(*code(x)), x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        if args.kind == "frame":
            x = frames(data.test.sequences, np.arange(2000))
            test_features = model.frame_encoder(x)
            logits = model.frame_decoder(projection(test_features))
            train_features = model.frame_encoder(frames(data.train.sequences, np.arange(2000)))
            rows = [x[:16], torch.sigmoid(logits[:16])]
        else:
            x = cdsvae.to_frames(data.test.sequences[:200], "cpu")
            static, dynamic = code(x)
            logits = decode_logits(static, dynamic)
            if args.pairings:        # the test BCE is the mixture's; the pictures draw glyph k at place k
                mixture_bce = pairing_nll(static, dynamic, x).sum().item() / (x.numel() // 1024)
            train_features = code(cdsvae.to_frames(data.train.sequences[:2000], "cpu"))[0]
            test_features = code(cdsvae.to_frames(data.test.sequences[:1000], "cpu"))[0]
            swapped = torch.sigmoid(decode_logits(static[[1, 2, 0]], dynamic[:3]))
            rows = [row for i in range(3) for row in (x[i], torch.sigmoid(logits[i]), swapped[i])]
        bce = mixture_bce if args.kind == "sequence" and args.pairings else bce_per_frame(logits, x).item()
    count = len(test_features)
    probe = [cdsvae.probe_accuracy(train_features.numpy(), data.train.labels[f][:2000], test_features.numpy(),
                                   data.test.labels[f][:count], 10) for f in ("digit_low", "digit_high")]
    cdsvae.save_grid_png(rows, args.png, cfg)
    print(json.dumps({"kind": args.kind, "minutes": args.minutes, "steps": step, "test_bce_per_frame": round(bce, 2),
                      "probe_digit_low_high": probe, "options": {k: v for k, v in vars(args).items()
                                                                  if k not in ("mnist_dir", "png")}}))


if __name__ == "__main__":
    main()
