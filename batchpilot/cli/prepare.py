"""``batchpilot prepare``: tokenize text or chat sources into memory-mapped shards (see ``data/prepare.py``)."""

from __future__ import annotations

import argparse

from batchpilot.data.prepare import PrepareConfig, load_meta, prepare


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare", help="tokenize text into training shards",
                              description="Tokenize .txt/.jsonl/.parquet files, directories or the embedded "
                                          "'default' corpus (KJV) into train/val shards plus tokenizer.json; "
                                          "with --format chat, chat JSONL rendered with --tokenizer's chat "
                                          "template plus a loss-mask stream.")
    p.add_argument("sources", nargs="+", help="files, directories, or 'default'")
    p.add_argument("--out", required=True, help="output directory (must be new, empty, or the same config)")
    p.add_argument("--tokenizer", help="tokenizer.json or HF model directory (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size of the trained BPE")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split hash")
    p.add_argument("--format", choices=("text", "chat"), default="text",
                   help="text: documents separated by EOS; chat: conversations ({messages: [...]} or "
                        "prompt/response pairs) with loss on assistant tokens (needs --tokenizer MODEL_DIR)")
    p.add_argument("--messages-field", default="messages", help="chat: JSONL field holding the messages")
    p.add_argument("--prompt-field", default="prompt", help="chat: field of the instruction in pair records")
    p.add_argument("--response-field", default="response", help="chat: field of the response in pair records")
    p.add_argument("--loss-on", choices=("assistant", "all"), default="assistant",
                   help="chat: train on assistant tokens only (default) or on every token")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = PrepareConfig(sources=args.sources, out_dir=args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        text_field=args.text_field, val_fraction=args.val_fraction, seed=args.seed,
                        format=args.format, messages_field=args.messages_field, prompt_field=args.prompt_field,
                        response_field=args.response_field, loss_on=args.loss_on)
    out = prepare(cfg)
    meta = load_meta(out)
    tokens, docs = meta["tokens"], meta["documents"]
    chars_per_token = sum(meta["chars"].values()) / max(1, sum(tokens.values()))
    print(f"train: {tokens['train']:,} tokens ({docs['train']:,} documents)")
    print(f"val:   {tokens['val']:,} tokens ({docs['val']:,} documents)")
    if meta.get("format") == "chat":
        loss = meta["loss_tokens"]
        print(f"loss on {meta['loss_on']} tokens: {loss['train']:,} train / {loss['val']:,} val targets")
    print(f"vocab {meta['vocab_size']:,} ({meta['tokenizer']}), {meta['dtype']}, {chars_per_token:.2f} chars/token")
    print(f"dataset: {out}")
    return 0
