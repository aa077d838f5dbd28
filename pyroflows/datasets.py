"""Benchmark datasets of the flow-VAE papers: static binarized MNIST, Caltech-101, Frey faces.

:func:`load_dataset` reads a dataset from a directory holding either the compact ``.npz``
files (bit-packed binary images, format below) or the original files
(``binarized_mnist_{train,valid,test}.amat``, ``caltech101_silhouettes_28_split1.mat``,
``frey_rawface.mat``), and can download the originals from their public URLs. Without a
directory it returns the small static-MNIST sample that ships with the package. Every split
is a float32 tensor of shape ``(N, H * W)`` with values in ``[0, 1]`` (exactly ``{0, 1}`` for
the binary datasets).

The npz format: ``shape`` (``[H, W]``) and, for the binary datasets, ``train``, ``valid`` and
``test`` as ``np.packbits(x_uint8, axis=-1)`` (``ceil(H * W / 8)`` bytes per image); for Frey
faces ``data``, the raw ``(N, H * W)`` uint8 grey levels 0-255. A file that breaks this
(unpacked images, a ``shape`` that disagrees with the data, Frey faces already scaled to
[0, 1], missing keys) or that is truncated or malformed raises a ``ValueError`` that names the
file and says what is wrong.

Downloads use https and are verified against pinned sha256 digests: of the files for MNIST
(the Larochelle & Murray binarization as MATLAB files, from a pinned commit of
``mingzhang-yin/ARM-gradient``) and Caltech-101, and of the image array for Frey faces (whose
file digest is not published; the array digest is that of the ``ff`` array the Sylvester-flows
code uses).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "Dataset", "download", "load_dataset", "load_sample"]

_SAMPLE = Path(__file__).parent / "data" / "binarized_mnist_sample.npz"
_MNIST_URL = (  # the Larochelle & Murray (2011) binarization, as MATLAB files holding X
    "https://raw.githubusercontent.com/mingzhang-yin/ARM-gradient/"
    "bac893cfcec486bbd00b755b12cf8402053b0e84/"
)
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


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any failure to read or validate ``path`` into a ``ValueError`` naming the file."""
    try:
        yield
    except _FileError:
        raise
    except FileNotFoundError as err:
        raise _FileError(f"{path}: missing file ({err.strerror})") from err
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, IndexError) as err:
        raise _FileError(f"{path}: {err or type(err).__name__}") from err
    except Exception as err:  # scipy.io and numpy raise many kinds for a malformed file
        raise _FileError(f"{path}: malformed or truncated file ({err!r})") from err


class _FileError(ValueError):
    """A ``ValueError`` whose message already names the file."""


def _unpack(packed: np.ndarray, d: int, key: str) -> np.ndarray:
    """Unpack ``np.packbits(x, axis=-1)`` rows back to ``(N, d)`` 0/1 uint8."""
    packed = np.asarray(packed)
    width = -(-d // 8)
    if packed.ndim != 2 or packed.dtype != np.uint8 or packed.shape[1] != width:
        unpacked = packed.ndim == 2 and packed.shape[1] == d
        raise ValueError(
            f"{key!r} must be bit-packed images, np.packbits(x_uint8, axis=-1) of shape "
            f"(N, {width}) uint8 for shape {d} pixels; got {packed.dtype} {packed.shape}"
            + (" (unpacked images: pack them with np.packbits)" if unpacked else "")
            + ("" if unpacked else " (does 'shape' match the images?)")
        )
    return np.unpackbits(packed, axis=-1)[:, :d]


def _npz_shape(z: np.lib.npyio.NpzFile) -> tuple[int, int]:
    shape = tuple(int(s) for s in np.asarray(z["shape"]).ravel())
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"'shape' must be [H, W] with positive sizes; got {list(shape)}")
    return shape  # type: ignore[return-value]


def _from_npz(path: Path, name: str, binary: bool) -> Dataset:
    """Read the compact npz format (see the module docstring)."""
    with _reading(path), open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
        keys = ("data", "shape") if name == "frey" else ("train", "valid", "test", "shape")
        missing = [k for k in keys if k not in z]
        if missing:
            raise ValueError(f"missing keys {missing}; the npz has {sorted(z.keys())}")
        shape = _npz_shape(z)
        if name == "frey":  # one uint8 array, split by the caller's seed
            return _split_frey(z["data"], shape)
        d = shape[0] * shape[1]
        splits = {k: _unpack(z[k], d, k) for k in _SPLITS}
        return Dataset(**splits, shape=shape, binary=binary, name=name)


def _grey_levels(data: np.ndarray) -> np.ndarray:
    """Raw Frey faces as uint8 grey levels 0-255; anything else is a ``ValueError``."""
    x = np.asarray(data)
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise ValueError(f"Frey faces must be finite grey levels; got dtype {x.dtype}")
    if x.size and x.max() <= 1.0 and not np.array_equal(x, np.round(x)):
        raise ValueError(
            "Frey faces must be raw grey levels 0-255; got values in "
            f"[{x.min():g}, {x.max():g}] (already scaled to [0, 1]? store the raw uint8 array)"
        )
    if x.size and (x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.round(x))):
        raise ValueError(f"Frey faces must be integers 0-255; got [{x.min():g}, {x.max():g}]")
    return x.astype(np.uint8)


def _split_frey(data: np.ndarray, shape: tuple[int, int], seed: int = 123) -> Dataset:
    """Frey faces split of the Sylvester-flows code: shuffle with ``seed``, 1565/200/200."""
    x = _grey_levels(data).astype(np.float64)
    if x.ndim != 2 or x.shape[1] != shape[0] * shape[1] or len(x) < 1766:
        raise ValueError(
            f"Frey faces must have shape (N >= 1766, {shape[0] * shape[1]}) for shape "
            f"{list(shape)}; got {x.shape}"
        )
    x = x / 255.0
    np.random.RandomState(seed).shuffle(x)
    return Dataset(x[:1565], x[1565:1765], x[1765:], shape=shape, binary=False, name="frey")


def _read_amat(path: Path) -> np.ndarray:
    """Read a ``.amat`` split: whitespace-separated text rows, or a MATLAB file holding ``X``."""
    with _reading(path):
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


def _from_originals(root: Path, name: str, check_content: bool = False) -> Dataset:
    """Read the original file formats (``binarized_mnist_*.amat``, the Caltech and Frey .mat).

    ``check_content``: verify the Frey image array against its pinned digest.
    """
    if name == "mnist":
        splits = {}
        for split in _SPLITS:
            path = root / f"binarized_mnist_{split}.amat"
            with _reading(path):
                splits[split] = _validate(_read_amat(path), split, (28, 28), binary=True)
        return Dataset(**splits, shape=(28, 28), binary=True, name=name)
    if name == "caltech":
        path = root / "caltech101_silhouettes_28_split1.mat"

        def fix(raw: np.ndarray) -> np.ndarray:  # column-major, 1 = background
            return 1 - raw.reshape((-1, 28, 28)).reshape((-1, 784), order="F")

        keys = {"train": "train_data", "valid": "val_data", "test": "test_data"}
        with _reading(path):
            mat = _loadmat(path)
            splits = {s: fix(mat[k]) for s, k in keys.items()}
            return Dataset(**splits, shape=(28, 28), binary=True, name=name)
    path = root / "frey_rawface.mat"
    with _reading(path):
        faces = _grey_levels(_loadmat(path)["ff"].T)
        if check_content:
            digest = hashlib.sha256(np.ascontiguousarray(faces).tobytes()).hexdigest()
            if digest != _FREY_ARRAY_SHA256:
                raise ValueError(
                    f"the image array's sha256 is {digest}; expected {_FREY_ARRAY_SHA256}"
                )
        return _split_frey(faces, (28, 20))


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
_MNIST_SHA256 = (  # train, valid, test
    "79a0312c7389d855cfc97e3812de3998417c5829d8a51543b56a90a91252ae7e",
    "7436afc856959075c7787025bb8a4ba2b520b9230ee39667c66aa7dd2819dd68",
    "5bc30222e1e7896cbccd1e1db6b28540cc1230f4d2d5473841a5f6cc54be8d38",
)
_SHA256: dict[str, str | None] = {  # digests of the files at the default URLs (None: unknown)
    **{f"binarized_mnist_{s}.amat": h for s, h in zip(_SPLITS, _MNIST_SHA256, strict=True)},
    "caltech101_silhouettes_28_split1.mat": (
        "eb6735e8d84b1850fabc5590124aab1755e90c9fd28123585324398405e1e42a"
    ),
    "frey_rawface.mat": None,
}
# sha256 of the (1965, 560) uint8 array ff.T of frey_rawface.mat (checked after download)
_FREY_ARRAY_SHA256 = "2438ba4f0d2a6bd8bac43de756141eaa33c8d248dd613d464bdb1210d9b7af78"


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

    Raises:
        OSError: The download failed; the message names the URL.
        ValueError: The sha256 does not match.

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
        try:
            with urllib.request.urlopen(url, timeout=60) as r, os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(r, f)
        except (urllib.error.URLError, OSError, ValueError) as err:
            if isinstance(err, urllib.error.HTTPError):
                err.close()  # it holds the open response
            plain = isinstance(err, urllib.error.HTTPError) or not hasattr(err, "reason")
            reason = err if plain else err.reason
            raise OSError(f"download of {url} failed: {reason}") from err
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
    over https from their public URLs and verified against pinned sha256 digests (see the
    module docstring), or fetched from ``base_url`` + file name (e.g. a mirror, whose files
    may use another encoding and are not checked against the pinned digests).

    Args:
        name: ``"mnist"`` (static binarized MNIST), ``"caltech"`` (Caltech-101 silhouettes,
            28x28, split 1) or ``"frey"`` (Frey faces, scaled to [0, 1], Sylvester-flows split
            with seed 123).
        data_dir: Directory with the data; ``None`` returns the embedded MNIST sample.
        download_missing: Download missing original files into ``data_dir``.
        base_url: Override the download location (the file name is appended).

    Raises:
        ValueError: Unknown name, missing files, or a file that is malformed, truncated or
            holds data with the wrong shape, non-finite values or values outside the
            dataset's range; the message names the file.
        OSError: A download failed; the message names the URL.

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
            download(url, root / f, sha256=None if base_url else _SHA256[f])
    elif missing:
        raise ValueError(
            f"no {name} data in data_dir={str(root)!r}: expected {_NPZ[name]} or "
            f"{sorted(_ORIGINALS[name])}; pass download_missing=True to fetch the originals"
        )
    check = name == "frey" and bool(missing) and not base_url  # no file digest is known
    return _from_originals(root, name, check_content=check)
