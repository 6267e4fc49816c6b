#!/usr/bin/env python3
"""Builds the demo's pretraining corpus and its WordNet multiple-choice task from Debian's archive.

Run in /root/venv (needs PyPI `rdata`), after `apt-get update` once:
    python examples/demo/make_corpus.py [--work /tmp/demo-work]
Downloads r-cran-janeaustenr and wordnet-base with `apt-get download` and unpacks them with `dpkg -x` (nothing is
installed), then writes
    WORK/corpus/books.txt       Austen's six novels minus the held-out tail of Persuasion
    WORK/corpus/glosses.txt     WordNet glosses of every synset of a common word as text, both directions
                                ("word: gloss." and "the word for gloss is word."): the tokenizer's training text
    WORK/corpus/task_glosses.txt  the same two lines for the synsets the task asks about (train, valid and test):
                                the knowledge pretraining repeats (pretrain.py)
    examples/demo/tasks/wordnet_{train,valid,test}.jsonl   "Which word means ...?" with 4 choices
    examples/demo/tasks/heldout.txt                        held-out Austen text for perplexity
Everything is deterministic (fixed seed, sorted inputs).
"""
import argparse
import collections
import glob
import gzip
import json
import os
import random
import re
import subprocess
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1234
PACKAGES = ["r-cran-janeaustenr", "wordnet-base"]
NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
HELDOUT_LINES = 400  # last lines of Persuasion (before its final "Finis"), never seen in pretraining
# WordNet 3.0 lexicographer files, numbered as in lexnames(5WN).
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
            "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
            "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
            "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
            "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
            "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
MIN_BOOK_COUNT = 3  # a task word must occur this often in the novels (common words: the model can know them)
N_TEST, N_VALID, N_TRAIN = 500, 230, 1650  # questions (items) per split; other words are not used


def fetch(work):
    """apt-get download + dpkg -x into WORK/root (idempotent)."""
    debs, root = os.path.join(work, "debs"), os.path.join(work, "root")
    os.makedirs(debs, exist_ok=True)
    for pkg in PACKAGES:
        if not glob.glob(os.path.join(debs, pkg + "_*.deb")):
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
        subprocess.run(["dpkg", "-x", glob.glob(os.path.join(debs, pkg + "_*.deb"))[0], root], check=True)
    return root


def read_r_lazyload(prefix):
    """An R package's lazy-load data base (Rdata.rdx index + Rdata.rdb blobs) as {name: python object}."""
    import rdata
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(open(prefix + ".rdx", "rb").read())))
    rdb = open(prefix + ".rdb", "rb").read()
    out = {}
    for name, (off, n) in index["variables"].items():
        blob = rdb[int(off):int(off) + int(n)]  # 4-byte length, then zlib-compressed serialization
        out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
    return out


def paragraphs(lines):
    """Book lines (hard-wrapped) to paragraphs, one per line."""
    out, cur = [], []
    for line in list(lines) + [""]:
        line = str(line).strip()
        if line:
            cur.append(line)
        elif cur:
            out.append(" ".join(cur))
            cur = []
    return out


def clean_gloss(g):
    g = g.split('; "')[0].strip()  # drop the usage examples
    g = re.sub(r"\s+", " ", g).strip().rstrip(";").strip()
    return g


def read_wordnet(root):
    wn = os.path.join(root, "usr/share/wordnet")
    synsets = {}  # (pos, offset) -> dict
    for name, p in POS.items():
        for line in open(os.path.join(wn, "data." + name), encoding="latin-1"):
            if line.startswith("  "):
                continue
            head, gloss = line.split(" | ", 1)
            f = head.split()
            offset, lex, wcnt = f[0], int(f[1]), int(f[3], 16)
            words = [re.sub(r"\(.*\)$", "", f[4 + 2 * i]) for i in range(wcnt)]
            synsets[(p, offset)] = {"lex": LEXNAMES[lex], "words": words, "gloss": clean_gloss(gloss)}
    first_sense = {}  # (lemma, pos) -> offset of its first (most frequent) sense
    for name, p in POS.items():
        for line in open(os.path.join(wn, "index." + name), encoding="latin-1"):
            if line.startswith("  "):
                continue
            f = line.split()
            n = int(f[2])
            first_sense[(f[0], p)] = f[-n]
    return synsets, first_sense


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/demo-work")
    args = ap.parse_args()
    root = fetch(args.work)
    rng = random.Random(SEED)

    # Books: paragraphs, Persuasion's tail held out.
    novels = read_r_lazyload(os.path.join(root, "usr/lib/R/site-library/janeaustenr/data/Rdata"))
    book_pars, heldout = [], []
    for name in NOVELS:
        lines = [str(x) for x in novels[name]]
        if name == "persuasion":
            heldout = paragraphs(lines[-HELDOUT_LINES:])
            lines = lines[:-HELDOUT_LINES]
        book_pars += paragraphs(lines)
    counts = collections.Counter(w for p in book_pars for w in re.findall(r"[a-z]+", p.lower()))

    # WordNet: glosses of every synset whose lemmas include a common word; task items are common words' first senses.
    synsets, first_sense = read_wordnet(root)
    common = {w for w, c in counts.items() if c >= MIN_BOOK_COUNT and len(w) > 2}
    gloss_lines = []
    for key in sorted(synsets):
        s = synsets[key]
        ws = [w for w in s["words"] if w in common]
        if not ws or not s["gloss"]:
            continue
        for w in ws:
            gloss_lines.append(f"{w}: {s['gloss']}.")
            gloss_lines.append(f"the word for {s['gloss']} is {w}.")
    rng.shuffle(gloss_lines)

    items = []  # (word, pos, offset, lexname, gloss)
    for (w, p), off in sorted(first_sense.items()):
        s = synsets[(p, off)]
        if w in common and w.isalpha() and s["gloss"] and w in s["words"]:
            items.append({"word": w, "pos": p, "offset": off, "lex": s["lex"], "gloss": s["gloss"],
                          "lemmas": set(s["words"])})
    # Split by word (so also by synset): no test word or synset is gold or distractor in train/valid.
    words = sorted({it["word"] for it in items})
    rng.shuffle(words)
    # Pick test, valid and train words until each has the wanted number of items (test: a margin for items without
    # distractors). The task is kept small so that pretraining can repeat its glosses often enough to learn them.
    split_of = {}
    need = {"test": N_TEST + 60, "valid": N_VALID, "train": N_TRAIN}
    by_word = collections.defaultdict(list)
    for it in items:
        by_word[it["word"]].append(it)
    have = {sp: 0 for sp in need}
    for w in words:
        for sp in need:
            if have[sp] < need[sp]:
                split_of[w] = sp
                have[sp] += len(by_word[w])
                break
        else:
            split_of[w] = None
    out, facts = {}, []  # facts: the glosses of the task's synsets as text (pretraining repeats them)
    for sp in ("train", "valid", "test"):
        its = [it for it in items if split_of[it["word"]] == sp]
        pool = collections.defaultdict(list)
        for it in its:
            pool[it["lex"]].append(it["word"])
        rows = []
        for it in its:
            cands = sorted({w for w in pool[it["lex"]] if w not in it["lemmas"]})
            if len(cands) < 3:
                continue
            choices = rng.sample(cands, 3) + [it["word"]]
            rng.shuffle(choices)
            rows.append({"context": f"Question: Which word means \"{it['gloss']}\"?\nAnswer:",
                         "choices": [" " + c for c in choices], "gold": choices.index(it["word"]),
                         "meta": {"synset": f"{it['offset']}-{it['pos']}", "lexname": it["lex"]}})
        rng.shuffle(rows)
        if sp == "test":
            rows = rows[:N_TEST]
        out[sp] = rows
        for r in rows:
            word = r["choices"][r["gold"]].strip()
            gloss = r["context"].split('means "', 1)[1].rsplit('"?', 1)[0]
            facts.append(f"{word}: {gloss}.")
            facts.append(f"the word for {gloss} is {word}.")
    tasks = os.path.join(HERE, "tasks")
    os.makedirs(tasks, exist_ok=True)
    for sp, rows in out.items():
        with open(os.path.join(tasks, f"wordnet_{sp}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    with open(os.path.join(tasks, "heldout.txt"), "w") as f:
        f.write("\n".join(heldout) + "\n")
    corpus = os.path.join(args.work, "corpus")
    os.makedirs(corpus, exist_ok=True)
    with open(os.path.join(corpus, "books.txt"), "w") as f:
        f.write("\n".join(book_pars) + "\n")
    with open(os.path.join(corpus, "glosses.txt"), "w") as f:
        f.write("\n".join(gloss_lines) + "\n")
    facts.sort()
    rng.shuffle(facts)
    with open(os.path.join(corpus, "task_glosses.txt"), "w") as f:
        f.write("\n".join(facts) + "\n")
    print(f"books: {len(book_pars)} paragraphs, {sum(map(len, book_pars))} chars; held out {sum(map(len, heldout))} chars")
    print(f"glosses: {len(gloss_lines)} lines, {sum(map(len, gloss_lines))} chars; common words {len(common)}")
    print(f"task glosses: {len(facts)} lines, {sum(map(len, facts))} chars")
    print("task items: " + ", ".join(f"{sp} {len(r)}" for sp, r in out.items()))


if __name__ == "__main__":
    main()
