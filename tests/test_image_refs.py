"""The registry-host check that guards the Dockerfile, manifests and chart can fail."""

from __future__ import annotations

import pytest

from tests.image_refs import has_registry_host, image_refs


@pytest.mark.parametrize(
    ("ref", "host"),
    [
        ("qlora-runner:0.1.0", False),
        ("nvidia/cuda:12.8.1-runtime-ubuntu24.04", False),
        ("registry.example.com/team/qlora:1", True),
        ("localhost:5000/qlora:1", True),
        ("localhost/qlora", True),
    ],
)
def test_has_registry_host(ref: str, host: bool) -> None:
    assert has_registry_host(ref) is host


def test_image_refs_finds_every_form() -> None:
    text = (
        "ARG BASE_IMAGE=registry.example.com/cuda:1\nFROM ${BASE_IMAGE}\nFROM python:3.11 AS x\n"
        "  image: 'a/b:1'\n  repository: c/d\n"
    )
    assert image_refs(text) == ["a/b:1", "registry.example.com/cuda:1", "python:3.11", "c/d"]
