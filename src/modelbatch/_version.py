"""The package version: the one place it is written (``pyproject.toml`` reads it from here).

``0.2.0.dev0``: the public package index holds an earlier prototype of this design as
``modelbatch`` 0.1.0, so this code sorts after it (PEP 440: ``0.1.0 < 0.2.0.dev0 < 0.2.0``)
and says that it is a development version, not a release.
"""

__version__ = "0.2.0.dev0"
