"""Multiple-choice log-likelihoods as lm-evaluation-harness computes them,
with transformers: the reference `pt-host eval --eval_tasks` is tested
against (tests/fixtures/mc-tasks/expected.json).

For each task directory (CSV files: SUBJECT_dev/_val/_test.csv, or dev/,
val/, test/ folders of SUBJECT.csv; the scored split is test when it has
answers, else val), each model and each shot count: the harness's MMLU
(English) or C-Eval (Chinese) prompt, the pair split (trailing whitespace
moved to the continuation; continuation = encode(context + continuation)
past len(encode(context)), special tokens as the tokenizer adds them), the
input (context + continuation)[-(max_length + 1):][:-1], and the sum of the
continuation tokens' log-probabilities.

Usage: mc_reference.py OUT.json MAX_LENGTH MODEL_DIR... -- TASK_DIR...
"""

import csv
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SPLITS = {"dev": "dev", "val": "val", "test": "test"}


def split_and_subject(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    head, _, tail = stem.rpartition("_")
    if head and tail in SPLITS:
        return tail, head
    return os.path.basename(os.path.dirname(path)), stem


def read_task(root):
    subjects = {}
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if not name.endswith(".csv"):
                continue
            path = os.path.join(folder, name)
            split, subject = split_and_subject(path)
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
            header = [h.strip().lower() for h in rows[0]]
            col = {h: i for i, h in enumerate(header)}
            questions = []
            for line, row in enumerate(rows[1:], start=2):
                answer = row[col["answer"]].strip()
                questions.append(
                    {
                        "source": f"{os.path.relpath(path, root)}:{line}",
                        "question": row[col["question"]],
                        "choices": [row[col[c]] for c in "abcd"],
                        "answer": "ABCD".index(answer) if answer else None,
                    }
                )
            if all(q["answer"] is None for q in questions):
                continue
            subjects.setdefault(subject, {})[split] = questions
    return subjects


def prompt(language, subject, shots, question):
    subject = subject.replace("_", " ")
    if language == "en":
        text = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        cue, letters = "Answer:", [" A", " B", " C", " D"]
    else:
        text = f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
        cue, letters = "答案：", ["A", "B", "C", "D"]

    def ask(q):
        body = q["question"].strip()
        for letter, choice in zip("ABCD", q["choices"]):
            body += f"\n{letter}. {choice}"
        return body + "\n" + cue

    for shot in shots:
        text += ask(shot) + letters[shot["answer"]] + "\n\n"
    return text + ask(question), letters


def encode_pair(tokenizer, context, continuation):
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def log_likelihood(model, context, continuation, max_length):
    whole = (context + continuation)[-(max_length + 1):]
    inputs = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logits = model(input_ids=inputs).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    n = len(continuation)
    positions = range(len(whole) - 1 - n, len(whole) - 1)
    return sum(log_probs[p, t].item() for p, t in zip(positions, continuation))


def main():
    out, max_length = sys.argv[1], int(sys.argv[2])
    separator = sys.argv.index("--")
    models, tasks = sys.argv[3:separator], sys.argv[separator + 1:]
    results = []
    for model_dir in models:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        for task_dir in tasks:
            language = os.path.basename(task_dir.rstrip("/"))
            subjects = read_task(task_dir)
            for shots in (0, 2):
                questions = []
                for subject in sorted(subjects):
                    splits = subjects[subject]
                    scored = splits.get("test") or splits.get("val")
                    for question in scored:
                        context, letters = prompt(
                            language, subject, splits["dev"][:shots], question
                        )
                        scores = []
                        for letter in letters:
                            ctx, cont = encode_pair(tokenizer, context, letter)
                            scores.append(log_likelihood(model, ctx, cont, max_length))
                        questions.append(
                            {
                                "source": question["source"],
                                "scores": scores,
                                "prediction": max(range(4), key=lambda i: (scores[i], -i)),
                                "answer": question["answer"],
                            }
                        )
                results.append(
                    {
                        "model": os.path.basename(os.path.dirname(model_dir.rstrip("/"))),
                        "task": language,
                        "num_fewshot": shots,
                        "questions": questions,
                    }
                )
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"max_length": max_length, "results": results}, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
