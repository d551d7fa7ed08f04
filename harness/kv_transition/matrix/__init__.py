"""The engine × method × budget matrix: schema, expansion to cells, GPU packing, runner, lock files."""

from kv_transition.matrix.expand import EngineGroup, Expansion, MatrixCell, expand
from kv_transition.matrix.schema import MatrixFile, load_matrix

__all__ = ["EngineGroup", "Expansion", "MatrixCell", "MatrixFile", "expand", "load_matrix"]
