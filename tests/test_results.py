"""Provenance of result files: the commit, the dirty flag and where they came from."""

import subprocess

import pytest

from pymoe import results


def _git(root, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root,
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A one-commit git checkout that git_commit takes for a pymoe tree, as the current directory."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "moe_gate.mojo").write_text("# a kernel\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "one")
    monkeypatch.setattr(results, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(results.SOURCE_COMMIT_ENV, raising=False)
    return tmp_path


def test_commit_from_git_clean_and_dirty(checkout):
    head = _git(checkout, "rev-parse", "HEAD")
    assert results.git_commit() == {"commit": head, "dirty": False, "commit_source": "git"}
    (checkout / "kernels" / "moe_gate.mojo").write_text("# changed\n")
    assert results.git_commit() == {"commit": head, "dirty": True, "commit_source": "git"}


def test_head_missing_from_the_objects_is_recorded_as_inconsistent(checkout):
    """A .git copied without its newest objects names a commit git cannot read: recorded with
    dirty None and the reason, not skipped or taken for a clean tree."""
    head = _git(checkout, "rev-parse", "HEAD")
    (checkout / ".git" / "objects" / head[:2] / head[2:]).unlink()
    got = results.git_commit()
    assert got["commit"] == head and got["dirty"] is None
    assert got["commit_source"].startswith("git, inconsistent") and results.SOURCE_COMMIT_ENV in got["commit_source"]


@pytest.mark.parametrize("value, commit, dirty", [
    ("0123456789abcdef0123456789abcdef01234567", "0123456789abcdef0123456789abcdef01234567", False),
    ("6f1a5ad-dirty", "6f1a5ad", True),
])
def test_the_caller_names_the_commit_over_a_stale_git(checkout, monkeypatch, value, commit, dirty):
    (checkout / "kernels" / "moe_gate.mojo").write_text("# the tree of a newer commit\n")
    monkeypatch.setenv(results.SOURCE_COMMIT_ENV, value)
    assert results.git_commit() == {"commit": commit, "dirty": dirty, "commit_source": results.SOURCE_COMMIT_ENV}


def test_a_malformed_source_commit_is_recorded_not_trusted(monkeypatch):
    monkeypatch.setenv(results.SOURCE_COMMIT_ENV, "main")
    got = results.git_commit()
    assert got["commit"] is None and got["dirty"] is None and "'main'" in got["commit_source"]


def test_no_checkout_records_no_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(results.SOURCE_COMMIT_ENV, raising=False)
    assert results.git_commit() == {"commit": None, "dirty": None, "commit_source": None}
