#!/usr/bin/env python3
"""Exports evaluation tasks from the Hugging Face `datasets` library to crash-hpc's JSON Lines
format, with the prompt templates lm-eval (EleutherAI lm-evaluation-harness 0.4) uses.
Run it on a machine that has the data sets (crash-hpc itself never downloads anything):

    pip install datasets
    python examples/export_tasks.py --task piqa --split validation --out piqa.jsonl

Multiple choice lines: {"context": ..., "choices": [...], "gold": i}, or "gold": [i, ...] where
every listed choice is accepted (webqs); choices carry lm-eval's target delimiter (a leading
space). Generation lines: {"context": ..., "answers": [...]} (webqs_free_generation only, which
is not an lm-eval task). See docs/tasks.md for the templates, RACE's document-level form and
its quirks.
"""
import argparse
import ast
import json
import re


def hellaswag_preprocess(text):
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def piqa(doc):
    return {"context": f"Question: {doc['goal']}\nAnswer:", "choices": [" " + doc["sol1"], " " + doc["sol2"]],
            "gold": int(doc["label"])}


def openbookqa(doc):
    labels = doc["choices"]["label"]
    return {"context": doc["question_stem"], "choices": [" " + c for c in doc["choices"]["text"]],
            "gold": labels.index(doc["answerKey"].strip())}


def arc(doc):
    labels = doc["choices"]["label"]
    return {"context": f"Question: {doc['question']}\nAnswer:", "choices": [" " + c for c in doc["choices"]["text"]],
            "gold": labels.index(doc["answerKey"])}


def sciq(doc):
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return {"context": f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:",
            "choices": [" " + c for c in choices], "gold": 3}


def hellaswag(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"context": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [" " + hellaswag_preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}


RACE_BLANK = "  _  ."  # how RACE's cloze questions end


def race_problems(doc):
    # EleutherAI/race stores an article's problems as the text of a Python list.
    return ast.literal_eval(doc["problems"]) if isinstance(doc["problems"], str) else doc["problems"]


def race_answer(problem):
    return problem["options"]["ABCD".index(problem["answer"])]


def race(doc):
    """lm-eval's RACE (race.yaml v3.0, preprocess_race.py): one document is one article with all its
    problems. Every problem but the last is written out with its answer; a cloze one ("...  _  .")
    drops its last five characters (" _  .") and takes the answer and a newline. The last problem is
    appended as it is (no "Question:"/"Answer:", a cloze blank left in place) and is the one asked."""
    problems = race_problems(doc)
    text = "Article: " + doc["article"] + "\n\n"
    for p in problems[:-1]:
        if p["question"][-6:] == RACE_BLANK:
            text += p["question"][:-5] + race_answer(p) + "\n"
        else:
            text += "Question: " + p["question"] + "\n" + "Answer: " + race_answer(p) + "\n"
    last = problems[-1]
    text += last["question"]
    return {"context": text, "choices": [" " + last["options"][i] for i in range(4)],
            "gold": "ABCD".index(last["answer"])}


def webqs_choices(answers):
    """lm-eval's webqs utils._remove_prefixes: the answers sorted, each dropped when it starts with the
    last one kept (so a longer alias of a kept one goes, and so do duplicates)."""
    ordered = sorted(answers)
    kept = [ordered[0]]
    for a in ordered[1:]:
        if not a.startswith(kept[-1]):
            kept.append(a)
    return kept


def webqs(doc):
    """lm-eval's webqs (webqs.yaml v2.0): multiple choice over the answer aliases, all of them gold;
    scored by exact_match (some gold alias is the greedy continuation)."""
    choices = webqs_choices(doc["answers"])
    return {"context": f"Question: {doc['question']}\nAnswer:", "choices": [" " + c for c in choices],
            "gold": list(range(len(choices)))}


def webqs_free_generation(doc):
    """Not lm-eval's webqs: free greedy generation, exact match of the normalised text against any answer."""
    return {"context": f"Question: {doc['question']}\nAnswer:", "answers": [" " + a for a in doc["answers"]]}


TASKS = {  # name: (datasets path, config, lm-eval's evaluation split, converter)
    "piqa": ("baber/piqa", None, "validation", piqa),
    "openbookqa": ("allenai/openbookqa", "main", "test", openbookqa),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", arc),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", arc),
    "sciq": ("allenai/sciq", None, "test", sciq),
    "hellaswag": ("Rowan/hellaswag", None, "validation", hellaswag),
    "race": ("EleutherAI/race", "high", "test", race),
    "webqs": ("stanfordnlp/web_questions", None, "test", webqs),
    "webqs_free_generation": ("stanfordnlp/web_questions", None, "test", webqs_free_generation),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--split", default=None, help="default: the split lm-eval evaluates")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    from datasets import load_dataset
    path, config, split, convert = TASKS[a.task]
    data = load_dataset(path, config, split=a.split or split)
    with open(a.out, "w") as f:
        for i, doc in enumerate(data):
            if a.limit is not None and i >= a.limit:
                break
            f.write(json.dumps(convert(doc), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
