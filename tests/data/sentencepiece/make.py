"""Makes the SentencePiece fixture: a tiny BPE model trained with LLaMA's settings (byte
fallback, split digits, a "▁" before the text, no normalization), and what SentencePiece itself
makes of some texts: the ids a converted tokenizer must give. transformers' own conversion is
recorded beside them; it differs from SentencePiece where a text starts with spaces (it drops
one), which is why the reference is SentencePiece. Around a user-defined symbol (<|user|>)
every tokenizer.json, transformers' included, splits the symbol out first and puts the "▁"
before the text after it; SentencePiece puts it before the whole text.

    python make.py    # needs sentencepiece, transformers; writes tiny.model, unigram.model, expected.json
"""
import io
import json
import os
import tempfile

import sentencepiece as spm
from transformers import AutoTokenizer

CORPUS = [
    "The island of Vell has three harbours and one lighthouse.",
    "Fishermen of Vell mend their nets in the evening, singing old songs.",
    "In 1872 the lighthouse was painted red; in 1901 it was painted white.",
    "def add(a, b):\n    return a + b\n",
    "Le phare de Vell est rouge et blanc. Les pêcheurs chantent le soir.",
    "Die Fischer von Vell flicken ihre Netze am Abend.",
    "维尔岛有三个港口和一座灯塔。",
] * 20

TEXTS = [
    "Hello world!",
    "The lighthouse of Vell was painted in 1872.",
    "  two leading spaces,\ttabs\nand new lines\n\n",
    "café, naïve, Ångström 🙂 日本語 灯塔",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "nets nets nets netting",
    "",
    " ",
    "<|user|>Where is Vell?",
]

model = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS),
    model_writer=model,
    model_type="bpe",
    vocab_size=400,
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    character_coverage=1.0,
    user_defined_symbols=["<|user|>"],
    minloglevel=2,
)
with open("tiny.model", "wb") as f:
    f.write(model.getvalue())

# a Unigram model, which the converter refuses
unigram = io.BytesIO()
spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=unigram, model_type="unigram",
                               vocab_size=350, byte_fallback=True, normalization_rule_name="identity",
                               minloglevel=2)
with open("unigram.model", "wb") as f:
    f.write(unigram.getvalue())

sp = spm.SentencePieceProcessor(model_file="tiny.model")
# transformers' own conversion of the same file (what a LLaMA folder without tokenizer.json loads as)
folder = tempfile.mkdtemp()
with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True}, f)
fast = AutoTokenizer.from_pretrained(folder)
expected = []
for text in TEXTS:
    ids = sp.encode(text)
    hf = fast(text)["input_ids"]
    assert hf[:1] == [sp.bos_id()], hf
    if hf[1:] != ids:
        print(f"transformers differs on {text!r}: {[sp.id_to_piece(i) for i in hf[1:]][:4]} vs "
              f"{[sp.id_to_piece(i) for i in ids][:4]}")
    expected.append({"text": text, "ids": ids, "decoded": sp.decode(ids), "transformers_ids": hf[1:],
                     "transformers_decoded": fast.decode(hf[1:])})
json.dump({"vocab_size": sp.vocab_size(), "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(),
           "texts": expected}, open("expected.json", "w"), ensure_ascii=False, indent=1)
print(sp.vocab_size(), "pieces,", len(expected), "texts")
