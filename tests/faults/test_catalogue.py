"""The rest of the fault catalogue as a table: each case's set-up, command, expected exit code, a phrase its
one line must contain, and a check that nothing was left behind (no output where it failed, no temporary
files). Exit codes: 0 ok, 1 a job or row failed, 2 bad input or environment, 130 interrupted."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from quantkit.calib.workdir import WorkFolder, work_path
from tests.faults.conftest import invoke, leftovers, quantize_args
from tests.tiny import llama_config, make_model

Env = dict  # what a set-up made: "model", "text", "tmp", and its own paths


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Env], None]          # prepares files (and may add entries to the env)
    args: Callable[[Env], list[str]]      # the command line
    code: int
    phrase: str                           # the one line (or the JSON on stdout) must contain it
    absent: tuple[str, ...] = ("out",)    # env keys of paths that must not exist afterwards
    stdout_json: bool = False             # the failure is also JSON on stdout


def nothing(env: Env) -> None:
    pass


def copy_model(env: Env, name: str = "m2") -> Path:
    dst = env["tmp"] / name
    shutil.copytree(env["model"], dst)
    return dst


def damaged_copy(edit: Callable[[Path], None]) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        env["src"] = copy_model(env)
        edit(env["src"])
    return setup


def cut(name: str, keep: int | None = None) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2 if keep is None else keep])
    return edit


def overwrite(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")


def rtn(src_key: str = "src", *extra: str) -> Callable[[Env], list[str]]:
    return lambda env: ["quantize", env[src_key], "-o", env["out"], "-m", "rtn", "--bits", "4", "--group-size", "32",
                        *extra]


def gptq(*extra: str) -> Callable[[Env], list[str]]:
    return lambda env: quantize_args(env["model"], env["text"], env["out"], "gptq", *extra)


def evaluate(path_key: str, base_key: str | None = "model") -> Callable[[Env], list[str]]:
    def args(env: Env) -> list[str]:
        base = ["--base", env[base_key]] if base_key else []
        return ["eval", env[path_key], *base, "--dataset", env["text"], "--seqlen", "32", "--max-windows", "1"]
    return args


def other_vocab(env: Env) -> None:
    env["src"] = make_model(env["tmp"] / "v512", llama_config(layers=1, vocab=512))


def other_tokenizer(env: Env) -> None:
    """Same vocabulary size, other tokens: the vocabulary of tokenizer.json is reversed."""
    env["src"] = copy_model(env)
    f = env["src"] / "tokenizer.json"
    tok = json.loads(f.read_text())
    vocab = tok["model"]["vocab"]
    ids = sorted(vocab.values())
    tok["model"]["vocab"] = dict(zip(vocab, reversed(ids)))
    f.write_text(json.dumps(tok))


def remote_code(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="tinyremote", auto_map={"AutoConfig": "modeling_tiny.TinyConfig",
                                                  "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_tiny.py").write_text("raise RuntimeError('remote code ran')\n")


def not_gguf(env: Env) -> None:
    env["src"] = env["tmp"] / "x.gguf"
    env["src"].write_text("hello")


def existing_output(env: Env) -> None:
    Path(env["out"]).mkdir()
    (Path(env["out"]) / "keep.txt").write_text("mine")


def output_is_a_file(env: Env) -> None:
    Path(env["out"]).write_text("a file")


def locked_output(env: Env) -> None:
    """Another run holds the work folder (its lock) while this one starts."""
    work_path(Path(env["out"])).mkdir()
    (work_path(Path(env["out"])) / "fingerprint.json").write_text("{}")
    env["holder"] = WorkFolder(Path(env["out"]), dict)


def zoo_with_missing_model(env: Env) -> None:
    folder = env["tmp"] / "zoo"
    folder.mkdir()
    (folder / "rtn.yaml").write_text(yaml.safe_dump({"name": "rtn", "method": "rtn", "scheme": {"bits": 4}}))
    (folder / "zoo.yaml").write_text(yaml.safe_dump({"models": [{"model": str(env["tmp"] / "no-such-model"),
                                                                 "name": "x", "recipes": ["rtn.yaml"]}]}))
    env["zoo"] = str(folder / "zoo.yaml")


def special(path: str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        env["out"] = path
    return setup


CASES = [
    # --- every loader with a damaged file (tests/unit/test_cli_damaged.py crosses them with every command)
    Case("safetensors-truncated", damaged_copy(cut("model.safetensors")), rtn(), 2, "is truncated"),
    Case("safetensors-header-cut", damaged_copy(cut("model.safetensors", 200)), rtn(), 2, "is damaged"),
    Case("safetensors-empty", damaged_copy(cut("model.safetensors", 0)), rtn(), 2, "too short for a safetensors"),
    Case("safetensors-data-short", damaged_copy(lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:-1])), rtn(), 2, "is truncated"),
    Case("config-not-json", damaged_copy(overwrite("config.json", "{\"model_type\": ")), rtn(), 2, "is not valid JSON"),
    Case("config-missing", damaged_copy(lambda f: (f / "config.json").unlink()), rtn(), 2, "has no config.json"),
    Case("tokenizer-not-json", damaged_copy(overwrite("tokenizer.json", "{\"version\": ")), lambda env: [
        *quantize_args(env["src"], env["text"], env["out"], "gptq")], 2, "cannot read the tokenizer of"),
    Case("pickle-only-quantize", damaged_copy(pickle_only), rtn(), 2, "a pickle file quantkit does not load"),
    Case("pickle-only-eval", damaged_copy(pickle_only), evaluate("src", None), 2, "a pickle file quantkit does not load"),
    Case("pickle-only-convert", damaged_copy(pickle_only), lambda env: ["convert", env["src"], "--to", "gguf",
                                                                        env["out"] + ".gguf"], 2, "pickle"),
    Case("gguf-truncated", lambda env: env.update(src=str(env["gguf_cut"])), lambda env: ["info", env["src"]], 2,
         "is damaged or truncated"),
    Case("gguf-not-gguf", not_gguf, lambda env: ["convert", env["src"], "--to", "hf", env["out"]], 2, "is not a GGUF file"),
    # --- eval
    Case("eval-missing-path", nothing, lambda env: evaluate("out")(env), 2, "not found"),
    Case("eval-other-vocab-size", other_vocab, evaluate("src"), 2, "has a vocabulary of 512 tokens"),
    Case("eval-other-tokenizer", other_tokenizer, evaluate("src"), 2, "different tokenizers"),
    Case("eval-json-failure", nothing, lambda env: [*evaluate("out")(env), "--json", "-"], 2, '"ok": false',
         stdout_json=True),
    Case("eval-plot-not-png", nothing, lambda env: [*evaluate("model")(env), "--plot", env["out"] + ".jpg"], 2,
         "the plot is a PNG", absent=("out",)),
    # --- architecture and remote code
    Case("unknown-model-type", damaged_copy(edit_config(model_type="foolm", architectures=["FooForCausalLM"])),
         rtn(), 2, "model_type 'foolm'"),
    Case("unknown-model-type-eval", damaged_copy(edit_config(model_type="foolm")), evaluate("src", None), 2,
         "LlamaForCausalLM"),
    Case("remote-code-quantize", damaged_copy(remote_code), rtn(), 2, "--trust-remote-code"),
    Case("remote-code-eval", damaged_copy(remote_code), evaluate("src", None), 2, "auto_map"),
    # --- the output location
    Case("output-exists", existing_output, rtn("model"), 2, "--force", absent=()),
    Case("output-is-a-file", output_is_a_file, rtn("model", "--force"), 2, "is not a folder", absent=()),
    Case("output-under-proc", special("/proc/quantkit-x"), rtn("model"), 2, "/proc is a special filesystem"),
    Case("output-under-sys", special("/sys/quantkit/x"), rtn("model"), 2, "/sys is a special filesystem"),
    Case("gguf-output-under-proc", special("/proc/quantkit-x.gguf"),
         lambda env: ["convert", env["model"], "--to", "gguf", env["out"]], 2, "special filesystem"),
    Case("two-runs-on-one-output", locked_output, gptq(), 2, "another quantkit run is using"),
    # --- inputs that do not exist, and hints that name real options
    Case("quantize-missing-model", nothing, lambda env: ["quantize", env["tmp"] / "nope", "-o", env["out"]], 2,
         "not found"),
    Case("quantize-json-failure", nothing, lambda env: ["quantize", env["tmp"] / "nope", "-o", env["out"], "--json", "-"],
         2, '"exit_code": 2', stdout_json=True),
    Case("missing-dataset", nothing, lambda env: quantize_args(env["model"], env["tmp"] / "no.txt", env["out"]), 2,
         "no.txt"),
    Case("unknown-method", nothing, lambda env: ["quantize", env["model"], "-o", env["out"], "-m", "nope"], 2,
         "unknown method"),
    Case("convert-hint-names-real-options", nothing, lambda env: ["convert", env["model"], "--to", "gptq", env["out"]],
         2, "--method gptq -o OUT"),
    Case("offline-hub-id", nothing, lambda env: ["quantize", "no-org/no-model-xyz", "-o", env["out"]], 2,
         "HF_HUB_OFFLINE is set"),
    Case("zoo-missing-model", zoo_with_missing_model, lambda env: ["zoo", "build", env["zoo"], "--out", env["out"],
                                                                   "--device", "cpu"], 2, "not found"),
]


@pytest.fixture(scope="module")
def gguf_cut(tiny, tmp_path_factory):
    from quantkit.convert import convert

    model, _ = tiny
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    convert(model, "gguf", path, gguf_type="q8_0")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue(case, tiny, gguf_cut, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    model, text = tiny
    env: Env = {"model": model, "text": text, "tmp": tmp_path, "out": str(tmp_path / "out"), "gguf_cut": gguf_cut}
    case.setup(env)
    t0 = time.perf_counter()
    try:
        r = invoke(case.args(env))
    finally:
        if "holder" in env:
            env["holder"].close()
    assert r.exit_code == case.code, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines  # one line, whatever went wrong
    assert case.phrase in (r.stdout if case.stdout_json else lines[0]), r.output
    assert "internal error" not in r.output and "Traceback" not in r.output
    if case.stdout_json:
        doc = json.loads(r.stdout)
        assert doc["ok"] is False and doc["exit_code"] == case.code and doc["error"] == lines[0].removeprefix("error: ")
    for key in case.absent:
        assert not Path(env[key]).exists(), f"{env[key]} was left behind"
    assert leftovers(tmp_path) == []
    assert time.perf_counter() - t0 < 60  # an offline hub id fails in seconds, not after a minute of retries


def test_read_only_output_folder(tiny, tmp_path):
    """A folder the user cannot write: one line (as root, where permissions do not apply, the write's own
    PermissionError goes through the same map)."""
    model, _ = tiny
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() == 0:
            import tempfile
            from unittest import mock

            denied = PermissionError(13, "Permission denied", str(ro / ".out.tmp"))
            with mock.patch.object(tempfile, "mkdtemp", side_effect=denied):
                r = invoke(["quantize", model, "-o", ro / "out", "-m", "rtn", "--bits", "4", "--group-size", "32"])
        else:
            r = invoke(["quantize", model, "-o", ro / "out", "-m", "rtn", "--bits", "4", "--group-size", "32"])
    finally:
        ro.chmod(0o755)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and ("permission denied" in lines[0] or "not writable" in lines[0]), lines
    assert not (ro / "out").exists() and leftovers(tmp_path) == []
