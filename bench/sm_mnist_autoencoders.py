"""Where SM-MNIST's digits are lost: autoencoders built from the model's own modules, trained
alone with the Bernoulli likelihood (no KL, no MI), time-budgeted on one core.

    python bench/sm_mnist_autoencoders.py frame --mnist-dir MNIST_DIR --minutes 6
    python bench/sm_mnist_autoencoders.py sequence --mnist-dir MNIST_DIR --minutes 6 \
        [--dynamic-dim 40] [--pool mean] [--decoder-mlp 256] [--one-digit] [--curriculum 6] [--slots 2]

- ``frame``: ConvFrameEncoder -> linear -> ConvFrameDecoder on single frames (batch 128
  frames): a free 40-number code per frame.
- ``sequence``: the model's structure as a deterministic autoencoder (batch 8 sequences of 15):
  s = the static posterior's mean (or, ``--pool mean``, a linear map of the frame features'
  mean over time), z_1:T = the dynamic posterior's mean rollout, the model's decoder;
  ``--decoder-mlp H`` puts an MLP before the decoder's first 4x4 stage; ``--one-digit`` renders
  one moving digit instead of two; ``--curriculum M`` trains on one digit for the first M
  minutes, then on two; ``--slots K`` splits s and z_t into K parts and draws each pair with one
  shared decoder, the frames combined as a union of the K drawings.

Prints the test BCE per frame, a probe of the digits from s (sequence) or from the frame
features (frame), and writes a PNG (per sequence: input, reconstruction, and for ``sequence``
the reconstruction with the next sequence's s). Results: bench/RESULTS.md, fifth session.
"""
import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cdsvae  # noqa: E402
from data_prep import sm_mnist  # noqa: E402


def one_digit_split(pool, count: int, seed: int) -> cdsvae.Split:
    """SM-MNIST's renderer with its second digit dropped (label: digit_high; digit_low is 0)."""
    source = inspect.getsource(sm_mnist.generate).replace("for slot in range(2):", "for slot in range(1):")
    namespace = dict(vars(sm_mnist))
    exec(source, namespace)
    videos, labels, _ = namespace["generate"](*pool, count, seed, size=32, frames=15)
    return cdsvae.Split(videos, labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("frame", "sequence"))
    parser.add_argument("--mnist-dir", required=True)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--dynamic-dim", type=int, default=None)
    parser.add_argument("--pool", choices=("lstm", "mean"), default="lstm")
    parser.add_argument("--decoder-mlp", type=int, default=0)
    parser.add_argument("--one-digit", action="store_true")
    parser.add_argument("--curriculum", type=float, default=0.0, help="minutes on one digit first")
    parser.add_argument("--slots", type=int, default=1,
                        help="sequence: split s and z_t into K parts, decode each pair [s_k, z_k] with one shared "
                             "decoder and combine the frames as a union (p = 1 - prod(1 - p_k))")
    parser.add_argument("--png", type=Path, default=Path("autoencoder.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = cdsvae.load_dataset("sm-mnist", args.mnist_dir)
    one_digit_train = None
    if args.one_digit or args.curriculum:
        pools = sm_mnist.digit_pools(args.mnist_dir)
        one_digit_train = one_digit_split(pools["train"], 8000, 0).sequences
        if args.one_digit:
            data.train, data.test = one_digit_split(pools["train"], 8000, 0), one_digit_split(pools["test"], 2000, 10_000)
    overrides = {} if args.dynamic_dim is None else {"dynamic_dim": args.dynamic_dim}
    cfg = cdsvae.Config(**{**cdsvae.preset("sm-mnist", "cpu"), **overrides}, frame_shape=(1, 32, 32), frames=15)
    model = cdsvae.CDSVAE(cfg)
    latent = cfg.static_dim + cfg.dynamic_dim
    projection = nn.Linear(cfg.feature_dim, latent)            # frame: the free code
    pooler = nn.Linear(cfg.feature_dim, cfg.static_dim)         # sequence --pool mean
    if args.decoder_mlp:
        width = model.frame_decoder.net[0].out_channels
        model.frame_decoder.net[0] = nn.Sequential(
            nn.Flatten(), nn.Linear(latent, args.decoder_mlp), nn.LeakyReLU(0.2),
            nn.Linear(args.decoder_mlp, width * 16), nn.Unflatten(1, (width, 4, 4)))
    slot_decoder = None
    if args.slots > 1:
        slot_cfg = cdsvae.Config(**{**vars(cfg), "frame_shape": cfg.frame_shape,
                                    "static_dim": cfg.static_dim // args.slots, "dynamic_dim": cfg.dynamic_dim // args.slots})
        slot_decoder = cdsvae.ConvFrameDecoder(slot_cfg)
    optimizer = torch.optim.Adam([*model.parameters(), *projection.parameters(), *pooler.parameters(),
                                  *(slot_decoder.parameters() if slot_decoder else [])], 2e-3)

    def decode_logits(static, dynamic):
        if slot_decoder is None:
            return model.decode_logits(static, dynamic)
        B, T = dynamic.shape[:2]
        log_none = 0.0           # log prod_k (1 - p_k): no slot draws the pixel
        for s_k, z_k in zip(static.chunk(args.slots, 1), dynamic.chunk(args.slots, 2)):
            inputs = torch.cat([s_k.unsqueeze(1).expand(-1, T, -1), z_k], -1).flatten(0, 1)
            log_none = log_none - F.softplus(slot_decoder(inputs))
        log_none = log_none.clamp(max=-1e-6)
        return (torch.log(-torch.expm1(log_none)) - log_none).view(B, T, *log_none.shape[1:])

    def code(x):          # sequence: (static, dynamic) of (B, T, C, H, W)
        features = model.encode_frames(x)
        static = pooler(features.mean(1)) if args.pool == "mean" else model.static_posterior(features)[0]
        dynamic = model.dynamic_posterior(features, features.new_zeros(*features.shape[:2], cfg.dynamic_dim))[1]
        return static, dynamic

    def frames(sequences, index):   # frame: one random frame of each chosen sequence
        return cdsvae.to_frames(sequences[index], "cpu")[np.arange(len(index)), rng.integers(0, 15, len(index))]

    started, step = time.time(), 0
    while time.time() - started < 60 * args.minutes:
        step += 1
        if args.kind == "frame":
            x = frames(data.train.sequences, rng.integers(0, len(data.train.sequences), 128))
            logits = model.frame_decoder(projection(model.frame_encoder(x)))
        else:
            early = one_digit_train is not None and time.time() - started < 60 * args.curriculum
            source = one_digit_train if early else data.train.sequences
            x = cdsvae.to_frames(source[np.sort(rng.choice(len(source), 8, replace=False))], "cpu")
            logits = decode_logits(*code(x))
        loss = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / (x.numel() // 1024)
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
            train_features = code(cdsvae.to_frames(data.train.sequences[:2000], "cpu"))[0]
            test_features = code(cdsvae.to_frames(data.test.sequences[:1000], "cpu"))[0]
            swapped = torch.sigmoid(decode_logits(static[[1, 2, 0]], dynamic[:3]))
            rows = [row for i in range(3) for row in (x[i], torch.sigmoid(logits[i]), swapped[i])]
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum").item() / (x.numel() // 1024)
    count = len(test_features)
    probe = [cdsvae.probe_accuracy(train_features.numpy(), data.train.labels[f][:2000], test_features.numpy(),
                                   data.test.labels[f][:count], 10) for f in ("digit_low", "digit_high")]
    cdsvae.save_grid_png(rows, args.png, cfg)
    print(json.dumps({"kind": args.kind, "minutes": args.minutes, "steps": step, "test_bce_per_frame": round(bce, 2),
                      "probe_digit_low_high": probe, "options": {k: v for k, v in vars(args).items()
                                                                  if k not in ("mnist_dir", "png")}}))


if __name__ == "__main__":
    main()
