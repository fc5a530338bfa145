"""Engine parts without a model: adapter resolution (local, checkpoint, file:// download, errors),
the prompt-template check, config validation and streamed text with stop strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mistral_qa.adapters import AdapterError, check_prompt_template, read_training_config, resolve_adapter
from mistral_qa.engine import EngineConfig
from mistral_qa.engine.textstream import TextStream


def fake_adapter(folder: Path, template: str | None = "alpaca") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    if template is not None:
        (folder / "training_config.yaml").write_text(f"prompt_template: {template}\nmodel:\n  source: random\n")
    return folder


def test_local_and_checkpoint_folders(tmp_path):
    adapter = fake_adapter(tmp_path / "run" / "adapter")
    assert resolve_adapter(str(adapter)) == adapter
    checkpoint = tmp_path / "ray" / "run" / "checkpoint_000010"
    fake_adapter(checkpoint / "adapter", template=None)
    assert resolve_adapter(str(checkpoint)) == checkpoint / "adapter"
    assert read_training_config(checkpoint / "adapter") is None
    assert read_training_config(adapter)["prompt_template"] == "alpaca"


def test_missing_adapter_names_the_path(tmp_path):
    with pytest.raises(AdapterError, match="no-such-run"):
        resolve_adapter(str(tmp_path / "no-such-run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        resolve_adapter(str(tmp_path / "empty"))


def test_remote_adapter_is_downloaded_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRAL_QA_CACHE", str(tmp_path / "cache"))
    fake_adapter(tmp_path / "bucket" / "run" / "adapter")
    uri = f"file://{tmp_path}/bucket/run"
    local = resolve_adapter(uri)
    assert local.is_relative_to(tmp_path / "cache") and (local / "adapter_config.json").is_file()
    (tmp_path / "bucket" / "run" / "adapter" / "adapter_config.json").unlink()
    assert resolve_adapter(uri) == local  # cached: the source is not read again
    with pytest.raises(AdapterError, match="nowhere"):
        resolve_adapter(f"file://{tmp_path}/nowhere")


def test_prompt_template_must_match():
    check_prompt_template("a", {"prompt_template": "alpaca"})
    check_prompt_template("a", None)  # a bare checkpoint: this project's trainer only writes alpaca
    with pytest.raises(AdapterError, match="chatml"):
        check_prompt_template("a", {"prompt_template": "chatml"})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "give model"),
        ({"adapters": {"a": "x", "b": "y"}, "merge_adapter": True}, "exactly one adapter"),
        ({"adapters": {"base": "x"}}, "names the base"),
        ({"adapters": {"a": "x"}, "max_batch_size": 0}, "greater than or equal to 1"),
        ({"adapters": {"a": "x"}, "colour": "red"}, "Extra inputs"),
        ({"adapters": {"a": "x"}, "decode_attention": "flash"}, "'sdpa' or 'flex'"),
    ],
)
def test_engine_config_rejects(fields, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.model_validate(fields)


class CharTokenizer:
    """One token per character: enough to test holding back partial stop strings."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def run_stream(text: str, stop: list[str]) -> tuple[list[str], str, bool]:
    stream = TextStream(CharTokenizer(), stop)
    ids, pieces, stopped = [], [], False
    for ch in text:
        ids.append(ord(ch))
        piece, stopped = stream.push(ids)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(stream.flush())
    return pieces, stream.text, stopped


def test_text_stream_holds_back_possible_stop_strings():
    pieces, text, stopped = run_stream("Sleep well.\n### Instruction: more", ["\n### Instruction:"])
    assert stopped and text == "Sleep well." and "".join(pieces) == text
    assert all("#" not in p for p in pieces)


def test_text_stream_releases_a_false_alarm():
    pieces, text, stopped = run_stream("a\n## b", ["\n### Instruction:"])
    assert not stopped and text == "a\n## b" and "".join(pieces) == text


def test_text_stream_waits_for_whole_characters():
    stream = TextStream(CharTokenizer(), [])
    assert stream.push([ord("a"), 0xFFFD]) == ("", False)  # the last character's bytes are still coming
    assert stream.push([ord("a"), ord("é")]) == ("aé", False)
    assert stream.push([ord("a"), ord("é"), ord("b")]) == ("b", False)


def test_text_stream_trims_trailing_whitespace():
    pieces, text, stopped = run_stream("Hi there \n", [])
    assert text == "Hi there" and "".join(pieces) == text and not stopped
    pieces, text, stopped = run_stream("Hi \n\n### Response:", ["\n### Response:"])
    assert text == "Hi" and "".join(pieces) == text and stopped
