#!/usr/bin/env python3
"""Exports evaluation tasks from the Hugging Face `datasets` library to crash-hpc's JSON Lines
format, with the prompt templates lm-eval (EleutherAI lm-evaluation-harness 0.4) uses.
Run it on a machine that has the data sets (crash-hpc itself never downloads anything):

    pip install datasets
    python examples/export_tasks.py --task piqa --split validation --out piqa.jsonl

Multiple choice lines: {"context": ..., "choices": [...], "gold": i}; choices carry lm-eval's
target delimiter (a leading space). Generation lines: {"context": ..., "answers": [...]}.
See docs/tasks.md for the templates.
"""
import argparse
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


def race(doc):
    # lm-eval's RACE: the article, every earlier question of the article answered, then the last one.
    letters = ["A", "B", "C", "D"]
    problems = doc["problems"] if "problems" in doc else [
        {"question": doc["question"], "options": doc["options"], "answer": doc["answer"]}]
    text = "Article: " + doc["article"] + "\n\n"
    for p in problems[:-1]:
        answer = p["options"][letters.index(p["answer"])]
        if p["question"].endswith("  _  ."):
            text += p["question"][:-len("  _  .")] + " " + answer + ".\n"
        else:
            text += "Question: " + p["question"] + "\nAnswer: " + answer + "\n"
    last = problems[-1]
    text += last["question"].replace("  _  .", "") if last["question"].endswith("  _  .") else \
        "Question: " + last["question"] + "\nAnswer:"
    return {"context": text, "choices": [" " + o for o in last["options"]], "gold": letters.index(last["answer"])}


def webqs(doc):
    return {"context": f"Question: {doc['question']}\nAnswer:", "answers": [" " + a for a in doc["answers"]]}


TASKS = {  # name: (datasets path, config, converter)
    "piqa": ("piqa", None, piqa),
    "openbookqa": ("openbookqa", "main", openbookqa),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", arc),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", arc),
    "sciq": ("sciq", None, sciq),
    "hellaswag": ("hellaswag", None, hellaswag),
    "race": ("race", "high", race),
    "webqs": ("web_questions", None, webqs),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    from datasets import load_dataset
    path, config, convert = TASKS[a.task]
    data = load_dataset(path, config, split=a.split)
    with open(a.out, "w") as f:
        for i, doc in enumerate(data):
            if a.limit is not None and i >= a.limit:
                break
            f.write(json.dumps(convert(doc), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
