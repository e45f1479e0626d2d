"""Our logits equal transformers' for random tiny Llama and Qwen2 models, both directions."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from batchpilot import load_model, save_model  # noqa: E402
from batchpilot.model.hf import config_from_hf, read_config  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CASES = {
    "llama-gqa-tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mha-untied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3-rope-scaling": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "qwen2-bias-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2-untied": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=False)),
}


def hf_model(arch: str, overrides: dict):
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, **overrides)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, **overrides)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # make biases non-zero so that a dropped bias would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_load_hf_matches_logits(case, tmp_path):
    torch.manual_seed(0)
    hf = hf_model(*CASES[case])
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    ids = torch.randint(0, 512, (3, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_save_then_transformers_loads(case, tmp_path):
    torch.manual_seed(1)
    hf = hf_model(*CASES[case])
    hf.save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src").eval()
    save_model(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    assert read_config(tmp_path / "out").architecture == ours.config.architecture


def test_sharded_index_loads(tmp_path):
    hf = hf_model("llama", dict(num_key_value_heads=2))
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path).eval()
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_unsupported_architecture_names_supported():
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        config_from_hf({"architectures": ["GPT2LMHeadModel"]})


def test_index_cannot_escape_model_dir(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                                                      "hidden_size": 8, "intermediate_size": 8,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2}))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(ValueError, match="outside the model directory"):
        load_model(tmp_path)
