"""Evaluation: image metrics, Table 1 (``denoising``), Table 2's statistics (``stats``) and the
tolerance check of a finished run against the committed results (``headline``)."""
