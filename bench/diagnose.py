"""Why a trained model does not disentangle: which term pulls where, and which factor goes wrong.

For a checkpoint, a batch of training sequences and (optionally) a judge:

- the gradient norm of each weighted term of eq. (6) (``CDSVAE.objective_terms``) on the frame
  encoder, the static posterior and the dynamic posterior: which term drives which latent;
- with ``--judge``: the confusion matrix of the judge on fixed-dynamic generations of the test
  split (z_1:T the posterior mean, s ~ p(s)) for ``--factor``: which classes the static latent
  takes over; and for swaps, whether the judged class (and each part of a class name such as
  "walk-left") follows the z source or the s source;
- with ``--judge`` and ``--static-factor``: in the same swaps, how often that static factor is
  judged wrong, split by whether the two sources share the dynamic class, only a part of it
  (e.g. the direction of "walk-left"), or nothing: a static factor learned together with a
  dynamic part held in s goes wrong where z draws another one (bench/RESULTS.md, ninth session).
  And with s fixed, how often it is judged right per z source (the sequence's own posterior,
  another sequence's, the prior, and the prior going on from another sequence's z_1) and per
  class: where the prior's trajectories, not s, draw it wrong (bench/RESULTS.md, fifteenth
  session), and whether its first step does (thirty-fourth session).

    python bench/diagnose.py --ckpt RUN/last.pt --data-dir SPRITES32 --judge judge.pt
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cdsvae  # noqa: E402

MODULES = ("frame_encoder", "static_posterior", "dynamic_posterior")


def term_gradients(model: cdsvae.CDSVAE, x: torch.Tensor) -> dict:
    """{term: {"value", module: gradient norm}} for each weighted term of the loss."""
    cfg = model.cfg
    terms = model.objective_terms(x)
    weighted = {"recon": terms["recon"], "alpha*kl_s": cfg.alpha * terms["kl_s"],
                "alpha*kl_z": cfg.alpha * terms["kl_z"]}
    if cfg.mi != "off":
        weighted.update({"-beta*mi_sx": -cfg.beta * terms["mi_sx"], "-beta*mi_zx": -cfg.beta * terms["mi_zx"],
                         "gamma*mi_zs": cfg.gamma * terms["mi_zs"]})
    report = {}
    for name, value in weighted.items():
        row = {"value": round(float(value.detach()), 3)}
        for module in MODULES:
            parameters = list(getattr(model, module).parameters())
            grads = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
            row[module] = round(float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)
                                                 if any(g is not None for g in grads) else torch.tensor(0.0))), 3)
        report[name] = row
    return report


def judged_classes(judge, count: int, frames_of, batch_size: int = 256) -> dict:
    """Per factor, the judge's class of each of ``count`` generations, made a batch at a time
    (in order) by ``frames_of(slice)``."""
    judged = []
    for start in range(0, count, batch_size):
        probabilities = cdsvae.judge_probabilities(judge, frames_of(slice(start, start + batch_size)))
        judged.append({factor: p.argmax(1) for factor, p in probabilities.items()})
    return {factor: np.concatenate([batch[factor] for batch in judged]) for factor in judged[0]}


def split_frames(data, batch: slice) -> torch.Tensor:
    """The test split's sequences ``batch`` as model input."""
    return cdsvae.to_frames(data.test.sequences[batch], "cpu")


@torch.no_grad()
def fixed_dynamic_confusion(model, judge, data, factor: str, seed: int = 0) -> np.ndarray:
    truth = np.asarray(data.test.labels[factor])
    generator = torch.Generator().manual_seed(seed)
    judged = judged_classes(judge, len(truth), lambda batch: cdsvae.generate(
        model, dynamic=model.encode(split_frames(data, batch)).dynamic_mean, generator=generator))[factor]
    classes = len(data.classes[factor])
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (truth, judged), 1)
    return confusion


@torch.no_grad()
def swap_judgements(model, judge, data, seed: int = 0) -> tuple:
    """Swaps of the test split (s of each sequence, z of a random other, ``seed``): the partners'
    indices and, per factor, the judge's class of every swap."""
    count = len(data.test.sequences)
    partners = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).numpy()
    return partners, judged_classes(judge, count, lambda batch: model.decode(
        model.encode(split_frames(data, batch)).static_mean,
        model.encode(cdsvae.to_frames(data.test.sequences[partners[batch]], "cpu")).dynamic_mean))


def class_parts(class_names) -> list:
    """For class names made of parts ("walk-left"), per part the array of each class's part
    (["walk", ...], ["left", ...]); empty when some name has one part only."""
    names = [name.split("-") for name in class_names]
    if not all(len(n) > 1 for n in names):
        return []
    return [np.array([n[part] for n in names]) for part in range(min(len(n) for n in names))]


def swap_sources(swaps: tuple, data, factor: str) -> dict:
    """Swaps (``swap_judgements``: s of each test sequence, z of a random other): how often the
    judged class is the z source's and how often the s source's; for class names made of parts
    ("walk-left"), the same per part, over the pairs whose sources differ in that part."""
    truth = np.asarray(data.test.labels[factor])
    partners, judged = swaps[0], swaps[1][factor]
    from_s, from_z = truth, truth[partners]
    report = {"follows_z": round(float((judged == from_z).mean()), 4),
              "follows_s": round(float((judged == from_s).mean()), 4)}
    for part, value in enumerate(class_parts(data.classes[factor])):
        differ = value[from_s] != value[from_z]
        report[f"part {part} where the sources differ ({int(differ.sum())} pairs)"] = {
            "follows_z": round(float((value[judged][differ] == value[from_z][differ]).mean()), 4),
            "follows_s": round(float((value[judged][differ] == value[from_s][differ]).mean()), 4)}
    return report


def static_errors_by_dynamic_match(swaps: tuple, data, static_factor: str, dynamic_factor: str) -> dict:
    """In the swaps of ``swap_judgements`` (those ``swap_sources`` scores): the share of
    ``static_factor`` judged wrong, over the pairs whose sources have the same ``dynamic_factor``
    class, and for each part of its class names, over the pairs that differ in the class but
    share that part or not."""
    truth, dynamic = np.asarray(data.test.labels[static_factor]), np.asarray(data.test.labels[dynamic_factor])
    partners, judged = swaps[0], swaps[1][static_factor]
    wrong = judged != truth

    def share(mask):
        return {"pairs": int(mask.sum()), "wrong": round(float(wrong[mask].mean()), 4) if mask.any() else None}

    same = dynamic == dynamic[partners]
    report = {f"same {dynamic_factor}": share(same)}
    for part, value in enumerate(class_parts(data.classes[dynamic_factor])):
        shared = value[dynamic] == value[dynamic[partners]]
        report[f"other {dynamic_factor}, part {part} shared"] = share(~same & shared)
        report[f"other {dynamic_factor}, part {part} differs"] = share(~same & ~shared)
    return report


def accuracy_by_class(judged: np.ndarray, truth: np.ndarray, class_names) -> dict:
    """The share of ``judged`` equal to ``truth``, overall and per true class (classes absent from
    ``truth`` left out)."""
    right = judged == truth
    return {"right": round(float(right.mean()), 4),
            "by class": {name: round(float(right[truth == k].mean()), 4)
                         for k, name in enumerate(class_names) if (truth == k).any()}}


@torch.no_grad()
def static_by_dynamic_source(model, judge, data, factor: str, seed: int = 0) -> dict:
    """s of each test sequence (posterior mean) decoded with z_1:T from four sources: the
    sequence's own posterior (means: its reconstruction), another sequence's (the swaps of
    ``cdsvae eval``), the prior (its fixed-static generations; the model's own p(z_t | z_<t), or
    z_1 from the mixture ``cdsvae fit-prior`` stored) and p(z_t | z_<t) fed another sequence's z_1
    (posterior mean) in place of its first draw; the second and third are the first round of
    ``cdsvae eval --seed seed``. Per source, ``factor`` judged right, overall and per class: a
    static factor drawn right from real trajectories and wrong from the prior's is the decoder's or
    the prior's, not s's (bench/RESULTS.md, fifteenth session); right again from the prior that
    starts from a real z_1, it is the prior's first step (thirty-fourth session)."""
    truth = np.asarray(data.test.labels[factor])
    static, dynamic = cdsvae.encode_split(model, data.test.sequences, "cpu", sample=False)
    _, judged = cdsvae.judged_generations(model, judge, static, dynamic, "cpu", seed)

    def reconstruction(batch):
        encoding = model.encode(split_frames(data, batch))
        return model.decode(encoding.static_mean, encoding.dynamic_mean, encoding.glyph_order)

    generator = torch.Generator().manual_seed(seed)
    other = torch.randperm(len(truth), generator=generator)
    eps = torch.randn(dynamic.shape, generator=generator)

    def prior_from_real_first(batch):
        trajectory = model.dynamic_prior.sample(len(eps[batch]), dynamic.shape[1], eps[batch],
                                                torch.as_tensor(dynamic[other[batch], 0]))
        return model.decode(torch.as_tensor(static[batch]), trajectory)

    sources = {"own posterior": judged_classes(judge, len(truth), reconstruction)[factor],
               "another sequence's posterior": judged["swap"][factor].argmax(1),
               "prior": judged["fixed_static"][factor].argmax(1),
               "prior from another sequence's z_1": judged_classes(judge, len(truth), prior_from_real_first)[factor]}
    return {name: accuracy_by_class(judged_class, truth, data.classes[factor])
            for name, judged_class in sources.items()}


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--judge")
    parser.add_argument("--factor", default="action")
    parser.add_argument("--static-factor", help="with --judge: its swap errors by the --factor match of the sources")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    try:
        model = cdsvae.load_checkpoint(args.ckpt)
        data = cdsvae.load_dataset(None, args.data_dir)
        judge = cdsvae.load_judge(args.judge, "cpu", data.test.labels) if args.judge else None
        cdsvae.expect_same_frames(data, model, judge)
    except cdsvae.UserError as error:
        fail(str(error))
    for name in (args.factor, args.static_factor):
        if name is not None and name not in data.classes:
            fail(f"no factor '{name}' in {args.data_dir}; expected one of {', '.join(data.classes)}")
    trained = copy.deepcopy(model).train()        # the training step's BatchNorm and sampling, on a
    trained.cfg.dataset_size = len(data.train.sequences)   # copy: its batch statistics stay out of model
    x = cdsvae.to_frames(data.train.sequences[:args.batch], "cpu")
    print(json.dumps({"gradient_norms": term_gradients(trained, x)}))
    if judge is not None:
        model.eval()
        confusion = fixed_dynamic_confusion(model, judge, data, args.factor)
        print(json.dumps({"factor": args.factor, "classes": data.classes[args.factor],
                          "confusion": confusion.tolist(),
                          "accuracy": round(float(np.trace(confusion) / confusion.sum()), 4)}))
        swaps = swap_judgements(model, judge, data)         # one set of swaps for both reports
        print(json.dumps({"swap_sources": swap_sources(swaps, data, args.factor)}))
        if args.static_factor:
            print(json.dumps({"static_errors": args.static_factor, "by_match_of": args.factor,
                              **static_errors_by_dynamic_match(swaps, data, args.static_factor, args.factor)}))
            print(json.dumps({"static_by_z_source": args.static_factor,
                              **static_by_dynamic_source(model, judge, data, args.static_factor)}))


if __name__ == "__main__":
    main()
