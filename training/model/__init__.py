"""The GTR model: image encoder, triplane transformer, PixelShuffle upsampler, density/colour MLPs, triplane
sampling and volume rendering (paper §3.1, §3.2; docs/CONTRACTS.md "Model"). See docs/model.md."""

from training.model.gtr import GTR, flops_per_sample, parameter_count

__all__ = ["GTR", "flops_per_sample", "parameter_count"]
