"""The wheel ships every subpackage and data file the code imports or reads."""

from __future__ import annotations

import tomllib

from conftest import ROOT


def test_every_subpackage_and_its_data_is_listed_for_the_wheel():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    source = ROOT / "src"
    found = {".".join(p.parent.relative_to(source).parts) for p in source.rglob("__init__.py")}
    assert set(setup["packages"]) == found | {"layerdiff.templates"}
    data = setup["package-data"]
    for package, patterns in data.items():
        folder = ROOT / setup["package-dir"].get(package, "src/" + package.replace(".", "/"))
        assert all(any(folder.glob(p)) for p in patterns), (package, patterns)
    assert "*.npy" in data["layerdiff.data"]  # the bundled photo
