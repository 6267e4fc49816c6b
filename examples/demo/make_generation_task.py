#!/usr/bin/env python3
"""Writes tasks/wordnet_define.jsonl, the demo's generation task: the first 200 questions of the
WordNet test split asked as the pretraining text states the facts ("the word for GLOSS is WORD."),
scored by exact match of the greedy generation (cut at the newline) against the gold word.
Depth pruning hurts free generation most, so the pruning study scores it beside multiple choice."""
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
QUESTION = re.compile(r'^Question: Which word means "(.*)"\?\nAnswer:$', re.S)


def main():
    out = []
    with open(os.path.join(HERE, "tasks", "wordnet_test.jsonl")) as f:
        for line in f:
            ex = json.loads(line)
            gloss = QUESTION.match(ex["context"]).group(1)
            out.append({"context": f"the word for {gloss} is", "answers": [ex["choices"][ex["gold"]]]})
            if len(out) == 200:
                break
    with open(os.path.join(HERE, "tasks", "wordnet_define.jsonl"), "w") as f:
        for ex in out:
            f.write(json.dumps(ex) + "\n")
    print(f"wrote {len(out)} examples")


if __name__ == "__main__":
    main()
