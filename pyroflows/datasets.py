"""Benchmark datasets of the flow-VAE papers: static binarized MNIST, Caltech-101, Frey faces.

:func:`load_dataset` reads a dataset from a directory holding either the compact ``.npz``
files (bit-packed binary images, see ``shared/data/README.md``) or the original files
(``binarized_mnist_{train,valid,test}.amat``, ``caltech101_silhouettes_28_split1.mat``,
``frey_rawface.mat``), and can download the originals from their public URLs. Without a
directory it returns the small static-MNIST sample that ships with the package. Every split
is a float32 tensor of shape ``(N, H * W)`` with values in ``[0, 1]`` (exactly ``{0, 1}`` for
the binary datasets).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "Dataset", "download", "load_dataset", "load_sample"]

_SAMPLE = Path(__file__).parent / "data" / "binarized_mnist_sample.npz"
_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_CALTECH_URL = "https://people.cs.umass.edu/~marlin/data/caltech101_silhouettes_28_split1.mat"
_FREY_URL = "https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
_ALIASES = {
    "mnist": "mnist",
    "binarized_mnist": "mnist",
    "caltech": "caltech",
    "caltech101": "caltech",
    "frey": "frey",
    "freyfaces": "frey",
}
DATASETS = ("mnist", "caltech", "frey")
"""Canonical dataset names accepted by :func:`load_dataset` (aliases are also accepted)."""


@dataclass
class Dataset:
    """Train/validation/test splits of an image dataset, flattened row-major.

    Attributes:
        train: ``(N_train, H * W)`` float32 tensor.
        valid: ``(N_valid, H * W)`` float32 tensor.
        test: ``(N_test, H * W)`` float32 tensor.
        shape: Image shape ``(H, W)``.
        binary: Whether the values are exactly ``{0, 1}``.
        name: Canonical dataset name.
    """

    train: Tensor
    valid: Tensor
    test: Tensor
    shape: tuple[int, int]
    binary: bool
    name: str

    def __post_init__(self) -> None:
        for split in ("train", "valid", "test"):
            setattr(self, split, _validate(getattr(self, split), split, self.shape, self.binary))


def _validate(x: np.ndarray | Tensor, split: str, shape: tuple[int, int], binary: bool) -> Tensor:
    """Convert to float32 and check the shape, finiteness and range of one split."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    d = shape[0] * shape[1]
    if x.dim() != 2 or x.shape[1] != d or x.shape[0] == 0:
        raise ValueError(f"{split} must have shape (N, {d}) with N > 0; got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{split} contains non-finite values (NaN or inf)")
    if binary and not ((x == 0) | (x == 1)).all():
        raise ValueError(f"{split} must be binary (0/1) for this dataset; found other values")
    if not binary and not ((x >= 0) & (x <= 1)).all():
        raise ValueError(f"{split} must lie in [0, 1]; got range [{x.min()}, {x.max()}]")
    return x


def _unpack(packed: np.ndarray, d: int) -> np.ndarray:
    """Unpack ``np.packbits(x, axis=-1)`` rows back to ``(N, d)`` 0/1 uint8."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1)[:, :d]


def _from_npz(path: Path, name: str, binary: bool) -> Dataset:
    """Read the compact bit-packed npz format (``shared/data/README.md``)."""
    with np.load(path, allow_pickle=False) as z:
        shape = tuple(int(s) for s in z["shape"])
        d = shape[0] * shape[1]
        if "data" in z:  # Frey faces: one uint8 array, split by the caller's seed
            return _split_frey(z["data"], shape)
        splits = {k: _unpack(z[k], d) for k in ("train", "valid", "test")}
    return Dataset(**splits, shape=shape, binary=binary, name=name)


def _split_frey(data: np.ndarray, shape: tuple[int, int], seed: int = 123) -> Dataset:
    """Frey faces split of the Sylvester-flows code: shuffle with ``seed``, 1565/200/200."""
    x = np.asarray(data, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != shape[0] * shape[1]:
        raise ValueError(f"Frey faces must have shape (N, 560); got {x.shape}")
    x = x / 255.0
    np.random.RandomState(seed).shuffle(x)
    return Dataset(x[:1565], x[1565:1765], x[1765:], shape=shape, binary=False, name="frey")


def _read_amat(path: Path) -> np.ndarray:
    """Read a ``.amat`` split: whitespace-separated text rows, or a MATLAB file holding ``X``."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"MATLAB":
        return _loadmat(path)["X"]
    return np.loadtxt(path, dtype=np.float32, ndmin=2)


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError as e:  # pragma: no cover - scipy ships with most scientific stacks
        raise ImportError(f"reading {path.name} needs scipy: pip install scipy") from e
    return loadmat(path)


def _from_originals(root: Path, name: str) -> Dataset:
    """Read the original file formats described in ``shared/data/README.md``."""
    if name == "mnist":
        splits = {s: _read_amat(root / f"binarized_mnist_{s}.amat") for s in _SPLITS}
        return Dataset(**splits, shape=(28, 28), binary=True, name=name)
    if name == "caltech":
        mat = _loadmat(root / "caltech101_silhouettes_28_split1.mat")

        def fix(raw: np.ndarray) -> np.ndarray:  # column-major, 1 = background
            return 1 - raw.reshape((-1, 28, 28)).reshape((-1, 784), order="F")

        keys = {"train": "train_data", "valid": "val_data", "test": "test_data"}
        splits = {s: fix(mat[k]) for s, k in keys.items()}
        return Dataset(**splits, shape=(28, 28), binary=True, name=name)
    return _split_frey(_loadmat(root / "frey_rawface.mat")["ff"].T, (28, 20))


_SPLITS = ("train", "valid", "test")
_NPZ = {
    "mnist": "binarized_mnist.npz",
    "caltech": "caltech101_silhouettes_28_split1.npz",
    "frey": "freyfaces.npz",
}
_ORIGINALS = {
    "mnist": {
        f"binarized_mnist_{s}.amat": f"{_MNIST_URL}binarized_mnist_{s}.amat" for s in _SPLITS
    },
    "caltech": {"caltech101_silhouettes_28_split1.mat": _CALTECH_URL},
    "frey": {"frey_rawface.mat": _FREY_URL},
}


def _canonical(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in _ALIASES:
        raise ValueError(f"dataset must be one of {sorted(_ALIASES)}; got {name!r}")
    return _ALIASES[name.lower()]


def download(url: str, dest: str | os.PathLike, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically (a partial download never appears at ``dest``).

    Args:
        url: Source URL (``http(s)://`` or ``file://``).
        dest: Destination file path; its directory is created.
        sha256: Expected hex digest; a mismatch raises ``ValueError`` and keeps no file.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "a.txt").write_text("0 1")
        >>> download((d / "a.txt").as_uri(), d / "b.txt").read_text()
        '0 1'
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(r, f)
        if sha256 is not None:
            digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
            if digest != sha256.lower():
                raise ValueError(f"sha256 of {url} is {digest}; expected {sha256}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def load_sample() -> Dataset:
    """The embedded static-MNIST sample: 1000 train, 200 valid, 200 test rows.

    Rows drawn at random (seed 0, kept in file order; the original test file is sorted by
    digit) from each split of the Larochelle & Murray (2011) binarization; the npz also holds
    their row numbers (``train_index``, ...). Results on it are a smoke test, not comparable
    to the papers.

    Example:
        >>> load_sample().train.shape
        torch.Size([1000, 784])
    """
    return _from_npz(_SAMPLE, "mnist", binary=True)


def load_dataset(
    name: str = "mnist",
    data_dir: str | os.PathLike | None = None,
    download_missing: bool = False,
    base_url: str | None = None,
) -> Dataset:
    """Load a benchmark dataset from ``data_dir`` (or the embedded MNIST sample).

    Files are looked up in ``data_dir`` in this order: the compact npz
    (``binarized_mnist.npz``, ``caltech101_silhouettes_28_split1.npz``, ``freyfaces.npz``),
    then the original files. With ``download_missing=True`` missing originals are fetched
    from their public URLs (or from ``base_url`` + file name, e.g. a mirror).

    Args:
        name: ``"mnist"`` (static binarized MNIST), ``"caltech"`` (Caltech-101 silhouettes,
            28x28, split 1) or ``"frey"`` (Frey faces, scaled to [0, 1], Sylvester-flows split
            with seed 123).
        data_dir: Directory with the data; ``None`` returns the embedded MNIST sample.
        download_missing: Download missing original files into ``data_dir``.
        base_url: Override the download location (the file name is appended).

    Raises:
        ValueError: Unknown name, missing files, or data with the wrong shape, non-finite
            values or values outside the dataset's range.

    Example:
        >>> data = load_dataset("mnist")  # the embedded sample
        >>> data.shape, data.test.shape
        ((28, 28), torch.Size([200, 784]))
    """
    name = _canonical(name)
    if data_dir is None:
        if name != "mnist":
            raise ValueError(f"only mnist has an embedded sample; pass data_dir for {name!r}")
        return load_sample()
    root = Path(data_dir)
    if (root / _NPZ[name]).exists():
        return _from_npz(root / _NPZ[name], name, binary=name != "frey")
    missing = [f for f in _ORIGINALS[name] if not (root / f).exists()]
    if missing and download_missing:
        for f in missing:
            url = base_url.rstrip("/") + "/" + f if base_url else _ORIGINALS[name][f]
            download(url, root / f)
    elif missing:
        raise ValueError(
            f"no {name} data in data_dir={str(root)!r}: expected {_NPZ[name]} or "
            f"{sorted(_ORIGINALS[name])}; pass download_missing=True to fetch the originals"
        )
    return _from_originals(root, name)
