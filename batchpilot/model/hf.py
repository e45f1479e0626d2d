"""Hugging Face interop: config.json <-> LlamaConfig, safetensors <-> state dict, presets.

One declarative map: HF names are ours with a ``model.`` prefix (``lm_head`` has none), because
the model uses HF's names and rotate-half RoPE. Weights are read with safetensors only; nothing
from a checkpoint is ever executed, and shard file names from an index are confined to the
model directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from batchpilot.io import make_temp_dir
from batchpilot.model.llama import PRESETS, Llama, LlamaConfig, build_model, get_preset

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_HF_CLASS = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}

# HF config.json key -> LlamaConfig field
_CONFIG_MAP = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim", "rope_theta": "rope_theta", "rope_scaling": "rope_scaling", "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings", "max_position_embeddings": "max_position_embeddings",
    "initializer_range": "initializer_range", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
}


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def our_name(name: str) -> str:
    return name.removeprefix("model.")


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    arch = SUPPORTED_ARCHITECTURES.get(archs[0]) or {"llama": "llama", "qwen2": "qwen2"}.get(archs[0])
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
    return LlamaConfig(architecture=arch, **kwargs)


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    hf: dict[str, Any] = {"architectures": [_HF_CLASS[config.architecture]], "model_type": config.architecture,
                          "hidden_act": "silu", "torch_dtype": "float32", "use_cache": True}
    for key, ours in _CONFIG_MAP.items():
        hf[key] = getattr(config, ours)
    if config.architecture == "llama":
        hf["attention_bias"] = config.attention_bias
        hf["mlp_bias"] = False
    return hf


def read_config(path: str | os.PathLike) -> LlamaConfig:
    """A LlamaConfig from a model directory's config.json (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no config.json in {path}")
    try:
        return config_from_hf(json.loads(file.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{file}: not a valid HF model config ({e})") from None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Our-named tensors from model.safetensors or a sharded model.safetensors.index.json."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [_confined(path, name) for name in shard_names]
    else:
        raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update({our_name(k): v for k, v in load_file(f).items()})
    return state


def _confined(root: Path, name: str) -> Path:
    """A shard path from an index file, refused if it points outside the model directory."""
    candidate = (root / name).resolve()
    if candidate.parent != root.resolve() or not candidate.is_file():
        raise ValueError(f"{root}: index names an invalid shard file {name!r}")
    return candidate


def load_model(path_or_preset: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, seed: int = 0) -> Llama:
    """A model from an HF directory (Llama/Qwen2, safetensors), a batchpilot checkpoint dir, or a preset name.

    A preset gives random weights (seeded).
    """
    path = Path(path_or_preset)
    if not path.exists():
        if str(path_or_preset) in PRESETS:
            return _cast(build_model(get_preset(str(path_or_preset)), device=device, seed=seed), dtype)
        raise ValueError(f"{path_or_preset!r} is neither a model directory nor a preset ({', '.join(PRESETS)})")
    config = read_config(path)
    state = load_state_dict(path)
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
    state = {hf_name(k): v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
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
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if path.exists():
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
        tmp.rmdir()
    else:
        os.replace(tmp, path)
