"""Networks: the denoisers (and the user's own), the (c)VAEs with a global or spatial latent,
the cINNs and the backbones they share."""
