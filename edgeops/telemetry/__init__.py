"""Host side of telemetry: the store, SSH collection and MQTT ingest (collect.py), what it says
(analysis.py: summaries, alerts, the rollout's bake gate) and the Prometheus export (export.py).
The device side is in the agent package: runtime.py, spool.py, push.py, profile.py."""
