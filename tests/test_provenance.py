"""Provenance names pefteval's own source revision, never the repository of the project it runs in."""

from __future__ import annotations

import shutil
import subprocess

from pefteval_harness.provenance import source_revision
from tests.conftest import REPO

IGNORE = shutil.ignore_patterns("__pycache__")


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_own_checkout_gives_commit_and_dirty_flag(tmp_path):
    checkout = tmp_path / "pefteval"
    shutil.copytree(REPO / "pefteval_harness", checkout / "pefteval_harness", ignore=IGNORE)
    git("init", "-q", cwd=checkout)
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x", "--allow-empty", cwd=checkout)
    git("add", ".", cwd=checkout)
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "code", cwd=checkout)
    clean = source_revision(checkout / "pefteval_harness")
    assert clean["dirty"] is False and len(clean["sha"]) == 40
    (checkout / "pefteval_harness" / "errors.py").write_text("# edited\n")
    source_revision.cache_clear()
    assert source_revision(checkout / "pefteval_harness")["dirty"] is True


def test_a_package_inside_a_users_repository_records_no_revision(tmp_path):
    users = tmp_path / "my-project"
    package = users / ".venv" / "lib" / "site-packages" / "pefteval_harness"
    shutil.copytree(REPO / "pefteval_harness", package, ignore=IGNORE)
    git("init", "-q", cwd=users)
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "theirs", "--allow-empty", cwd=users)
    assert source_revision(package) is None
