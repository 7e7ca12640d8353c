"""Bad input, for every command line: one clear line on stderr, a non-zero exit, no traceback, nothing left behind.

Each CLI gets the same table of broken model folders, plus its own table of bad flags, data,
output paths, a full disk and Ctrl-C. Real bugs are not caught: a test at the end checks that
an internal error still shows its traceback.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_qwen2.chat import main as chat_main
from mlx_qwen2.convert import main as convert_main
from mlx_qwen2.fuse import main as fuse_main
from mlx_qwen2.generate import main as generate_main
from mlx_qwen2.loader import load
from mlx_qwen2.lora import main as lora_main
from mlx_qwen2.tuner.adapters import apply_adapters
from tests.tiny import make_checkpoint
from tests.tiny_gguf import write_gguf

REQUIRED = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")


def edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))

    return edit


def drop_key(key: str) -> Callable[[Path], None]:
    return edit_config(**{key: ...})


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def truncate(name: str, cut: int) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:-cut])


def remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def only_pickle(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")


# (id, how to break a copy of a good model folder, what the one line must say)
BROKEN_MODELS = [
    ("empty-folder", lambda f: [p.unlink() for p in f.iterdir()], "config.json not found"),
    ("config-not-json", write("config.json", b"{not json"), "not valid JSON"),
    ("config-not-utf8", write("config.json", b'{"model_type": "\xff"}'), "not valid JSON"),
    ("config-a-list", write("config.json", b"[1, 2]"), "JSON object"),
    ("not-qwen2-and-incomplete", write("config.json", b'{"model_type": "llama", "hidden_size": 64}'), "not 'qwen2'"),
    *[(f"missing-{k}", drop_key(k), k) for k in REQUIRED],
    ("hidden-size-a-string", edit_config(hidden_size="64"), "hidden_size is '64'"),
    ("layers-a-float", edit_config(num_hidden_layers=2.5), "num_hidden_layers is 2.5"),
    ("rope-scaling-a-number", edit_config(rope_scaling=3), "rope_scaling is 3"),
    ("tie-a-string", edit_config(tie_word_embeddings="yes"), "tie_word_embeddings"),
    ("zero-heads", edit_config(num_attention_heads=0), "num_attention_heads must be at least 1"),
    ("shapes-disagree", edit_config(intermediate_size=100), "do not match its config.json"),
    ("moe-without-experts", edit_config(model_type="qwen2_moe"), "lacks num_experts, num_experts_per_tok"),
    (
        "moe-dense-weights",  # a MoE config over a dense checkpoint: no experts to load
        edit_config(
            model_type="qwen2_moe",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
        "do not match its config.json",
    ),
    ("truncated-safetensors", truncate("model.safetensors", 1000), "truncated"),
    ("corrupt-safetensors", write("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"), "valid"),
    ("only-pickled-weights", only_pickle, "pickled"),
    ("no-tokenizer", remove("tokenizer.json"), "tokenizer.json not found"),
    ("corrupt-tokenizer", write("tokenizer.json", b'{"version": "1.0", "model": 7}'), "not a valid tokenizer.json"),
    ("corrupt-generation-config", write("generation_config.json", b"{oops"), "not valid JSON"),
]


def check(main: Callable, argv: list[str], capsys: pytest.CaptureFixture, match: str, code: int = 1) -> None:
    """The command fails with exit status `code` and one line on stderr that contains `match`.

    Progress and training reports may come before it; a traceback or a second error may not."""
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, (rc, err)
    *before, last = err
    assert not any(line.startswith(("error", "Traceback", "interrupted")) for line in before), err
    assert "Traceback" not in last
    assert last.startswith("error: " if code == 1 else "interrupted"), err
    assert match in last, last


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.fixture
def good(tiny_untied, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_untied, dst)
    return dst


@pytest.fixture(scope="module")
def other_adapters(tmp_path_factory) -> Path:
    """Adapters trained for a model of another width."""
    other = make_checkpoint(tmp_path_factory.mktemp("other"), hidden=32, layers=2, seed=9)
    model, _ = load(other)
    apply_adapters(model, 2, rank=4)
    folder = tmp_path_factory.mktemp("other_adapters")
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 20.0}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def data_folder(root: Path, train: bytes = b'{"text": "hello there"}\n') -> Path:
    folder = root / "data"
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_bytes(train)
    (folder / "valid.jsonl").write_bytes(b'{"text": "hi"}\n')
    (folder / "test.jsonl").write_bytes(b'{"text": "hi"}\n')
    return folder


# Each CLI, as argv for a model folder and a scratch folder for outputs.
COMMANDS: dict[str, tuple[Callable, Callable[[Path, Path], list[str]]]] = {
    "generate": (generate_main, lambda m, t: ["--model", str(m), "--max-tokens", "2"]),
    "chat": (chat_main, lambda m, t: ["--model", str(m), "--max-tokens", "2"]),
    "convert": (convert_main, lambda m, t: ["--hf-path", str(m), "--mlx-path", str(t / "out"), "-q", "--q-group-size", "32"]),
    "lora": (lora_main, lambda m, t: ["--model", str(m), "--train", "--data", str(data_folder(t)), "--iters", "1",
                                      "--adapter-path", str(t / "out")]),
    "fuse": (fuse_main, lambda m, t: ["--model", str(m), "--adapter-path", str(t / "adapters"), "--save-path", str(t / "out")]),
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("name, damage, match", BROKEN_MODELS, ids=[b[0] for b in BROKEN_MODELS])
def test_broken_model_folder(command, name, damage, match, good, tmp_path, capsys, monkeypatch):
    main, argv = COMMANDS[command]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # chat: end of input at once
    damage(good)
    check(main, argv(good, tmp_path), capsys, match)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path, {"model", "data"}) == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    "path, match",
    [("nowhere", "not found"), ("a-file", "is a file"), ("../x/y", "not found")],
    ids=["missing", "a-file", "missing-relative"],
)
def test_model_path_that_is_not_a_folder(command, path, match, tmp_path, capsys, monkeypatch):
    main, argv = COMMANDS[command]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    (tmp_path / "a-file").write_text("x")
    check(main, argv(tmp_path / path, tmp_path), capsys, match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unreadable_config(command, good, tmp_path, capsys, monkeypatch):
    main, argv = COMMANDS[command]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    real_open = builtins.open
    config = str(good / "config.json")

    def guarded(file, *args, **kwargs):
        if str(file) == config:
            raise PermissionError(errno.EACCES, "Permission denied", config)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    check(main, argv(good, tmp_path), capsys, "config.json: Permission denied")


# --- generate and chat --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--temp", "-1"], "temperature"),
        (["--top-p", "1.5"], "top-p"),
        (["--top-p", "0"], "top-p"),
        (["--min-p", "2"], "min-p"),
        (["--top-k", "-3"], "top-k"),
        (["--max-tokens", "-1"], "max-tokens"),
        (["--prefill-step-size", "0"], "prefill-step-size"),
        (["--repetition-penalty", "0"], "repetition penalty"),
    ],
)
@pytest.mark.parametrize("main", [generate_main, chat_main], ids=["generate", "chat"])
def test_out_of_range_flags(main, flags, match, tiny_untied, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    check(main, ["--model", str(tiny_untied), *flags], capsys, match)


def test_generate_prompt_longer_than_context(tiny_untied, capsys):
    prompt = " ".join(f"w{i}" for i in range(600))
    check(generate_main, ["--model", str(tiny_untied), "--prompt", prompt, "--no-chat-template"], capsys, "context")


def test_generate_stdin_not_utf8(tiny_untied, capsys, monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait"), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    check(generate_main, ["--model", str(tiny_untied), "--prompt", "-"], capsys, "not utf-8 text")


@pytest.mark.parametrize("kind", ["another-model", "missing", "corrupt-config", "corrupt-weights"])
def test_generate_bad_adapters(kind, tiny_untied, other_adapters, tmp_path, capsys):
    folder = tmp_path / "adapters"
    if kind != "missing":
        shutil.copytree(other_adapters, folder)
    if kind == "corrupt-config":
        (folder / "adapter_config.json").write_text("{")
    if kind == "corrupt-weights":
        (folder / "adapters.safetensors").write_bytes(b"\x00" * 12)
    match = {"another-model": "do not fit this model", "missing": "not found", "corrupt-config": "not a valid adapter"}
    argv = ["--model", str(tiny_untied), "--adapter-path", str(folder)]
    check(generate_main, argv, capsys, match.get(kind, "not a valid safetensors"))


def test_generate_ctrl_c(tiny_untied, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["mlx_qwen2.generate"], "stream_generate", interrupted)
    check(generate_main, ["--model", str(tiny_untied)], capsys, "interrupted", code=130)


def test_chat_ctrl_c(tiny_untied, capsys, monkeypatch):
    def ctrl_c(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", ctrl_c)
    check(chat_main, ["--model", str(tiny_untied)], capsys, "interrupted", code=130)


def test_chat_without_template(good, capsys, monkeypatch):
    config = json.loads((good / "tokenizer_config.json").read_text())
    (good / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    check(chat_main, ["--model", str(good)], capsys, "no chat template")


# --- convert ------------------------------------------------------------------------------------------


def full_disk(path, *args, **kwargs):
    Path(path).write_bytes(b"partial")  # a partial file appears, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def ctrl_c_on_save(path, *args, **kwargs):
    Path(path).write_bytes(b"partial")
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "flags, match",
    [
        (["-q", "--q-bits", "7"], "--q-bits 7"),
        (["-q", "--q-group-size", "48"], "--q-group-size 48"),
        (["--quant-recipe", "mixed_9_9"], "mixed_9_9"),
        (["-q", "--q-group-size", "128"], "does not divide"),
        (["--dequantize"], "not quantized"),
        (["--calibrate", "--calibration-tokens", "0"], "calibration-tokens"),
        (["--calibrate", "--calibration-data", "nowhere.txt"], "not found"),
        (["-q", "--dequantize"], "exclude each other"),
    ],
)
def test_convert_bad_flags(flags, match, tiny_untied, tmp_path, capsys):
    check(convert_main, ["--hf-path", str(tiny_untied), "--mlx-path", str(tmp_path / "out"), *flags], capsys, match)
    assert leftovers(tmp_path, set()) == []


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"text": "fine"}\n{"txt": "wrong key"}\n', "line 2"),
        (b'{"text": "fine"}\nnot json\n', "line 2"),
        (b'{"text": 5}\n', '"text" must be a string'),
        (b'{"text": "caf\xe9"}\n', "not UTF-8"),
        (b'{"text": "short"}\n', "give at least"),
    ],
)
def test_convert_bad_calibration_data(content, match, tiny_untied, tmp_path, capsys):
    data = tmp_path / "cal.jsonl"
    data.write_bytes(content)
    argv = ["--hf-path", str(tiny_untied), "--mlx-path", str(tmp_path / "out"), "--calibrate", "--q-group-size", "32"]
    check(convert_main, [*argv, "--calibration-data", str(data)], capsys, match)
    assert leftovers(tmp_path, {"cal.jsonl"}) == []


def test_convert_quantized_source_again(tiny_untied, tmp_path, capsys):
    assert (
        convert_main(["--hf-path", str(tiny_untied), "--mlx-path", str(tmp_path / "q"), "-q", "--q-group-size", "32"])
        == 0
    )
    capsys.readouterr()
    check(
        convert_main, ["--hf-path", str(tmp_path / "q"), "--mlx-path", str(tmp_path / "out"), "-q"], capsys, "already"
    )


OUTPUTS = [("a-file", "is a file"), ("a-file/below", "is a file"), ("full", "not empty")]


@pytest.mark.parametrize("out, match", OUTPUTS, ids=[o[0] for o in OUTPUTS])
@pytest.mark.parametrize("command", ["convert", "fuse"])
def test_bad_output_path(command, out, match, tiny_untied, other_adapters, tmp_path, capsys):
    (tmp_path / "a-file").write_text("keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep me")
    if command == "convert":
        check(convert_main, ["--hf-path", str(tiny_untied), "--mlx-path", str(tmp_path / out)], capsys, match)
    else:
        argv = ["--model", str(tiny_untied), "--adapter-path", str(other_adapters), "--save-path", str(tmp_path / out)]
        check(fuse_main, argv, capsys, match)
    assert (tmp_path / "a-file").read_text() == "keep me" and (tmp_path / "full" / "keep.txt").read_text() == "keep me"
    assert leftovers(tmp_path, {"a-file", "full"}) == []


@pytest.fixture
def own_adapters(tiny_untied, tmp_path) -> Path:
    model, _ = load(tiny_untied)
    apply_adapters(model, 2, rank=4)
    folder = tmp_path / "adapters"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 20.0}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "failure, code, match", [(full_disk, 1, "No space left"), (ctrl_c_on_save, 130, "interrupted")]
)
@pytest.mark.parametrize("command", ["convert", "gguf", "fuse"])
def test_full_disk_and_ctrl_c_leave_nothing(command, failure, code, match, tiny_untied, own_adapters, tmp_path, capsys,
                                            monkeypatch):  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")  # replaced only by a complete new one
    argv = {
        "convert": ["--hf-path", str(tiny_untied), "--mlx-path", str(out), "-q", "--q-group-size", "32", "--force"],
        "gguf": ["--gguf", str(write_gguf(tiny_untied, tmp_path / "m.gguf")), "--mlx-path", str(out), "--force"],
        "fuse": ["--model", str(tiny_untied), "--adapter-path", str(own_adapters), "--save-path", str(out), "--force"],
    }[command]
    monkeypatch.setattr(mx, "save_safetensors", failure)
    check(fuse_main if command == "fuse" else convert_main, argv, capsys, match, code)
    assert leftovers(out, set()) == ["old.txt"]
    assert leftovers(tmp_path, {"out", "m.gguf", "adapters"}) == []


# --- GGUF ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wrong-sha256", "llama", "not-gguf", "truncated", "missing"])
def test_bad_gguf(kind, tiny_untied, tmp_path, capsys):
    path = tmp_path / "m.gguf"
    flags = []
    if kind in ("wrong-sha256", "truncated"):
        write_gguf(tiny_untied, path)
    if kind == "wrong-sha256":
        flags = ["--sha256", "0" * 64]
    if kind == "llama":
        write_gguf(tiny_untied, path, arch="llama")
    if kind == "not-gguf":
        path.write_bytes(b"PK\x03\x04 definitely a zip")
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-5000])
    match = {
        "wrong-sha256": "sha256",
        "llama": "not qwen2",
        "not-gguf": "not a GGUF",
        "truncated": "corrupt or truncated",
    }
    check(
        convert_main,
        ["--gguf", str(path), "--mlx-path", str(tmp_path / "out"), *flags],
        capsys,
        match.get(kind, "not found"),
    )
    assert leftovers(tmp_path, {"m.gguf"}) == []


def test_hub_id_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check(generate_main, ["--model", "Qwen/not-a-cached-model-xyz"], capsys, "local model folder")


# --- lora ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "train, match",
    [
        (b"not json\n", "train.jsonl, line 1"),
        (b'{"text": "fine"}\n{"text": 3}\n', "train.jsonl, line 2"),
        (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "train.jsonl, line 2: not UTF-8"),
        (b'{"txt": "no such field"}\n', "expected a"),
        (b'{"messages": [{"role": "user"}]}\n', '"messages" must be'),
        (b'{"prompt": "p", "completion": 3}\n', "must be strings"),
        (b"[1, 2]\n", "expected a JSON object"),
        (b"\n\n", "no examples"),
    ],
)
def test_lora_bad_data(train, match, tiny_untied, tmp_path, capsys):
    data = data_folder(tmp_path, train)
    argv = ["--model", str(tiny_untied), "--train", "--data", str(data), "--adapter-path", str(tmp_path / "out")]
    check(lora_main, argv, capsys, match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "config, match",
    [
        ("iters: ten\n", "iters is 'ten', but it must be an integer"),
        ("learning_rate: fast\n", "learning_rate is 'fast'"),
        ("mask_prompt: 3\n", "mask_prompt is 3"),
        ("rank: true\n", "rank is True"),
        ("bogus_option: 1\n", "bogus_option"),
        ("- just\n- a list\n", "mapping"),
        ("rank: [unclosed\n", "not valid YAML"),
    ],
)
def test_lora_bad_config_file(config, match, tiny_untied, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(config)
    argv = ["--model", str(tiny_untied), "--train", "--data", str(data_folder(tmp_path))]
    argv += ["-c", str(tmp_path / "c.yaml"), "--adapter-path", str(tmp_path / "out")]
    check(lora_main, argv, capsys, match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--rank", "0"], "rank must be at least 1"),
        (["--iters", "0"], "iters must be at least 1"),
        (["--batch-size", "0"], "batch-size must be at least 1"),
        (["--num-layers", "99"], "num-layers must be in 1..2"),
        (["--fine-tune-type", "qlora"], "fine-tune-type"),
        (["--dropout", "1.5"], "dropout"),
        (["--optimizer", "lion"], "optimizer"),
        (["--max-seq-length", "1"], "max-seq-length"),
        (["--resume", "--num-layers", "2"], "no checkpoint"),
        ([], "nothing to do"),
    ],
)
def test_lora_bad_flags(flags, match, tiny_untied, tmp_path, capsys):
    argv = ["--model", str(tiny_untied), "--data", str(data_folder(tmp_path)), "--adapter-path", str(tmp_path / "out")]
    check(lora_main, [*argv, *(["--train"] if flags else []), *flags], capsys, match)
    assert not (tmp_path / "out").exists()


def test_lora_adapter_path_is_a_file(tiny_untied, tmp_path, capsys):
    (tmp_path / "out").write_text("keep")
    argv = ["--model", str(tiny_untied), "--train", "--data", str(data_folder(tmp_path)), "--adapter-path"]
    check(lora_main, [*argv, str(tmp_path / "out")], capsys, "is a file")
    assert (tmp_path / "out").read_text() == "keep"


def test_lora_test_with_another_models_adapters(tiny_untied, other_adapters, tmp_path, capsys):
    argv = ["--model", str(tiny_untied), "--test", "--data", str(data_folder(tmp_path))]
    check(lora_main, [*argv, "--adapter-path", str(other_adapters)], capsys, "do not fit this model")


def test_lora_ctrl_c_keeps_no_partial_file(tiny_untied, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mx, "save_safetensors", ctrl_c_on_save)
    argv = ["--model", str(tiny_untied), "--train", "--data", str(data_folder(tmp_path)), "--iters", "1"]
    argv += ["--num-layers", "2", "--adapter-path", str(tmp_path / "out")]
    check(lora_main, argv, capsys, "interrupted", code=130)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".safetensors" or p.name.startswith(".")] == []


# --- fuse ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["another-model", "missing", "corrupt-config", "corrupt-weights", "unknown-type"])
def test_fuse_bad_adapters(kind, tiny_untied, other_adapters, tmp_path, capsys):
    folder = tmp_path / "adapters"
    if kind != "missing":
        shutil.copytree(other_adapters, folder)
    if kind == "corrupt-config":
        (folder / "adapter_config.json").write_text('{"fine_tune_type": "lora"}')  # no num_layers
    if kind == "corrupt-weights":
        (folder / "adapters.safetensors").write_bytes((folder / "adapters.safetensors").read_bytes()[:-100])
    if kind == "unknown-type":
        (folder / "adapter_config.json").write_text('{"fine_tune_type": "ia3", "num_layers": 2}')
    match = {
        "another-model": "do not fit this model",
        "missing": "not found",
        "corrupt-config": "not a valid adapter config",
        "corrupt-weights": "truncated",
        "unknown-type": "unknown fine_tune_type",
    }[kind]
    argv = ["--model", str(tiny_untied), "--adapter-path", str(folder), "--save-path", str(tmp_path / "out")]
    check(fuse_main, argv, capsys, match)
    assert not (tmp_path / "out").exists()


# --- real bugs are not hidden -------------------------------------------------------------------------


def test_internal_errors_keep_their_traceback(tiny_untied, monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("an internal invariant broke")  # not a UserError: a bug

    monkeypatch.setattr(sys.modules["mlx_qwen2.generate"], "stream_generate", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        generate_main(["--model", str(tiny_untied)])


# --- generate --prompts-file, and the cache flags ---------------------------------------------------


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "has no prompts"),
        (b"\n\n", "has no prompts"),
        (b'{"prompt": "fine"}\n{"prompt": \n', "in.jsonl, line 2"),
        (b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n', "line 2: not UTF-8"),
        (b'{"promt": "typo"}\n', "unknown field(s) promt"),
        (b'{"prompt": 3}\n', 'expected a "prompt" string'),
        (b'{"prompt": "x", "temp": "hot"}\n', "temp is 'hot'"),
        (b'{"prompt": "x", "top_p": 7}\n', "top-p"),
        (b'{"prompt": "x", "max_tokens": -2}\n', "max-tokens"),
        (b'{"messages": "hi"}\n', '"messages" must be'),
        (b'{"prompt": "' + b"w " * 600 + b'"}\n', "line 1: the prompt has"),
    ],
)
def test_bad_prompts_file(content, match, tiny_untied, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_bytes(content)
    argv = ["--model", str(tiny_untied), "--prompts-file", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o")]
    check(generate_main, argv, capsys, match)
    assert not (tmp_path / "o").exists()  # nothing ran: every line is checked first


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--prompts-file", "in.jsonl"], "needs --output"),
        (["--output", "o.jsonl"], "goes with --prompts-file"),
        (["--prompts-file", "nowhere.jsonl", "--output", "o"], "not found"),
        (["--prompts-file", "in.jsonl", "--output", "o", "--max-batch", "0"], "--max-batch"),
        (["--prompts-file", "in.jsonl", "--output", "o", "--prompt-cache-file", "c"], "starts every prompt afresh"),
        (["--prompts-file", "in.jsonl", "--output", "o", "--kv-bits", "8"], "does not divide the head size"),
        (["--max-kv-size", "3"], "kept prefix"),
        (["--max-kv-size", "16", "--kv-keep", "20"], "kept prefix"),
        (["--kv-bits", "5"], "--kv-bits 5"),
        (["--kv-bits", "8", "--kv-group-size", "16"], "--kv-group-size 16"),
        (["--kv-bits", "8", "--max-kv-size", "64"], "cannot be combined"),
        (["--kv-bits", "8", "--quantized-kv-start", "-1"], "quantized-kv-start"),
        (["--kv-bits", "8"], "does not divide the head size"),  # the tiny model's heads are 16 wide
    ],
)
def test_bad_batch_and_cache_flags(flags, match, tiny_untied, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    check(generate_main, ["--model", str(tiny_untied), "-m", "2", *flags], capsys, match)


def test_output_of_another_kind_is_not_overwritten(tiny_untied, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "o.jsonl").write_text("my notes, not results\nmore notes\n")
    argv = ["--model", str(tiny_untied), "--prompts-file", str(tmp_path / "in.jsonl"), "--output"]
    check(generate_main, [*argv, str(tmp_path / "o.jsonl")], capsys, "not a result of ours")
    assert (tmp_path / "o.jsonl").read_text() == "my notes, not results\nmore notes\n"
