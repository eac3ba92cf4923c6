"""sbtrain: train and evaluate causal language models with Scatterbrain attention."""

__version__ = "0.1.0"
