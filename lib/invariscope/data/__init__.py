"""Data: the simulated low-dose CT cohort (phantoms, fan-beam physics), the Mayo LDCT import,
the on-disk data set and the crop loaders every stage trains on."""
