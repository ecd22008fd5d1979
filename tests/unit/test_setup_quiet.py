"""`make setup` says only what matters: TimescaleDB's build, configured exactly as
deploy/setup/build-timescaledb.sh does it, runs no git in a source tree that is no checkout."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "setup" / "build-timescaledb.sh"
PG_CONFIG = "/usr/lib/postgresql/15/bin/pg_config"
# where the script leaves the extracted source package (its WORK default, then src/build)
SOURCE = Path(
    os.environ.get("FIELDLINE_BUILD_DIR", "/var/tmp/fieldline-build/timescaledb")
) / "src" / "build"  # fmt: skip


def bootstrap_flags() -> list[str]:
    """The -D flags the script hands TimescaleDB's ./bootstrap (continued lines joined)."""
    text = re.sub(r"\\\n\s*", " ", SCRIPT.read_text())
    line = next(x for x in text.splitlines() if x.strip().startswith("./bootstrap "))
    words = shlex.split(line.split(">", 1)[0].replace('"$PG_CONFIG"', PG_CONFIG))
    return [w for w in words[1:] if w.startswith("-D")]


def test_the_script_turns_git_off() -> None:
    assert "-DCMAKE_DISABLE_FIND_PACKAGE_Git=TRUE" in bootstrap_flags()


def test_the_build_prints_no_git_errors_outside_a_checkout(tmp_path: Path) -> None:
    """It printed six `fatal: not a git repository` lines: TimescaleDB's `gitcheck` target runs
    git describe, rev-parse and log on every make (build, then install)."""
    if not (SOURCE / "CMakeLists.txt").exists() or shutil.which("cmake") is None:
        pytest.skip(f"no TimescaleDB source at {SOURCE} (left there by `make setup`) or no cmake")
    if not Path(PG_CONFIG).exists():
        pytest.skip(f"no {PG_CONFIG}")
    outside = subprocess.run(
        ["git", "rev-parse", "--git-dir"], cwd=SOURCE, capture_output=True, check=False
    )
    assert outside.returncode != 0, "the source must be outside a git checkout for this test"
    build = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(SOURCE), "-B", str(build), *bootstrap_flags()],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert configure.returncode == 0, configure.stderr[-2000:]
    assert "fatal:" not in configure.stderr
    # the target that ran git on every make; building all of TimescaleDB would take minutes
    gitcheck = subprocess.run(
        ["make", "-C", str(build), "gitcheck"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert gitcheck.returncode == 0, gitcheck.stderr[-2000:]
    assert (build / "src" / "gitcommit.h").exists(), "the gitcheck target ran"
    assert "fatal:" not in gitcheck.stderr, gitcheck.stderr
