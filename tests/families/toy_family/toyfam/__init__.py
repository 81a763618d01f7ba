"""A toy model family, written the way a new family is added: this folder and one registration.

The conformance suite (``tests/families/test_conformance.py``) copies this folder to a temporary
directory, imports it, registers ``FAMILY`` with `mosaicdiff.families.register_family` and runs every
check on it: the proof that a family needs nothing outside its folder.
"""

from mosaicdiff.core.family import Family
from toyfam.adapter import TOY
from toyfam.model import MosaicToy

FAMILY = Family("toy", "toyfam.ToyDenoiser", TOY, MosaicToy, "toyfam.testing")
