"""The batchpilot lm-eval backend against lm-eval's hf backend on one exported tiny model: same metrics, same
per-request loglikelihoods (fp32), same generations."""

import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

WORDS = ("In the beginning God created the heaven and the earth And the earth was without form and void "
         "Let there be light").split()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from batchpilot.data.tokenizer import Tokenizer

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("lm_eval_model")
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok = Tokenizer.train_bpe([" ".join(WORDS)] * 30, 300)
    tok.save(path, model_max_length=256)
    return path


def _run(model, tasks_dir, names):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, tasks=names, task_manager=TaskManager(include_path=str(tasks_dir)),
                           log_samples=True, num_fewshot=0, random_seed=0, numpy_random_seed=0,
                           torch_random_seed=0, fewshot_random_seed=0)


def test_batchpilot_backend_equals_hf_backend(exported, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from batchpilot.eval.lm_eval_model import BatchpilotLM
    from batchpilot.eval.tasks import write_tasks

    names = write_tasks(tmp_path / "tasks", WORDS, num_docs=12)
    ours = _run(BatchpilotLM(pretrained=str(exported), dtype="float32"), tmp_path / "tasks", names)
    hf = _run(HFLM(pretrained=str(exported), dtype="float32", device="cpu", batch_size=4), tmp_path / "tasks", names)
    for name in names:
        a, b = ours["samples"][name], hf["samples"][name]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b]
        for sa, sb in zip(a, b):
            for ra, rb in zip(sa["resps"], sb["resps"], strict=True):
                ra, rb = ra[0], rb[0]
                if isinstance(ra, str):  # generate_until
                    assert ra == rb
                elif isinstance(ra, tuple | list):  # loglikelihood: (logprob, is_greedy)
                    assert math.isclose(float(ra[0]), float(rb[0]), rel_tol=1e-4, abs_tol=1e-4)
                    assert bool(ra[1]) == bool(rb[1])
                else:  # rolling: the summed logprob
                    assert math.isclose(float(ra), float(rb), rel_tol=1e-4, abs_tol=1e-4)
        for metric, value in ours["results"][name].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert math.isclose(value, hf["results"][name][metric], rel_tol=1e-4, abs_tol=1e-6), metric


def test_registered_in_lm_eval_registry():
    import batchpilot.eval.lm_eval_model  # noqa: F401 - registers on import
    from lm_eval.api.registry import get_model

    from batchpilot.eval.lm_eval_model import BatchpilotLM

    assert get_model("batchpilot") is BatchpilotLM
