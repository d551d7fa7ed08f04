"""Two-request examples: the follow-up request built from the first response.

LongBench v2 with chain of thought (its ``pred.py --cot``) asks twice: the reasoning prompt (the manifest
entry, 1024 new tokens), then the ``0shot_cot_ans`` prompt holding the question, the choices and that
reasoning (stripped), 128 new tokens; the second response is the one scored. The manifest says so per
task (``followups``); the follow-up goes to the same engine with the same KV method, its prompt
chat-templated and middle-truncated by the harness tokenizer exactly like the first.

An empty first response (``''``) asks nothing more: pred.py drops such an example (``if output == '':
continue``) and so does scoring (score/longbench_v2.py).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from kv_transition.datasets.schema import Example
from kv_transition.manifest.prompts import PromptBuilder
from kv_transition.runner.core import FollowupRequest, WorkItem

BodyFn = Callable[[dict[str, Any]], dict[str, Any]]  # a manifest-entry-shaped dict → the request body


def make_followup(item: WorkItem, ex: Example, fu: dict[str, Any], builder: PromptBuilder,
                  to_body: BodyFn) -> Callable[[str], Optional[FollowupRequest]]:
    """The callable the runner calls with the first response's text."""

    def build(first: str) -> Optional[FollowupRequest]:
        if fu.get("skip_empty") and first == "":
            return None
        bp = builder.build_followup(ex, fu["template"], first.strip() if fu.get("strip") else first,
                                    int(fu["max_new_tokens"]), bool(fu.get("chat", True)))
        body = to_body({"prompt": bp.prompt, "max_new_tokens": bp.max_new_tokens,
                        "add_special_tokens": bp.add_special_tokens, "question_start": bp.question_start})
        body["model"] = item.body.get("model", body.get("model"))  # the name the server serves (set after ready)
        return FollowupRequest(body=body, prompt=bp.prompt, prompt_tokens=bp.final_tokens, truncated=bp.truncated)

    return build
