"""runtime.health: the health poll's own cost."""

from __future__ import annotations

import ssl

from tests.fakes.fake_engine import serve_in_thread

from kv_transition.runtime import health


def test_health_poll_builds_one_tls_context_not_one_per_probe(monkeypatch):
    """httpx.get without `verify` loads the CA bundle on every call (~28 ms CPU): a 0.05 s poll over an
    engine's start then burns a core. wait_healthy/probe must reuse one context."""
    made, probes = [], []
    real_ctx, real_probe = ssl.create_default_context, health.probe_status

    def counting_ctx(*a, **k):
        made.append(1)
        return real_ctx(*a, **k)

    def counting_probe(*a, **k):
        probes.append(1)
        return real_probe(*a, **k)

    monkeypatch.setattr(ssl, "create_default_context", counting_ctx)
    monkeypatch.setattr(health, "probe_status", counting_probe)  # every GET (probe and the poll)
    monkeypatch.setattr(health, "_SSL_CTX", None, raising=False)
    url, srv, t = serve_in_thread(["--unhealthy-for", "0.5"])
    try:
        health.wait_healthy(url + "/health", timeout_s=10, interval_s=0.05)
        assert health.probe(url + "/health")[0]
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)
    assert len(probes) >= 5
    assert len(made) <= 1, f"{len(made)} TLS contexts for {len(probes)} probes"
