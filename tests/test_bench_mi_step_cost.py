"""bench/mi_step_cost.py: each variant is the base config changed as named, and is timed."""
import torch

import cdsvae


def test_each_variant_trains_its_own_config_and_gets_a_time(load_bench, monkeypatch):
    bench = load_bench("mi_step_cost")
    base = dict(frame_shape=(1, 16, 16), frames=3, static_dim=4, dynamic_dim=2, feature_dim=8, hidden_dim=8,
                conv_width=4, dataset_size=10)
    built = []
    original = cdsvae.CDSVAE.__init__

    def record(self, cfg):
        built.append(cfg)
        original(self, cfg)

    monkeypatch.setattr(cdsvae.CDSVAE, "__init__", record)
    x = torch.rand(4, 3, 1, 16, 16)
    times = bench.step_times(base, {"C": {}, "D": dict(mi="off")}, x, rounds=3)
    assert list(times) == ["C", "D"] and all(t > 0 for t in times.values())
    assert [cfg.mi for cfg in built] == ["contrastive", "off"] and built[0].frame_shape == (1, 16, 16)
