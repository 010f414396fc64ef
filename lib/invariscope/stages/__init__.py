"""The pipeline's stages, in data-flow order: train the denoisers (``denoiser_training``), their
conditional VAEs (``vae_training``) and cINNs (``cinn_training``), sample the invariances
(``invariances``), learn the similarity embedding (``embedding``) and analyze (``analysis``);
``training`` is the loop they share."""
