"""One small adapter per architecture family: where the FFN lives and what it ranks.

Each adapter answers four questions about a Hugging Face causal LM: which
modules are its decoder layers, how to read a layer's FFN as ``FFNWeights``,
how to put a ``SparseFFN`` in its place, and which attention projections read
the layer's normed hidden state (q, k, v) and the attention's output (o), for
token-level sparsity. Adapters are looked up by
``config.model_type``; nothing else in coreinfer matches on module names.
"""

from __future__ import annotations

from torch import nn

from .sparse_ffn import FFNWeights, SparseFFN


class FFNAdapter:
    """Base adapter for models whose FFN is ``layer.mlp`` with gate/up/down Linear layers."""

    family = "gated"
    mlp_attr = "mlp"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def ffn_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        """The modules holding this layer's FFN weights; ``SparseFFN`` keeps them registered."""
        return {"mlp": getattr(layer, self.mlp_attr)}

    def read_ffn(self, modules: nn.ModuleDict) -> FFNWeights:
        mlp = modules["mlp"]
        return FFNWeights(
            gate=mlp.gate_proj.weight,
            up=mlp.up_proj.weight,
            down=mlp.down_proj.weight,
            act=mlp.act_fn,
            gate_bias=mlp.gate_proj.bias,
            up_bias=mlp.up_proj.bias,
            down_bias=mlp.down_proj.bias,
        )

    def attention_inputs(self, layer: nn.Module) -> dict[str, list[nn.Module]]:
        """The attention's projections by the input they read: ``qkv`` (the normed hidden state), ``o``."""
        attn = layer.self_attn
        return {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "o": [attn.o_proj]}

    def install(self, layer: nn.Module, ffn: SparseFFN) -> None:
        setattr(layer, self.mlp_attr, ffn)

    def installed(self, layer: nn.Module) -> SparseFFN | None:
        module = getattr(layer, self.mlp_attr, None)
        return module if isinstance(module, SparseFFN) else None


class OPTAdapter(FFNAdapter):
    """OPT keeps ``fc1``/``fc2`` on the decoder layer itself, with biases and ReLU.

    The layer calls ``fc2(activation_fn(fc1(x)))``, so the whole FFN goes in
    ``fc1``'s place and the other two become identities.
    """

    family = "plain"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def ffn_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {"fc1": layer.fc1, "fc2": layer.fc2, "act": layer.activation_fn}

    def read_ffn(self, modules: nn.ModuleDict) -> FFNWeights:
        return FFNWeights(
            up=modules["fc1"].weight,
            up_bias=modules["fc1"].bias,
            down=modules["fc2"].weight,
            down_bias=modules["fc2"].bias,
            act=modules["act"],
        )

    def attention_inputs(self, layer: nn.Module) -> dict[str, list[nn.Module]]:
        attn = layer.self_attn
        return {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "o": [attn.out_proj]}

    def install(self, layer: nn.Module, ffn: SparseFFN) -> None:
        ffn.flat_input = True
        layer.fc1 = ffn
        layer.activation_fn = nn.Identity()
        layer.fc2 = nn.Identity()

    def installed(self, layer: nn.Module) -> SparseFFN | None:
        return layer.fc1 if isinstance(layer.fc1, SparseFFN) else None


class GPT2Adapter(FFNAdapter):
    """GPT-2 uses ``Conv1D`` (weights stored ``[in, out]``) in ``layer.mlp``, with GELU."""

    family = "plain"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.h

    def attention_inputs(self, layer: nn.Module) -> dict[str, list[nn.Module]]:
        return {"qkv": [layer.attn.c_attn], "o": [layer.attn.c_proj]}

    def read_ffn(self, modules: nn.ModuleDict) -> FFNWeights:
        mlp = modules["mlp"]
        return FFNWeights(
            up=mlp.c_fc.weight.t(),
            up_bias=mlp.c_fc.bias,
            down=mlp.c_proj.weight.t(),
            down_bias=mlp.c_proj.bias,
            act=mlp.act,
        )


class GPTNeoXAdapter(FFNAdapter):
    """GPT-NeoX (Pythia): ``mlp.dense_h_to_4h`` / ``mlp.dense_4h_to_h`` with GELU."""

    family = "plain"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.gpt_neox.layers

    def attention_inputs(self, layer: nn.Module) -> dict[str, list[nn.Module]]:
        return {"qkv": [layer.attention.query_key_value], "o": [layer.attention.dense]}

    def read_ffn(self, modules: nn.ModuleDict) -> FFNWeights:
        mlp = modules["mlp"]
        return FFNWeights(
            up=mlp.dense_h_to_4h.weight,
            up_bias=mlp.dense_h_to_4h.bias,
            down=mlp.dense_4h_to_h.weight,
            down_bias=mlp.dense_4h_to_h.bias,
            act=mlp.act,
        )


_GATED = FFNAdapter()

ADAPTERS: dict[str, FFNAdapter] = {
    # SwiGLU: act(gate) * up with SiLU. SmolLM is model_type "llama".
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    # Gated GELU-tanh; the activation comes from the module, so the same adapter serves.
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    "opt": OPTAdapter(),
    "gpt2": GPT2Adapter(),
    "gpt_neox": GPTNeoXAdapter(),
}


class UnsupportedArchitecture(ValueError):
    pass


def get_adapter(model_type: str) -> FFNAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"coreinfer has no adapter for model_type {model_type!r}; "
            f"supported: {', '.join(sorted(ADAPTERS))}"
        ) from None


def attention_inputs(model: nn.Module) -> list[dict[str, list[nn.Module]]]:
    """Per decoder layer, the attention projections grouped by the input they read."""
    adapter = get_adapter(model.config.model_type)
    return [adapter.attention_inputs(layer) for layer in adapter.layers(model)]


def wrap_model(model: nn.Module) -> list[SparseFFN]:
    """Replace every decoder layer's FFN with a ``SparseFFN`` (idempotent).

    The wrapped model computes exactly what it did before until a request
    installs handlers. Returns the FFN modules in layer order.
    """
    adapter = get_adapter(model.config.model_type)
    ffns = []
    for idx, layer in enumerate(adapter.layers(model)):
        ffn = adapter.installed(layer)
        if ffn is None:
            ffn = SparseFFN(adapter.ffn_modules(layer), adapter.read_ffn, idx)
            adapter.install(layer, ffn)
        ffns.append(ffn)
    return ffns

