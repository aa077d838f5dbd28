"""Mutation check for the generic flow tests: each mutant must make tests/test_transforms.py fail.

It edits source files and restores them, so run it on a scratch copy of the repository:

    mkdir -p /tmp/mut && git archive HEAD | tar -x -C /tmp/mut && cd /tmp/mut
    python tests/mutants.py
"""

from __future__ import annotations

import subprocess
import sys

PLANAR = "pyroflows/transforms/planar.py"
RADIAL = "pyroflows/transforms/radial.py"
MUTANTS = {  # name -> (file, original text, mutated text); -k selects the family's tests
    "planar: no constraint": (
        PLANAR,
        "    return torch.addcmul(u, gap / n2, w), one_plus_c.squeeze(-1)",
        "    return u, 1 + a.squeeze(-1)",
    ),
    "planar: ladj + 0.01": (
        PLANAR,
        "    return y, torch.log(det)\n",
        "    return y, torch.log(det) + 0.01\n",
    ),
    "radial: no constraint": (
        RADIAL,
        "F.softplus(alpha_raw).clamp_min(floor), F.softplus(beta_raw).clamp_min(floor)",
        "F.softplus(alpha_raw).clamp_min(floor), F.softplus(alpha_raw) + beta_raw",
    ),
    "radial: ladj + 0.01": (RADIAL, "    return y, ladj\n", "    return y, ladj + 0.01\n"),
}


def run_mutant(path: str, old: str, new: str, family: str) -> subprocess.CompletedProcess:
    src = open(path).read()
    if old not in src:
        raise ValueError(f"mutation target not found in {path}: {old!r}")
    try:
        open(path, "w").write(src.replace(old, new, 1))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        cmd += ["tests/test_transforms.py", "-k", family]
        return subprocess.run(cmd, capture_output=True, text=True)
    finally:
        open(path, "w").write(src)


def main() -> int:
    survivors = []
    for name, (path, old, new) in MUTANTS.items():
        proc = run_mutant(path, old, new, name.split(":")[0])
        failed = [ln.split("::")[1] for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
        print(f"{name:24s} {proc.stdout.strip().splitlines()[-1]}")
        for test in failed:
            print(f"    {test[:90]}")
        if proc.returncode == 0:
            survivors.append(name)
    print("surviving mutants:", survivors or "none")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
