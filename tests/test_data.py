"""The built-in shapes dataset and Stochastic Moving MNIST from the real MNIST test digits."""
import gzip
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from data_prep import shapes, sm_mnist

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist not present")


def test_shapes_is_a_pure_function_of_the_seed():
    first, labels = shapes.render(50, seed=3)
    second, labels_again = shapes.render(50, seed=3)
    assert np.array_equal(first, second)
    assert all(np.array_equal(labels[k], labels_again[k]) for k in labels)
    assert not np.array_equal(first, shapes.render(50, seed=4)[0])
    assert first.shape == (50, 8, 32, 32, 3) and first.dtype == np.uint8
    assert shapes.render(2, 0, size=64)[0].shape == (2, 8, 64, 64, 3)


def test_shapes_direction_changes_only_the_frame_order():
    """A sequence with the other direction and the same static factors (large_side included) is
    the same sequence played backwards: the unordered set of frames never tells the direction."""
    videos, labels = shapes.render(300, seed=0)
    vertical_profile = videos.sum(axis=(1, 3, 4))     # depends on the (unlabelled) offset only
    matches = 0
    for n in range(300):
        for m in range(n + 1, 300):
            same_static = all(labels[k][n] == labels[k][m] for k in ("shape", "colour", "large_side"))
            flipped = labels["direction"][n] != labels["direction"][m]
            if same_static and flipped and np.array_equal(vertical_profile[n], vertical_profile[m]):
                assert np.array_equal(videos[n], videos[m][::-1])
                matches += 1
    assert matches >= 3


def test_shapes_colour_and_motion_are_rendered_as_labelled():
    videos, labels = shapes.render(20, seed=1)
    for n in range(20):
        pixels = videos[n].reshape(-1, 3)
        lit = pixels[pixels.any(axis=1)]
        assert (lit == shapes.PALETTE[labels["colour"][n]]).all()
        centre_x = [np.nonzero(videos[n, t].any(axis=(0, 2)))[0].mean() for t in range(8)]
        moving_right = centre_x[-1] > centre_x[0]
        assert moving_right == (labels["direction"][n] == 0)
        area = videos[n].any(axis=3).sum(axis=(1, 2))
        largest_at_right = area[int(np.argmax(centre_x))] > area[int(np.argmin(centre_x))]
        assert largest_at_right == (labels["large_side"][n] == 0)
        assert (area[-1] > area[0]) == shapes.growing(labels)[n]


def write_idx(path, array, gz):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_round_trips_and_rejects_truncation(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28))
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    write_idx(tmp_path / name, images, gz)
    assert np.array_equal(sm_mnist.read_idx(tmp_path / name), images)
    raw = (tmp_path / "cut").with_suffix("")
    write_idx(raw, images, False)
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(sm_mnist.MnistError, match="truncated"):
        sm_mnist.read_idx(raw)


def test_full_mnist_uses_the_official_split(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 30), ("t10k", 12)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)), False)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, count), False)
    pools = sm_mnist.digit_pools(tmp_path)
    assert len(pools["train"][0]) == 30 and len(pools["test"][0]) == 12


def test_missing_mnist_files_name_what_was_expected(tmp_path):
    with pytest.raises(sm_mnist.MnistError, match="t10k-images-idx3-ubyte"):
        sm_mnist.digit_pools(tmp_path)


@needs_mnist
def test_real_mnist_test_digits_split_into_disjoint_pools():
    pools = sm_mnist.digit_pools(MNIST)
    train_images, train_labels = pools["train"]
    test_images, test_labels = pools["test"]
    assert train_images.shape == (8000, 28, 28) and test_images.shape == (2000, 28, 28)
    assert set(np.unique(train_labels)) == set(range(10))
    assert not np.shares_memory(train_images, test_images)


@needs_mnist
def test_sm_mnist_sequences_from_real_digits():
    images, labels = sm_mnist.digit_pools(MNIST)["test"]
    videos, out_labels, trajectories = sm_mnist.generate(images, labels, 40, seed=0, size=64, frames=15)
    assert videos.shape == (40, 15, 64, 64, 1) and videos.dtype == np.uint8
    assert (out_labels["digit_low"] <= out_labels["digit_high"]).all()
    assert out_labels["motions"].max() < len(sm_mnist.LABELS["motions"])
    assert trajectories.shape == (40, 15, 2, 2)
    # Digits stay on the canvas, move at most size/16 pixels a frame, and bounce.
    assert trajectories.min() >= 16 and trajectories.max() <= 48
    steps = np.abs(np.diff(trajectories, axis=1))
    assert steps.max() <= 4
    # Each frame shows ink where the trajectories say the digits are.
    for n in range(5):
        for t in range(15):
            for slot in range(2):
                x, y = trajectories[n, t, slot].astype(int)
                assert videos[n, t, y - 16:y + 16, x - 16:x + 16].max() > 0
    again = sm_mnist.generate(images, labels, 40, seed=0, size=64, frames=15)[0]
    assert np.array_equal(videos, again)
    assert sm_mnist.generate(images, labels, 3, seed=0, size=32)[0].shape == (3, 15, 32, 32, 1)


class FakeResponse:
    """An HTTP response serving ``payload`` in 100-byte chunks, failing after ``fail_after`` bytes."""

    def __init__(self, payload, fail_after=None):
        self.payload, self.sent, self.fail_after = payload, 0, fail_after
        self.headers = {"Content-Length": str(len(payload))}

    def read(self, size):
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        chunk = self.payload[self.sent:self.sent + min(size, 100)]
        self.sent += len(chunk)
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def mnist_payloads(tmp_path):
    """The four MNIST files as small real gzip IDX files, and their MD5 sums."""
    import hashlib
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (30, 28, 28)),
              "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 30),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 12)}
    payloads = {}
    tmp_path.mkdir(parents=True)
    for name, array in arrays.items():
        write_idx(tmp_path / name, array, True)
        payloads[name] = (tmp_path / name).read_bytes()
    return payloads, {name: hashlib.md5(data).hexdigest() for name, data in payloads.items()}


def test_an_interrupted_download_is_never_trusted_and_a_finished_one_is_reused(tmp_path, monkeypatch):
    payloads, md5 = mnist_payloads(tmp_path / "served")
    monkeypatch.setattr(sm_mnist, "FILES_MD5", md5)
    cache = tmp_path / "cache"
    requests = []

    def interrupted(url, timeout):
        requests.append(url)
        return FakeResponse(payloads[url.rsplit("/", 1)[1]], fail_after=300)
    monkeypatch.setattr(sm_mnist, "urlopen", interrupted)
    with pytest.raises(sm_mnist.MnistError, match="could not download MNIST.*ConnectionResetError.*--data-dir"):
        sm_mnist.download(cache, show_progress=False)
    assert not cache.exists()                   # nothing half-written is left behind
    cache.mkdir()                               # a partial file and a corrupt file from elsewhere
    (cache / "t10k-images-idx3-ubyte.gz.part").write_bytes(payloads["t10k-images-idx3-ubyte.gz"][:300])
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the file")
    monkeypatch.setattr(sm_mnist, "urlopen", lambda url, timeout: requests.append(url) or
                        FakeResponse(payloads[url.rsplit("/", 1)[1]]))
    requests.clear()
    assert sm_mnist.download(cache, show_progress=False) == cache
    assert len(requests) == 4                   # the corrupt file was fetched again
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == payloads
    requests.clear()
    assert sm_mnist.download(cache, show_progress=False) == cache and requests == []   # reused
    assert len(sm_mnist.digit_pools(cache)["train"][0]) == 30


def test_mnist_is_found_in_cdsvae_data_before_any_download(tmp_path, monkeypatch):
    payloads, _ = mnist_payloads(tmp_path / "data" / "mnist")
    monkeypatch.setenv("CDSVAE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(url, timeout):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(sm_mnist, "urlopen", offline)
    assert sm_mnist.locate(show_progress=False) == tmp_path / "data" / "mnist"
    monkeypatch.delenv("CDSVAE_DATA")
    assert sm_mnist.cache_folder() == tmp_path / "cache" / "cdsvae" / "mnist"
    with pytest.raises(sm_mnist.MnistError, match="URLError: no network.*CDSVAE_DATA"):
        sm_mnist.locate(show_progress=False)
