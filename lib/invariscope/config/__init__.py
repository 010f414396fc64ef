"""Configuration: the params files (``params/*.yaml``, validated) and the paths built from the
repository root."""
