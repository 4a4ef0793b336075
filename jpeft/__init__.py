"""jpeft: parameter-efficient fine-tuning for JAX/Flax with Hugging Face PEFT checkpoints.

The public surface keeps PEFT's names::

    peft_model = jpeft.get_peft_model(flax_model, jpeft.LoraConfig(r=8, target_modules=["c_attn"]))
    peft_model.print_trainable_parameters()
    peft_model.save_pretrained("out")      # loads in torch with peft.PeftModel.from_pretrained
"""

from jpeft import (
    models,  # noqa: F401  (jpeft.models.AutoModelForCausalLM, ...)
    train,  # noqa: F401  (jpeft.train.make_train_step, ...)
)
from jpeft import tuners as _tuners  # noqa: F401  (registers the methods)
from jpeft.bindings.linen import LinenBinding
from jpeft.bindings.nnx import NNXBinding
from jpeft.bindings.nnx_layers import LayerSpec
from jpeft.bindings.nnx_layers import register_layer as register_nnx_layer
from jpeft.config import PeftConfig, PeftType, TaskType
from jpeft.core.modules import ModuleInfo
from jpeft.core.registry import config_from_dict
from jpeft.core.tree import combine, split
from jpeft.errors import CheckpointError, ConfigError, JpeftError, NoMatchingModuleError
from jpeft.mapping import get_peft_model
from jpeft.mixed_model import PeftMixedModel
from jpeft.nnx_module import PeftModule
from jpeft.peft_model import PeftModel, named_modules
from jpeft.prompt_learning import PromptLearningPeftModel
from jpeft.quant import QuantizationConfig, quantize_model
from jpeft.tuners.adalora import AdaLoraConfig
from jpeft.tuners.ia3 import IA3Config
from jpeft.tuners.loha import LoHaConfig
from jpeft.tuners.lora import LoftQConfig, LoraConfig
from jpeft.tuners.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType, PTuningConfig
from jpeft.tuners.prefix_tuning import PrefixTuningConfig
from jpeft.tuners.prompt_tuning import PromptTuningConfig, PromptTuningInit
from jpeft.tuners.vera import VeraConfig

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "CheckpointError",
    "ConfigError",
    "IA3Config",
    "JpeftError",
    "LayerSpec",
    "LinenBinding",
    "LoftQConfig",
    "LoHaConfig",
    "LoraConfig",
    "ModuleInfo",
    "NNXBinding",
    "NoMatchingModuleError",
    "PeftConfig",
    "PeftMixedModel",
    "PeftModel",
    "PeftModule",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningPeftModel",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PTuningConfig",
    "QuantizationConfig",
    "TaskType",
    "VeraConfig",
    "combine",
    "config_from_dict",
    "get_peft_model",
    "named_modules",
    "quantize_model",
    "register_nnx_layer",
    "split",
]
