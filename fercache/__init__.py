"""fercache: facial expression / action-unit recognition on frozen encoder features cached in Zarr stores."""

__version__ = "0.5.0"
