"""Configuration: frozen, validated dataclasses, loaded from one YAML or TOML file.

Every field has its unit and default next to it. :func:`build_cascade` turns a config into a running
:class:`~cascade.engine.Cascade`; backends are built through a small lazy registry (no import of torch or
openai until a tier of that kind is built).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cascade.backends.base import Backend
from cascade.combined import COMBINED
from cascade.errors import ConfigError
from cascade.monitor import MonitorConfig
from cascade.types import MEASURES

__all__ = [
    "DEFAULT_ARTIFACT",
    "BackendConfig",
    "BatchingConfig",
    "CascadeConfig",
    "TierConfig",
    "build_backend",
    "build_cascade",
    "default_config",
    "load_config",
]

#: Thresholds calibrated for the embedded default pair (Qwen2.5-Coder-0.5B -> Qwen2.5-Coder-1.5B), shipped.
DEFAULT_ARTIFACT = Path(__file__).parent / "data" / "default_artifact.json"


@dataclass(frozen=True)
class BackendConfig:
    """How to reach one model."""

    kind: str = "hf"  # "hf": local transformers model; "openai": any OpenAI-compatible server
    model: str = "smollm2-135m"  # hf: embedded name, folder, .gguf file or hub id; openai: the model id
    device: str = "cpu"  # hf: torch device of the model and of all scoring ("cpu", "cuda", "cuda:1", "mps")
    dtype: str | None = None  # hf: "float32" | "bfloat16" | "float16"; None = float32 on CPU
    device_map: str | None = None  # hf: accelerate device map (e.g. "auto") for models bigger than a device
    max_batch_size: int = 32  # hf: largest batch given to generate at once
    base_url: str | None = None  # openai: server URL, e.g. "http://127.0.0.1:8001/v1" (credentials in it are
    # never shown: errors and logs print it as http://***@host/..., clients never see it)
    api_key_env: str = "OPENAI_API_KEY"  # openai: environment variable holding the API key
    api: str = "chat"  # openai: "chat" or "completions"
    timeout_s: float = 60.0  # openai: seconds one request may take in total (retries and the whole answer,
    # streamed or not, included) before a timeout error, which on a higher tier follows on_error
    max_retries: int = 2  # openai: retries with exponential backoff on connection errors and 5xx/429
    max_concurrency: int = 64  # openai: requests in flight at once
    rate_limit_per_s: float | None = None  # openai: requests per second at most; None = unlimited
    top_logprobs: int = 5  # openai: top-k log-probabilities asked for when scoring (1..20)
    choices: str = "auto"  # openai: how requests with allowed answers are answered: "guided" (the server's
    # guided_choice / structured_outputs.choice), "echo" (prompt logprobs on /completions), "auto" or "none"

    def __post_init__(self) -> None:
        if self.kind not in _BUILDERS:
            raise ConfigError(f"backend kind must be one of {sorted(_BUILDERS)}, got {self.kind!r}")
        if not self.model:
            raise ConfigError("backend model must be set")
        if self.kind == "openai" and not self.base_url:
            raise ConfigError(f"openai backend {self.model!r} needs base_url")
        if self.max_batch_size < 1 or self.max_concurrency < 1 or self.timeout_s <= 0:
            raise ConfigError("max_batch_size, max_concurrency and timeout_s must be positive")
        if not 1 <= self.top_logprobs <= 20:
            raise ConfigError("top_logprobs must be in 1..20")
        if self.choices not in ("auto", "guided", "echo", "none"):
            raise ConfigError(f"choices must be 'auto', 'guided', 'echo' or 'none', got {self.choices!r}")


@dataclass(frozen=True)
class TierConfig:
    """One tier of the chain."""

    name: str  # the tier's name in results ("small", "large", ...)
    backend: BackendConfig = field(default_factory=BackendConfig)  # the model behind it
    price_input_per_mtok: float = 0.0  # price of one million prompt tokens, any currency unit
    price_output_per_mtok: float = 0.0  # price of one million generated tokens
    timeout_s: float | None = None  # seconds before the tier's call is abandoned; None = no extra limit


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic micro-batching of concurrent requests (server and concurrent Python callers)."""

    enabled: bool = True  # collect concurrent requests to local (hf) tiers into one batched call per tier
    max_batch_size: int = 16  # requests per batch at most
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company, milliseconds
    max_queue: int = 1024  # requests waiting at most; more are refused (HTTP 429)


def _default_tiers() -> tuple[TierConfig, ...]:
    # Notional prices proportional to parameter count (per million tokens): the demo's "cost".
    return (
        TierConfig("small", BackendConfig(model="qwen2.5-coder-0.5b", dtype="bfloat16"), 0.5, 0.5),
        TierConfig("large", BackendConfig(model="qwen2.5-coder-1.5b", dtype="bfloat16"), 1.5, 1.5),
    )


@dataclass(frozen=True)
class CascadeConfig:
    """A whole cascade: tiers, decision rule, decoding defaults and batching."""

    tiers: tuple[TierConfig, ...] = field(default_factory=_default_tiers)  # cheapest first, at least two
    measure: str | None = None  # uncertainty measure (cascade.types.MEASURES); None: the artifact's, or margin_first
    thresholds: tuple[float, ...] | None = None  # one per stage; None = take them from `artifact`
    artifact: str | None = None  # calibration artifact path; None with no thresholds = the shipped default
    on_error: str = "degrade"  # a failing higher tier: "degrade" (lower answer, marked) or "raise"
    early_exit: bool = True  # with a first-token measure, stop small answers that will escalate
    max_tokens: int = 64  # default new tokens per answer
    temperature: float = 0.0  # default sampling temperature (0 = greedy)
    max_prompt_chars: int = 200_000  # longest prompt accepted, characters
    length_normalize: bool = False  # requests with choices: rank them by mean token logprob instead of the sum
    batching: BatchingConfig = field(default_factory=BatchingConfig)  # micro-batching of concurrent calls
    router: str | None = None  # fitted expert-router file (expert-router mode); None = one pool
    monitor: MonitorConfig | None = None  # live calibration checks and shadow calls (cascade.monitor); None = off
    extra: Mapping[str, Any] = field(default_factory=dict)  # sections for other components (e.g. "server")

    def __post_init__(self) -> None:
        if len(self.tiers) < 2:
            raise ConfigError("a cascade needs at least two tiers")
        if self.measure is not None and self.measure not in (*MEASURES, COMBINED):
            raise ConfigError(f"measure must be one of {[*MEASURES, COMBINED]}, got {self.measure!r}")
        if self.thresholds is not None and len(self.thresholds) != len(self.tiers) - 1:
            raise ConfigError(f"{len(self.tiers)} tiers need {len(self.tiers) - 1} thresholds")
        if self.thresholds is not None and self.artifact is not None:
            raise ConfigError("give thresholds or artifact, not both")
        if self.on_error not in ("raise", "degrade"):
            raise ConfigError("on_error must be 'raise' or 'degrade'")


def backend_signature(config: CascadeConfig) -> list[dict[str, Any]]:
    """What produced each tier's scores: backend kind, and for a remote tier the ``top_logprobs`` k its measures
    were computed from (a calibration artifact records it; :func:`build_cascade` refuses a mismatch)."""
    return [{"tier": t.name, "kind": t.backend.kind,
             "top_logprobs": t.backend.top_logprobs if t.backend.kind == "openai" else None} for t in config.tiers]


def check_backends(config: CascadeConfig, artifact: Any) -> None:
    """Refuse an artifact whose thresholds were fitted on other backends than the config serves the tiers with.

    The same weights give different scores locally (exact) and through a server (from its top-k logprobs), so
    a threshold does not carry over silently. Artifacts from before this check (no ``backends``) pass.

    Raises:
        ArtifactError: a tier's backend kind or ``top_logprobs`` differs from the artifact's.
    """
    from cascade.errors import ArtifactError

    fitted = artifact.params.get("backends") if isinstance(artifact.params, Mapping) else None
    if not isinstance(fitted, list):
        return
    for was, now in zip(fitted, backend_signature(config)):
        if not isinstance(was, Mapping) or "kind" not in was:
            continue
        if (was.get("kind"), was.get("top_logprobs")) != (now["kind"], now["top_logprobs"]):
            raise ArtifactError(
                f"the artifact's thresholds for tier {now['tier']!r} were fitted on a {_backend_text(was)} backend, "
                f"the config serves it with {_backend_text(now)}: scores differ between backends; refit with "
                "cascade-calibrate on this config")


def _backend_text(b: Mapping[str, Any]) -> str:
    return f"{b['kind']}" + (f" with top_logprobs {b['top_logprobs']}" if b.get("top_logprobs") else "")


def with_overrides(config: CascadeConfig, *, measure: str | None = None, thresholds: Sequence[float] | None = None,
                   artifact: str | None = None, max_tokens: int | None = None) -> CascadeConfig:
    """``config`` with the command line's overrides (None: keep the config's value).

    Hand-set ``thresholds`` replace the config's artifact and an ``artifact`` replaces its thresholds.

    Raises:
        ConfigError: the result is not a valid config (e.g. an unknown measure, thresholds for another chain).
    """
    changes: dict[str, Any] = {}
    if measure:
        changes["measure"] = measure
    if thresholds is not None:
        changes.update(thresholds=tuple(float(t) for t in thresholds), artifact=None)
    if artifact:
        changes.update(artifact=artifact, thresholds=None)
    if max_tokens is not None:
        changes["max_tokens"] = max_tokens
    return replace(config, **changes) if changes else config


def default_config() -> CascadeConfig:
    """The embedded default pair: Qwen2.5-Coder-0.5B-Instruct -> Qwen2.5-Coder-1.5B-Instruct, shipped thresholds.

    The shipped thresholds (``cascade/data/default_artifact.json``) are for requests with ``choices``
    (``choice_margin``); a free request under them has no choice measure and is answered by the large tier.
    """
    return CascadeConfig()


def _build(cls: type[Any], raw: Any, where: str) -> Any:
    """Build a config dataclass from a mapping, rejecting unknown keys by name."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table/mapping")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {sorted(unknown)}")
    kwargs = dict(raw)
    try:
        if cls is TierConfig and "backend" in kwargs:
            kwargs["backend"] = _build(BackendConfig, kwargs["backend"], f"{where}.backend")
        if cls is CascadeConfig:
            if "tiers" in kwargs:
                tiers = kwargs["tiers"]
                if not isinstance(tiers, list):
                    raise ConfigError("tiers must be a list")
                kwargs["tiers"] = tuple(_build(TierConfig, t, f"tiers[{i}]") for i, t in enumerate(tiers))
            if "batching" in kwargs:
                kwargs["batching"] = _build(BatchingConfig, kwargs["batching"], "batching")
            if kwargs.get("monitor") is not None:
                kwargs["monitor"] = _build(MonitorConfig, kwargs["monitor"], "monitor")
            if kwargs.get("thresholds") is not None:
                kwargs["thresholds"] = tuple(float(t) for t in kwargs["thresholds"])
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {where}: {exc}") from exc


def load_config(path: str | Path) -> CascadeConfig:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file.

    Sections not part of :class:`CascadeConfig` (e.g. ``server``) are kept in ``extra`` only when listed
    under the ``extra`` key; any other unknown key is an error. Relative file paths of ``artifact``,
    ``router``, ``monitor.log_path`` and ``extra.experts.*.config`` are taken relative to the config file's
    folder (model names and folders are left as written: they may be embedded names or hub ids).

    Raises:
        ConfigError: unreadable file, unknown format, unknown keys or invalid values.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc}") from exc
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif p.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            raw = tomllib.loads(text)
        else:
            raise ConfigError(f"config {p} must end in .yaml, .yml or .toml")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot parse config {p}: {exc}") from exc
    cfg: CascadeConfig = _build(CascadeConfig, raw, str(p))
    return _relative_to(cfg, p.parent)


def _relative_to(cfg: CascadeConfig, folder: Path) -> CascadeConfig:
    def resolve(path: Any) -> Any:
        relative = isinstance(path, str) and bool(path) and not Path(path).is_absolute()
        return str(folder.absolute() / path) if relative else path

    extra = dict(cfg.extra)
    experts = extra.get("experts")
    if isinstance(experts, Mapping):
        extra["experts"] = {k: ({**v, "config": resolve(v["config"])} if isinstance(v, Mapping) and "config" in v
                                else v) for k, v in experts.items()}
    monitor = cfg.monitor
    if monitor is not None and monitor.log_path is not None:
        monitor = dataclasses.replace(monitor, log_path=resolve(monitor.log_path))
    return dataclasses.replace(cfg, artifact=resolve(cfg.artifact), router=resolve(cfg.router), extra=extra,
                               monitor=monitor)


def _build_hf(cfg: BackendConfig) -> Backend:
    from cascade.backends.hf_local import HFLocalBackend

    return HFLocalBackend.from_pretrained(
        cfg.model, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map, max_batch_size=cfg.max_batch_size
    )


def _build_openai(cfg: BackendConfig) -> Backend:
    from cascade.backends.openai_compat import OpenAIBackend

    backend: Backend = OpenAIBackend(
        model=cfg.model,
        base_url=cfg.base_url,
        api_key_env=cfg.api_key_env,
        api=cfg.api,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        max_concurrency=cfg.max_concurrency,
        rate_limit_per_s=cfg.rate_limit_per_s,
        top_logprobs=cfg.top_logprobs,
        choices=cfg.choices,
    )
    return backend


_BUILDERS: dict[str, Callable[[BackendConfig], Backend]] = {"hf": _build_hf, "openai": _build_openai}


def build_backend(cfg: BackendConfig) -> Backend:
    """Build the backend a config describes (loads the model for ``hf``)."""
    return _BUILDERS[cfg.kind](cfg)


def build_cascade(config: CascadeConfig, *, backends: Mapping[str, Backend] | None = None) -> Any:
    """Build a :class:`~cascade.engine.Cascade` from a config.

    Args:
        config: the configuration.
        backends: already-built backends by tier name (reused instead of building them again).

    Raises:
        ConfigError, ArtifactError, ModelNotInstalledError: bad config, artifact or missing model package.
    """
    from cascade.engine import Cascade, Price, Tier
    from cascade.types import GenerationParams

    built = dict(backends or {})
    tiers = []
    for t in config.tiers:
        backend = built.get(t.name) or build_backend(t.backend)
        # Merge concurrent calls to a local model into batches. Remote tiers already answer a batch as
        # concurrent requests and the server batches itself: a batcher there only adds waiting.
        if config.batching.enabled and t.backend.kind == "hf":
            from cascade.batching import MicroBatcher

            b = config.batching
            if not isinstance(backend, MicroBatcher):
                backend = MicroBatcher(backend, b.max_batch_size, b.max_wait_ms, b.max_queue)
        tiers.append(Tier(t.name, backend, Price(t.price_input_per_mtok, t.price_output_per_mtok), t.timeout_s))
    artifact = config.artifact
    if config.thresholds is None and artifact is None:
        artifact = str(DEFAULT_ARTIFACT)
    params = GenerationParams(max_tokens=config.max_tokens, temperature=config.temperature)
    cascade = Cascade(
        tiers,
        measure=config.measure,
        threshold=config.thresholds,
        artifact=artifact,
        params=params,
        on_error=config.on_error,  # type: ignore[arg-type]
        early_exit=config.early_exit,
        max_prompt_chars=config.max_prompt_chars,
        length_normalize=config.length_normalize,
        monitor=config.monitor,
    )
    fitted = getattr(cascade.policy, "artifact", None)
    if fitted is not None and config.artifact is not None:  # the shipped default is for its own local models
        check_backends(config, fitted)
    return cascade
