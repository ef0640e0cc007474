"""Triton kernels of relprop, installed as ``relprop.kernels`` (never as a top-level
``kernels`` module).  Imported lazily by the backend dispatch; see README.md here for the
primitives they implement."""
