"""Input reconstruction from one example's gradients: analytic (fully connected ReLU nets) and gradient matching."""
from .analytic import (FullyConnectedInversion, LayerInversion, fully_connected_inversion, invert_fully_connected,
                       linear_stages)
from .matching import (METHODS, MatchingConfig, MatchingResult, gradient_distance, match_gradients,
                       total_variation)

__all__ = ["FullyConnectedInversion", "LayerInversion", "METHODS", "MatchingConfig", "MatchingResult",
           "fully_connected_inversion", "gradient_distance", "invert_fully_connected", "linear_stages", "match_gradients", "total_variation"]
