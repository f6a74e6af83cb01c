"""Tiny random-weight checkpoints for the host tests; the builder lives in ``antipure.random_checkpoint``."""
from antipure.random_checkpoint import (FAMILIES, SIZE_MULTIPLE, TinySD15, TinySD20, TinySDXL,  # noqa: F401
                                        _Noise, _random_state, _vae_state, build, checkpoint_state, register,
                                        save_checkpoint)
