"""The ``pyroflows vae`` command line: outputs, resume and argument errors."""

from __future__ import annotations

import json
import math

import pytest

from pyroflows.cli import build_parser, main

FAST = ["--epochs", "1", "--num-samples", "4", "--test-subset", "10", "--hidden-dim", "16"]
FAST += ["--latent-dim", "4", "--no-progress"]


def test_vae_writes_results_and_figure(tmp_path, capsys):
    assert (
        main(["vae", "--flow", "planar", "--num-flows", "2", *FAST, "--output-dir", str(tmp_path)])
        == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_test"] == 10 and results["epochs_run"] == 1
    assert math.isfinite(results["test_elbo"]) and results["test_log_likelihood"] < 0
    assert results["config"]["flow"] == "planar" and len(results["history"]) == 1
    png = (tmp_path / "vae.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert (tmp_path / "checkpoint.pt").exists()
    assert "test ELBO" in capsys.readouterr().err


def test_resume_continues_from_the_checkpoint(tmp_path, capsys):
    out = ["--output-dir", str(tmp_path), "--flow", "none"]
    main(["vae", *out, *FAST])
    args = [a if a != "1" else "2" for a in FAST]  # --epochs 2
    main(["vae", *out, *args, "--resume"])
    assert "resumed from" in capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2]


def test_bare_options_default_to_the_vae_command(tmp_path):
    main([*FAST, "--flow", "none", "--num-samples", "0", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert math.isnan(results["test_log_likelihood"])


def test_defaults_are_the_embedded_quick_run():
    args = build_parser().parse_args(["vae"])
    assert args.data_dir is None and args.dataset == "mnist" and args.flow == "planar"
    assert args.device == "cpu" and args.latent_dim == 64


@pytest.mark.parametrize(
    "argv,match",
    [
        (["vae", "--flow", "nope"], "--flow must be one of"),
        (["vae", "--epochs", "0"], "--epochs must be positive"),
        (["vae", "--warmup", "-1"], "--warmup must be >= 0"),
        (["vae", "--dataset", "omniglot"], "invalid choice"),
    ],
)
def test_argument_errors(argv, match, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert match in capsys.readouterr().err
