"""Every command ends a bad input or an environment fault in one line on stderr and a non-zero exit (issue 14).

Each case runs ``batchpilot.cli.main([...])`` in-process and checks the exit code and that stderr is exactly one
line starting ``batchpilot CMD: error:`` (no traceback). Malformed model directories are also checked at the
library seam (``load_model`` / ``read_config``), where the message is made.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct

import pytest
import torch

from batchpilot.cli import describe, main
from batchpilot.io import LockedError, write_json_atomic
from batchpilot.model.hf import load_model, read_config, save_model
from batchpilot.model.llama import LlamaConfig, build_model


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, command: str, *, contains: str = "") -> None:
    lines = err.strip().splitlines()
    assert rc != 0
    assert len(lines) == 1, err
    assert lines[0].startswith(f"batchpilot {command}: error: "), err
    assert "Traceback" not in err
    assert contains.lower() in lines[0].lower(), lines[0]


@pytest.fixture
def model_dir(tmp_path, tiny_config) -> os.PathLike:
    path = tmp_path / "model"
    save_model(build_model(tiny_config, seed=0), path)
    return path


# ---- plan ----

@pytest.mark.parametrize("tokens", ["inf", "nan", "-1e9", "-1", "0"])
def test_plan_non_finite_tokens(capsys, tokens):
    rc, err = run_cli(capsys, "plan", "--preset", "tiny", f"--tokens={tokens}")
    assert_one_line_error(rc, err, "plan", contains="--tokens must be a finite number > 0")


@pytest.mark.parametrize("flag", ["--compute", "--hours"])
def test_plan_non_finite_compute_or_hours(capsys, flag):
    rc, err = run_cli(capsys, "plan", "--preset", "tiny", f"{flag}=inf")
    assert_one_line_error(rc, err, "plan", contains=f"{flag} must be a finite number > 0")


def test_plan_law_file_holding_a_list(capsys, tmp_path):
    law = tmp_path / "law.json"
    law.write_text("[1, 2, 3]")
    rc, err = run_cli(capsys, "plan", "--preset", "tiny", "--tokens", "1e9", "--law", str(law))
    assert_one_line_error(rc, err, "plan", contains=f"{law}: a JSON list, not a law object")


def test_plan_out_on_a_full_disk_names_the_path(capsys, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "plan.json"
    rc, err = run_cli(capsys, "plan", "--preset", "tiny", "--tokens", "1e9", "--out", str(out))
    assert_one_line_error(rc, err, "plan", contains="no space left on device")
    assert str(out) in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plan_out_has_plain_mode(capsys, tmp_path):
    os.umask(old := os.umask(0o022))
    try:
        out = tmp_path / "plan.json"
        assert main(["plan", "--preset", "tiny", "--tokens", "1e9", "--out", str(out), "--json"]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~old
    finally:
        os.umask(old)


# ---- --debug after the command ----

def test_debug_after_the_command_shows_the_traceback(tmp_path):
    law = tmp_path / "law.json"
    law.write_text("[1]")
    with pytest.raises(Exception):
        main(["plan", "--preset", "tiny", "--tokens", "1e9", "--law", str(law), "--debug"])
    with pytest.raises(Exception):
        main(["--debug", "plan", "--preset", "tiny", "--tokens", "1e9", "--law", str(law)])


def test_without_debug_no_traceback(capsys, tmp_path):
    law = tmp_path / "law.json"
    law.write_text("[1]")
    rc, err = run_cli(capsys, "plan", "--preset", "tiny", "--tokens", "1e9", "--law", str(law))
    assert_one_line_error(rc, err, "plan")


# ---- prepare, sweep, sample, report ----

def test_prepare_garbage_tokenizer(capsys, tmp_path, tiny_text_dir):
    tok = tmp_path / "tokenizer.json"
    tok.write_bytes(b"\x00garbage{")
    rc, err = run_cli(capsys, "prepare", str(tiny_text_dir), "--out", str(tmp_path / "ds"), "--tokenizer", str(tok))
    assert_one_line_error(rc, err, "prepare")


def test_sweep_with_an_empty_grid(capsys, tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text("{}")
    rc, err = run_cli(capsys, "sweep", str(grid), "--out", str(tmp_path / "sweep"))
    assert_one_line_error(rc, err, "sweep", contains="the grid needs models, tokens, lrs, batch_tokens")
    assert not (tmp_path / "sweep").exists()


def test_sample_seed_beyond_64_bits(capsys, model_dir, tmp_path):
    from batchpilot.data.tokenizer import Tokenizer
    Tokenizer.train_bpe(["in the beginning god created the heaven and the earth"] * 20, vocab_size=300,
                        special_tokens=["<eos>"]).save(model_dir / "tokenizer.json")
    rc, err = run_cli(capsys, "sample", "--model", str(model_dir), "--prompt", "in the", "--max-tokens", "2",
                      "--seed", str(2**70))
    assert_one_line_error(rc, err, "sample")


def test_report_metrics_line_holding_a_list(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n[1, 2]\n{"step": 2, "train/loss": 2.9}\n')
    rc, err = run_cli(capsys, "report", str(run_dir))
    assert_one_line_error(rc, err, "report", contains="metrics.jsonl:2")


def test_report_config_not_an_object(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n')
    (run_dir / "config.json").write_text('["not", "a", "config"]')
    rc, err = run_cli(capsys, "report", str(run_dir))
    assert_one_line_error(rc, err, "report", contains="config.json")


def test_report_missing_run_dir(capsys, tmp_path):
    rc, err = run_cli(capsys, "report", str(tmp_path / "nope"))
    assert_one_line_error(rc, err, "report")


# ---- the dispatcher's messages ----

def test_describe_environment_faults():
    assert describe(OSError(errno.ENOSPC, "No space left on device", "/runs/a/metrics.jsonl")) == (
        "/runs/a/metrics.jsonl: no space left on device", 2)
    assert describe(PermissionError(errno.EACCES, "Permission denied", "/runs/a"))[0] == "/runs/a: permission denied"
    assert describe(LockedError("runs/a is in use by another batchpilot process"))[1] == 2
    assert describe(json.JSONDecodeError("Expecting value", "x", 0))[1] == 2
    message, code = describe(TypeError("unsupported operand\ntype"))
    assert code == 1 and "\n" not in message and "--debug" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_unwritable_output(capsys, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    rc, err = run_cli(capsys, "plan", "--preset", "tiny", "--tokens", "1e9", "--out", str(locked / "x" / "plan.json"))
    assert_one_line_error(rc, err, "plan", contains="permission denied")


# ---- malformed model directories: one-line ValueErrors at the source, none hangs ----

def write_config(model_dir, change):
    cfg = json.loads((model_dir / "config.json").read_text())
    change(cfg)
    (model_dir / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("text, match", [
    ('["a", "list"]', "not an HF model config object"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe\x00".decode("latin-1"), "not valid JSON"),
])
def test_config_json_not_an_object(model_dir, text, match):
    (model_dir / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_config(model_dir)


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "64"), ("hidden_size", -64), ("num_hidden_layers", 0), ("vocab_size", 2.5),
    ("num_attention_heads", True), ("rope_theta", "big"), ("architectures", "LlamaForCausalLM"),
])
def test_config_wrong_types_and_negative_sizes(model_dir, key, value):
    write_config(model_dir, lambda c: c.__setitem__(key, value))
    with pytest.raises(ValueError, match=key):
        load_model(model_dir)


def test_config_missing_keys(model_dir):
    write_config(model_dir, lambda c: c.pop("hidden_size"))
    with pytest.raises(ValueError, match="missing hidden_size"):
        load_model(model_dir)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_config_huge_sizes_refused_before_allocating(model_dir, key):
    write_config(model_dir, lambda c: c.__setitem__(key, 10**9 if key != "hidden_size" else 4 * 10**8))
    with pytest.raises(ValueError, match="weight files hold"):
        load_model(model_dir)


def make_sharded(model_dir, shard_name):
    (model_dir / "model.safetensors").rename(model_dir / "real.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard_name}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name, match", [
    ("../outside.safetensors", "outside the model directory"),
    ("/etc/passwd", "outside the model directory"),
    ("missing.safetensors", "missing shard"),
])
def test_index_pointing_outside_or_to_a_missing_shard(model_dir, name, match):
    (model_dir.parent / "outside.safetensors").write_bytes(b"")
    make_sharded(model_dir, name)
    with pytest.raises(ValueError, match=match):
        load_model(model_dir)


@pytest.mark.parametrize("text", ["[]", "{}", '{"weight_map": ["a"]}', "garbage"])
def test_index_malformed(model_dir, text):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match="index|weight_map"):
        load_model(model_dir)


def test_hf_cache_symlinked_shards_are_accepted(tmp_path, tiny_config):
    """snapshots/REV/model-*.safetensors -> ../../blobs/SHA, as huggingface_hub lays out its cache."""
    model = build_model(tiny_config, seed=0)
    save_model(model, tmp_path / "src")
    blobs, snap = tmp_path / "cache" / "blobs", tmp_path / "cache" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "src" / name).rename(blobs / f"sha-{name}")
    (snap / "config.json").symlink_to("../../blobs/sha-config.json")
    (snap / "model-00001-of-00001.safetensors").symlink_to("../../blobs/sha-model.safetensors")
    from safetensors import safe_open
    with safe_open(str(blobs / "sha-model.safetensors"), framework="pt") as f:
        weight_map = {k: "model-00001-of-00001.safetensors" for k in f.keys()}
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(snap)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_truncated_safetensors(model_dir):
    file = model_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(model_dir)


@pytest.mark.parametrize("payload", [
    b"this is not a safetensors file",
    struct.pack("<Q", 2**62) + b"{}",  # a header length far beyond the file: must not try to read 4 EiB
    struct.pack("<Q", 8) + b"[1,2,3] ",
    b"",
])
def test_shard_that_is_not_safetensors(model_dir, payload):
    (model_dir / "model.safetensors").write_bytes(payload)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(model_dir)


def test_tokenizer_json_garbage_via_sample(capsys, model_dir):
    (model_dir / "tokenizer.json").write_text('{"model": 3}')
    rc, err = run_cli(capsys, "sample", "--model", str(model_dir), "--prompt", "x", "--max-tokens", "1")
    assert_one_line_error(rc, err, "sample")


def test_model_export_has_plain_modes(tmp_path, tiny_config):
    old = os.umask(0o022)
    try:
        save_model(build_model(tiny_config, seed=0), tmp_path / "model")
        write_json_atomic(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    for f in (tmp_path / "model").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


def test_llama_config_fixture_is_small(tiny_config):
    assert isinstance(tiny_config, LlamaConfig)


def test_metrics_write_on_a_full_disk_names_the_file(tmp_path):
    from batchpilot.metrics import MetricsWriter

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            pass

    writer = MetricsWriter(tmp_path)
    writer._file.close()
    writer._file = FullDisk()
    with pytest.raises(OSError) as info:
        writer.log({"step": 1, "loss": 2.0})
    message, code = describe(info.value)
    assert message == f"{tmp_path / 'metrics.jsonl'}: no space left on device" and code == 2
