"""invariscope: reconstruct and analyze the invariances of low-dose CT denoisers.

Companion library to Eulig et al., "Reconstructing and analyzing the invariances of
low-dose CT image denoising networks", Med Phys 52(1):188-200, 2025.
"""

__version__ = "0.1.0"
