"""An export that transformers reads as it is: its greedy ``generate`` stops at the EOS where batchpilot stops."""

import json

import torch

import batchpilot
from batchpilot.data.tokenizer import Tokenizer
from batchpilot.generate.engine import Engine, EngineConfig
from batchpilot.generate.request import SamplingParams
from batchpilot.model.hf import save_model


def test_transformers_generate_stops_at_eos_where_batchpilot_does(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = batchpilot.load_model(model_dir), Tokenizer.from_path(model_dir)
    engine = Engine(model, None, EngineConfig(cpu_kv_tokens=4096))
    # an EOS that greedy decoding meets a few tokens in (first occurrence), so that stopping there is visible
    for k in range(40):
        prompt = [5 + k, 17, 3 * k + 1]
        free = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].output_ids
        pos = next((i for i in range(1, len(free)) if free[i] not in free[:i] and free[i] < tok.vocab_size), None)
        if pos is not None:
            break
    assert pos is not None
    tok.eos_id, tok.pad_id = free[pos], None
    export = tmp_path / "export"
    save_model(model, export, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    tok.save(export, model_max_length=model.config.max_position_embeddings)
    gen = json.loads((export / "generation_config.json").read_text())
    cfg = json.loads((export / "config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] == tok.eos_id and gen["pad_token_id"] == tok.eos_id

    ours = Engine(batchpilot.load_model(export), Tokenizer.from_path(export), EngineConfig(cpu_kv_tokens=1024))
    c = ours.generate([prompt], SamplingParams(max_tokens=12))[0]
    assert c.finish_reason == "stop" and c.output_ids == free[:pos + 1]
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():  # no generation kwargs: everything comes from the exported files
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12)[0, len(prompt):].tolist()
    assert out == free[:pos + 1]
