"""atod_jax: Annealed Turn-aware On-policy Distillation for multi-turn LM agents."""
__version__ = "0.1.0"
