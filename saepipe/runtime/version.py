"""The package version, recorded in the files saepipe writes (shard manifests, SAE files)."""

__version__ = "0.1.0"
