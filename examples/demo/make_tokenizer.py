#!/usr/bin/env python3
"""Trains the demo's byte-level BPE tokenizer (GPT-2/OPT style) on the corpus of make_corpus.py.

    python examples/demo/make_tokenizer.py [--work /tmp/demo-work] [--vocab 8192]
Writes examples/demo/model/tokenizer.json (+ tokenizer_config.json, special_tokens_map.json). Special tokens have
OPT's ids (<s> 0, <pad> 1, </s> 2, <unk> 3) and, as OPT's tokenizer does, </s> is put before every text (BOS).
The BPE trainer is deterministic for a fixed input.
"""
import argparse
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0, 1, 2, 3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/demo-work")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--out", default=os.path.join(HERE, "model"))
    args = ap.parse_args()
    files = [os.path.join(args.work, "corpus", f) for f in ("books.txt", "glosses.txt")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3]
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", 2)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>")
    os.makedirs(args.out, exist_ok=True)
    hf.save_pretrained(args.out)
    text = open(files[0]).read()[:200000]
    n = len(tok.encode(text, add_special_tokens=False).ids)
    print(f"vocab {tok.get_vocab_size()}, {len(text) / n:.2f} chars/token on the books")


if __name__ == "__main__":
    main()
