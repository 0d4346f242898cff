"""The complete DeepSeek-V3.2 attention layer (MLA + DSA) and the signals that train its indexer.

* :class:`DSAConfig` — the layer's hyper-parameters (official ``ModelArgs`` names).
* :class:`DSALayer` — parameters, caches, prefill and decode; core ops through the active backend.
* :func:`load_layer` — one layer out of a (possibly fp8, sharded) safetensors checkpoint.
* :mod:`.training` / :mod:`.backward` — the indexer's KL loss (eqs. 3-4) and hand-written gradients.
"""

from .config import DSAConfig
from .layer import PARAMETER_NAMES, DSALayer, LayerProjections, parameter_shapes
from .loader import load_layer, load_layer_state_dict

__all__ = [
    "DSAConfig",
    "DSALayer",
    "LayerProjections",
    "PARAMETER_NAMES",
    "load_layer",
    "load_layer_state_dict",
    "parameter_shapes",
]
