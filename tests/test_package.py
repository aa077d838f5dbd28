"""Package-level guarantees: importing pyroflows has no global side effects (STYLE rule 8)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import torch, pyro
from torch.distributions import Distribution
before = (Distribution._validate_args, torch.get_default_dtype(),
          torch.get_default_device(), len(pyro.get_param_store()),
          {k: id(v) for k, v in vars(pyro.distributions).items()},
          {k: id(v) for k, v in vars(torch.distributions.Transform).items()})
import importlib, pkgutil
import pyroflows
for info in pkgutil.walk_packages(pyroflows.__path__, "pyroflows."):
    importlib.import_module(info.name)
after = (Distribution._validate_args, torch.get_default_dtype(),
         torch.get_default_device(), len(pyro.get_param_store()),
         {k: id(v) for k, v in vars(pyro.distributions).items()},
         {k: id(v) for k, v in vars(torch.distributions.Transform).items()})
assert before == after, [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
print("ok")
"""


def test_import_has_no_global_side_effects():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_version_is_exposed():
    import pyroflows

    assert isinstance(pyroflows.__version__, str) and pyroflows.__version__.count(".") == 2


def test_hypothesis_is_derandomized_by_default():
    """STYLE rule 16: the suite cannot fail by chance (conftest.py's ``ci`` profile)."""
    from hypothesis import settings

    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        assert settings.default.derandomize and settings.default.database is None
