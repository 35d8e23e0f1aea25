"""Statistics shared across MPI processes: the collectives both synchronized layers use."""

from ._mpi import PeerError

__all__ = ["PeerError"]
