"""Reproduce the paper's tables on one dataset: C-DSVAE and its ablations at the same time budget.

    python bench/reproduce.py sprites --data-dir runs/sprites --budget 600 --device cuda  # paper config
    python bench/reproduce.py sprites --data-dir runs/sprites32 --budget 25 --scale cpu \\
        --variants C-DSVAE,DSVAE                                                          # 2 CPU cores
    python bench/reproduce.py fsdd --data-dir runs/fsdd --budget 5 --scale cpu

Trains every variant for ``--budget`` minutes of wall-clock training each (the preset's epochs are
the upper bound) with the same data, seed and settings, then evaluates each one:

- video: the judge protocol of ``cdsvae eval`` (fixed-dynamic, fixed-static and swap generation;
  Acc, IS, H(y|x), H(y); ``--repeat`` sampling rounds). The judge is ``--judge`` or one trained here.
- speech: speaker-verification EER of s and of z on the test split.

Variants: C-DSVAE; DSVAE (the MI terms off); without content augmentation and without motion
augmentation (that I(.;x) term by MWS instead of the contrastive estimate); MWS (every MI term by
minibatch-weighted sampling). ``--scale paper`` (default) trains the paper's widths,
``--scale cpu`` the settings our 2-core studies chose (both in ``cdsvae.SCALES``);
``--set key=value`` overrides any setting. The paper's published numbers (``paper_results.json``)
stand beside ours. Writes ``report.md`` and ``report.json`` to ``--out`` and a swap picture made
by ``cdsvae swap`` from the first variant. A variant whose folder already holds a summary.json
is not trained again (delete the folder to retrain).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

# bench/kernels.py shares its name with the project's ``kernels`` package: keep bench/ off the path.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cdsvae  # noqa: E402

VARIANTS = {
    "C-DSVAE": {},
    "DSVAE": {"mi": "off"},
    "w/o content aug": {"content_aug": False},
    "w/o motion aug": {"motion_aug": False},
    "MWS": {"mi": "mws"},
}
PROBES = ("s_static", "s_dynamic", "z_static", "z_dynamic")
METRICS = (("acc", "Acc"), ("is", "IS"), ("h_yx", "H(y|x)"), ("h_y", "H(y)"))


def parse_settings(pairs) -> dict:
    """``key=value`` strings as Config overrides, each value parsed as the field's type."""
    types = {f.name: type(f.default) for f in fields(cdsvae.Config)}
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types or not value:
            raise cdsvae.UserError(f"--set {pair}: expected key=value with a key of {', '.join(types)}")
        kind = types[key]
        settings[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return settings


def slug(name: str) -> str:
    return name.lower().replace("/", "").replace(" ", "-").replace("--", "-")


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return (f"CPU {names[0] if names else platform.machine()}, {torch.get_num_threads()} torch "
            f"thread(s), torch {torch.__version__}")


def swap_picture(run_dir: Path, data: cdsvae.Dataset, out: Path, device: str) -> Path:
    """``cdsvae swap`` on four test pairs that differ in every factor; returns the PNG's path."""
    labels = data.test.labels
    rng = np.random.default_rng(0)
    first, second = [], []
    for _ in range(10_000):
        a, b = rng.integers(0, len(data.test.sequences), 2)
        if all(labels[f][a] != labels[f][b] for f in data.kinds if f not in data.disjoint):
            first.append(a), second.append(b)
        if len(first) == 4:
            break
    np.save(out / "swap_a.npy", np.asarray(data.test.sequences[first]))
    np.save(out / "swap_b.npy", np.asarray(data.test.sequences[second]))
    subprocess.run([sys.executable, str(HERE.parent / "cdsvae.py"), "swap", str(out / "swap_a.npy"),
                    str(out / "swap_b.npy"), "--ckpt", str(run_dir / "last.pt"), "-o", str(out / "swap"),
                    "--device", device], check=True)
    return out / "swap" / "swap.png"


def fmt(value, percent=False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if percent else f"{value:.3f}"


def paper_rows(paper: dict, columns) -> list:
    """Every row of the paper's table (and the later methods we have), after ours: the rows named
    as our variants are the comparison, the others context."""
    label = "paper, " + paper["table"].split(" (")[0]
    return [f"| {name} | {label} | " + " | ".join(fmt(published[m], percent) for m, percent in columns) + " |"
            for name, published in paper.get("rows", {}).items()]


def video_tables(dataset: str, runs: dict, paper: dict) -> list:
    """One paper-style table per (protocol, factor): Acc, IS, H(y|x), H(y) for every variant,
    followed by every row of the paper's table where the paper reports that protocol."""
    lines = []
    keys = list(next(iter(runs.values()))["eval"]["results"])
    paper_protocol = paper.get("protocol")
    columns = [(m, m == "acc") for m, _ in METRICS]
    header = ["| model | source | " + " | ".join(label for _, label in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    paper_shown = False                                       # the paper's rows went beside ours
    for key in keys:
        if key.startswith("swap/"):
            continue
        lines += [f"\n### {dataset}: {key}", "", *header]
        for name, run in runs.items():
            metrics = run["eval"]["results"][key]
            cells = [f"{fmt(metrics[m]['mean'], m == 'acc')} ± {fmt(metrics[m]['std'], m == 'acc')}"
                     for m, _ in METRICS]
            lines.append(f"| {name} | ours | " + " | ".join(cells) + " |")
        if key == paper_protocol:
            lines += paper_rows(paper, columns)
            paper_shown = True
    if all("all_static" in run["eval"] for run in runs.values()):   # every static factor right at once
        lines += [f"\n### {dataset}: fixed_static, all static factors right", "", "| model | source | Acc |", "|---|---|---|"]
        for name, run in runs.items():
            joint = run["eval"]["all_static"]["fixed_static"]
            lines.append(f"| {name} | ours | {fmt(joint['mean'], True)} ± {fmt(joint['std'], True)} |")
        if paper_protocol == "fixed_static/digit_pair":      # the paper's pair of digits (ordered; ours order-free)
            lines += paper_rows(paper, [("acc", True)]) + ["", f"(The paper's rows: {paper['note']}.)"]
            paper_shown = True
    if paper_protocol and not paper_shown:                    # a protocol ours does not measure (yet)
        lines += [f"\n### {dataset}: the paper's {paper_protocol} (not measured by ours: {paper.get('note', '')})",
                  "", *header, *paper_rows(paper, columns)]
    swaps = [k for k in keys if k.startswith("swap/")]
    lines += [f"\n### {dataset}: swap accuracy (s of one test sequence, z of another)", "",
              "| model | " + " | ".join(k.split("/")[1] for k in swaps) + " |", "|---|" + "---|" * len(swaps)]
    for name, run in runs.items():
        results = run["eval"]["results"]
        lines.append(f"| {name} | " + " | ".join(fmt(results[k]["acc"]["mean"], True) for k in swaps) + " |")
    return lines


def speech_table(dataset: str, runs: dict, paper: dict) -> list:
    lines = [f"\n### {dataset}: speaker verification EER on the test split", "",
             "| model | source | EER of s (low is good) | EER of z (high is good) |", "|---|---|---|---|"]
    for name, run in runs.items():
        sv = run["speaker_verification"]
        lines.append(f"| {name} | ours | {fmt(sv['eer_s'], True)} | {fmt(sv['eer_z'], True)} |")
    if paper:
        lines += paper_rows(paper, [("eer_s", True), ("eer_z", True)])
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="shapes, sm-mnist, sprites, mug, timit or fsdd")
    parser.add_argument("--budget", type=float, required=True, help="minutes of training per variant")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--scale", choices=("paper", "cpu"), default="paper",
                        help="paper: the paper's widths; cpu: what our CPU studies chose (cdsvae.SCALES)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--judge", type=Path, default=None, help="a judge from 'cdsvae judge' (default: train one)")
    parser.add_argument("--judge-epochs", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="sampling rounds of the evaluation")
    parser.add_argument("--frame-size", type=int, default=None, help="for generated datasets")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/reproduce_DATASET")
    parser.add_argument("--device", default=cdsvae.default_device())
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    try:
        run(args)
    except cdsvae.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def run(args):
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise cdsvae.UserError(f"--variants {args.variants}: expected names from {', '.join(VARIANTS)}")
    if args.budget <= 0 or args.repeat < 1:
        raise cdsvae.UserError("--budget must be positive and --repeat at least 1")
    device = cdsvae._check_device(args.device)
    data = cdsvae.load_dataset(args.dataset, args.data_dir, args.frame_size)
    out = args.out or Path("runs") / f"reproduce_{data.name}"
    out.mkdir(parents=True, exist_ok=True)
    settings = {**cdsvae.preset(data.name, args.scale), **parse_settings(args.settings)}
    speech = len(data.frame_shape) == 1   # feature frames (log mel), not video
    paper_file = json.loads((HERE / "paper_results.json").read_text())
    paper = paper_file.get(data.name, {})

    judge, judge_info = None, None
    if not speech:
        judge_path = args.judge or out / "judge.pt"
        if args.judge is None and not judge_path.is_file():
            cdsvae.train_judge(data, device, args.judge_epochs, judge_path, show_progress=not args.no_progress)
        judge = cdsvae.load_judge(judge_path, device, data.test.labels)
        cdsvae.expect_same_frames(data, judge=judge)
        judge_info = {"path": str(judge_path), "test_accuracy": judge.test_accuracy}

    runs = {}
    for name in variants:
        run_dir = out / slug(name)
        cfg = cdsvae.Config(**{**settings, **VARIANTS[name]}, frame_shape=data.frame_shape,
                            frames=data.train.sequences.shape[1])
        if (run_dir / "summary.json").is_file() and (run_dir / "last.pt").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
            print(f"{name}: reusing {run_dir} ({summary['steps']} steps)")
        else:
            print(f"{name}: training for {args.budget} min into {run_dir}")
            summary = cdsvae.train(cfg, data, run_dir, device, log_every=50, show_progress=not args.no_progress,
                                   time_budget=60.0 * args.budget)
        model = cdsvae.load_checkpoint(run_dir / "last.pt", device)
        result = {"config": asdict(model.cfg), "steps": summary["steps"],
                  "train_seconds": summary["train_seconds"], "stopped": summary.get("stopped")}
        started = time.time()
        if judge is not None:
            result["eval"] = cdsvae.evaluate(model, judge, data, device, repeat=args.repeat)
        if "speaker" in data.kinds and speech:
            result["speaker_verification"] = cdsvae.speaker_verification(model, data, device)
        if "probe" in summary:
            result["probe"] = {k: summary["probe"][k] for k in (*PROBES, "chance")}
        result["eval_seconds"] = round(time.time() - started, 1)
        runs[name] = result

    picture = None if speech else swap_picture(out / slug(variants[0]), data, out, str(device))
    report = {"dataset": data.name, "budget_minutes": args.budget, "scale": args.scale,
              "settings": settings, "machine": machine(str(device)), "judge": judge_info,
              "paper_source": paper_file["source"],
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "runs": runs}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report, paper, picture, out)
    (out / "report.md").write_text(text + "\n")
    print(text)


def markdown(report: dict, paper: dict, picture, out: Path) -> str:
    runs = report["runs"]
    lines = [f"## Reproduction: {report['dataset']}", "",
             f"- command: `python bench/{report['command']}`",
             f"- machine: {report['machine']}",
             f"- budget: {report['budget_minutes']} min of training per model; scale: {report['scale']}; "
             f"settings: `{json.dumps(report['settings'])}`",
             "- steps reached: " + ", ".join(f"{n} {r['steps']} ({r['train_seconds']:.0f} s)" for n, r in runs.items())]
    if report["judge"]:
        accuracy = report["judge"]["test_accuracy"] or {}
        lines.append("- judge test accuracy: " + ", ".join(f"{f} {100 * a:.2f}%" for f, a in accuracy.items()))
    if paper:
        lines.append(f"- paper rows: {paper['table']}; {report['paper_source']}")
    else:
        lines.append("- paper rows: none transcribed for this dataset (see bench/paper_results.json)")
    if any("eval" in r for r in runs.values()):
        lines.append(f"- ours: mean ± spread over {next(iter(runs.values()))['eval']['rounds']} sampling rounds; "
                     "Acc over the whole test split, IS/H(y|x)/H(y) over a class-balanced selection")
        lines += video_tables(report["dataset"], runs, paper)
    if any("speaker_verification" in r for r in runs.values()):
        lines += speech_table(report["dataset"], runs, paper)
    probed = {n: r["probe"] for n, r in runs.items() if "probe" in r}
    if probed:
        chance = next(iter(probed.values()))["chance"]
        lines += [f"\n### {report['dataset']}: latent probe (posterior samples; chance static "
                  f"{fmt(chance['static'])}, dynamic {fmt(chance['dynamic'])})", "",
                  "| model | " + " | ".join(PROBES) + " |", "|---|---|---|---|---|"]
        for name, p in probed.items():
            lines.append(f"| {name} | " + " | ".join(fmt(p[k]) for k in PROBES) + " |")
    if picture is not None:
        lines += ["", f"Swap picture ({next(iter(runs))}): `{picture.relative_to(out)}` (rows per pair: A, B, "
                  "A's static with B's dynamic, B's static with A's dynamic)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
