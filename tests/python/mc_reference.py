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

A `.jsonl` task is MedQA's JSONL (MedQA's layout or Hugging Face's
sent1/ending0/label one), asked as the medqa_tasks plugin's two formats:
`medqa`, lm-evaluation-harness's medqa_4options prompt scored on the
letters, and `medqa_text`, the question alone scored on the options' words
(multi-token continuations); zero-shot, subjects (meta_info, else the
format) in name order.

A model given as `MODEL_DIR=TOKENIZER_DIR` is read with that tokenizer and
named after the tokenizer's directory (llama-bos-tokenizer: a BOS before
every encoding).

Usage: mc_reference.py OUT.json MAX_LENGTH MODEL_DIR[=TOKENIZER_DIR]... -- TASK_DIR|MEDQA.jsonl...
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


def read_medqa(path, task):
    questions = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            doc = json.loads(line)
            if "sent1" in doc:
                text, answer, subject = doc["sent1"], doc["label"], task
                options = [doc[f"ending{i}"] for i in range(4)]
            else:
                letters = sorted(doc["options"])
                text, subject = doc["question"], doc.get("meta_info") or task
                options = [doc["options"][k] for k in letters]
                answer = letters.index(doc["answer_idx"])
            questions.append((subject, f"{os.path.basename(path)}:{line_no}", text, options, answer))
    return sorted(questions, key=lambda q: q[0])


def medqa_prompt(task, text, options):
    if task == "medqa":
        answers = "".join(f"{k}. {v}\n" for k, v in zip("ABCD", options))
        return f"Question: {text}\n{answers}Answer:", [f" {k}" for k in "ABCD"[: len(options)]]
    return f"Question: {text}\nAnswer:", [" " + o.strip() for o in options]


def scored(tokenizer, model, max_length, source, context, continuations, answer):
    scores = []
    for continuation in continuations:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        scores.append(log_likelihood(model, ctx, cont, max_length))
    return {
        "source": source,
        "scores": scores,
        "prediction": max(range(len(scores)), key=lambda i: (scores[i], -i)),
        "answer": answer,
    }


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
    for model_arg in models:
        model_dir, _, tokenizer_dir = model_arg.partition("=")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        model_name = (
            os.path.basename(tokenizer_dir.rstrip("/"))
            if tokenizer_dir
            else os.path.basename(os.path.dirname(model_dir.rstrip("/")))
        )
        for task_dir in tasks:
            if task_dir.endswith(".jsonl"):
                for task in ("medqa", "medqa_text"):
                    questions = []
                    for _, source, text, options, answer in read_medqa(task_dir, task):
                        context, continuations = medqa_prompt(task, text, options)
                        questions.append(
                            scored(tokenizer, model, max_length, source, context, continuations, answer)
                        )
                    results.append(
                        {"model": model_name, "task": task, "num_fewshot": 0, "questions": questions}
                    )
                continue
            language = os.path.basename(task_dir.rstrip("/"))
            subjects = read_task(task_dir)
            for shots in (0, 2):
                questions = []
                for subject in sorted(subjects):
                    splits = subjects[subject]
                    for question in splits.get("test") or splits.get("val"):
                        context, letters = prompt(
                            language, subject, splits["dev"][:shots], question
                        )
                        questions.append(
                            scored(
                                tokenizer,
                                model,
                                max_length,
                                question["source"],
                                context,
                                letters,
                                question["answer"],
                            )
                        )
                results.append(
                    {
                        "model": model_name,
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
