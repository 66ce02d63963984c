"""Training machinery: the trainer loop, losses (a registry), optimizer groups, loop sampling,
held-out scoring, checkpoints and distributed training. Nothing is imported here, so the config
can read a loss's or a sampler's Config without loading the trainer."""
