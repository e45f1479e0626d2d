"""torchtitan's own trainer on the llama-1b shape, timed step by step: the peer system of ``train_throughput.py``.

What runs is torchtitan's ``Trainer`` (its model, ``parallelize_llama`` with its compile / activation-checkpointing /
float8 converter options, its loss, its optimizer and LR scheduler, its train step with gradient accumulation and
clipping), registered as a train spec of our own only to change what torchtitan cannot be told from the command line:
- the model flavour: the llama-1b shape of ``batchpilot.model.llama.PRESETS["llama-1b"]`` (d 2048, 16 layers, 32 heads,
  8 KV heads, FFN 8192, vocabulary 128256) with the embedding TIED to the output layer as in Llama 3.2 1B; torchtitan's
  llama3 model has no tying option, so ``TiedTransformer`` re-ties the two after ``to_empty`` (one init overwrites the
  other: irrelevant for throughput);
- the data: random tokens (``RandomTokens``), so nothing is downloaded and no tokenizer is needed.
On one GPU torchtitan trains fp32 parameters under bf16 autocast (``training.mixed_precision_param``), as batchpilot's
one-GPU path does. Run by ``train_throughput.py`` in a child process (``--run-one`` with a ``torchtitan*`` system);
needs ``torchtitan`` (0.2.2 runs on torch 2.11; 0.3.0 needs a newer torch) and, for float8, ``torchao``.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from typing import Any, Iterator

import torch

from batchpilot.model.llama import LlamaConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _register(config: LlamaConfig, seq_len: int) -> str:
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs, parallelize_llama
    from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

    class TiedTransformer(Transformer):
        def init_weights(self, *args: Any, **kwargs: Any) -> None:
            self.output.weight = self.tok_embeddings.weight  # to_empty unties shared parameters
            super().init_weights(*args, **kwargs)

    class RandomTokens(BaseDataLoader):
        def __init__(self, local_batch_size: int, seed: int) -> None:
            self.local_batch_size, self.gen = local_batch_size, torch.Generator().manual_seed(seed)

        def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
            while True:
                tokens = torch.randint(0, vocab_size, (self.local_batch_size, seq_len + 1), generator=self.gen)
                yield {"input": tokens[:, :-1].contiguous()}, tokens[:, 1:].contiguous()

        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            pass

    def build_dataloader(*, dp_world_size: int, dp_rank: int, tokenizer: Any, job_config: Any) -> RandomTokens:
        return RandomTokens(job_config.training.local_batch_size, seed=dp_rank)

    # torchtitan's FFN width is multiple_of x ceil(int(8 d / 3) / multiple_of): multiple_of = our intermediate size
    # gives exactly it whenever it is >= 8 d / 3 (llama-1b: 8192; tiny: 384)
    assert config.intermediate_size >= int(8 * config.hidden_size / 3), "FFN narrower than 8d/3: no exact flavour"
    assert config.head_dim == config.hidden_size // config.num_heads, "torchtitan derives head_dim = d / heads"
    args = TransformerModelArgs(dim=config.hidden_size, n_layers=config.num_layers, n_heads=config.num_heads,
                                n_kv_heads=config.num_kv_heads, vocab_size=config.vocab_size,
                                multiple_of=config.intermediate_size, norm_eps=config.rms_norm_eps,
                                rope_theta=config.rope_theta, max_seq_len=seq_len)
    vocab_size = config.vocab_size
    name = "batchpilot_shape"
    register_train_spec(name, TrainSpec(
        model_cls=TiedTransformer if config.tie_word_embeddings else Transformer, model_args={"shape": args}, parallelize_fn=parallelize_llama, pipelining_fn=None,
        build_optimizers_fn=build_optimizers, build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_dataloader, build_tokenizer_fn=None, build_loss_fn=build_cross_entropy_loss))
    return name


def job_args(name: str, case: dict, *, steps: int, float8: str | None, dump_folder: str, compile: bool) -> list[str]:
    """torchtitan command-line flags for one case: its best options for speed on one GPU."""
    argv = ["--model.name", name, "--model.flavor", "shape", "--job.dump_folder", dump_folder,
            "--training.seq_len", str(case["seq"]), "--training.local_batch_size", str(case["mb"]),
            "--training.global_batch_size", str(case["rows"]), "--training.steps", str(steps),
            "--training.max_norm", "1.0", "--optimizer.lr", "1e-4", "--lr_scheduler.warmup_steps", "1",
            "--metrics.log_freq", "100000", "--activation_checkpoint.mode", case["ac"]]
    if compile:
        argv += ["--compile.enable", "--compile.components", "model,loss"]  # torchtitan parses lists comma-separated
    if float8:
        # torchtitan's float8 converter; the output layer stays bf16 as in its llama3 float8 recipes (and as ours)
        argv += ["--model.converters", "quantize.linear.float8", "--quantize.linear.float8.recipe_name", float8,
                 "--quantize.linear.float8.filter_fqns", "output"]
    return argv


def time_torchtitan(case: dict, config: LlamaConfig, *, warmup: int, steps: int, float8: str | None, compile: bool,
                    peak_tflops: float, flops_per_token: float) -> dict[str, Any]:
    """One case through torchtitan's Trainer; the row has the fields train_throughput.py's rows have."""
    import tempfile

    from torchtitan.config import ConfigManager
    from torchtitan.train import Trainer

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    name = _register(config, case["seq"])
    cuda = torch.cuda.is_available()
    times: list[float] = []

    class TimedTrainer(Trainer):
        def train_step(self, data_iterator: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            super().train_step(data_iterator)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as dump:
        job = ConfigManager().parse_args(job_args(name, case, steps=warmup + steps, float8=float8,
                                                     dump_folder=dump, compile=compile))
        trainer = TimedTrainer(job)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            trainer.train()
        finally:
            trainer.close()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    step_s = statistics.median(times[warmup:])
    tokens_per_s = case["rows"] * case["seq"] / step_s
    return dict(step_s=round(step_s, 4), tokens_per_s=round(tokens_per_s, 1), tokens_per_s_per_gpu=round(tokens_per_s, 1),
                mfu=round(tokens_per_s * flops_per_token / (peak_tflops * 1e12), 4),
                step_times=[round(t, 4) for t in times], torchtitan_version=_version(),
                **({"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)} if cuda else {}))


def _version() -> str:
    from importlib.metadata import version

    return version("torchtitan")
