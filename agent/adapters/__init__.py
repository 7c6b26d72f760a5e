"""Model adapters: how headroom finds blocks, attention and MLP inside a model."""
from headroom_sidecar.agent.adapters.base import (Adapter, AttentionRefs, BlockRefs, MlpRefs, ModelStructure,
                                 UnsupportedModelError, WeightLayout, register_adapter,
                                 registered_adapters, resolve_structure)
from headroom_sidecar.agent.adapters.gpt2 import GPT2Adapter
from headroom_sidecar.agent.adapters.hf_llama import HFLlamaAdapter
from headroom_sidecar.agent.adapters.phi3 import Phi3Adapter
from headroom_sidecar.agent.adapters.plain import PlainAdapter
from headroom_sidecar.agent.adapters.refused import MixtureOfExpertsRefusal

# Built-ins go last: adapters registered by users are tried first.
register_adapter(MixtureOfExpertsRefusal(), first=False)
register_adapter(HFLlamaAdapter(), first=False)
register_adapter(Phi3Adapter(), first=False)
register_adapter(GPT2Adapter(), first=False)
register_adapter(PlainAdapter(), first=False)

__all__ = ["Adapter", "AttentionRefs", "BlockRefs", "MlpRefs", "ModelStructure",
           "UnsupportedModelError", "WeightLayout", "register_adapter", "registered_adapters",
           "resolve_structure", "HFLlamaAdapter", "GPT2Adapter", "Phi3Adapter", "PlainAdapter",
           "MixtureOfExpertsRefusal"]
