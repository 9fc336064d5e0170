"""megahet: Megatron-style model-parallel LLM training across mixed hardware."""

__version__ = "0.1.0"


def load_model(checkpoint_dir: str, **kwargs):
    """Load any megahet checkpoint as one single-process model (see megahet.inference.load_model)."""
    from megahet.inference import load_model as _load
    return _load(checkpoint_dir, **kwargs)


__all__ = ["load_model", "__version__"]
