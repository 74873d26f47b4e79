"""Architecture adapters: per model family, where a block's MLP input and first dense layer(s) are.

This is the only module that names a family's modules or reads its config for family differences. For
every block the engine needs:

- the MLP module, whose input is the paper's A(C, x) (`a`),
- the first dense layer(s) inside it (`z = W a`, `W = [W_gate; W_up]`),
- the module whose output is added to the residual stream after the MLP (the MLP itself, or the norm
  after it in Gemma), and the factor it is multiplied by on the way (GraniteMoeHybrid's residual
  multiplier); the block's output minus that product is the residual `m` that the bias patch acts on.
  For parallel-residual blocks (GPT-NeoX) `m = h + Attn(h)` falls out the same way, and the MLP input
  does not see the context at all,
- how its dense layers store their weights (`nn.Linear`'s [out, in], or GPT-2's transposed `Conv1D`),
- the kinds of attention its layers use and their sliding windows (from the model's config), which the
  engine's custom masks follow,
- in hybrid models, the Mamba2 (SSD) mixer that runs beside or instead of attention in a block, and the
  factors after the down projection (Falcon-H1's down multiplier), which a change of the down
  projection passes through.

Recurrent families whose context layer has no exact all-prefixes form here are refused by name with
the reason (`REFUSED`).
"""

from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers.pytorch_utils import Conv1D

from icldaemon.exceptions import UnsupportedArchitectureError

_DENSE_TYPE = {"linear": nn.Linear, "transposed": Conv1D}  # by weight_layout


@dataclass(frozen=True)
class ArchitectureAdapter:
    family: str
    architectures: tuple[str, ...]
    layers: str  # attribute path from the *ForCausalLM model to the list of blocks
    mlp: str  # attribute path inside a block
    first_dense: tuple[str, ...]  # paths inside a block, in the order their outputs are concatenated
    mlp_output: str  # path inside a block of the module whose output joins the residual
    down_proj: str  # path inside a block of the MLP's last dense layer (the bias patch's home in an adapter)
    # paths inside a block of the context layers' input projections (query/key/value, a mixer's in_proj):
    # rows with the same layer input have the same projections. A path a block lacks is skipped (hybrids
    # with attention in some blocks and a mixer in the others)
    attention_projections: tuple[str, ...]
    parallel_residual: bool = False
    mixer: str | None = None  # path inside a block of a Mamba2 (SSD) mixer; blocks without one are skipped
    down_scale: str | None = None  # attribute path inside a block: the MLP's own factor after its down projection
    mlp_output_scale: str | None = None  # attribute path inside a block: the factor on mlp_output before the residual
    experts: str | None = None  # config attribute counting routed experts; more than 0 is refused
    # the dense layers' weights: nn.Linear's [out, in], or "transposed" [in, out] (GPT-2's Conv1D)
    weight_layout: Literal["linear", "transposed"] = "linear"

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the dense weights are stored [in, out]: PEFT's LoraConfig flag of the same name."""
        return self.weight_layout == "transposed"

    def require_dense(self, module: nn.Module) -> None:
        """Refuse a dense layer of a type this family's layout does not describe."""
        expected = _DENSE_TYPE[self.weight_layout]
        if not isinstance(module, expected):
            raise UnsupportedArchitectureError(
                f"dense layer of type {type(module).__name__} in a {self.family} model is not supported "
                f"(expected {expected.__name__})")

    def dense_without_bias(self, module: nn.Module, x):
        """W x for a dense layer of this family, without its bias."""
        self.require_dense(module)
        return x @ module.weight if self.fan_in_fan_out else nn.functional.linear(x, module.weight)

    def dense_weight(self, module: nn.Module):
        """A dense layer's weight as [out, in] (a view), or None where it is no plain floating-point matrix
        (a quantised or adapter-wrapped layer)."""
        if type(module) is not _DENSE_TYPE[self.weight_layout]:
            return None
        weight = module.weight.T if self.fan_in_fan_out else module.weight
        return weight if weight.dtype.is_floating_point and weight.dim() == 2 else None

    def attention_windows(self, config) -> dict[str | None, int | None]:
        """Per kind of attention mask the model's layers take, its sliding window in positions (None: full).

        The key None: the model takes one mask for every layer. Hybrids take their full mask as the
        "linear_attention" mask too: their mixers read each copy's sequence off it (state_space.py).
        """
        if self.mixer is not None:
            return {"full_attention": None, "linear_attention": None}
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            kinds: dict[str | None, int | None] = {"full_attention": None}
            if "sliding_attention" in layer_types:
                kinds["sliding_attention"] = config.sliding_window
            return kinds
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        return {None: window}

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.get_submodule(self.layers))

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def present(self, block: nn.Module, paths: tuple[str, ...]) -> list[nn.Module]:
        """The modules at `paths` that this block has."""
        modules = []
        for path in paths:
            try:
                modules.append(block.get_submodule(path))
            except AttributeError:
                continue
        return modules

    def mixers(self, model: nn.Module) -> list[nn.Module]:
        """Every block's Mamba2 mixer, where it has one."""
        if self.mixer is None:
            return []
        return [mixer for block in self.blocks(model) for mixer in self.present(block, (self.mixer,))]

    def mlp_output_factor(self, block: nn.Module) -> float:
        """The factor between the output of `mlp_output` and what joins the residual."""
        return _attribute(block, self.mlp_output_scale)

    def down_projection_factor(self, block: nn.Module) -> float:
        """The factor between the down projection's output and what joins the residual: a change D of the down
        projection moves the residual by factor * D k."""
        return _attribute(block, self.down_scale) * self.mlp_output_factor(block)


def _attribute(block: nn.Module, path: str | None) -> float:
    if path is None:
        return 1.0
    value = block
    for name in path.split("."):
        value = getattr(value, name)
    return float(value)


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
        weight_layout="transposed",
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
    # hybrids: attention and a Mamba2 mixer side by side in every block (Falcon-H1), or one of the two per
    # block (Bamba, GraniteMoeHybrid); then a gated MLP
    ArchitectureAdapter(
        family="falcon_h1",
        architectures=("FalconH1ForCausalLM",),
        layers="model.layers",
        mlp="feed_forward",
        first_dense=("feed_forward.gate_proj", "feed_forward.up_proj"),
        mlp_output="feed_forward",
        down_proj="feed_forward.down_proj",
        attention_projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mamba.in_proj"),
        mixer="mamba",
        down_scale="feed_forward.down_multiplier",
    ),
    ArchitectureAdapter(
        family="bamba",
        architectures=("BambaForCausalLM",),
        layers="model.layers",
        mlp="feed_forward",
        first_dense=("feed_forward.gate_proj", "feed_forward.up_proj"),
        mlp_output="feed_forward",
        down_proj="feed_forward.down_proj",
        attention_projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mamba.in_proj"),
        mixer="mamba",
    ),
    ArchitectureAdapter(
        family="granitemoehybrid",
        architectures=("GraniteMoeHybridForCausalLM",),
        layers="model.layers",
        mlp="shared_mlp",
        first_dense=("shared_mlp.input_linear",),  # gate and up, fused
        mlp_output="shared_mlp",
        down_proj="shared_mlp.output_linear",
        attention_projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mamba.in_proj"),
        mixer="mamba",
        mlp_output_scale="residual_multiplier",
        experts="num_local_experts",
    ),
)

_GATED_DELTA = ("gated-delta-rule mixers: the state update subtracts the state's own read-out, so the context's "
                "effect is no decayed attention over the context and has no exact all-prefixes form here")
_NO_MLP = "a recurrent stack without an MLP: there is no first dense layer for the patch to live in"
REFUSED: dict[str, str] = {
    "JambaForCausalLM": "Jamba's Mamba1 mixers decay per channel, which has no scalar dual form: every prefix would "
                        "need its own token-by-token replay",
    "MambaForCausalLM": _NO_MLP,
    "FalconMambaForCausalLM": _NO_MLP,
    "Mamba2ForCausalLM": _NO_MLP,
    "ZambaForCausalLM": "Zamba reuses one shared attention block across depths, with no residual around its MLP",
    "Zamba2ForCausalLM": "Zamba2 reuses shared blocks with a per-call LoRA and no residual around their MLP: the "
                         "patch's W differs per call",
    "NemotronHForCausalLM": "NemotronH has one mixer, attention or MLP per block: the contextual block spans several "
                            "blocks, which no adapter describes yet",
    "Qwen3NextForCausalLM": _GATED_DELTA,
    "Qwen3_5ForCausalLM": _GATED_DELTA,
    "Qwen3_5MoeForCausalLM": _GATED_DELTA,
    "Qwen4ExpForCausalLM": _GATED_DELTA,
    "OlmoHybridForCausalLM": _GATED_DELTA,
    "KimiLinearForCausalLM": _GATED_DELTA,
    "Lfm2ForCausalLM": "short-convolution mixers: each prefix's convolution state would need its own replay",
    "Lfm2MoeForCausalLM": "short-convolution mixers: each prefix's convolution state would need its own replay",
    "MiniMaxForCausalLM": "lightning (linear) attention layers have no exact all-prefixes form here",
    "RecurrentGemmaForCausalLM": "RG-LRU recurrences decay per channel: no scalar dual form",
    "RwkvForCausalLM": "RWKV's recurrences decay per channel: no scalar dual form",
    "xLSTMForCausalLM": "xLSTM's recurrences have no exact all-prefixes form here",
}

_BY_ARCHITECTURE = {name: adapter for adapter in ADAPTERS for name in adapter.architectures}
SUPPORTED_ARCHITECTURES = tuple(sorted(_BY_ARCHITECTURE))


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for a loaded model, from `config.architectures` (or the model's class name)."""
    names = list(getattr(model.config, "architectures", None) or []) or [type(model).__name__]
    for name in names:
        if name in _BY_ARCHITECTURE:
            adapter = _BY_ARCHITECTURE[name]
            experts = getattr(model.config, adapter.experts, 0) if adapter.experts else 0
            if experts:
                raise UnsupportedArchitectureError(
                    f"architecture {name} with {experts} routed experts is not supported: a router must be patched "
                    "with its experts; only its dense form (no routed experts) is")
            return adapter
        if name in REFUSED:
            raise UnsupportedArchitectureError(f"architecture {name} is not supported: {REFUSED[name]}")
    raise UnsupportedArchitectureError(
        f"architecture {', '.join(names)} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )



def max_positions(model: nn.Module) -> int | None:
    """The longest prompt the model's position embeddings cover, by the name its family's config gives it."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):  # GPT-2: n_positions
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
