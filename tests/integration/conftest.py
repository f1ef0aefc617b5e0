"""Integration fixtures: edgecache instances (tests.support.edge) on top of the root conftest's registries."""

from tests.support.edge import edge_factory, http  # noqa: F401  (fixtures)
