"""Prometheus metrics, named as vLLM names them (with a fourwalls_ prefix), in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fourwalls.engine import Engine

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, engine: Engine) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fourwalls_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.finished = Counter("fourwalls_requests_finished", "Generations by how they ended",
                                ["reason"], registry=r)
        self.adapter_requests = Counter("fourwalls_adapter_requests", "Generations by LoRA adapter ('' = base)",
                                        ["adapter"], registry=r)
        self.routes = Counter("fourwalls_route", "Requests for model 'auto' by the expert that answered ('' = the "
                              "base model, 'a+b' = a top-2 mix)", ["adapter"], registry=r)
        self.route_latency = Histogram("fourwalls_route_latency_seconds", "Time to route a request for model 'auto' "
                                       "(one embedding and one product with the experts' centroids)",
                                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1), registry=r)
        self.ttft = Histogram("fourwalls_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("fourwalls_inter_token_latency_seconds", "Time between output tokens",
                             buckets=_LATENCY, registry=r)
        self.profile_ttft = Histogram("fourwalls_profile_time_to_first_token_seconds", "Time to first token by "
                                      "application profile", ["profile"], buckets=_LATENCY, registry=r)
        self.profile_itl = Histogram("fourwalls_profile_inter_token_latency_seconds", "Time between output tokens by "
                                     "application profile", ["profile"], buckets=_LATENCY, registry=r)
        self.slo = Counter("fourwalls_slo_requests", "Finished generations by application profile and SLO (ttft; itl: "
                           "the mean time per output token after the first), met or not (attainment: met=yes over "
                           "all)", ["profile", "slo", "met"], registry=r)
        self.e2e = Histogram("fourwalls_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("fourwalls_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_tokens = Counter("fourwalls_prompt_tokens_cached", "Prompt tokens found in the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter("fourwalls_generation_tokens", "Tokens generated", registry=r)
        Gauge("fourwalls_num_requests_waiting", "Requests queued for the batch and KV-cache blocks",
              registry=r).set_function(lambda: engine.num_waiting)
        Gauge("fourwalls_num_requests_running", "Requests in the running batch",
              registry=r).set_function(lambda: engine.num_running)
        Gauge("fourwalls_kv_cache_usage_ratio", "Fraction of the KV cache's blocks held by requests",
              registry=r).set_function(lambda: engine.kv_usage)
