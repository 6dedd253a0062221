"""KPIs: durable call records (SQLite), Prometheus metrics, reports, Erlang B sizing.

A leaf package: it imports nothing from the rest of pbx-agent except ``agent.errors``, so every
layer may record into it.
"""
