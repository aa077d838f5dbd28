"""The density benchmarks run (one tiny configuration each) and render their tables."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "family", ["nice", "realnvp", "spline", "spline-ar", "maf", "actnorm", "linear-lu"]
)
def test_density_speed_rows(family):
    speed = _load("density_speed")
    args = speed.parse_args(["--repeats", "1", "--families", family])
    rows = speed.config_rows(args, torch.device("cpu"), family, 2, 4, 3)
    assert [r["op"] for r in rows] == ["log_prob", "train", "sample"]
    for r in rows:
        assert r["ours"] > 0 and r["pyro"] > 0 and r["ratio"] > 0
        assert speed.fmt(r).count("|") == 10
    # the full grid is the default; --quick keeps D <= 64 and B <= 256
    full, quick = speed.parse_args([]), speed.parse_args(["--quick"])
    assert (full.dims, full.batches, full.num_flows) == ([2, 64, 512], [1, 256, 8192], [1, 8])
    assert (quick.dims, quick.batches) == ([2, 64], [1, 256])


def test_density_speed_full_grid_skips_only_the_largest_autoregressive_sampling():
    speed = _load("density_speed")
    args = speed.parse_args([])
    skipped = {
        (f, op, k, d, b)
        for f in args.families
        for op in args.ops
        for k in args.num_flows
        for d in args.dims
        for b in args.batches
        if speed.work(f, op, k, d, b, args.hidden) > args.max_work
    }
    assert skipped == {
        ("maf", "sample", 8, 512, 8192),
        ("spline-ar", "sample", 1, 512, 8192),
        ("spline-ar", "sample", 8, 512, 8192),
    }


def test_density_toy_table(tmp_path):
    toy = _load("density_toy")
    example = toy.load_example()
    done = {}
    for seed, shift in ((0, 0.0), (1, 0.12)):
        for model, value in (("realnvp", -1.90), ("pyro-affine-coupling", -1.93)):
            done[f"{seed}/{model}"] = {
                "test": value + shift,
                "valid": 0.0,
                "steps": 100,
                "seconds": 1.0,
            }
        done[f"{seed}/zuko-realnvp"] = {"test": -1.80, "valid": 0, "steps": 1, "seconds": 1}
    args = toy.parse_args(["--json", str(tmp_path / "r.json")])
    text = toy.render(done, example, args)
    row = next(line for line in text.splitlines() if line.startswith("| realnvp |"))
    # gap per seed: ours - the best equivalent (zuko-realnvp, -1.80) = -0.10, +0.02
    assert "-0.040 (-0.100, +0.020)" in row and row.endswith("| yes |")


def test_density_speed_slow_rows_and_missing_peers(monkeypatch):
    speed = _load("density_speed")
    monkeypatch.setattr(speed, "ONE_ROUND_S", 0.0)  # every row "slow": the warm-up round
    args = speed.parse_args(["--ops", "log_prob"])
    (row,) = speed.config_rows(args, torch.device("cpu"), "realnvp", 1, 4, 2)
    assert row["rounds"] == 1 and "(1 round)" in speed.fmt(row)
    # Pyro's MADE needs hidden >= D: no Pyro MAF column at D = 512 with 64 hidden units
    assert speed.pyro_peer("maf", 1, 512, 64, 1) is None
    assert speed.pyro_peer("linear-lu", 1, 512, 64, 8192) is None  # (B, D, D) > 2^28


def test_density_speed_leaves_out_models_over_the_memory_limit():
    speed = _load("density_speed")
    # the row that took the whole 23 GB machine: Pyro's and zuko's splines, not ours
    assert speed.train_gb("spline", "ours", 8, 512, 8192) < 12
    assert speed.train_gb("spline", "pyro", 8, 512, 8192) > 12
    assert speed.train_gb("spline", "zuko", 8, 512, 8192) > 12
    args = speed.parse_args(["--repeats", "1", "--ops", "train", "--max-memory-gb", "1e-6"])
    (row,) = speed.config_rows(args, torch.device("cpu"), "spline", 1, 4, 1000)
    assert row["skipped"] and "skipped (not run: ours ~0.0016 GB, pyro" in speed.fmt(row)
    args = speed.parse_args(["--repeats", "1", "--ops", "train", "--max-memory-gb", "2.5e-3"])
    (row,) = speed.config_rows(args, torch.device("cpu"), "spline", 1, 4, 1000)
    assert row["ours"] > 0 and "pyro" not in row and "zuko" not in row
    assert speed.fmt(row).endswith(
        "| - | - | - (peers not run: pyro ~0.0052 GB, zuko ~0.0056 GB > --max-memory-gb 0.0025) |"
    )


def test_density_speed_rejects_families_it_does_not_time():
    speed = _load("density_speed")
    with pytest.raises(SystemExit):
        speed.parse_args(["--families", "planar"])


def test_density_speed_times_autoregressive_sampling_with_all_d_passes(monkeypatch):
    speed = _load("density_speed")
    made = importlib.import_module("pyroflows.transforms.made")
    calls = []
    real = made.made_forward
    for name in ("pyroflows.transforms.iaf", "pyroflows.transforms.spline_autoregressive"):
        module = importlib.import_module(name)

        def counting(x, layers, real=real):
            calls.append(1)
            return real(x, layers)

        monkeypatch.setattr(module, "made_forward", counting)
    flow = speed.ours("spline-ar", 1, 6, 8)
    with torch.no_grad():
        flow.sample((3,))
    early = len(calls)
    calls.clear()
    with speed.all_passes(), torch.no_grad():
        flow.sample((3,))
    assert early < 6 and len(calls) == 6  # near the identity the exit comes early
    args = speed.parse_args(["--repeats", "1", "--ops", "sample"])
    (row,) = speed.config_rows(args, torch.device("cpu"), "maf", 1, 4, 3)
    slower = max(row["ours"], row["ours_all_passes"])
    peers = [row[n] for n in ("pyro", "zuko") if n in row]  # zuko: optional
    assert row["ratio"] == pytest.approx(min(peers) / slower)
    assert "(ours with the early exit:" in speed.fmt(row)
