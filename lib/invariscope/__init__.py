"""invariscope: reconstruct and analyze the invariances of low-dose CT denoisers.

Companion library to Eulig et al., "Reconstructing and analyzing the invariances of
low-dose CT image denoising networks", Med Phys 52(1):188-200, 2025.

The layout follows the data flow:

- ``config``: params files and paths;
- ``data``: the simulated cohort, the Mayo import, data sets and crop loaders;
- ``models``: denoisers, (c)VAEs, cINNs;
- ``stages``: training each model, sampling invariances, the embedding and the analysis;
- ``evaluation``: metrics, Table 1, Table 2's statistics, the tolerance check;
- ``figures``: every figure; ``handoffs``: the files one stage passes to the next;
  ``provenance``: what each stage's results depend on and where its checkpoints are;
  ``names``: method keys and labels; ``notebook``: the notebooks' common setup;
- ``pipeline`` / ``workflow``: ``run_all.sh`` and the Snakemake workflow.
"""

__version__ = "0.1.0"
