"""Every private library internal the project patches (finlora.patches.PATCHES): the
installed version is the one the patch was written for, and the patched names still exist. A
failure names the patch: read that library's new code before moving the pin."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest

from finlora.patches import PATCHES


@pytest.mark.parametrize("names", list(PATCHES))
def test_patched_internal_is_where_it_was_written_for(names):
    package, version, by = PATCHES[names]
    installed = importlib.metadata.version(package)
    assert installed == version, f"{by} patches {names}, written for {package} {version}; {installed} is installed"
    for dotted in (n.strip() for n in names.split(",")):
        module, _, attr = dotted.rpartition(".")
        try:
            obj = importlib.import_module(module)
        except ImportError:  # a class attribute: module.Class.attr
            module, _, cls = module.rpartition(".")
            obj = getattr(importlib.import_module(module), cls)
        assert hasattr(obj, attr), f"{by}: {dotted} is gone in {package} {installed}"


def test_no_other_module_patches_a_library():
    """`mock.patch` and `isEnabledFor` overrides are gone from the product: the plugin's table is the list."""
    from finlora import ROOT

    for p in (ROOT / "finlora").rglob("*.py"):
        text = p.read_text()
        assert "mock.patch" not in text and "isEnabledFor =" not in text, p
