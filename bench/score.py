"""Benchmark: score 10,000 synthetic responses of mixed tasks with the LongBench metrics core.

    .venv/bin/python bench/score.py [--n 10000] [--seed 0]

Predictions and answers are generated (seeded) to look like real ones: short QA answers, multi-sentence
summaries (a few of them long, including rambling outputs without periods that hit rouge's recursion
limit), Chinese text, class labels, "Paragraph N", counts, code lines, pass keys. Prints the jieba
start-up time, the total scoring seconds and a per-metric breakdown (count, seconds, ms/example, mean
score, flags).
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

from kv_transition.score import TASK_METRIC, score_example
from kv_transition.score import metrics as M

EN_WORDS = (
    "the committee report budget federal agency program review said would year million members "
    "government plan health care services state funding department officials new public data "
    "policy system local meeting project team discussed decided next week product design market "
    "user interface remote control battery cost price research study results patients treatment"
).split()
ZH_CHARS = "我们今天讨论项目进度会议决定下周完成这个问题是很重要的产品设计市场用户成本价格研究结果政府计划"
TREC = ["Abbreviation", "Expression abbreviated", "Animal", "Organ of body", "Color", "Definition of something",
        "Description of something", "Manner of an action", "Reason", "Human being", "Individual", "Title of a person",
        "City", "Country", "Mountain", "State", "Other location", "Date", "Number of something", "Other number"]
LSHT = ["体育", "体育新闻", "财经", "财经新闻", "教育", "科技", "娱乐", "房产", "时政", "军事"]


def en_sentence(rng: random.Random, lo: int = 6, hi: int = 25) -> str:
    words = [rng.choice(EN_WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


def en_text(rng: random.Random, sentences: int) -> str:
    return " ".join(en_sentence(rng) for _ in range(sentences))


def zh_text(rng: random.Random, chars: int) -> str:
    out = []
    for i in range(chars):
        out.append(rng.choice(ZH_CHARS))
        if i % rng.randint(8, 20) == 0 and i:
            out.append(rng.choice("，。"))
    return "".join(out)


def noisy_copy(rng: random.Random, text: str, keep: float, sep: str = " ") -> str:
    parts = text.split(sep) if sep else list(text)
    return sep.join(p for p in parts if rng.random() < keep)


def make(task: str, rng: random.Random) -> tuple[str, list[str], dict]:
    base = M.base_task(task)
    meta: dict = {"source": "longbench"}
    metric = TASK_METRIC[task]
    if metric == "qa_f1_score":
        gold = " ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(1, 6)))
        pred = rng.choice([gold, noisy_copy(rng, gold, 0.6) + " " + en_sentence(rng, 2, 8), en_sentence(rng)])
        answers = [gold] + ([gold.upper()] if rng.random() < 0.3 else [])
    elif metric == "qa_f1_zh_score":
        gold = zh_text(rng, rng.randint(4, 20))
        pred = rng.choice([gold, noisy_copy(rng, gold, 0.7, "") + zh_text(rng, 10), zh_text(rng, 30)])
        answers = [gold]
    elif metric == "rouge_score":
        n_sent = {"gov_report": 30, "qmsum": 12, "multi_news": 20, "samsum": 2}[base]
        gold = en_text(rng, rng.randint(max(1, n_sent // 2), n_sent))
        r = rng.random()
        if r < 0.02:  # degenerate: one long rambling "sentence" with no period -> RecursionError
            pred = " ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(1000, 1600)))
        elif r < 0.05:  # long but well-formed
            pred = en_text(rng, 60)
        else:
            pred = noisy_copy(rng, gold, 0.7) + " " + en_text(rng, rng.randint(1, n_sent // 2 + 1))
        answers = [gold]
    elif metric == "rouge_zh_score":
        gold = zh_text(rng, rng.randint(60, 500) if base == "vcsum" else rng.randint(20, 120))
        r = rng.random()
        if r < 0.05:  # long Chinese outputs: no "." so one sentence -> often a RecursionError
            pred = zh_text(rng, rng.randint(900, 1500))
        else:
            pred = noisy_copy(rng, gold, 0.7, "") + zh_text(rng, rng.randint(10, 150))
        answers = [gold]
    elif metric == "classification_score":
        classes = TREC if base == "trec" else LSHT
        gold = rng.choice(classes)
        pred = rng.choice([gold, rng.choice(classes), f"{gold}\n{rng.choice(classes)}", "I am not sure."])
        answers = [gold]
        meta["all_classes"] = classes
    elif metric in ("retrieval_score", "retrieval_zh_score"):
        k = rng.randint(1, 30)
        gold = f"Paragraph {k}" if metric == "retrieval_score" else f"段落{k}"
        pred = rng.choice([gold, f"Paragraph {rng.randint(1, 30)}", f"{k} or {rng.randint(1, 30)}", "unknown"])
        answers = [gold]
    elif metric == "count_score":
        k = rng.randint(1, 30)
        pred = rng.choice([str(k), f"There are {rng.randint(1, 30)} unique paragraphs.", f"{k}, {k + 1}"])
        answers = [str(k)]
    else:  # code_sim_score
        ident = rng.choice(["x", "self.value", "result", "items[i]", "total"])
        gold = f"{ident} = {rng.choice(['foo', 'bar', 'compute'])}({rng.randint(0, 99)}, {ident})"
        pred = rng.choice([gold, f"```python\n{noisy_copy(rng, gold, 0.8)}\n```",
                           f"# next line\n{gold[:-3]}", "return None"])
        answers = [gold]
    return pred, answers, meta


def make_synthetic(rng: random.Random) -> tuple[str, str, list[str], dict]:
    if rng.random() < 0.5:
        key = str(rng.randint(10000, 99999))
        pred = rng.choice([f"The pass key is {key}.", key, f"{key}0", "I could not find it."])
        return "passkey", pred, [key], {"source": "synthetic", "metric": "exact"}
    values = [str(rng.randint(1000000, 9999999)) for _ in range(4)]
    pred = ", ".join(v for v in values if rng.random() < 0.7)
    return "niah_multivalue", pred, values, {"source": "synthetic", "metric": "contains_all"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tasks = sorted(TASK_METRIC)
    items = []
    for _ in range(args.n):
        if rng.random() < 0.15:
            task, pred, answers, meta = make_synthetic(rng)
            items.append((task, pred, answers, meta, "synthetic:" + meta["metric"]))
        else:
            task = rng.choice(tasks)
            pred, answers, meta = make(task, rng)
            items.append((task, pred, answers, meta, TASK_METRIC[task]))

    t0 = time.perf_counter()
    M._jieba_cut("预热")  # one-time jieba dictionary load, reported separately
    jieba_s = time.perf_counter() - t0

    secs: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    total_score: dict[str, float] = defaultdict(float)
    flags: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    slowest = (0.0, "")
    t_all = time.perf_counter()
    cpu_all = time.process_time()
    for task, pred, answers, meta, key in items:
        t = time.perf_counter()
        score, fl = score_example(task, pred, answers, meta)
        dt = time.perf_counter() - t
        secs[key] += dt
        count[key] += 1
        total_score[key] += score
        for f in fl:
            flags[key][f] += 1
        if dt > slowest[0]:
            slowest = (dt, f"{task} ({len(pred)} chars prediction)")
    total = time.perf_counter() - t_all
    cpu = time.process_time() - cpu_all

    print(f"jieba initialisation: {jieba_s:.2f} s (once per process)")
    print(f"scored {len(items)} responses in {total:.2f} s wall, {cpu:.2f} s CPU "
          f"({1000 * total / len(items):.3f} ms/response wall)")
    print(f"slowest single response: {1000 * slowest[0]:.1f} ms, {slowest[1]}")
    print(f"{'metric':<24}{'n':>6}{'seconds':>10}{'ms/resp':>10}{'mean':>8}  flags")
    for key in sorted(secs, key=lambda k: -secs[k]):
        fl = ", ".join(f"{k}={v}" for k, v in sorted(flags[key].items())) or "-"
        print(f"{key:<24}{count[key]:>6}{secs[key]:>10.3f}{1000 * secs[key] / count[key]:>10.3f}"
              f"{total_score[key] / count[key]:>8.3f}  {fl}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
