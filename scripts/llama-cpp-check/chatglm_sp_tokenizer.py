#!/usr/bin/env python3
"""A copy of the ChatGLM3 fixture with a SentencePiece tokenizer.model (tests/data/sentencepiece's
tiny BPE model; ChatGLM3 ships one, with its special tokens numbered after the pieces by its
Python tokenizer) and the vocabulary grown to hold the pieces and those specials, and the ids
SentencePiece gives each line of TEXTS: python chatglm_sp_tokenizer.py FIXTURE_DIR OUT_DIR TEXTS"""
import json, os, shutil, sys
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
fx, out, texts_path = sys.argv[1], sys.argv[2], sys.argv[3]
here = os.path.dirname(os.path.abspath(__file__))
model = os.path.join(here, "../../tests/data/sentencepiece/tiny.model")
os.makedirs(out, exist_ok=True)
# the tiny model has a <|user|> piece of its own, which ChatGLM3's specials would repeat (and
# llama.cpp refuses a vocabulary with a token twice): rename it
from sentencepiece import sentencepiece_model_pb2 as pb
proto = pb.ModelProto()
proto.ParseFromString(open(model, "rb").read())
for p in proto.pieces:
    if p.piece == "<|user|>":
        p.piece = "<|usr|>"
model = os.path.join(out, "tokenizer.model")
open(model, "wb").write(proto.SerializeToString())
sp = spm.SentencePieceProcessor(model_file=model)
rows = (sp.get_piece_size() + 9 + 15) // 16 * 16  # the pieces, ChatGLM3's 9 specials, padded
cfg = json.load(open(os.path.join(fx, "config.json")))
cfg["padded_vocab_size"] = cfg["vocab_size"] = rows
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
weights = load_file(os.path.join(fx, "model.safetensors"))
g = torch.Generator().manual_seed(0)
for name, t in list(weights.items()):
    if t.dim() == 2 and t.shape[0] < rows and ("word_embeddings" in name or "output_layer" in name):
        extra = torch.randn(rows - t.shape[0], t.shape[1], generator=g, dtype=t.dtype) * t.std()
        weights[name] = torch.cat([t, extra])
save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
json.dump({"add_bos_token": False}, open(os.path.join(out, "tokenizer_config.json"), "w"))
for line in open(texts_path).read().splitlines():
    print(" ".join(map(str, sp.encode(line))))
