"""Each image installs only what its process imports.

The operator image installs `kubiot[operator]`, the ingest image `kubiot[ingest]`. The sets are
resolved through the installed distributions' own metadata, and each process's entry point is
imported in a fresh interpreter to see which distributions it really loads.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
IMAGES = {"operator": "kubiot_operator.main", "ingest": "kubiot_ingest.main"}
NEVER_IN = {
    "ingest": {"kopf", "kubernetes", "cryptography", "cel-python"},
    "operator": {"asyncpg", "influxdb-client"},
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(extra: str) -> set[str]:
    """Every distribution `pip install kubiot[extra]` brings, from installed metadata."""
    wanted = [Requirement(r) for r in PROJECT["dependencies"]]
    wanted += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    seen: set[str] = set()
    while wanted:
        requirement = wanted.pop()
        name = canonical(requirement.name)
        if name in seen or name == "kubiot":
            continue
        seen.add(name)
        for line in metadata.requires(requirement.name) or []:
            nested = Requirement(line)
            if nested.marker is None or nested.marker.evaluate(
                    {"extra": next(iter(requirement.extras), "")}):
                wanted.append(nested)
    return seen


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_an_image_never_installs_what_the_other_process_needs(image: str) -> None:
    assert not closure(image) & NEVER_IN[image]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_each_dockerfile_installs_its_own_extra(image: str) -> None:
    dockerfile = (REPO / image / "Dockerfile").read_text()
    assert f'".[{image}]"' in dockerfile and f'"kubiot[{image}]"' in dockerfile


#: Run in a fresh interpreter: hide every distribution the image does not install, as if it
#: were absent (optional imports then take their fallback), and import the entry point.
IMAGE_PROBE = """
import importlib, importlib.abc, json, sys
from importlib import metadata
allowed = set(json.loads(sys.argv[2])) | {"kubiot"}
owners = {m: {d.lower().replace("_", "-") for d in ds}
          for m, ds in metadata.packages_distributions().items()}

class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        dists = owners.get(name.split(".")[0])
        if dists and not dists & allowed:
            raise ModuleNotFoundError(f"{name} is not installed in this image", name=name)
        return None

sys.meta_path.insert(0, NotInImage())
importlib.import_module(sys.argv[1])
"""


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_the_process_starts_with_only_what_its_image_installs(image: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMAGE_PROBE, IMAGES[image], json.dumps(sorted(closure(image)))],
        capture_output=True, text=True, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
