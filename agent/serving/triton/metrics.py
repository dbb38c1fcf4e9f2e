"""The Triton model's custom metrics (python backend metric API), and reading them back from the metrics port.

Besides Triton's own `nv_inference_*`, the model publishes tokens generated, time to first token, inter-token
latency, the running count, cancellations, prompt tokens served from the engine's prefix cache, and
`dsa_triton_model_info{...} 1` whose labels describe the loaded engine (the gateway engine reads them for its
`info()`; Prometheus users join on them like any `*_info` metric).
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from agent.engine.types import EngineInfo

INFO_METRIC = "dsa_triton_model_info"
RUNNING_METRIC = "dsa_triton_running_requests"
ABORTED_METRIC = "dsa_triton_aborted_requests_total"
ENGINE_RUNNING_METRIC = "dsa_triton_engine_running_requests"
ENGINE_WAITING_METRIC = "dsa_triton_engine_waiting_requests"
TOKENS_METRIC = "dsa_triton_generated_tokens_total"
TTFT_METRIC = "dsa_triton_time_to_first_token_seconds"
ITL_METRIC = "dsa_triton_inter_token_latency_seconds"
PREFIX_CACHED_METRIC = "dsa_triton_prefix_cached_tokens_total"
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class ModelMetrics:
    """The metric handles one model instance updates. Families are kept: a family must outlive its metrics."""

    tokens: Any
    ttft: Any
    itl: Any
    running: Any
    aborted: Any
    engine_running: Any
    engine_waiting: Any
    prefix_cached: Any
    info: Any
    families: list[Any]

    @classmethod
    def create(cls, pb_utils: Any, labels: dict[str, str]) -> ModelMetrics:
        kinds = pb_utils.MetricFamily
        families: list[Any] = []

        def metric(name: str, description: str, kind: Any, **extra: Any) -> Any:
            families.append(kinds(name=name, description=description, kind=kind))
            return families[-1].Metric(labels=extra.pop("labels", labels), **extra)

        return cls(
            tokens=metric(TOKENS_METRIC, "Tokens generated", kinds.COUNTER),
            ttft=metric(TTFT_METRIC, "Seconds to the first token", kinds.HISTOGRAM, buckets=LATENCY_BUCKETS),
            itl=metric(ITL_METRIC, "Seconds between streamed chunks", kinds.HISTOGRAM, buckets=LATENCY_BUCKETS),
            running=metric(RUNNING_METRIC, "Requests in the engine now", kinds.GAUGE),
            aborted=metric(ABORTED_METRIC, "Requests cancelled by their client", kinds.COUNTER),
            engine_running=metric(ENGINE_RUNNING_METRIC, "The engine's own count of running requests", kinds.GAUGE),
            engine_waiting=metric(ENGINE_WAITING_METRIC, "The engine's own count of waiting requests", kinds.GAUGE),
            prefix_cached=metric(
                PREFIX_CACHED_METRIC, "Prompt tokens reused from the engine's prefix cache, not computed", kinds.COUNTER
            ),
            info=None,
            families=families,
        )

    def publish_info(
        self, pb_utils: Any, labels: dict[str, str], info: EngineInfo, extra: Mapping[str, str] | None = None
    ) -> None:
        """`dsa_triton_model_info{model, version, <EngineInfo fields>, <extra>} 1` once the engine is loaded."""
        kinds = pb_utils.MetricFamily
        family = kinds(name=INFO_METRIC, description="The loaded engine, in labels (1 while serving)", kind=kinds.GAUGE)
        self.families.append(family)
        # loaded_at tells a reloaded model's info from its predecessor's while both are briefly loaded.
        described = {k: str(v) for k, v in asdict(info).items()} | dict(extra or {})
        described["loaded_at"] = f"{time.time():.3f}"
        self.info = family.Metric(labels={**labels, **described})
        self.info.set(1)


def parse_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric `name` in Prometheus text: (labels, value)."""
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group("name") == name:
            labels = dict(_LABEL.findall(match.group("labels") or ""))
            out.append((labels, float(match.group("value"))))
    return out


def serving_info_labels(text: str, model: str, version: int | str | None = None) -> dict[str, str] | None:
    """The info labels of `model` (of one `version` if given) at 1; the newest load wins (None: none published)."""
    serving = [
        lab
        for lab, value in parse_samples(text, INFO_METRIC)
        if lab.get("model") == model and value == 1 and (version is None or lab.get("version") == str(version))
    ]
    if not serving:
        return None
    return max(serving, key=lambda lab: float(lab.get("loaded_at", "0") or 0))


def parse_model_info(text: str, model: str, version: int | str | None = None) -> EngineInfo | None:
    """The EngineInfo the model `model` (one `version` of it if given) published (None if it has not, e.g. still
    loading); the newest load wins."""
    labels = serving_info_labels(text, model, version)
    if labels is None:
        return None
    return info_from_labels(labels, model)


def info_from_labels(labels: Mapping[str, str], model: str) -> EngineInfo:
    """EngineInfo from the labels of one `dsa_triton_model_info` sample."""
    return EngineInfo(
        model_name=labels.get("model_name", model),
        engine=labels.get("engine", "unknown"),
        supports_images=labels.get("supports_images") == "True",
        context_length=int(labels.get("context_length", "0") or 0),
        device=labels.get("device", "cpu"),
        model_path=labels.get("model_path", ""),
        dtype=labels.get("dtype", "auto"),
        quantization=labels.get("quantization", "none"),
    )


def fetch_metrics_text(url: str, timeout: float = 5.0) -> str:
    """The Prometheus text of Triton's metrics endpoint (blocking: call it in a thread)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode("utf-8", "replace")
