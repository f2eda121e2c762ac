#!/usr/bin/env python3
"""A byte-level BPE tokenizer.json (GPT-2 byte symbols, no merges, <extra_N> up to the vocabulary)
beside a copy of a fixture model, which ships none: python fixture_tokenizer.py FIXTURE_DIR OUT_DIR"""
import json, shutil, sys, os
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
fx = sys.argv[1]; out = sys.argv[2]
os.makedirs(out, exist_ok=True)
for f in ["config.json", "model.safetensors", "generation_config.json"]:
    if os.path.exists(os.path.join(fx, f)):
        shutil.copy(os.path.join(fx, f), out)
cfg = json.load(open(os.path.join(fx, "config.json")))
vocab_n = cfg.get("padded_vocab_size") or cfg.get("vocab_size")
bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
cs = bs[:]; n = 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
sym = {b: chr(c) for b, c in zip(bs, cs)}
vocab = {sym[b]: b for b in range(256)}
for i in range(256, vocab_n):
    vocab[f"<extra_{i}>"] = i
tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
tok.decoder = decoders.ByteLevel()
tok.save(os.path.join(out, "tokenizer.json"))
