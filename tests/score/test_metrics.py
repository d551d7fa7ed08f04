"""The LongBench metrics core: hand-computed cases for every metric and quirk of the reference
(THUDM/LongBench ``LongBench/metrics.py`` + ``eval.py``, rouge==1.0.1), synthetic metrics, and properties.

Every expected number is derived in the comment next to it; nothing is a bare magic number.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_transition.errors import DataError
from kv_transition.score import (
    FLAG_NO_ANSWERS,
    FLAG_ROUGE_EMPTY,
    FLAG_ROUGE_RECURSION,
    TASK_METRIC,
    longbench_e_bucket,
    score_example,
    score_longbench,
    score_longbench_detailed,
    score_synthetic,
)
from kv_transition.score import metrics as M


def rouge_f(p: float, r: float) -> float:
    """rouge 1.0.1's F: 2 * ((p * r) / (p + r + 1e-8)), in that operation order."""
    return 2.0 * ((p * r) / (p + r + 1e-8))


def f1(p: float, r: float) -> float:
    """metrics.py f1_score: (2 * precision * recall) / (precision + recall)."""
    return (2 * p * r) / (p + r)


# --------------------------------------------------------------------------------------------
# Task table
# --------------------------------------------------------------------------------------------


def test_task_metric_matches_eval_py_and_the_dataset_registry():
    from kv_transition.datasets.longbench import TASKS

    # eval.py dataset2metric has 21 tasks; LongBench-E adds 13 "<task>_e" names
    assert len(M.LONGBENCH_METRIC) == 21
    assert len(TASK_METRIC) == 21 + 13
    assert TASK_METRIC == {name: info.metric for name, info in TASKS.items()}
    assert TASK_METRIC["dureader"] == "rouge_zh_score" and TASK_METRIC["lsht"] == "classification_score"
    assert TASK_METRIC["repobench-p_e"] == "code_sim_score"


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(DataError, match="valid tasks: narrativeqa, qasper"):
        score_longbench("hotpot", "x", ["x"])
    # narrativeqa is not part of LongBench-E
    with pytest.raises(DataError, match="hotpotqa_e"):
        score_longbench("narrativeqa_e", "x", ["x"])


def test_bad_inputs_are_data_errors():
    with pytest.raises(DataError, match="list of strings"):
        score_longbench("hotpotqa", "Paris", "Paris")  # a bare string would be iterated per character
    with pytest.raises(DataError, match="prediction must be a string"):
        score_longbench("hotpotqa", None, ["Paris"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# qa_f1 (normalize_answer + Counter F1)
# --------------------------------------------------------------------------------------------


def test_qa_f1_normalisation_case_punctuation_articles():
    # lower, drop "!" and ",", drop "The" -> "eiffel tower" on both sides
    assert score_longbench("hotpotqa", "The Eiffel Tower!", ["eiffel, tower"]) == 1.0
    # "an apple a day" -> "apple day"; "theory" keeps its "the" (articles only as whole words)
    assert M.normalize_answer("An apple a day, theory.") == "apple day theory"


def test_qa_f1_partial_overlap():
    # [paris, france] vs [paris]: P = 1/2, R = 1
    assert score_longbench("qasper", "Paris, France", ["Paris"]) == f1(1 / 2, 1.0)


def test_qa_f1_counter_overlap_counts_duplicates_once_each():
    # [cat, cat, dog] & [cat, dog, dog] = {cat: 1, dog: 1} -> 2 common; P = R = 2/3
    assert score_longbench("musique", "cat cat dog", ["cat dog dog"]) == f1(2 / 3, 2 / 3)


def test_qa_f1_punctuation_is_removed_before_articles():
    # "the-end" -> "theend" (one token, no article left) vs "end" -> no overlap
    assert score_longbench("2wikimqa", "the-end", ["end"]) == 0.0
    # only ASCII string.punctuation is removed: curly quotes stay, so '“Paris”' is one odd token
    assert M.normalize_answer("“Paris”") == "“paris”"
    assert score_longbench("2wikimqa", "“Paris”", ["Paris"]) == 0.0
    assert score_longbench("2wikimqa", '"Paris"', ["Paris"]) == 1.0
    # "“the" : \b sits between “ and t, so the article goes and leaves "“"
    assert M.normalize_answer("“the end”") == "“ end”"


def test_qa_f1_empty_sides_score_zero():
    assert score_longbench("narrativeqa", "", ["Paris"]) == 0.0
    # both empty: 0 common tokens -> 0 (not 1)
    assert score_longbench("narrativeqa", "", [""]) == 0.0
    # normalising to nothing ("the a an") also gives no tokens
    assert score_longbench("narrativeqa", "The. A, an!", ["the"]) == 0.0


def test_max_over_gold_answers_and_no_answers():
    assert score_longbench("hotpotqa", "Paris", ["Berlin", "Paris", "Paris, France"]) == 1.0
    # "Rome" scores 0, "Paris" gives P = 1/2, R = 1: the max wins
    assert score_longbench("hotpotqa", "Paris France", ["Rome", "Paris"]) == f1(1 / 2, 1.0)
    assert score_longbench_detailed("hotpotqa", "Paris", []) == (0.0, (FLAG_NO_ANSWERS,))


# --------------------------------------------------------------------------------------------
# qa_f1_zh (jieba cut on raw text, then per-token normalize_zh_answer)
# --------------------------------------------------------------------------------------------


def test_qa_f1_zh_jieba_tokens():
    # jieba: [我们, 今天, 讨论, 项目, 。] -> "。" normalises to "" and is dropped; gold [今天, 讨论, 项目]
    assert M._jieba_cut("我们今天讨论项目。") == ["我们", "今天", "讨论", "项目", "。"]
    # 3 common of 4 predicted / 3 gold: P = 3/4, R = 1
    assert score_longbench("multifieldqa_zh", "我们今天讨论项目。", ["今天讨论项目"]) == f1(3 / 4, 1.0)


def test_qa_f1_zh_punctuation_set_has_right_but_not_left_book_title_mark():
    # the reference's cn_punctuation contains "》" but not "《"
    assert M.normalize_zh_answer("《红楼梦》") == "《红楼梦"
    # jieba: [《, 红楼梦, 》] -> [《, 红楼梦] after normalising and dropping "": P = 1/2, R = 1
    assert M._jieba_cut("《红楼梦》") == ["《", "红楼梦", "》"]
    assert score_longbench("multifieldqa_zh", "《红楼梦》", ["红楼梦"]) == f1(1 / 2, 1.0)


def test_qa_f1_zh_cuts_before_normalising():
    # jieba cuts "Hello,World" into [Hello, ",", World] -> [hello, world]; gold "hello world" ->
    # [hello, " ", world] -> [hello, world]: F1 = 1. Normalising first would give "helloworld" and 0.
    assert score_longbench("multifieldqa_zh", "Hello,World", ["hello world"]) == 1.0


# --------------------------------------------------------------------------------------------
# rouge-L (rouge==1.0.1 summary-level, set-based union LCS) and rouge_zh
# --------------------------------------------------------------------------------------------


def test_rouge_single_sentence():
    # ref [the cat is on the mat], hyp [the cat sat on the mat]; LCS "the cat on the mat" has the token
    # set {the, cat, on, mat} = 4; m = |{the, cat, is, on, mat}| = 5, n = |{the, cat, sat, on, mat}| = 5
    got = score_longbench("gov_report", "the cat sat on the mat", ["the cat is on the mat"])
    assert got == rouge_f(4 / 5, 4 / 5)


def test_rouge_union_lcs_over_candidate_sentences():
    # the rouge docstring example: r = w1..w5, c1 = "w1 w2 w6 w7 w8", c2 = "w1 w3 w8 w9 w5":
    # LCS(r, c1) = {w1, w2}, LCS(r, c2) = {w1, w3, w5}; union = 4; m = 5; n = |{w1,w2,w3,w5,w6,w7,w8,w9}| = 8
    got = score_longbench("qmsum", "w1 w2 w6 w7 w8. w1 w3 w8 w9 w5", ["w1 w2 w3 w4 w5"])
    assert got == rouge_f(4 / 8, 4 / 5)


def test_rouge_is_set_based_repetition_is_free():
    # m = n = 1 distinct word, union = {go}: p = r = 1 -> 2 * 1 / (2 + 1e-8)
    assert score_longbench("multi_news", "go go go go", ["go"]) == rouge_f(1.0, 1.0)


def test_rouge_lcs_tie_breaking_changes_the_token_set():
    # ref "a b. b", hyp "b a". For (ref "a b", hyp "b a") both "a" and "b" are LCSs; rouge's backtrack
    # moves up only if table[i-1][j] > table[i][j-1] (strictly), else left, so it returns "b".
    # The second reference sentence "b" also gives {b}: union = {b} = 1, m = n = 2 -> p = r = 1/2.
    # (Choosing "a" on the tie would give union {a, b} and F = 1.)
    assert M._recon_lcs_tokens(["a", "b"], ["b", "a"], 10) == ["b"]
    assert score_longbench("gov_report", "b a", ["a b. b"]) == rouge_f(1 / 2, 1 / 2)


def test_rouge_sentence_split_on_every_period_and_blank_pieces():
    # "cat. ." -> pieces ["cat", " "] (the empty tail is dropped) -> words [cat], [""]: the blank
    # sentence is the word "". n = |{cat, ""}| = 2, m = 1, union {cat}: p = 1/2, r = 1
    assert score_longbench("samsum", "cat. .", ["cat"]) == rouge_f(1 / 2, 1.0)
    # "3.5 million" is two sentences, "3" and "5 million": each matches its part of the reference
    # "3 5 million" (one sentence): union {3, 5, million} = 3 = m = n
    assert score_longbench("gov_report", "3.5 million", ["3 5 million"]) == rouge_f(1.0, 1.0)


def test_rouge_empty_side_is_zero_with_a_flag():
    # rouge raises ValueError("Hypothesis is empty.") -> the reference's except returns 0.0
    assert score_longbench_detailed("gov_report", "", ["a summary"]) == (0.0, (FLAG_ROUGE_EMPTY,))
    assert score_longbench_detailed("gov_report", "...", ["a summary"]) == (0.0, (FLAG_ROUGE_EMPTY,))
    assert score_longbench_detailed("gov_report", "a summary", ["."]) == (0.0, (FLAG_ROUGE_EMPTY,))


def _words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_rouge_recursion_error_boundary_identical_sentence():
    # identical sentences of L distinct words: the backtrack goes diagonally (L, L) -> (0, 0), i.e.
    # L + 1 recursive calls. eval.py (CPython 3.11, recursion limit 1000) survives 991 calls.
    ok = _words(990)
    assert score_longbench_detailed("gov_report", ok, [ok]) == (rouge_f(1.0, 1.0), ())
    bad = _words(991)
    assert score_longbench_detailed("gov_report", bad, [bad]) == (0.0, (FLAG_ROUGE_RECURSION,))


def test_rouge_recursion_error_long_answer_without_periods():
    # gold "w0"; prediction "w0 x1 ... x<k>" (one sentence, k + 1 words). The backtrack walks left from
    # (1, k+1) to (1, 1), matches w0 and stops at (0, 0): k + 2 calls. So 989 extra words (991 calls)
    # score p = 1/990, r = 1, but 990 extra words (992 calls) give the reference's RecursionError -> 0.
    ok = "w0 " + _words(989, "x")
    assert score_longbench_detailed("qmsum", ok, ["w0"]) == (rouge_f(1 / 990, 1.0), ())
    bad = "w0 " + _words(990, "x")
    assert score_longbench_detailed("qmsum", bad, ["w0"]) == (0.0, (FLAG_ROUGE_RECURSION,))
    # a period anywhere splits the sentence and the error disappears
    fixed = "w0 " + _words(500, "x") + ". " + _words(490, "y")
    score, flags = score_longbench_detailed("qmsum", fixed, ["w0"])
    assert score > 0 and flags == ()


def test_rouge_recursion_flag_kept_when_another_answer_scores():
    bad = _words(991)
    score, flags = score_longbench_detailed("gov_report", bad, [bad, "w1 w2"])
    assert score > 0 and flags == (FLAG_ROUGE_RECURSION,)


def test_rouge_zh_jieba_joined():
    # jieba: hyp [我们, 今天, 讨论, 项目], ref [今天, 讨论, 项目] -> union 3, m = 3, n = 4
    assert score_longbench("vcsum", "我们今天讨论项目", ["今天讨论项目"]) == rouge_f(3 / 4, 1.0)
    # "。" does not split sentences (only "."), it is just one more word on the hyp side: n = 5
    assert score_longbench("dureader", "我们今天讨论项目。", ["今天讨论项目"]) == rouge_f(3 / 5, 1.0)


def test_rouge_zh_recursion_boundary_is_one_call_lower():
    # rouge_zh_score calls rouge_score: one frame deeper in the reference, one call less to spare.
    # jieba keeps "w0 w1" as [w0, " ", w1]; the joined text collapses back to the same words.
    ok, bad = _words(989), _words(990)
    assert score_longbench_detailed("vcsum", ok, [ok]) == (rouge_f(1.0, 1.0), ())
    assert score_longbench_detailed("vcsum", bad, [bad]) == (0.0, (FLAG_ROUGE_RECURSION,))
    assert score_longbench_detailed("gov_report", bad, [bad])[1] == ()  # English allows it


def _plain_lcs_table(x, y):
    """The textbook DP rouge's _lcs fills: match -> diagonal + 1, else max(up, left)."""
    t = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t


def _plain_recon(x, y):
    """rouge's _recon, iteratively: tokens of the reconstructed LCS and the number of calls."""
    t = _plain_lcs_table(x, y)
    i, j, calls, out = len(x), len(y), 1, []
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif t[i - 1][j] > t[i][j - 1]:
            i -= 1
        else:
            j -= 1
        calls += 1
    return out, calls


@settings(max_examples=300, deadline=None)
@given(
    x=st.lists(st.sampled_from("abcd"), min_size=1, max_size=70),
    y=st.lists(st.sampled_from("abcde"), min_size=1, max_size=70),
)
def test_bit_parallel_lcs_equals_the_textbook_table(x, y):
    rows = M._lcs_rows(x, y)
    table = [[j - (r & ((1 << j) - 1)).bit_count() for j in range(len(y) + 1)] for r in rows]
    assert table == _plain_lcs_table(x, y)
    tokens, calls = _plain_recon(x, y)
    limit = calls  # exactly enough calls: same tokens; one fewer: the recursion error
    assert M._recon_lcs_tokens(x, y, limit) == tokens
    assert M._recon_lcs_tokens(x, y, limit - 1) is None


_SENT_WORDS = st.lists(st.sampled_from(["a", "b", "c", "d", "the", "cat", "x"]), min_size=0, max_size=12)
_DOC = st.lists(_SENT_WORDS, min_size=0, max_size=5).map(lambda ss: ". ".join(" ".join(s) for s in ss))


@settings(max_examples=200, deadline=None)
@given(pred=_DOC, gold=_DOC)
def test_rouge_equals_the_rouge_package(pred, gold):
    """Differential check against the installed rouge==1.0.1 (inputs short: no recursion issue)."""
    rouge = pytest.importorskip("rouge")
    try:
        expected = rouge.Rouge().get_scores([pred], [gold], avg=True)["rouge-l"]["f"]
    except Exception:  # the reference's bare except
        expected = 0.0
    assert score_longbench("gov_report", pred, [gold]) == expected


def test_recursion_boundary_against_the_rouge_package_run_like_eval_py(tmp_path):
    """Runs the installed rouge package in a fresh interpreter with eval.py's call depth
    (<module> -> scorer -> rouge_score -> Rouge.get_scores) and compares both sides of the boundary."""
    pytest.importorskip("rouge")
    script = tmp_path / "ref.py"
    script.write_text(textwrap.dedent(
        """
        import json, sys
        from rouge import Rouge

        def rouge_score(prediction, ground_truth):
            try:
                return Rouge(metrics=["rouge-l"]).get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]
            except RecursionError:
                return "recursion"

        def scorer(prediction, ground_truth):
            return rouge_score(prediction, ground_truth)

        cases = json.loads(sys.stdin.read())
        out = []
        for p, g in cases:
            out.append(scorer(p, g))
        print(json.dumps(out))
        """
    ))
    # thin tables (1 x 991) keep the reference fast; the path goes left (long prediction) or up
    # (long gold) to the single match, then diagonally to (0, 0)
    cases = [
        ("w0 " + _words(989, "x"), "w0"),  # 991 calls: fine
        ("w0 " + _words(990, "x"), "w0"),  # 992 calls: RecursionError
        ("w0", "w0 " + _words(989, "x")),
        ("w0", "w0 " + _words(990, "x")),
    ]
    # (Rouge(metrics=["rouge-l"]) keeps the same call path for rouge-l as the default metrics list.)
    res = subprocess.run([sys.executable, str(script)], input=json.dumps(cases), capture_output=True,
                         text=True, check=True, timeout=120)
    ref = json.loads(res.stdout)
    for (p, g), r in zip(cases, ref):
        score, flags = score_longbench_detailed("gov_report", p, [g])
        if r == "recursion":
            assert (score, flags) == (0.0, (FLAG_ROUGE_RECURSION,))
        else:
            assert (score, flags) == (r, ())


# --------------------------------------------------------------------------------------------
# classification (trec, lsht)
# --------------------------------------------------------------------------------------------


def test_classification_basic():
    classes = ["Animal", "Human", "Location"]
    assert score_longbench("trec", "Human", ["Human"], classes) == 1.0
    assert score_longbench("trec", "Animal", ["Human"], classes) == 0.0
    # two classes mentioned, one right: 1 / 2
    assert score_longbench("trec", "Human or Animal", ["Human"], classes) == 1 / 2


def test_classification_removes_substrings_of_the_gold():
    # matches [Definition, Definition of something]; "Definition" is a proper substring of the gold and
    # is removed -> [Definition of something] -> 1/1
    classes = ["Definition", "Definition of something", "Description"]
    assert score_longbench("trec", "Definition of something", ["Definition of something"], classes) == 1.0


def test_classification_removal_is_order_dependent():
    # matches [Other, number, Other number]: "Other" removed at position 0, "number" slides into
    # position 0 and is skipped; position 1 is "Other number" (the gold, kept) -> 2 left -> 1/2
    gold = "Other number"
    assert score_longbench("trec", gold, [gold], ["Other", "number", "Other number"]) == 1 / 2
    # order [Other, Other number, number]: "Other" removed, "Other number" skipped (kept anyway),
    # then "number" is checked and removed -> [Other number] -> 1
    assert score_longbench("trec", gold, [gold], ["Other", "Other number", "number"]) == 1.0


def test_classification_zh_and_first_line():
    classes = ["体育", "体育新闻", "财经"]
    # "体育" is a substring of the gold "体育新闻" -> removed; [体育新闻] -> 1
    assert score_longbench("lsht", "体育新闻", ["体育新闻"], classes) == 1.0
    # first-line rule: only "体育新闻" counts, "财经" on line 2 is ignored
    assert score_longbench("lsht", "\n体育新闻\n财经", ["体育新闻"], classes) == 1.0
    # hypothetical task without the rule would have counted both: check via the plain metric
    assert M.classification_score("体育新闻\n财经", "体育新闻", all_classes=classes) == 1 / 2


def test_classification_needs_all_classes():
    with pytest.raises(DataError, match="all_classes"):
        score_longbench("trec", "Human", ["Human"])


# --------------------------------------------------------------------------------------------
# retrieval, count
# --------------------------------------------------------------------------------------------


def test_retrieval_share_of_numbers():
    assert score_longbench("passage_retrieval_en", "Paragraph 12", ["Paragraph 12"]) == 1.0
    # numbers [12, 3]: one right -> 1/2
    assert score_longbench("passage_retrieval_en", "Paragraph 12 or Paragraph 3", ["Paragraph 12"]) == 1 / 2
    # string equality, not prefix: [12, 120] -> 1/2; "012" != "12"
    assert score_longbench("passage_retrieval_en", "12, not 120", ["Paragraph 12"]) == 1 / 2
    assert score_longbench("passage_retrieval_en", "Paragraph 012", ["Paragraph 12"]) == 0.0
    assert score_longbench("passage_retrieval_en", "I don't know", ["Paragraph 12"]) == 0.0
    with pytest.raises(DataError, match="Paragraph"):
        score_longbench("passage_retrieval_en", "12", ["twelve"])


def test_retrieval_zh():
    assert score_longbench("passage_retrieval_zh", "答案是段落5", ["段落5"]) == 1.0
    # the prediction needs no "段落" prefix, any number counts: [5, 7] -> 1/2
    assert score_longbench("passage_retrieval_zh", "5 或 7", ["段落5"]) == 1 / 2
    with pytest.raises(DataError):
        score_longbench("passage_retrieval_zh", "5", ["Paragraph 5"])


def test_count():
    assert score_longbench("passage_count", "There are 3 unique paragraphs.", ["3"]) == 1.0
    assert score_longbench("passage_count", "3 or 4", ["3"]) == 1 / 2
    assert score_longbench("passage_count", "30", ["3"]) == 0.0
    assert score_longbench("passage_count", "no idea", ["3"]) == 0.0


# --------------------------------------------------------------------------------------------
# code_sim (lcc, repobench-p)
# --------------------------------------------------------------------------------------------


def test_code_sim_first_line_without_markers():
    pred = "\n```python\n# a comment\n// another\nx = foo(1)\n```"
    assert M.code_first_line(pred) == "x = foo(1)"
    # "x = foo(1)" vs "x = foo(2)": lensum 20, indel distance 2 -> 100 * (1 - 2/20) = 90
    assert score_longbench("lcc", pred, ["x = foo(2)"]) == 0.9
    # every line has a marker -> "" -> ratio 0; a URL line is skipped for its "//"
    assert score_longbench("repobench-p", "# only\n`code`", ["x = 1"]) == 0.0
    assert M.code_first_line('url = "http://a"\ny = 2') == "y = 2"
    # leading newlines are stripped, so the first line is the code
    assert score_longbench("lcc", "\n\nreturn a + b", ["return a + b"]) == 1.0


def test_code_sim_rounding_matches_fuzzywuzzy():
    # a = 17*"x" + 23*"y", b = 17*"x" + 23*"z": lensum 80, indel distance 46. rapidfuzz gives
    # 100 * (1 - 46/80) = 42.50000000000001, the same double as fuzzywuzzy's 100 * Levenshtein.ratio
    # (python-Levenshtein >= 0.20), rounded -> 43 (the old C python-Levenshtein's (80-46)/80 = 0.425
    # exactly would round half-to-even to 42; see the module docstring).
    a, b = "x" * 17 + "y" * 23, "x" * 17 + "z" * 23
    assert score_longbench("lcc", a, [b]) == 0.43
    # "abcd" vs "abc": lensum 7, distance 1 -> 100 * (1 - 1/7) = 85.71 -> 86
    assert score_longbench("lcc", "abcd", ["abc"]) == 0.86
    # exact halves round half-to-even like fuzzywuzzy's int(round(...)):
    # "abcdefgh" vs "abcdefgx": lensum 16, distance 2 -> 87.5 exactly -> 88
    assert score_longbench("lcc", "abcdefgh", ["abcdefgx"]) == 0.88
    # "abcdefgh" vs "abcdexyz": lensum 16, distance 6 -> 62.5 exactly -> 62
    assert score_longbench("lcc", "abcde" + "fgh", ["abcde" + "xyz"]) == 0.62
    # two empty strings: fuzzywuzzy's check_for_equivalence returns 100
    assert score_longbench("lcc", "# nothing", [""]) == 1.0


# --------------------------------------------------------------------------------------------
# eval.py first-line rule, _e names, buckets
# --------------------------------------------------------------------------------------------


def test_first_line_rule_tasks():
    pred = "Paris\nThe capital of France is Paris."
    assert score_longbench("triviaqa", pred, ["Paris"]) == 1.0
    # hotpotqa has no first-line rule: [paris, capital, of, france, is, paris] vs [paris]: P = 1/6
    assert score_longbench("hotpotqa", pred, ["Paris"]) == f1(1 / 6, 1.0)
    # samsum: the second line is dropped before rouge -> identical one-word summaries
    assert score_longbench("samsum", "\n\nhello\nworld", ["hello"]) == rouge_f(1.0, 1.0)
    # lstrip('\n') strips newlines only: " \nParis" keeps the line " " -> no tokens -> 0
    assert score_longbench("triviaqa", " \nParis", ["Paris"]) == 0.0


def test_e_names_use_the_base_metric_and_rule():
    assert score_longbench("hotpotqa_e", "Paris, France", ["Paris"]) == f1(1 / 2, 1.0)
    assert score_longbench("trec_e", "Human\nAnimal", ["Human"], ["Animal", "Human"]) == 1.0
    assert M.base_task("repobench-p_e") == "repobench-p"


@pytest.mark.parametrize(
    "length,bucket",
    [(0, "0-4k"), (3999, "0-4k"), (3999.5, "0-4k"), (4000, "4-8k"), (7999, "4-8k"), (8000, "8k+"), (31000, "8k+")],
)
def test_longbench_e_bucket_boundaries(length, bucket):
    # eval.py scorer_e: length < 4000 -> 0-4k; elif length < 8000 -> 4-8k; else 8k+
    assert longbench_e_bucket(length) == bucket


def test_longbench_e_bucket_rejects_non_numbers():
    for bad in (True, "4000", float("nan"), None):
        with pytest.raises(DataError):
            longbench_e_bucket(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# synthetic metrics and dispatch
# --------------------------------------------------------------------------------------------


def test_exact_whole_token():
    assert score_synthetic("exact", "The pass key is 71432.", ["71432"]) == 1.0
    assert score_synthetic("exact", "71432", ["71432"]) == 1.0
    assert score_synthetic("exact", "**71432**", ["71432"]) == 1.0
    assert score_synthetic("exact", "The pass key is 714320.", ["71432"]) == 0.0
    assert score_synthetic("exact", "key71432", ["71432"]) == 0.0
    assert score_synthetic("exact", "71432.5", ["71432"]) == 0.0  # part of a decimal number
    assert score_synthetic("exact", "1.71432", ["71432"]) == 0.0
    assert score_synthetic("exact", "no idea", ["71432"]) == 0.0
    # case- and whitespace-insensitive for word answers; any of several answers
    assert score_synthetic("exact", "It is BLUE  Whale", ["blue whale"]) == 1.0
    assert score_synthetic("exact", "red", ["blue", "red"]) == 1.0


def test_exact_boundaries_are_letters_and_digits_only():
    # punctuation, underscores and brackets are boundaries; letters and digits are not
    assert score_synthetic("exact", "key_71432", ["71432"]) == 1.0
    assert score_synthetic("exact", "(71432)", ["71432"]) == 1.0
    assert score_synthetic("exact", "71432x", ["71432"]) == 0.0
    # a later occurrence can qualify when the first one does not
    assert score_synthetic("exact", "714321 then 71432", ["71432"]) == 1.0


_SYN_ALPHABET = st.sampled_from(list("0123456789ab .,_-"))


@settings(max_examples=300, deadline=None)
@given(text=st.lists(_SYN_ALPHABET, max_size=30).map("".join),
       answer=st.lists(_SYN_ALPHABET, min_size=1, max_size=5).map("".join).filter(lambda a: a.strip()))
def test_exact_matches_a_regex_oracle(text, answer):
    import re

    a = " ".join(answer.casefold().split())
    t = " ".join(text.casefold().split())
    left = (r"(?<![^\W_])" + (r"(?<!\d\.)" if a[0].isdigit() else "")) if a[0].isalnum() else ""
    right = (r"(?![^\W_])" + (r"(?!\.\d)" if a[-1].isdigit() else "")) if a[-1].isalnum() else ""
    expected = 1.0 if re.search(left + re.escape(a) + right, t) else 0.0
    assert score_synthetic("exact", text, [answer]) == expected


def test_contains_all_is_a_fraction():
    answers = ["1234567", "2345678", "3456789"]
    # 2 of 3 present
    assert score_synthetic("contains_all", "1234567, 2345678", answers) == 2 / 3
    assert score_synthetic("contains_all", "1234567,2345678,3456789", answers) == 1.0
    assert score_synthetic("contains_all", "12345678", answers) == 0.0


def test_synthetic_errors():
    with pytest.raises(DataError, match="exact, contains_all"):
        score_synthetic("fuzzy", "x", ["x"])
    with pytest.raises(DataError, match="at least one answer"):
        score_synthetic("exact", "x", [])
    with pytest.raises(DataError, match="empty"):
        score_synthetic("exact", "x", [" "])


def test_score_example_dispatch():
    syn = {"source": "synthetic", "metric": "exact", "task": "passkey"}
    assert score_example("passkey", "The pass key is 71432.", ["71432"], syn) == (1.0, ())
    lb = {"source": "longbench", "all_classes": ["Animal", "Human"]}
    assert score_example("trec", "Human", ["Human"], lb) == (1.0, ())
    assert score_example("hotpotqa", "Paris", ["Paris"], None) == (1.0, ())
    bad = _words(991)
    assert score_example("gov_report", bad, [bad], {"source": "longbench"}) == (0.0, (FLAG_ROUGE_RECURSION,))
    with pytest.raises(DataError, match="meta metric"):
        score_example("passkey", "x", ["x"], {"source": "synthetic", "metric": "rouge"})


# --------------------------------------------------------------------------------------------
# properties: pure and bounded
# --------------------------------------------------------------------------------------------

_ALPHABET = st.sampled_from(list("ab c.\n#/`1234,!") + ["the", " a ", "段落", "我们", "今天", "。", "《", "Paragraph "])
_TEXT = st.lists(_ALPHABET, max_size=40).map("".join) | st.text(max_size=40)


def _gold_for(task: str, draw_text: str, n: int) -> str:
    base = M.base_task(task)
    if base == "passage_retrieval_en":
        return f"Paragraph {n}"
    if base == "passage_retrieval_zh":
        return f"段落{n}"
    return draw_text


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    task=st.sampled_from(sorted(TASK_METRIC)),
    prediction=_TEXT,
    golds=st.lists(_TEXT, min_size=0, max_size=3),
    n=st.integers(min_value=0, max_value=40),
    classes=st.lists(_TEXT, min_size=0, max_size=4),
)
def test_longbench_metrics_are_pure_and_bounded(task, prediction, golds, n, classes):
    answers = [_gold_for(task, g, n) for g in golds]
    first = score_longbench_detailed(task, prediction, answers, classes)
    second = score_longbench_detailed(task, prediction, list(answers), list(classes))
    assert first == second
    assert isinstance(first[0], float) and 0.0 <= first[0] <= 1.0


@settings(max_examples=150, deadline=None)
@given(
    metric=st.sampled_from(["exact", "contains_all"]),
    prediction=_TEXT,
    answers=st.lists(_TEXT.filter(lambda s: s.strip()), min_size=1, max_size=3),
)
def test_synthetic_metrics_are_pure_and_bounded(metric, prediction, answers):
    first = score_synthetic(metric, prediction, answers)
    assert first == score_synthetic(metric, prediction, answers)
    assert 0.0 <= first <= 1.0
