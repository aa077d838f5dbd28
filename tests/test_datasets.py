"""Datasets: embedded sample, npz and original formats, downloads (loopback only), errors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pyroflows.datasets import download, load_dataset, load_sample

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def binary_rows(n: int, d: int = 784, seed: int = 0) -> np.ndarray:
    return (np.random.RandomState(seed).rand(n, d) < 0.2).astype(np.uint8)


def write_npz(path: Path, splits: dict[str, np.ndarray], shape=(28, 28)) -> None:
    packed = {k: np.packbits(v, axis=-1) for k, v in splits.items()}
    np.savez_compressed(path, **packed, shape=np.array(shape), n_features=np.array(784))


def write_amat(root: Path, splits: dict[str, np.ndarray]) -> None:
    for name, x in splits.items():
        np.savetxt(root / f"binarized_mnist_{name}.amat", x, fmt="%g")


@pytest.fixture
def splits():
    return {
        "train": binary_rows(5, seed=1),
        "valid": binary_rows(3, seed=2),
        "test": binary_rows(4, seed=3),
    }


def test_embedded_sample():
    data = load_sample()
    assert data.train.shape == (1000, 784) and data.valid.shape == (200, 784)
    assert data.test.shape == (200, 784) and data.shape == (28, 28) and data.binary
    assert data.train.dtype == torch.float32
    assert set(data.train.unique().tolist()) == {0.0, 1.0}
    assert 0.1 < data.train.mean() < 0.16  # static MNIST: about 13% ones
    assert load_dataset().test.equal(data.test)
    assert (
        Path(__file__)
        .resolve()
        .parents[1]
        .joinpath("pyroflows", "data", "binarized_mnist_sample.npz")
        .stat()
        .st_size
        < 200_000
    )


def test_npz_format_round_trip(tmp_path, splits):
    write_npz(tmp_path / "binarized_mnist.npz", splits)
    data = load_dataset("mnist", tmp_path)
    for k, v in splits.items():
        assert torch.equal(getattr(data, k), torch.from_numpy(v).float())


def test_amat_text_and_matlab_formats(tmp_path, splits):
    write_amat(tmp_path, splits)
    data = load_dataset("binarized_mnist", tmp_path)
    assert torch.equal(data.valid, torch.from_numpy(splits["valid"]).float())
    scipy_io = pytest.importorskip("scipy.io")
    mat_dir = tmp_path / "mat"
    mat_dir.mkdir()
    for k, v in splits.items():  # the ARM-gradient copy: MATLAB files named .amat
        scipy_io.savemat(mat_dir / f"binarized_mnist_{k}.amat", {"X": v})
    assert torch.equal(load_dataset("mnist", mat_dir).test, data.test)


def test_caltech_original_mat_is_transposed_and_inverted(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    x = {k: binary_rows(n, seed=n) for k, n in (("train", 4), ("valid", 2), ("test", 3))}
    # the raw .mat layout: column-major images with 1 = background
    raw = {k: 1 - v.reshape(-1, 28, 28).transpose(0, 2, 1).reshape(-1, 784) for k, v in x.items()}
    keys = {"train": "train_data", "valid": "val_data", "test": "test_data"}
    mat = {keys[k]: v.astype(np.float64) for k, v in raw.items()}
    scipy_io.savemat(tmp_path / "caltech101_silhouettes_28_split1.mat", mat)
    data = load_dataset("caltech", tmp_path)
    for k, v in x.items():
        assert torch.equal(getattr(data, k), torch.from_numpy(v).float())


def test_frey_original_and_npz_agree(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    faces = np.random.RandomState(0).randint(8, 239, size=(1965, 560)).astype(np.uint8)
    scipy_io.savemat(tmp_path / "frey_rawface.mat", {"ff": faces.T})
    data = load_dataset("frey", tmp_path)
    assert (len(data.train), len(data.valid), len(data.test)) == (1565, 200, 200)
    assert data.shape == (28, 20) and not data.binary
    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    np.savez_compressed(npz_dir / "freyfaces.npz", data=faces, shape=np.array([28, 20]))
    other = load_dataset("freyfaces", npz_dir)
    assert torch.equal(other.test, data.test)
    # the split is the Sylvester-flows one: seed-123 shuffle of data / 255
    x = faces / 255.0
    np.random.RandomState(123).shuffle(x)
    torch.testing.assert_close(data.test, torch.from_numpy(x[1765:]).float())


@pytest.mark.skipif(not (SHARED / "binarized_mnist.npz").exists(), reason="no shared data")
def test_shared_mnist_matches_its_readme():
    data = load_dataset("mnist", SHARED)
    assert [len(data.train), len(data.valid), len(data.test)] == [50000, 10000, 10000]
    assert [int(s.sum()) for s in (data.train, data.valid, data.test)] == [
        5118041,
        1028036,
        1038896,
    ]
    with np.load(Path(__file__).parents[1] / "pyroflows/data/binarized_mnist_sample.npz") as z:
        index = {k: torch.from_numpy(z[f"{k}_index"]).long() for k in ("train", "valid", "test")}
    sample = load_sample()
    for k, idx in index.items():
        assert torch.equal(getattr(data, k)[idx], getattr(sample, k))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server over ``tmp_path / "www"``; never the internet."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_from_loopback_server(tmp_path, server, splits):
    root, url = server
    write_amat(root, splits)
    dest = tmp_path / "data"
    with pytest.raises(ValueError, match="download_missing=True"):
        load_dataset("mnist", dest)
    data = load_dataset("mnist", dest, download_missing=True, base_url=url)
    assert torch.equal(data.train, torch.from_numpy(splits["train"]).float())
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        f"binarized_mnist_{k}.amat" for k in ("test", "train", "valid")
    )


def test_download_checks_sha256_and_leaves_nothing_on_mismatch(tmp_path, server):
    root, url = server
    (root / "f.bin").write_bytes(b"abc")
    good = hashlib.sha256(b"abc").hexdigest()
    assert download(f"{url}/f.bin", tmp_path / "ok.bin", sha256=good).read_bytes() == b"abc"
    with pytest.raises(ValueError, match="sha256"):
        download(f"{url}/f.bin", tmp_path / "bad.bin", sha256="0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.bin", "www"]


def test_bad_data_raises_clear_errors(tmp_path, splits):
    bad = dict(splits, test=splits["test"].astype(np.float64))
    bad["test"][1, 3] = np.nan
    write_amat(tmp_path, bad)
    with pytest.raises(ValueError, match="test contains non-finite values"):
        load_dataset("mnist", tmp_path)
    bad["test"] = splits["test"][:, :700]
    write_amat(tmp_path, bad)
    with pytest.raises(ValueError, match=r"test must have shape \(N, 784\)"):
        load_dataset("mnist", tmp_path)
    bad["test"] = splits["test"] * 2
    write_amat(tmp_path, bad)
    with pytest.raises(ValueError, match="test must be binary"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "cifar"}, "dataset must be one of"),
        ({"name": "frey"}, "only mnist has an embedded sample"),
        ({"name": "caltech", "data_dir": "/nonexistent"}, "no caltech data in data_dir"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bad_npz_mnist(root: Path, splits) -> tuple[Path, str]:
    path = root / "binarized_mnist.npz"
    np.savez_compressed(path, **splits, shape=np.array([28, 28]))  # not bit-packed
    return path, r"'train' must be bit-packed .*\(unpacked images: pack them with np.packbits\)"


def _bad_npz_shape(root: Path, splits) -> tuple[Path, str]:
    path = root / "binarized_mnist.npz"
    write_npz(path, splits, shape=(28, 20))
    return path, r"'train' must be bit-packed .*\(N, 70\).*does 'shape' match the images"


def _frey_scaled(root: Path, splits) -> tuple[Path, str]:
    path = root / "freyfaces.npz"
    faces = np.random.RandomState(0).randint(8, 239, size=(1965, 560)) / 255.0
    np.savez_compressed(path, data=faces, shape=np.array([28, 20]))
    return path, r"raw grey levels 0-255; got values in \[0.03.*already scaled"


def _truncated_npz(root: Path, splits) -> tuple[Path, str]:
    path = root / "binarized_mnist.npz"
    write_npz(path, splits)
    _truncate(path)
    return path, ""


def _missing_keys(root: Path, splits) -> tuple[Path, str]:
    path = root / "binarized_mnist.npz"
    np.savez_compressed(path, train=np.packbits(splits["train"], axis=-1))
    return path, r"missing keys \['valid', 'test', 'shape'\]"


def _ragged_amat(root: Path, splits) -> tuple[Path, str]:
    write_amat(root, splits)
    path = root / "binarized_mnist_valid.amat"
    path.write_text(path.read_text() + "0 1 0\n")
    return path, ""


def _truncated_mat(root: Path, splits) -> tuple[Path, str]:
    scipy_io = pytest.importorskip("scipy.io")
    path = root / "caltech101_silhouettes_28_split1.mat"
    mat = {k: binary_rows(50).astype(np.float64) for k in ("train_data", "val_data", "test_data")}
    scipy_io.savemat(path, mat)
    _truncate(path)
    return path, ""


def _nan_amat(root: Path, splits) -> tuple[Path, str]:
    bad = dict(splits, test=splits["test"].astype(np.float64))
    bad["test"][0, 0] = np.nan
    write_amat(root, bad)
    return root / "binarized_mnist_test.amat", "test contains non-finite values"


@pytest.mark.parametrize(
    "make",
    [
        _bad_npz_mnist,
        _bad_npz_shape,
        _frey_scaled,
        _truncated_npz,
        _missing_keys,
        _ragged_amat,
        _truncated_mat,
        _nan_amat,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_files_raise_value_errors_naming_the_file(tmp_path, splits, make):
    path, what = make(tmp_path, splits)
    name = {"binarized": "mnist", "caltech101": "caltech", "freyfaces": "frey"}[
        path.name.split("_")[0].split(".")[0]
    ]
    with pytest.raises(ValueError, match=rf"^{path}: .*{what}"):
        load_dataset(name, tmp_path)


def test_failed_download_names_the_url(tmp_path, server):
    _, url = server
    with pytest.raises(OSError, match=rf"download of {url}/nope.bin failed: HTTP Error 404"):
        download(f"{url}/nope.bin", tmp_path / "x.bin")
    with pytest.raises(OSError, match="download of .*binarized_mnist_train.amat failed"):
        load_dataset("mnist", tmp_path / "d", download_missing=True, base_url=url + "/missing")
    assert not (tmp_path / "x.bin").exists()


def test_default_downloads_are_https_and_pinned():
    from pyroflows import datasets

    urls = {f: u for files in datasets._ORIGINALS.values() for f, u in files.items()}
    assert all(u.startswith("https://") for u in urls.values()), urls
    assert set(urls) == set(datasets._SHA256)
    assert all(len(h) == 64 for h in filter(None, datasets._SHA256.values()))


def test_downloads_from_default_urls_are_verified(tmp_path, server, monkeypatch, splits):
    """Fake originals served in place of the real ones fail the pinned digests."""
    from pyroflows import datasets

    scipy_io = pytest.importorskip("scipy.io")
    root, url = server
    write_amat(root, splits)
    faces = np.random.RandomState(0).randint(8, 239, size=(1965, 560)).astype(np.uint8)
    scipy_io.savemat(root / "frey_rawface.mat", {"ff": faces.T})
    local = {name: {f: f"{url}/{f}" for f in files} for name, files in datasets._ORIGINALS.items()}
    monkeypatch.setattr(datasets, "_ORIGINALS", local)
    with pytest.raises(
        ValueError, match="sha256 of .*binarized_mnist_train.amat is .*; expected 79a0"
    ):
        load_dataset("mnist", tmp_path / "mnist", download_missing=True)
    assert not (tmp_path / "mnist" / "binarized_mnist_train.amat").exists()
    with pytest.raises(ValueError, match=r"frey_rawface.mat: the image array's sha256 is"):
        load_dataset("frey", tmp_path / "frey", download_missing=True)
    assert load_dataset("frey", root).shape == (28, 20)  # present files are not re-checked
