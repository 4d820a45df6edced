"""Prometheus metrics: the proxy's pools and guard as metric families (collect.py), served at
`/metrics` on `metrics_listen` from the proxy's own event loop (http.py)."""
