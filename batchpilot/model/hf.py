"""Hugging Face interop: config.json <-> LlamaConfig, safetensors <-> state dict, presets.

One declarative map: HF names are ours with a ``model.`` prefix (``lm_head`` has none), because
the model uses HF's names and rotate-half RoPE. Weights are read with safetensors only; nothing
from a checkpoint is ever executed, and shard file names from an index are confined to the
model directory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from batchpilot.io import make_temp_dir, plain_file_mode
from batchpilot.model.counting import total_params
from batchpilot.model.llama import PRESETS, Llama, LlamaConfig, build_model, get_preset

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                           "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe"}
_HF_CLASS = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}

# HF config.json key -> LlamaConfig field
_CONFIG_MAP = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim", "rope_theta": "rope_theta", "rope_scaling": "rope_scaling", "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings", "max_position_embeddings": "max_position_embeddings",
    "initializer_range": "initializer_range", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
}


# MoE config.json keys -> LlamaConfig fields, per family (Mixtral's intermediate_size is the expert's size).
_MOE_CONFIG_MAP = {
    "mixtral": {"num_local_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
                "intermediate_size": "moe_intermediate_size", "router_aux_loss_coef": "router_aux_loss_coef"},
    "qwen2_moe": {"num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
                  "moe_intermediate_size": "moe_intermediate_size",
                  "shared_expert_intermediate_size": "shared_expert_intermediate_size",
                  "norm_topk_prob": "norm_topk_prob", "decoder_sparse_step": "decoder_sparse_step",
                  "mlp_only_layers": "mlp_only_layers", "router_aux_loss_coef": "router_aux_loss_coef"},
}
# Per-expert tensor names on disk, as transformers' save_pretrained writes them (transformers 5 fuses them in
# memory into experts.gate_up_proj (E, 2I, D) and experts.down_proj (E, D, I), our layout; we read both).
# family -> (MoE module name, gate, up, down)
_EXPERT_NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
                 "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def our_name(name: str) -> str:
    return name.removeprefix("model.")


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    arch = SUPPORTED_ARCHITECTURES.get(archs[0]) or {a: a for a in SUPPORTED_ARCHITECTURES.values()}.get(archs[0])
    if arch is None:
        raise ValueError(f"unsupported architecture {archs[0]!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    kwargs: dict[str, Any] = {ours: hf[key] for key, ours in _CONFIG_MAP.items() if hf.get(key) is not None}
    kwargs.setdefault("num_kv_heads", hf["num_attention_heads"])
    rope = hf.get("rope_parameters")  # transformers 5 moved rope_theta/rope_scaling here
    if isinstance(rope, dict):
        kwargs.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    # Qwen2 always has q/k/v bias; Llama has it only when attention_bias is set.
    kwargs["attention_bias"] = arch == "qwen2" or bool(hf.get("attention_bias", False))
    if arch in _MOE_CONFIG_MAP:
        kwargs.update(_moe_config_from_hf(hf, arch))
    return LlamaConfig(architecture=arch, **kwargs)


def _moe_config_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    if hf.get("sliding_window") and (arch == "mixtral" or hf.get("use_sliding_window")):
        raise ValueError(f"{arch}: sliding-window attention is not supported (sliding_window={hf['sliding_window']})")
    kwargs = {ours: hf[key] for key, ours in _MOE_CONFIG_MAP[arch].items() if hf.get(key) is not None}
    if arch == "mixtral":  # Mixtral: every layer sparse, top-k weights renormalised, no shared expert, no bias
        kwargs.update(norm_topk_prob=True, attention_bias=False)
    else:  # Qwen2-MoE: q/k/v bias unless qkv_bias is false; a sigmoid-gated shared expert
        kwargs.update(attention_bias=bool(hf.get("qkv_bias", True)), shared_expert_gate=True)
    return kwargs


def _moe_config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """The MoE keys of config.json; refuses shapes the HF class cannot express."""
    if config.architecture not in _MOE_CONFIG_MAP:
        return {}
    if config.architecture == "mixtral" and (config.shared_expert_intermediate_size or not config.norm_topk_prob
                                             or config.num_moe_layers != config.num_layers or config.attention_bias):
        raise ValueError("mixtral export needs every layer sparse, norm_topk_prob, no shared expert, no bias")
    if config.architecture == "qwen2_moe" and not (config.shared_expert_intermediate_size
                                                   and config.shared_expert_gate):
        raise ValueError("qwen2_moe export needs a shared expert with its sigmoid gate")
    hf: dict[str, Any] = {key: getattr(config, ours) for key, ours in _MOE_CONFIG_MAP[config.architecture].items()}
    if config.architecture == "mixtral":
        hf["sliding_window"] = None
    else:
        hf.update(intermediate_size=config.intermediate_size, mlp_only_layers=list(config.mlp_only_layers),
                  qkv_bias=config.attention_bias, use_sliding_window=False)
    return hf


def fuse_experts(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors (our-named, ``model.`` stripped) -> our 3-D expert tensors, in place."""
    if config.architecture not in _EXPERT_NAMES:
        return state
    module, gate, up, down = _EXPERT_NAMES[config.architecture]
    for i in (i for i in range(config.num_layers) if config.is_moe_layer(i)):
        src, dst = f"layers.{i}.{module}", f"layers.{i}.mlp"
        if f"{src}.gate.weight" in state:
            state[f"{dst}.gate.weight"] = state.pop(f"{src}.gate.weight")
        if f"{dst}.experts.gate_up_proj" in state:  # already fused (a transformers-5 in-memory layout)
            continue
        experts = range(config.num_experts)
        try:
            gate_up = [torch.cat([state.pop(f"{src}.experts.{e}.{gate}.weight"),
                                  state.pop(f"{src}.experts.{e}.{up}.weight")]) for e in experts]  # (2I, D) each
            downs = [state.pop(f"{src}.experts.{e}.{down}.weight") for e in experts]  # (D, I) each
        except KeyError as e:
            raise ValueError(f"layer {i}: expert weight {e.args[0]} missing from the checkpoint") from None
        state[f"{dst}.experts.gate_up_proj"] = torch.stack(gate_up)  # (E, 2I, D)
        state[f"{dst}.experts.down_proj"] = torch.stack(downs)  # (E, D, I)
    return state


def split_experts(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``fuse_experts``: our 3-D expert tensors -> the per-expert names save_pretrained writes."""
    if config.architecture not in _EXPERT_NAMES:
        return state
    module, gate, up, down = _EXPERT_NAMES[config.architecture]
    for i in (i for i in range(config.num_layers) if config.is_moe_layer(i)):
        src, dst = f"layers.{i}.mlp", f"layers.{i}.{module}"
        state[f"{dst}.gate.weight"] = state.pop(f"{src}.gate.weight")
        gate_up, downs = state.pop(f"{src}.experts.gate_up_proj"), state.pop(f"{src}.experts.down_proj")
        for e in range(config.num_experts):
            g, u = gate_up[e].chunk(2, dim=0)  # (I, D) each
            state[f"{dst}.experts.{e}.{gate}.weight"] = g.contiguous()
            state[f"{dst}.experts.{e}.{up}.weight"] = u.contiguous()
            state[f"{dst}.experts.{e}.{down}.weight"] = downs[e].contiguous()
    return state


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    hf: dict[str, Any] = {"architectures": [_HF_CLASS[config.architecture]], "model_type": config.architecture,
                          "hidden_act": "silu", "torch_dtype": "float32", "use_cache": True}
    for key, ours in _CONFIG_MAP.items():
        hf[key] = getattr(config, ours)
    hf.update(_moe_config_to_hf(config))
    if config.architecture == "llama":
        hf["attention_bias"] = config.attention_bias
        hf["mlp_bias"] = False
    return hf


# HF config.json keys that must hold a positive integer / a number / a bool when present (a crafted config.json
# is refused with one line before anything is allocated).
_POSITIVE_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "max_position_embeddings")
_NUMBER_KEYS = ("rope_theta", "rms_norm_eps", "initializer_range")
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _check_hf_config(hf: object, file: Path) -> dict[str, Any]:
    """The config.json object, refused with a one-line ValueError if it is not one or its sizes are malformed."""
    if not isinstance(hf, dict):
        raise ValueError(f"{file}: a JSON {type(hf).__name__}, not an HF model config object")
    missing = [key for key in _REQUIRED_KEYS if hf.get(key) is None]
    if missing:
        raise ValueError(f"{file}: not a valid HF model config (missing {', '.join(missing)})")
    for key in _POSITIVE_INT_KEYS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{file}: {key} must be a positive integer, got {value!r}")
    for key in _NUMBER_KEYS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{file}: {key} must be a number, got {value!r}")
    archs = hf.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs)):
        raise ValueError(f"{file}: architectures must be a non-empty list of class names, got {archs!r}")
    return hf


def read_config(path: str | os.PathLike) -> LlamaConfig:
    """A LlamaConfig from a model directory's config.json (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no config.json in {path}")
    try:
        hf = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    try:
        return config_from_hf(_check_hf_config(hf, file))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{file}: not a valid HF model config ({type(e).__name__}: {e})") from None


def _read_index(index: Path) -> list[str]:
    """The shard file names of a model.safetensors.index.json."""
    try:
        weight_map = json.loads(index.read_bytes()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{index}: not a safetensors index (a JSON object with a weight_map)") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to shard file names")
    return sorted(set(weight_map.values()))


def _shard_numel(file: Path) -> int:
    """Elements stored in a safetensors file, read from its header only (nothing is allocated)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError (an Exception) for a bad header
        raise ValueError(f"{file}: not a readable safetensors file ({_first_line(e)})") from None


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except Exception as e:  # a truncated file or a bad header: SafetensorError
        raise ValueError(f"{file}: not a readable safetensors file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def shard_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json names (confined to ``path``)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        return [_confined(path, name) for name in _read_index(index)]
    raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Our-named tensors from model.safetensors or a sharded model.safetensors.index.json."""
    state: dict[str, torch.Tensor] = {}
    for f in shard_files(path):
        state.update({our_name(k): v for k, v in _load_shard(f).items()})
    return state


def _confined(root: Path, name: str) -> Path:
    """A shard path from an index file, refused if its NAME leaves the model directory.

    The name must be a plain relative path inside ``root`` (no absolute path, no ``..``); the file itself may be
    a symlink to elsewhere, as in the Hugging Face cache, where ``snapshots/REV/x.safetensors`` points into
    ``../../blobs/``.
    """
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"{root}: index names a shard outside the model directory: {name!r}")
    candidate = root / relative
    if not candidate.is_file():
        raise ValueError(f"{root}: index names a missing shard file {name!r}")
    return candidate


def load_model(path_or_preset: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, seed: int = 0) -> Llama:
    """A model from an HF directory (Llama/Qwen2/Mixtral/Qwen2-MoE, safetensors), a batchpilot checkpoint dir, or a preset name.

    A preset gives random weights (seeded).
    """
    path = Path(path_or_preset)
    if not path.exists():
        if str(path_or_preset) in PRESETS:
            return _cast(build_model(get_preset(str(path_or_preset)), device=device, seed=seed), dtype)
        raise ValueError(f"{path_or_preset!r} is neither a model directory nor a preset ({', '.join(PRESETS)})")
    config = read_config(path)
    files = shard_files(path)
    # A config whose sizes the files cannot hold is refused before the model is allocated (a crafted config.json
    # with hidden_size 10**9 would otherwise exhaust memory); a tied model may also store the LM head.
    stored, expected = sum(_shard_numel(f) for f in files), total_params(config)
    if stored < expected:
        raise ValueError(f"{path}: the config describes {expected:,} parameters but the weight files hold {stored:,}")
    state = fuse_experts(load_state_dict(path), config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = build_model(config, device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return _cast(model.to(device), dtype)


def _cast(model: Llama, dtype: torch.dtype | None) -> Llama:
    if dtype is not None:
        model.to(dtype)
        model.inv_freq.data = model.inv_freq.float()
    return model


def generation_config(config: LlamaConfig) -> dict[str, Any]:
    """generation_config.json: the ids transformers' ``generate`` stops at and pads with (without it, and with
    null ids in config.json, ``generate`` runs past EOS). Greedy by default, as batchpilot's ``--temperature 0``."""
    gen: dict[str, Any] = {"do_sample": False}
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(config, key) is not None:
            gen[key] = getattr(config, key)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = config.eos_token_id  # HF's convention for models trained without a pad token
    if pad is not None:
        gen["pad_token_id"] = pad
    return gen


def save_model(model: Llama, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
               bos_token_id: int | None = None, eos_token_id: int | None = None,
               pad_token_id: int | None = None) -> None:
    """Write config.json + generation_config.json + model.safetensors that transformers' AutoModelForCausalLM
    loads and ``generate``s with as batchpilot does (stopping at the same EOS).

    The special ids come from the tokenizer (the caller's: the model layer does not read tokenizers); given ones
    override the model config's. Written into a temporary directory beside ``path`` and renamed, so a crash
    leaves no half model.
    """
    from dataclasses import replace

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ours = split_experts(dict(model.state_dict()), model.config)
    state = {hf_name(k): v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in ours.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config
    ids: dict[str, Any] = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    config = replace(config, **{k: v for k, v in ids.items() if v is not None})
    hf_config = config_to_hf(config)
    hf_config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    if pad_token_id is not None:
        hf_config["pad_token_id"] = pad_token_id
    gen = generation_config(config)
    if pad_token_id is not None:
        gen["pad_token_id"] = pad_token_id
    tmp = make_temp_dir(path.parent, prefix=f".{path.name}.")
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    os.chmod(tmp / "model.safetensors", plain_file_mode())  # safetensors writes 0600; others must read the export
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if path.exists():
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
        tmp.rmdir()
    else:
        os.replace(tmp, path)
