"""The names every stage shares: denoiser keys, their display labels, the VAEs' and cINNs' names.

A denoiser is known by its key (``cnn10``, ``redcnn``, ``wganvgg``, ``dugan``, ``gaussri`` or a
key of ``denoisers.custom``); its cVAE and cINN carry the same name, the two unconditional VAEs
:data:`UNCONDITIONAL` and :data:`UNCONDITIONAL_SPATIAL`.
"""

from __future__ import annotations

from invariscope.config.params import BUILTIN_DENOISERS, Params

__all__ = ["METHODS", "TRAINED_METHODS", "UNCONDITIONAL", "UNCONDITIONAL_SPATIAL", "LABELS",
           "check_name", "vae_name", "cinn_name", "is_unconditional"]

METHODS = BUILTIN_DENOISERS
#: The built-in denoisers that are trained (Gauss+RI is a fixed filter).
TRAINED_METHODS = tuple(m for m in METHODS if m != "gaussri")
#: The global-latent unconditional VAE (s_VAE; Figure 4).
UNCONDITIONAL = "unconditional"
#: The unconditional VAE of the spatial design (``vae.latent: spatial``): Figure 4's like-for-like
#: comparison with the spatial cVAEs. s_VAE keeps the global :data:`UNCONDITIONAL` VAE.
UNCONDITIONAL_SPATIAL = "unconditional_spatial"
_UNCONDITIONAL_NAMES = (UNCONDITIONAL, UNCONDITIONAL_SPATIAL)


class _Labels(dict):
    """Display names by key; an unknown key (a custom denoiser) is shown as itself."""

    def __missing__(self, key: str) -> str:
        return str(key)


#: Display names of the methods in tables and figures (``ld``: the low-dose input).
LABELS = _Labels({"ld": "LD", "cnn10": "CNN-10", "redcnn": "RED-CNN", "wganvgg": "WGAN-VGG",
                  "dugan": "DU-GAN", "gaussri": "Gauss+RI"})


def check_name(name: str, params: Params | None = None, also: tuple[str, ...] = ()) -> str:
    """``name`` lowercased if it is a built-in denoiser or (with ``params``) a key of
    ``denoisers.custom``; ValueError listing the allowed values (``also`` first) otherwise."""
    key = str(name).lower()
    known = params.denoisers.names if params is not None else METHODS
    if key not in known:
        raise ValueError(f"unknown denoiser {name!r}; allowed values: "
                         f"{', '.join([*also, *known])} (own denoisers: denoisers.custom)")
    return key


def is_unconditional(name: str | None) -> bool:
    """Whether ``name`` is one of the unconditional VAEs (None: the global one)."""
    return name is None or name in _UNCONDITIONAL_NAMES


def vae_name(denoiser: str | None, params: Params | None = None) -> str:
    """Folder / report name of a VAE: the denoiser key, or ``"unconditional"`` for None.

    Custom denoisers (``denoisers.custom``) are known only with ``params``.
    """
    if denoiser is None or denoiser == UNCONDITIONAL:
        return UNCONDITIONAL
    if denoiser == UNCONDITIONAL_SPATIAL:
        return UNCONDITIONAL_SPATIAL
    return check_name(denoiser, params, also=("None", repr(UNCONDITIONAL), repr(UNCONDITIONAL_SPATIAL)))


def cinn_name(denoiser: str, params: Params | None = None) -> str:
    """Folder name of a denoiser's cINN (the denoiser key; there is no unconditional cINN).

    Custom denoisers (``denoisers.custom``) are known only with ``params``.
    """
    return check_name(denoiser, params)
