"""TEST DOUBLE argcheck (the contract in docs/config.md, "Argument check"): parses the launch argv with the
fake engine's OWN parser (fake_openai_server.parse_args), parse only. Exit 0 + one JSON line when
accepted; argparse's exit 2 + its one-line message on stderr when rejected.

The fake server is looked up in $FAKE_SERVER_DIR (default /opt/kvt, where the test image has it)."""

import json
import os
import sys

sys.path.insert(0, os.environ.get("FAKE_SERVER_DIR", "/opt/kvt"))
import fake_openai_server  # noqa: E402

opts = fake_openai_server.parse_args(sys.argv[1:])  # exits 2 with "…: error: unrecognized arguments: …"
print(json.dumps({"attention_backend": getattr(opts, "attention_backend", None) or "FLASH_ATTN"}))
