"""Architecture adapters: per model family, where a block's MLP input and first dense layer(s) are.

This is the only module that names a family's modules. For every block the engine needs:

- the MLP module, whose input is the paper's A(C, x) (`a`),
- the first dense layer(s) inside it (`z = W a`, `W = [W_gate; W_up]`),
- the module whose output is added to the residual stream after the MLP (the MLP itself, or the norm
  after it in Gemma); the block's output minus that module's output is the residual `m` that the
  bias patch acts on. For parallel-residual blocks (GPT-NeoX) `m = h + Attn(h)` falls out the same way,
  and the MLP input does not see the context at all.
"""

from dataclasses import dataclass

from torch import nn

from icldaemon.exceptions import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureAdapter:
    family: str
    architectures: tuple[str, ...]
    layers: str  # attribute path from the *ForCausalLM model to the list of blocks
    mlp: str  # attribute path inside a block
    first_dense: tuple[str, ...]  # paths inside a block, in the order their outputs are concatenated
    mlp_output: str  # path inside a block of the module whose output joins the residual
    down_proj: str  # path inside a block of the MLP's last dense layer (the bias patch's home in an adapter)
    attention_projections: tuple[str, ...]  # paths inside a block of the query/key/value projection(s)
    parallel_residual: bool = False

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.get_submodule(self.layers))

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))


_LLAMA_LIKE = dict(
    layers="model.layers",
    mlp="mlp",
    first_dense=("mlp.gate_proj", "mlp.up_proj"),
    mlp_output="mlp",
    down_proj="mlp.down_proj",
    attention_projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter(family="llama", architectures=("LlamaForCausalLM",), **_LLAMA_LIKE),
    ArchitectureAdapter(family="mistral", architectures=("MistralForCausalLM",), **_LLAMA_LIKE),
    ArchitectureAdapter(family="qwen2", architectures=("Qwen2ForCausalLM",), **_LLAMA_LIKE),
    ArchitectureAdapter(family="qwen3", architectures=("Qwen3ForCausalLM",), **_LLAMA_LIKE),
    ArchitectureAdapter(
        family="gemma",
        architectures=("Gemma2ForCausalLM", "Gemma3ForCausalLM"),
        layers="model.layers",
        mlp="mlp",
        first_dense=("mlp.gate_proj", "mlp.up_proj"),
        mlp_output="post_feedforward_layernorm",
        down_proj="mlp.down_proj",
        attention_projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ),
    ArchitectureAdapter(
        family="phi3",
        architectures=("Phi3ForCausalLM",),
        layers="model.layers",
        mlp="mlp",
        first_dense=("mlp.gate_up_proj",),
        mlp_output="mlp",
        down_proj="mlp.down_proj",
        attention_projections=("self_attn.qkv_proj",),
    ),
    ArchitectureAdapter(
        family="gpt2",
        architectures=("GPT2LMHeadModel",),
        layers="transformer.h",
        mlp="mlp",
        first_dense=("mlp.c_fc",),
        mlp_output="mlp",
        down_proj="mlp.c_proj",
        attention_projections=("attn.c_attn",),
    ),
    ArchitectureAdapter(
        family="gpt_neox",
        architectures=("GPTNeoXForCausalLM",),
        layers="gpt_neox.layers",
        mlp="mlp",
        first_dense=("mlp.dense_h_to_4h",),
        mlp_output="mlp",
        down_proj="mlp.dense_4h_to_h",
        attention_projections=("attention.query_key_value",),
        parallel_residual=True,
    ),
)

_BY_ARCHITECTURE = {name: adapter for adapter in ADAPTERS for name in adapter.architectures}
SUPPORTED_ARCHITECTURES = tuple(sorted(_BY_ARCHITECTURE))


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for a loaded model, from `config.architectures` (or the model's class name)."""
    names = list(getattr(model.config, "architectures", None) or []) or [type(model).__name__]
    for name in names:
        if name in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[name]
    raise UnsupportedArchitectureError(
        f"architecture {', '.join(names)} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def dense_without_bias(module: nn.Module, x):
    """W x for a first dense layer, without its bias (nn.Linear, or GPT-2's transposed Conv1D)."""
    if isinstance(module, nn.Linear):
        return nn.functional.linear(x, module.weight)
    if type(module).__name__ == "Conv1D":
        return x @ module.weight
    raise UnsupportedArchitectureError(f"dense layer of type {type(module).__name__} is not supported")
