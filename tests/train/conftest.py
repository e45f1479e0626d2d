import pytest

from batchpilot.data.prepare import PrepareConfig, prepare


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small prepared dataset (synthetic documents of varied length, byte-level BPE of 256 tokens)."""
    root = tmp_path_factory.mktemp("data")
    words = "the of and to in a is that for it as was with be by on not he this are or his".split()
    docs = []
    for i in range(400):
        n = 20 + (i * 37) % 120
        docs.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(n)) + ".")
    src = root / "docs.jsonl"
    import json
    src.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return prepare(PrepareConfig(sources=[str(src)], out_dir=str(root / "prepared"), vocab_size=320,
                                 val_fraction=0.05))
