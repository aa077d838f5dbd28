"""Train a flow VAE on your own data: N images (or vectors) with values in [0, 1].

    python examples/train_vae.py --data my_images.npy            # (N, H, W) or (N, D)
    python examples/train_vae.py --data faces.npz --key x --flow sylvester-orthogonal
    python examples/train_vae.py                                 # the embedded MNIST sample
    python examples/train_vae.py --num-steps 2                   # smoke test, seconds

--data is a .npy file (one array) or a .npz file (the array named by --key), of shape
(N, H, W) or (N, D) (then the image shape is (1, D)). uint8 data are divided by 255; the
VAE's Bernoulli likelihood scores grey levels in [0, 1] by their cross-entropy, and
--binarize thresholds them at 0.5 instead. A random 10% of rows (at least one) is held out
for validation and early stopping. Writes vae.pt (the VAE's state_dict), results.json and
samples.png (validation images, reconstructions, samples) to --output-dir.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from pyroflows import VAE, Trainer, evaluate  # noqa: E402
from pyroflows.datasets import load_sample  # noqa: E402
from pyroflows.transforms import CONDITIONAL_FLOWS  # noqa: E402


def load_images(path: str | None, key: str, binarize: bool) -> tuple[torch.Tensor, tuple]:
    """Rows ``(N, H * W)`` as float32 in [0, 1] and the image shape ``(H, W)``."""
    if path is None:
        sample = load_sample()
        return torch.cat([sample.train, sample.valid]), sample.shape
    with open(path, "rb") as f:
        loaded = np.load(f, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            if key not in loaded:
                raise SystemExit(f"--key {key!r} is not in {path}; it has {sorted(loaded)}")
            loaded = loaded[key]
    x = np.asarray(loaded)
    if x.ndim not in (2, 3) or len(x) < 2:
        raise SystemExit(f"--data {path}: expected (N >= 2, H, W) or (N, D); got {x.shape}")
    shape = x.shape[1:] if x.ndim == 3 else (1, x.shape[1])
    x = x.reshape(len(x), -1).astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    if binarize:
        x = (x > 0.5).astype(np.float32)
    return torch.from_numpy(x), tuple(int(s) for s in shape)


def save_figure(vae: VAE, x: torch.Tensor, shape: tuple, path: Path, n: int = 8) -> None:
    rows = [x[:n], vae.reconstruct(x[:n]), vae.sample(n)]
    fig, axes = plt.subplots(3, n, figsize=(n, 3), squeeze=False)
    for r, imgs in enumerate(rows):
        for c in range(n):
            axes[r, c].set_axis_off()
            if c < len(imgs):
                image = imgs[c].reshape(shape).detach().numpy()
                axes[r, c].imshow(image, cmap="gray", vmin=0, vmax=1)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _report(h: dict) -> None:
    print(f"epoch {h['epoch']}: train ELBO {h['train_elbo']:.2f}, valid {h['valid_elbo']:.2f}")


def main(args: argparse.Namespace) -> dict:
    pyro.set_rng_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, shape = load_images(args.data, args.key, args.binarize)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    n_valid = max(1, len(x) // 10)
    train, valid = x[order[n_valid:]], x[order[:n_valid]]
    vae = VAE(shape, args.latent_dim, args.flow, args.num_flows, hidden_dim=args.hidden_dim)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    epochs = math.ceil(args.num_steps / steps_per_epoch)  # whole epochs, at least one
    trainer = Trainer(
        vae, train, valid, batch_size=args.batch_size, lr=args.lr,
        warmup_epochs=min(10, epochs // 2), early_stopping_epochs=20, seed=args.seed,
    )  # fmt: skip
    print(f"{len(train)} training rows of shape {shape}, {epochs} epochs of {steps_per_epoch}")
    trainer.fit(epochs, on_epoch=_report)
    scores = evaluate(vae, valid, num_samples=args.num_importance)
    torch.save(vae.state_dict(), out / "vae.pt")
    save_figure(vae, valid, shape, out / "samples.png")
    results = {"valid": scores, "epochs": trainer.epoch, "history": trainer.history}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"validation ELBO {scores['elbo']:.2f} nats per row; wrote {out}/vae.pt")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", default=None, help=".npy or .npz file; default: MNIST sample")
    parser.add_argument("--key", default="x", help="array name inside an .npz file")
    parser.add_argument("--binarize", action="store_true", help="threshold values at 0.5")
    flows = ", ".join(["none", *sorted(CONDITIONAL_FLOWS)])
    parser.add_argument("--flow", default="planar", help=f"flow family, one of: {flows}")
    parser.add_argument("--num-flows", type=int, default=4, help="number of flow layers")
    parser.add_argument("--latent-dim", type=int, default=16, help="size of the latent z")
    parser.add_argument("--hidden-dim", type=int, default=300, help="MLP width")
    parser.add_argument("--num-steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=100, help="mini-batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--num-importance", type=int, default=100, help="IS samples for log p")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--output-dir", default="outputs/train_vae", help="output folder")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
