"""poolfs: mount blob-backed data pools as POSIX directories through FUSE."""

__version__ = "0.1.0"
