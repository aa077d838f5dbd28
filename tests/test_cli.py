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


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors (e.g. an invalid choice)
        return e.code


@pytest.mark.parametrize(
    "argv,match",
    [
        (["vae", "--flow", "nope"], "error: --flow must be one of none, "),
        (["vae", "--epochs", "0"], "error: --epochs must be positive"),
        (["vae", "--warmup", "-1"], "error: --warmup must be >= 0"),
        (["vae", "--lr", "-1"], "error: --lr must be a positive, finite number; got -1.0"),
        (["vae", "--lr", "inf"], "error: --lr must be a positive, finite number; got inf"),
        (["vae", "--data-dir", "/nonexistent"], "error: --data-dir /nonexistent: no such dir"),
        (["vae", "--dataset", "caltech"], "error: --dataset caltech has no embedded sample"),
    ],
)
def test_user_errors_are_one_line_naming_the_flag(argv, match, capsys, tmp_path):
    assert _run([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_invalid_choice_is_argparses_error(capsys):
    assert _run(["vae", "--dataset", "omniglot"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_missing_files_and_unwritable_output_dir_name_the_flags(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(["vae", "--dataset", "caltech", "--data-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "--dataset caltech: no caltech data in --data-dir " in err and "--download" in err
    assert "download_missing" not in err and "data_dir" not in err and err.count("\n") == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _run(["vae", "--output-dir", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: --output-dir {blocker / 'out'}: not writable" in err and err.count("\n") == 1


def test_failed_download_names_the_url(tmp_path, capsys, monkeypatch):
    from pyroflows import datasets

    url = "http://127.0.0.1:9/binarized_mnist_train.amat"  # port 9: nothing listens
    files = dict(datasets._ORIGINALS, mnist={"binarized_mnist_train.amat": url})
    monkeypatch.setattr(datasets, "_ORIGINALS", files)
    argv = ["vae", "--data-dir", str(tmp_path / "d"), "--download"]
    assert _run([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"download of {url} failed" in err and err.count("\n") == 1, err


def test_help_lists_flows_and_defaults_without_rst(capsys):
    from pyroflows.transforms import CONDITIONAL_FLOWS

    with pytest.raises(SystemExit):
        main(["vae", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name in CONDITIONAL_FLOWS:
        assert name in text
    for flag in ("--dataset", "--latent-dim", "--epochs", "--lr", "--output-dir", "--seed"):
        after = text.split(f"{flag} ")[-1]
        assert "(default:" in after.split(" --")[0], flag
    assert "``" not in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_python_dash_m_pyroflows_runs_the_cli(monkeypatch, capsys):
    """``python -m pyroflows`` (and so ``torchrun -m pyroflows vae ...``) reaches main()."""
    import runpy

    monkeypatch.setattr("sys.argv", ["pyroflows", "--version"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("pyroflows", run_name="__main__")
    assert exit_info.value.code == 0 and "pyroflows" in capsys.readouterr().out
