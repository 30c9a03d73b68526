"""skaffold.yaml: builds both images from the repository root and deploys the chart."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.support.tools import REPO_ROOT

SKAFFOLD = yaml.safe_load((REPO_ROOT / "skaffold.yaml").read_text())
CHART_VALUES = yaml.safe_load((REPO_ROOT / "charts/kubiot/values.yaml").read_text())
PIPELINES = {"default": SKAFFOLD, **{p["name"]: p for p in SKAFFOLD["profiles"]}}


def _image_key(image: str) -> str:
    """The suffix skaffold gives an artifact's template variables (IMAGE_REPO_<key>)."""
    return re.sub(r"[^a-zA-Z0-9]", "_", image)


def _has_value(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_config_is_a_v4beta_skaffold_config_with_an_eks_profile() -> None:
    assert SKAFFOLD["apiVersion"].startswith("skaffold/v4beta")
    assert SKAFFOLD["kind"] == "Config"
    assert "eks" in PIPELINES


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_both_images_build_from_the_repository_root(name: str) -> None:
    artifacts = {a["image"]: a for a in PIPELINES[name]["build"]["artifacts"]}
    assert artifacts["kubiot/operator"]["docker"]["dockerfile"] == "operator/Dockerfile"
    assert artifacts["kubiot/ingest"]["docker"]["dockerfile"] == "ingest/Dockerfile"
    for artifact in artifacts.values():
        context = REPO_ROOT / artifact["context"]
        assert context.resolve() == REPO_ROOT
        assert (context / artifact["docker"]["dockerfile"]).is_file()


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_helm_release_points_at_existing_files_and_real_values(name: str) -> None:
    images = {_image_key(a["image"]) for a in PIPELINES[name]["build"]["artifacts"]}
    (release,) = PIPELINES[name]["deploy"]["helm"]["releases"]
    assert (REPO_ROOT / release["chartPath"] / "Chart.yaml").is_file()
    assert release["valuesFiles"]
    for values_file in release["valuesFiles"]:
        assert (REPO_ROOT / values_file).is_file(), values_file
    for key, template in release["setValueTemplates"].items():
        assert _has_value(CHART_VALUES, key), f"{key} is not a chart value"
        for variable in re.findall(r"\{\{\.IMAGE_[A-Z]+_(\w+)\}\}", template):
            assert variable in images, f"{template} names no built image"


def test_eks_profile_pushes_and_uses_the_eks_values() -> None:
    eks = PIPELINES["eks"]
    assert eks["build"]["local"]["push"] is True
    (release,) = eks["deploy"]["helm"]["releases"]
    assert release["valuesFiles"] == ["charts/kubiot/values-eks.yaml"]
    (default_release,) = SKAFFOLD["deploy"]["helm"]["releases"]
    assert default_release["valuesFiles"] == ["charts/kubiot/values-minikube.yaml"]
