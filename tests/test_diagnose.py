"""bench/diagnose.py: the static factor's swap errors split by the dynamic factor's match,
against a direct count over the same swaps."""
from types import SimpleNamespace

import numpy as np


def test_static_errors_by_dynamic_match_counts_each_kind_of_pair(load_bench):
    diagnose = load_bench("diagnose")
    rng = np.random.default_rng(0)
    count = 200
    skin, action = rng.integers(0, 6, count), rng.integers(0, 9, count)
    classes = ["spellcast-left", "spellcast-front", "spellcast-right", "walk-left", "walk-front",
               "walk-right", "slash-left", "slash-front", "slash-right"]
    data = SimpleNamespace(test=SimpleNamespace(labels={"skin": skin, "action": action}),
                           classes={"action": classes, "skin": [str(i) for i in range(6)]})
    partners, judged = rng.permutation(count), np.where(rng.random(count) < 0.3, (skin + 1) % 6, skin)
    report = diagnose.static_errors_by_dynamic_match((partners, {"skin": judged}), data, "skin", "action")

    def expected(keep):
        pairs = [i for i in range(count) if keep(i)]
        return {"pairs": len(pairs), "wrong": round(float(np.mean([judged[i] != skin[i] for i in pairs])), 4)}

    direction = [name.split("-")[1] for name in classes]
    kind = [name.split("-")[0] for name in classes]
    same = lambda i: action[i] == action[partners[i]]  # noqa: E731
    assert report["same action"] == expected(same)
    assert report["other action, part 0 shared"] == expected(
        lambda i: not same(i) and kind[action[i]] == kind[action[partners[i]]])
    assert report["other action, part 1 differs"] == expected(
        lambda i: direction[action[i]] != direction[action[partners[i]]])
    assert sum(report[f"other action, part 1 {k}"]["pairs"] for k in ("shared", "differs")) + \
        report["same action"]["pairs"] == count
