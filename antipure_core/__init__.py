"""AntiPure core: plain torch, no host import. See ``model.DiffusionModel`` for the model interface."""

__version__ = "0.1.0"
