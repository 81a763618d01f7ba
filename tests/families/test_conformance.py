"""Every registered family, and a family loaded from a folder outside the package, pass the
conformance suite (`conformance.FamilyConformance`)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from mosaicdiff import families
from tests.families.conformance import FamilyConformance

TOY_FAMILY = Path(__file__).parent / "toy_family" / "toyfam"


@pytest.fixture(autouse=True)
def _torch_backend():
    """The fast torch reference backend of the kernel ops (the kernels have their own tests)."""
    from mosaic_kernels import ops

    with ops.use_backend("torch"):
        yield


class TestRegisteredFamilies(FamilyConformance):
    @pytest.fixture(params=[f.name for f in families.FAMILIES], scope="class")
    @classmethod
    def family(cls, request):
        return next(f for f in families.FAMILIES if f.name == request.param)


class TestAFamilyFromAFolder(FamilyConformance):
    """The toy family is one folder: copied elsewhere, imported and registered, it passes the suite
    with no file of the package changed."""

    @pytest.fixture(scope="class")
    @classmethod
    def family(cls, tmp_path_factory):
        root = tmp_path_factory.mktemp("plugins")
        shutil.copytree(TOY_FAMILY, root / "toyfam")
        sys.path.insert(0, str(root))
        before = list(families.FAMILIES)
        try:
            import toyfam

            yield families.register_family(toyfam.FAMILY)
        finally:
            families.FAMILIES[:] = before
            sys.path.remove(str(root))
            for name in [m for m in sys.modules if m == "toyfam" or m.startswith("toyfam.")]:
                del sys.modules[name]

    def test_the_family_is_not_in_the_package(self, family):
        assert family.name == "toy" and "mosaicdiff" not in family.mosaic_class.__module__
        assert family in families.FAMILIES
