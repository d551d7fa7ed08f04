"""The request runner: async streaming client, retries, per-request latency metrics, batched DB writes.

    writer = DbWriter(db_path).start()
    runner = Runner(base_url, writer, run_id, RunnerOptions(concurrency=16))
    stats = asyncio.run(runner.run(items))      # items: list[WorkItem]
    writer.close()
"""

from kv_transition.runner.core import Counters, FollowupRequest, RunnerOptions, Runner, RunStats, WorkItem
from kv_transition.runner.stream import AttemptError, Completion, SSEDecoder, StreamAccumulator, tpot
from kv_transition.runner.writer import DbWriter, WriterError

__all__ = [
    "AttemptError", "Completion", "Counters", "DbWriter", "RunStats", "Runner", "RunnerOptions", "SSEDecoder",
    "FollowupRequest", "StreamAccumulator", "WorkItem", "WriterError", "tpot",
]
