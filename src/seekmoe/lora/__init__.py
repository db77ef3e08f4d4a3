"""LoRA and QLoRA for DeepSeek-style MoE models: adapters on attention, shared experts, dense MLPs and each routed
expert (stacked factors through the grouped GEMMs), saved in PEFT's format and merged into plain model folders.

- config.py: LoRAConfig (rank, alpha, dropout, targets, nf4) and its checks
- layers.py: LoRALinear (dense projections) and LoRAExperts (the routed experts' weight provider)
- apply.py: apply_lora, walking a model from outside; which tensors an adapter holds
- peft_format.py: adapter_config.json + adapter_model.safetensors as peft reads them
- merge.py: attach an adapter folder to a model, merge it into a new folder (`seekmoe merge`)
- run.py: what a training run does with LoRA (build, save adapter/ and final/)
- nf4.py: QLoRA's 4-bit base weights through torchao (NF4Experts: the experts' stacks)
- load.py: QLoRA's model read block by block into NF4
"""

from .apply import AdaptedModel, apply_lora, lora_parameters
from .config import DEFAULT_TARGETS, TARGETS, LoRAConfig
from .layers import LoRAExperts, LoRALinear
from .merge import attach_adapter, merge_adapter
from .peft_format import read_adapter, save_adapter

__all__ = ["AdaptedModel", "DEFAULT_TARGETS", "LoRAConfig", "LoRAExperts", "LoRALinear", "TARGETS", "apply_lora",
           "attach_adapter", "lora_parameters", "merge_adapter", "read_adapter", "save_adapter"]
