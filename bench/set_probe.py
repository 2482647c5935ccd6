"""Is a ``--glyphs 2`` model's s short of the digits, or is the probe short of reading them?

``cdsvae.probe`` reads the two order-free digit labels (``digit_low``, ``digit_high``) from s
with one small MLP per label. With glyphs, s is two parts (one per glyph) in no fixed order, so
that MLP must tell each part's digit *and* which is the smaller, in one hidden layer. This
diagnostic reads the same posterior samples of s (the encoder's, as ``probe`` takes them) part by
part: one classifier, shared by the parts, gives each part's digit distribution p_k, and the
order-free pair has P(low = i, high = j) = p_1(i) p_2(j) + p_1(j) p_2(i) for i < j, p_1(i) p_2(i)
for i = j (``pair_log_probs``); it is fitted by the pair's likelihood on the training split and
scored on the test split by the most probable pair. Beside it, the package's probe on the same
samples. Diagnostic only: the issue's bar is the package's probe.

    python bench/set_probe.py --ckpt RUN/last.pt --data-dir MNIST [--means] [--out set_probe.json]

``--means`` reads the encoder's posterior means instead (not refined): how much of the gap is
the samples' noise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cdsvae  # noqa: E402


def pair_log_probs(part_logits: torch.Tensor) -> torch.Tensor:
    """(N, 2, C) logits of two parts -> (N, C, C) log P(low = i, high = j) of the order-free
    pair: i < j sums both assignments, i = j is both parts saying i, i > j is -inf."""
    log_p = F.log_softmax(part_logits.float(), dim=-1)
    ordered = log_p[:, 0, :, None] + log_p[:, 1, None, :]             # part 1 says i, part 2 says j
    classes = part_logits.shape[-1]
    upper = torch.triu(torch.ones(classes, classes, dtype=torch.bool, device=part_logits.device), diagonal=1)
    either = torch.logaddexp(ordered, ordered.transpose(1, 2))
    diagonal = torch.eye(classes, dtype=torch.bool, device=part_logits.device)
    out = torch.where(upper, either, torch.full_like(ordered, float("-inf")))
    return torch.where(diagonal, ordered, out)


def set_probe_accuracy(train_s, train_low, train_high, test_s, test_low, test_high, classes: int = 10,
                       hidden: int = 128, steps: int = 300, seed: int = 0) -> dict:
    """Test accuracy of each label and of both at once, by a classifier shared by s's two parts
    (an MLP of ``hidden``, or linear with 0), trained as ``cdsvae.probe_accuracy`` trains its own
    (features standardised by the training split, Adam 3e-3, weight decay 1e-4, full batch)."""
    torch.manual_seed(seed)
    train_s, test_s = torch.as_tensor(train_s).float(), torch.as_tensor(test_s).float()
    mean, std = train_s.mean(0), train_s.std(0) + 1e-6
    train_s, test_s = (train_s - mean) / std, (test_s - mean) / std
    part = train_s.shape[1] // 2
    classifier = (torch.nn.Sequential(torch.nn.Linear(part, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))
                  if hidden else torch.nn.Linear(part, classes))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=3e-3, weight_decay=1e-4)
    low, high = torch.as_tensor(train_low), torch.as_tensor(train_high)
    rows = torch.arange(len(train_s))
    for _ in range(steps):
        optimizer.zero_grad()
        log_p = pair_log_probs(classifier(train_s.view(len(train_s), 2, part)))
        (-log_p[rows, low, high].mean()).backward()
        optimizer.step()
    with torch.no_grad():
        best = pair_log_probs(classifier(test_s.view(len(test_s), 2, part))).flatten(1).argmax(1).numpy()
    low_right, high_right = best // classes == np.asarray(test_low), best % classes == np.asarray(test_high)
    return {"digit_low": float(low_right.mean()), "digit_high": float(high_right.mean()),
            "s_static": float((low_right.mean() + high_right.mean()) / 2), "both": float((low_right & high_right).mean())}


def split_statics(model, train_sequences, test_sequences, means: bool = False):
    """s of the training and test sequences as numpy arrays: posterior samples (seeds 0 and 1, as
    ``cdsvae.probe`` draws them) or, with ``means``, the encoder's posterior means, not refined."""
    return tuple(cdsvae.encode_split(model, sequences, "cpu", not means, seed=seed, refine_steps=0)[0]
                 for sequences, seed in ((train_sequences, 0), (test_sequences, 1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data-dir", required=True, help="folder of MNIST IDX files")
    parser.add_argument("--means", action="store_true", help="the encoder's posterior means instead of samples")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args()
    with cdsvae.user_errors():
        model = cdsvae.load_checkpoint(args.ckpt)
        if model.cfg.glyphs != 2:
            raise cdsvae.UserError(f"{args.ckpt}: expected a model trained with --glyphs 2, got glyphs {model.cfg.glyphs}")
        data = cdsvae.load_dataset("sm-mnist", args.data_dir)
        train_s, test_s = split_statics(model, data.train.sequences, data.test.sequences, args.means)
        labels = [data.train.labels["digit_low"], data.train.labels["digit_high"],
                  data.test.labels["digit_low"], data.test.labels["digit_high"]]
        result = {"checkpoint": model.description, "latents": "posterior means (the encoder's)" if args.means else "posterior samples (the encoder's)",
                  "probe": {f: cdsvae.probe_accuracy(train_s, data.train.labels[f], test_s, data.test.labels[f], 10)
                            for f in ("digit_low", "digit_high")},
                  "set_probe": set_probe_accuracy(train_s, labels[0], labels[1], test_s, labels[2], labels[3]),
                  "set_probe_linear": set_probe_accuracy(train_s, labels[0], labels[1], test_s, labels[2], labels[3],
                                                         hidden=0)}
        result["probe"]["s_static"] = float(np.mean(list(result["probe"].values())))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
