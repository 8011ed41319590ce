"""Result files: what each one records about its run, where it goes and under which name,
reading it back, and which files each figure draws.

Every command that measures or simulates writes one JSON file. It starts with
`result_header(schema, command)`: the schema (`pymoe.<kind>/<version>`), the command line,
the git commit, the date, the machine and the package versions. `write_result` writes it as
`<folder>/<stamp>-<name>.json`, the stamp being the UTC time (`20261123T084459Z`), so that
runs never overwrite each other and sort by time. `read_result` and `load_results` read
files back.

The figures (`pymoe graphs`) draw the files that `results/figures.toml` lists for them and
nothing else; `FigureList` reads that list (its header says how to add a run).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
FIGURES_FILE = "figures.toml"


# -- provenance: the header of every result file ------------------------------

def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = value.split()
    except OSError:
        pass
    return model, [f for f in CPU_FLAGS_OF_INTEREST if f in flags]


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """The CPU (model, vector extensions), memory, OS, PyTorch's threads and the GPU, if any."""
    import torch

    model, flags = _cpuinfo()
    info = {
        "hostname": platform.node(),
        "cpu_model": model,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        # What this process may run on (taskset): MAX sizes its CPU worker pool by it.
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    """Python's version and those of pymoe and the packages that decide its speed."""
    out = {"python": sys.version.split()[0]}
    for package in ("pymoe", "max", "mojo", "torch", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


SOURCE_COMMIT_ENV = "PYMOE_SOURCE_COMMIT"
_SOURCE_COMMIT = re.compile(r"([0-9a-f]{7,40})(-dirty)?")


def git_commit() -> dict:
    """The commit of the code that ran, whether the tree differed from it (`dirty`), and
    where that came from (`commit_source`).

    A copy of a tree whose .git is stale (the lent GPU machines get the working tree with
    the .git of an older commit, so git would name that commit, dirty) is named by its
    caller in PYMOE_SOURCE_COMMIT: a commit hash, with "-dirty" appended when the tree had
    uncommitted changes (`$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty)` in
    the caller's checkout). Otherwise git
    is asked, in the source tree itself or, for an installed package (pip install .), in
    the checkout in the current directory; None outside a pymoe git checkout. A HEAD whose
    commit is not in the repository's objects (a partial .git copy) is recorded as such,
    with `dirty` None, rather than skipped."""
    claimed = os.environ.get(SOURCE_COMMIT_ENV)
    if claimed:
        match = _SOURCE_COMMIT.fullmatch(claimed.strip())
        if not match:  # recorded, not raised: some commands write their header after the run
            return {"commit": None, "dirty": None,
                    "commit_source": f"{SOURCE_COMMIT_ENV}={claimed!r}, which is not a commit hash"}
        return {"commit": match[1], "dirty": bool(match[2]), "commit_source": SOURCE_COMMIT_ENV}
    for root in (REPO_ROOT, Path.cwd()):
        if not (root / "kernels" / "moe_gate.mojo").is_file():
            continue

        def git(*args, root=root):
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        try:
            head = git("rev-parse", "HEAD")
        except (OSError, subprocess.SubprocessError):
            continue  # not a git checkout (a source archive): try the next root
        try:
            git("cat-file", "-e", f"{head}^{{commit}}")
            dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        except (OSError, subprocess.SubprocessError):
            return {"commit": head, "dirty": None,
                    "commit_source": f"git, inconsistent: HEAD names {head[:9]}, which is not in the repository's "
                                     f"objects (a stale or partial .git copy?); set {SOURCE_COMMIT_ENV}"}
        return {"commit": head, "dirty": dirty, "commit_source": "git"}
    return {"commit": None, "dirty": None, "commit_source": None}


def provenance(command: str) -> dict:
    """Where and how a result was produced: command, commit, date (UTC), machine, versions."""
    return {
        "command": command,
        **git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
    }


def command_line() -> str:
    """This process's `pymoe ...` command line, as result files record it."""
    return " ".join(["pymoe", *sys.argv[1:]])


def result_header(schema: str, command: str) -> dict:
    """The keys every result file starts with: its schema, then its provenance."""
    return {"schema": schema, **provenance(command)}


# -- writing ------------------------------------------------------------------

def file_stamp(date: str | None = None) -> str:
    """A UTC time as result file names start with it (20261123T084459Z): that of an ISO
    date (a result's `date`), or now."""
    when = _dt.datetime.fromisoformat(date) if date else _dt.datetime.now(_dt.timezone.utc)
    return when.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def slug(text: str) -> str:
    """A device or model name as a file name part: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA-H100-80GB-HBM3'."""
    return re.sub("[^A-Za-z0-9]+", "-", text).strip("-")


def write_json(path: str | Path, payload: dict) -> Path:
    """Write payload as indented JSON at path (its folder made if need be)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path


def write_result(folder: str | Path, name: str, payload: dict, *, stamp: str | None = None) -> Path:
    """Write a result as `<folder>/<stamp>-<name>.json` and return its path; the stamp is
    now unless given (`file_stamp(result["date"])` names a file by its run's start)."""
    return write_json(Path(folder) / f"{stamp or file_stamp()}-{name}.json", payload)


# -- reading ------------------------------------------------------------------

class ResultError(ValueError):
    """A result file that is missing, not JSON, or not a result."""


def read_result(path: str | Path) -> dict:
    """One result file's contents; a clear ResultError if it is missing or unreadable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or "schema" not in data:
        raise ResultError(f"{path}: not a result file (no schema)")
    return data


def load_results(results_dir: str | Path, schema: str | None = None) -> list[tuple[Path, dict]]:
    """Every result file under results_dir (of the given schema, if one is given) in path
    order, which is time order within a folder; rendered figures and unreadable files are
    left out."""
    found = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        if "graphs" in path.parts:
            continue
        try:
            data = read_result(path)
        except ResultError:
            continue
        if schema is None or data["schema"] == schema:
            found.append((path, data))
    return found


# -- which files each figure draws ----------------------------------------------

class FigureListError(ValueError):
    """figures.toml is malformed, or names a file that is missing or of the wrong kind."""


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise FigureListError(f"{path}: not valid TOML ({err})") from None


@dataclass
class FigureList:
    """`<results>/figures.toml` read: which result files (paths relative to results/) each
    figure draws. The file groups the figures that draw the same files:

        [offload-sweeps]
        figures = ["offload_speedup.png", ...]
        files = ["offload/20261123T145935Z-simulated-switch-lm-switch-aux-cache25.json", ...]

    Where two listed files hold the same run (same device and preset, same model, ...), a
    figure draws the one listed later. A group with no figures (`figures = []`) lists files
    that no figure draws on purpose: `newer_unlisted` says nothing of them."""

    results_dir: Path
    files: dict[str, list[str]] = field(default_factory=dict)  # figure -> its files
    not_drawn: list[str] = field(default_factory=list)  # the files of groups without figures
    group: dict[str, str] = field(default_factory=dict)  # figure -> its group
    exists: bool = True
    asked: dict[str, tuple[str, ...]] = field(default_factory=dict)  # figure -> the schemas it draws
    _read: dict[Path, dict] = field(default_factory=dict, repr=False)

    @property
    def path(self) -> Path:
        return self.results_dir / FIGURES_FILE

    @classmethod
    def read(cls, results_dir: str | Path) -> FigureList:
        """The list in results_dir; an empty one (no figure listed) if there is none."""
        figures = cls(Path(results_dir))
        if not figures.path.is_file():
            figures.exists = False
            return figures
        for group, table in _read_toml(figures.path).items():
            if (not isinstance(table, dict) or set(table) != {"figures", "files"}
                    or not all(isinstance(table[k], list) and all(isinstance(v, str) for v in table[k])
                               for k in ("figures", "files"))):
                raise FigureListError(f"{figures.path}: [{group}] needs exactly `figures` and `files`, "
                                      "two lists of strings")
            if not table["figures"]:
                figures.not_drawn += table["files"]
            for figure in table["figures"]:
                if figure in figures.files:
                    raise FigureListError(f"{figures.path}: {figure} is in [{figures.group[figure]}] and [{group}]")
                figures.files[figure], figures.group[figure] = list(table["files"]), group
        return figures

    def load(self, figure: str, schemas: tuple[str, ...]) -> list[tuple[Path, dict]] | None:
        """The files listed for the figure, read, in list order; None if it is not listed.
        FigureListError if a listed file is missing, unreadable or of none of `schemas`
        (the schemas the figure draws)."""
        self.asked[figure] = schemas
        if figure not in self.files:
            return None
        out = []
        for name in self.files[figure]:
            path = self.results_dir / name
            if path not in self._read:
                try:
                    self._read[path] = read_result(path)
                except ResultError as err:
                    raise FigureListError(f"{self.path.as_posix()} [{self.group[figure]}] lists {name}, "
                                          f"but {err}") from None
            data = self._read[path]
            if data["schema"] not in schemas:
                raise FigureListError(f"{self.path.as_posix()} [{self.group[figure]}] lists {name}, a "
                                      f"{data['schema']} file; {figure} draws {' and '.join(schemas)} files")
            out.append((path, data))
        return out

    def unknown_figures(self) -> list[str]:
        """Listed figures that no `load` asked for: names that pymoe does not draw."""
        return [figure for figure in self.files if figure not in self.asked]

    def newer_unlisted(self) -> list[str]:
        """Notes on result files that the list leaves out although they are newer than every
        file of their schema that it lists for a figure: perhaps a run a figure should now
        draw. (Older ones are taken as runs that later listed ones repeat.) Files in a group
        without figures are left out on purpose and get no note."""
        listed = {self.results_dir / name for names in [*self.files.values(), self.not_drawn] for name in names}
        newest: dict[str, str] = {}  # schema -> its newest listed file's date
        groups: dict[str, set[str]] = {}  # schema -> the groups that list files of it
        for figure, schemas in self.asked.items():
            for name in self.files.get(figure, ()):
                data = self._read.get(self.results_dir / name)
                if data is not None and data["schema"] in schemas:
                    newest[data["schema"]] = max(newest.get(data["schema"], ""), data.get("date", ""))
                    groups.setdefault(data["schema"], set()).add(f"[{self.group[figure]}]")
        notes = []
        for path, data in load_results(self.results_dir):
            schema = data["schema"]
            if path not in listed and schema in newest and data.get("date", "") > newest[schema]:
                where = ", ".join(sorted(groups[schema]))
                notes.append(f"{path.as_posix()} ({schema}, run {data.get('date', '?')[:16]}) is newer than every "
                             f"file of its kind that {self.path.as_posix()} lists ({where}): "
                             "add it to a group there if a figure should draw it, or to a group without figures "
                             "if none should")
        return notes
