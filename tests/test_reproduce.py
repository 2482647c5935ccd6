"""bench/reproduce.py end to end on tiny networks: every variant trained at the budget, evaluated,
tabulated beside the paper's numbers, and a swap picture made by the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--frame-size", "16", "--set", "static_dim=4", "--set", "dynamic_dim=2", "--set", "feature_dim=8",
        "--set", "hidden_dim=8", "--set", "conv_width=4", "--set", "batch_size=128"]


def reproduce(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_reproduce_trains_each_variant_at_the_budget_and_writes_the_tables(tmp_path):
    result = reproduce("shapes", "--budget", "0.01", *TINY, "--variants", "C-DSVAE,DSVAE,MWS",
                       "--judge-epochs", "1", "--repeat", "2", "--out", tmp_path, "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["runs"]) == ["C-DSVAE", "DSVAE", "MWS"]
    for name, mi in (("C-DSVAE", "contrastive"), ("DSVAE", "off"), ("MWS", "mws")):
        run = report["runs"][name]
        assert run["config"]["mi"] == mi and run["config"]["static_dim"] == 4
        assert run["stopped"] == "time budget" and run["steps"] >= 1
        assert run["eval"]["rounds"] == 2
    markdown = (tmp_path / "report.md").read_text()
    assert "### shapes: fixed_dynamic/direction" in markdown and "| DSVAE | ours |" in markdown
    assert "none transcribed" in markdown
    assert (tmp_path / "swap" / "swap.png").is_file()
    # a second call reuses the trained variants instead of training them again
    again = reproduce("shapes", "--budget", "0.01", *TINY, "--variants", "DSVAE", "--judge-epochs", "1",
                      "--repeat", "1", "--out", tmp_path, "--no-progress")
    assert again.returncode == 0 and "DSVAE: reusing" in again.stdout


def test_reproduce_puts_the_papers_rows_beside_ours_for_sprites():
    sys.path.insert(0, str(ROOT / "bench"))
    import reproduce as module

    paper = json.loads((ROOT / "bench" / "paper_results.json").read_text())["sprites"]
    metrics = {m: {"mean": 0.5, "std": 0.0} for m in ("acc", "is", "h_yx", "h_y")}
    runs = {"C-DSVAE": {"eval": {"results": {"fixed_dynamic/action": metrics, "swap/action": metrics}}}}
    lines = module.video_tables("sprites", runs, paper)
    assert "| C-DSVAE | ours | 50.00% ± 0.00% |" in "\n".join(lines)
    assert any(line.startswith("| C-DSVAE | paper") and "99.99%" in line and "8.871" in line for line in lines)
    for method in ("MoCoGAN", "DSVAE", "R-WAE", "S3VAE"):                   # every row of Table 1, as context
        assert any(line.startswith(f"| {method} | paper, Table 1 |") for line in lines), method
    timit = json.loads((ROOT / "bench" / "paper_results.json").read_text())["timit"]
    runs = {"C-DSVAE": {"speaker_verification": {"eer_s": 0.1, "eer_z": 0.2}}}
    lines = module.speech_table("timit", runs, timit)
    assert "| C-DSVAE | paper, Tables 4 and 6 | 4.03% | 31.81% |" in lines
    assert "| w/o motion aug | paper, Tables 4 and 6 | 4.31% | 31.09% |" in lines


def test_paper_results_hold_every_table_of_the_paper():
    """Every number of ../shared/paper/results.md's Tables 1-6 is in bench/paper_results.json."""
    paper = json.loads((ROOT / "bench" / "paper_results.json").read_text())
    source = ROOT.parent / "shared" / "paper" / "results.md"
    if not source.is_file():
        pytest.skip("../shared/paper/results.md not present")
    table, checked = None, 0
    names = {"C-DSVAE w/o content aug": "w/o content aug", "C-DSVAE w/o motion aug": "w/o motion aug"}
    where = {"Table 1": "sprites", "Table 2": "mug", "Table 3": "sm-mnist", "Table 5": "sm-mnist",
             "Table 4": "timit", "Table 6": "timit"}
    for line in source.read_text().splitlines():
        if line.startswith("Table "):
            table = where.get(" ".join(line.split()[:2]).rstrip(","))
        elif table and line.startswith("| ") and not line.startswith(("| method", "|---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            row = paper[table]["rows"][names.get(cells[0], cells[0])]
            values = [float(c.rstrip("%")) / (100 if c.endswith("%") else 1) for c in cells[1:]]
            assert list(row.values()) == pytest.approx(values, abs=1e-9), (table, cells[0])
            checked += 1
    assert checked == 5 + 5 + 5 + 5 + 4 + 4


def test_reproduce_rejects_an_unknown_variant_in_one_line(tmp_path):
    result = reproduce("shapes", "--budget", "1", "--variants", "C-DSVAE,nope", "--out", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "expected names from C-DSVAE" in result.stderr


def test_learning_curves_plots_the_logged_validation_scores(tmp_path):
    for name, scores in (("a", [0.2, 0.5, 0.7]), ("b", [0.1, 0.3])):
        run = tmp_path / name
        run.mkdir()
        lines = [json.dumps({"step": 10, "epoch": 0, "recon": 1.0})]
        lines += [json.dumps({"step": 10 * (k + 1), "epoch": 0, "minutes": 0.5 * (k + 1),
                              "validation": {"s/a": score / 2, "score": score}}) for k, score in enumerate(scores)]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_curves.py"), f"{tmp_path / 'a'}=C-DSVAE",
                             str(tmp_path / "b"), "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    points = [json.loads(line) for line in result.stdout.splitlines()]
    assert points == [{"run": "C-DSVAE", "minutes": [0.5, 1.0, 1.5], "score": [0.2, 0.5, 0.7]},
                      {"run": "b", "minutes": [0.5, 1.0], "score": [0.1, 0.3]}]
    from PIL import Image
    with Image.open(out) as image:
        assert image.size == (720, 440)
        colours = {colour for _, colour in image.getcolors(1 << 20)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours            # both lines drawn
    part = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_curves.py"), str(tmp_path / "a"),
                           "--key", "s/a", "-o", str(tmp_path / "part.png")], capture_output=True, text=True, timeout=60)
    assert json.loads(part.stdout.splitlines()[0])["score"] == [0.1, 0.25, 0.35]          # one logged part
    both = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_curves.py"), f"{tmp_path / 'a'}=all",
                           f"{tmp_path / 'a'}=part@s/a", "-o", str(tmp_path / "both.png")], capture_output=True,
                          text=True, timeout=60)
    assert [json.loads(line)["score"] for line in both.stdout.splitlines()] == [[0.2, 0.5, 0.7], [0.1, 0.25, 0.35]]
    unknown = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_curves.py"), str(tmp_path / "a"),
                              "--key", "nope", "-o", str(tmp_path / "n.png")], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "no 'nope'" in unknown.stderr and not (tmp_path / "n.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "recon": 1.0}) + "\n")
    failed = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_curves.py"), str(empty), "-o",
                             str(tmp_path / "x.png")], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and failed.stderr.strip().startswith("error:") and "--eval-every" in failed.stderr
    assert not (tmp_path / "x.png").exists()


def test_reproduce_puts_the_papers_digit_pair_rows_beside_our_all_static_accuracy():
    sys.path.insert(0, str(ROOT / "bench"))
    import reproduce as module

    paper = json.loads((ROOT / "bench" / "paper_results.json").read_text())["sm-mnist"]
    metrics = {m: {"mean": 0.5, "std": 0.0} for m in ("acc", "is", "h_yx", "h_y")}
    results = {"fixed_static/digit_low": metrics, "fixed_static/digit_high": metrics, "swap/digit_low": metrics}
    runs = {"C-DSVAE": {"eval": {"results": results, "all_static": {"fixed_static": {"mean": 0.25, "std": 0.01},
                                                                      "swap": {"mean": 0.3, "std": 0.0}}}}}
    text = "\n".join(module.video_tables("sm-mnist", runs, paper))
    assert "### sm-mnist: fixed_static, all static factors right" in text
    assert "| C-DSVAE | ours | 25.00% ± 1.00% |" in text
    assert "| C-DSVAE | paper, Tables 3 and 5 | 97.84% |" in text and "| DSVAE | paper, Tables 3 and 5 | 88.19% |" in text
    assert "not measured by ours" not in text
