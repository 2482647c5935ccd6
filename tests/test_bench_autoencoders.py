"""bench/sm_mnist_autoencoders.py --glyphs K --pairings: the glyph decoder drawn with every
assignment of glyphs to places, and the mixture likelihood over them, against direct computations (the glyph decoder's own tests, and the glimpses', are in test_model.py)."""
import math

import pytest
import torch

import cdsvae


@pytest.mark.parametrize("heatmap", [False, True])
def test_the_second_pairing_is_the_drawing_with_the_two_glyph_codes_exchanged(heatmap, load_bench):
    bench = load_bench("sm_mnist_autoencoders")
    cfg = cdsvae.Config(**cdsvae.preset("sm-mnist", "cpu"), frame_shape=(1, 32, 32), frames=15)
    torch.manual_seed(0)
    decoder = bench.GlyphDecoder(cfg, 2, heatmap).eval()
    latent = torch.randn(5, cfg.static_dim + cfg.dynamic_dim)
    half = cfg.static_dim // 2
    exchanged = torch.cat([latent[:, half:cfg.static_dim], latent[:, :half], latent[:, cfg.static_dim:]], 1)
    with torch.no_grad():
        drawings = decoder.pairings(latent)
        assert drawings.shape == (2, 5, 1, 32, 32)
        torch.testing.assert_close(drawings[0], decoder(latent))
        torch.testing.assert_close(drawings[1], decoder(exchanged), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(drawings[0], drawings[1])


def test_mixture_nll_is_minus_the_log_of_the_mean_likelihood_over_assignments(load_bench):
    bench = load_bench("sm_mnist_autoencoders")
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 1, 2, 2, dtype=torch.float64)       # 4 pixels: no underflow in exp
    frames = (torch.rand(3, 1, 2, 2, dtype=torch.float64) > 0.5).double()
    expected = []
    for n in range(3):
        likelihoods = []
        for p in range(2):
            probability = torch.sigmoid(logits[p, n])
            pixels = torch.where(frames[n] > 0, probability, 1 - probability)
            likelihoods.append(math.prod(pixels.flatten().tolist()))
        expected.append(-math.log(sum(likelihoods) / 2))
    torch.testing.assert_close(bench.mixture_nll(logits, frames), torch.tensor(expected, dtype=torch.float64))

