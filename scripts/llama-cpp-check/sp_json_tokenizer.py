#!/usr/bin/env python3
"""A SentencePiece-style BPE tokenizer.json ("▁" for spaces, as LlamaTokenizerFast writes one;
no tokenizer.model) trained to a fixture's vocabulary size, beside a copy of the fixture, and
the ids it gives each line of TEXTS: python sp_json_tokenizer.py FIXTURE_DIR OUT_DIR TEXTS_FILE"""
import json, os, shutil, sys
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders, trainers
fx, out, texts_path = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out, exist_ok=True)
for f in ["config.json", "model.safetensors", "generation_config.json"]:
    if os.path.exists(os.path.join(fx, f)):
        shutil.copy(os.path.join(fx, f), out)
vocab_n = json.load(open(os.path.join(fx, "config.json")))["vocab_size"]
corpus = [
    "the quick brown fox jumps over the lazy dog and then it runs far away into the green hills",
    "once upon a time there was a little girl who lived in a village near the forest",
    "hello world, this is a test of the tokenizer with some words that repeat: the the the",
] * 50
tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
trainer = trainers.BpeTrainer(vocab_size=vocab_n, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
tok.train_from_iterator(corpus, trainer)
assert tok.get_vocab_size() <= vocab_n, tok.get_vocab_size()
tok.save(os.path.join(out, "tokenizer.json"))
json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False},
          open(os.path.join(out, "tokenizer_config.json"), "w"))
for line in open(texts_path).read().splitlines():
    print(" ".join(map(str, tok.encode(line).ids)))
