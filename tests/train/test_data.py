"""Prompt template, row checks, split, tokenisation and loss masks, and per-step batch order (no Ray)."""

from __future__ import annotations

import json

import pytest

from mistral_qa.config import ModelConfig
from mistral_qa.data import (
    BUILTIN,
    IGNORE_INDEX,
    DataSourceError,
    clean_rows,
    collate,
    read_rows,
    split_rows,
    tokenize_row,
    tokenize_rows,
)
from mistral_qa.model import load_tokenizer
from mistral_qa.prompt import build_chat_prompt, build_prompt
from train.batches import micro_batch_indices


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(source="random", name="tiny-mistral"))


def test_prompt_with_and_without_input():
    no_input = build_prompt("Why sleep?")
    assert no_input.endswith("### Instruction:\nWhy sleep?\n\n### Response:\n") and "### Input" not in no_input
    with_input = build_prompt("Assess this.", "5 h screen time")
    assert "### Input:\n5 h screen time\n\n### Response:\n" in with_input


def test_chat_prompt_uses_last_user_turn_and_context():
    prompt = build_chat_prompt(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Phones and sleep?"},
        ]
    )
    assert "### Instruction:\nPhones and sleep?" in prompt and "Be brief.\nUser: Hi\nAssistant: Hello" in prompt
    with pytest.raises(ValueError):
        build_chat_prompt([{"role": "assistant", "content": "x"}])


def test_builtin_dataset_is_clean_and_large_enough():
    rows, report = clean_rows(read_rows("builtin:mobile_health"))
    assert len(rows) >= 150 and report.kept == report.total
    questions = read_rows(str(BUILTIN["builtin:mobile_health"].with_name("questions.jsonl")))
    assert len(questions) >= 50


def test_bad_rows_are_counted_by_reason(tmp_path):
    good = {"instruction": "Q", "input": "", "output": "A"}
    rows = [
        good,
        {"instruction": "Q"},
        {"instruction": "Q", "output": "  "},
        {"instruction": 3, "output": "A"},
        None,
        {"output": "A"},
        {"instruction": "", "output": "A"},
    ]
    kept, report = clean_rows(rows)
    assert len(kept) == 1
    assert dict(report.dropped) == {
        "missing_output": 1,
        "empty_output": 1,
        "non_text_instruction": 1,
        "unreadable": 1,
        "missing_instruction": 1,
        "empty_instruction": 1,
    }
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(good) + "\n")
    kept, report = clean_rows(read_rows(str(path)))
    assert len(kept) == 2 and report.dropped["unreadable"] == 1


def test_a_non_utf8_line_is_dropped_and_counted_and_the_rest_is_read(tmp_path):
    good = json.dumps({"instruction": "Q", "input": "", "output": "A"}).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + b"\n" + b'{"instruction": "bad \xff byte", "output": "A"}\n' + good + b"\n")
    kept, report = clean_rows(read_rows(str(path)))
    assert len(kept) == 2 and dict(report.dropped) == {"not_utf8": 1} and report.total == 3
    array = tmp_path / "d.json"
    array.write_bytes(b"[" + good + b', {"instruction": "\xff"}]')
    offset = array.read_bytes().index(b"\xff")
    with pytest.raises(DataSourceError, match=f"byte {offset} .* is not UTF-8"):
        read_rows(str(array))


def test_missing_sources_fail_clearly(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        read_rows(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(DataSourceError, match="not valid JSON"):
        read_rows(str(bad))


def test_split_is_deterministic_and_disjoint():
    rows = [{"instruction": str(i), "input": "", "output": "x"} for i in range(50)]
    train_a, eval_a = split_rows(rows, 10, seed=1)
    train_b, eval_b = split_rows(rows, 10, seed=1)
    assert train_a == train_b and eval_a == eval_b and len(eval_a) == 10
    assert not {r["instruction"] for r in train_a} & {r["instruction"] for r in eval_a}
    assert split_rows(rows, 10, seed=2)[1] != eval_a


def test_response_only_loss_masks_the_prompt(tokenizer):
    row = {"instruction": "Does screen time hurt sleep?", "input": "", "output": "It can delay sleep."}
    item = tokenize_row(tokenizer, row, 256, "response")
    n_prompt = len(tokenizer(build_prompt(row["instruction"]))["input_ids"])
    assert item["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert item["labels"][n_prompt:] == item["input_ids"][n_prompt:]
    assert item["input_ids"][0] == tokenizer.bos_token_id and item["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(item["input_ids"][n_prompt:-1]).strip() == row["output"]
    whole = tokenize_row(tokenizer, row, 256, "all")
    assert whole["labels"] == whole["input_ids"]


def test_over_long_rows_are_dropped_and_counted(tokenizer):
    rows = [
        {"instruction": "short", "input": "", "output": "ok"},
        {"instruction": "long " * 300, "input": "", "output": "x"},
    ]
    items, report = tokenize_rows(tokenizer, rows, 64, "response")
    assert len(items) == 1 and report.dropped["over_max_length"] == 1


def test_collate_pads_right_and_masks_pads():
    batch = collate(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [1, 5], "labels": [1, 5]}], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 5, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [1, 5, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_workers_get_disjoint_shards_and_every_row_once_per_epoch():
    n, world, bs = 24, 2, 3
    seen = []
    for step in range(1, 5):  # 4 steps x 2 workers x 3 rows = one epoch
        shards = [micro_batch_indices(n, 7, step, 0, 1, bs, world, rank) for rank in range(world)]
        assert not set(shards[0]) & set(shards[1])
        seen += shards[0] + shards[1]
    assert sorted(seen) == list(range(n))
    assert micro_batch_indices(n, 7, 3, 0, 1, bs, world, 1) == micro_batch_indices(n, 7, 3, 0, 1, bs, world, 1)
    assert micro_batch_indices(n, 7, 5, 0, 1, bs, world, 0) != micro_batch_indices(n, 7, 1, 0, 1, bs, world, 0)


def test_messages_and_sharegpt_rows_are_read_and_bad_ones_counted(tmp_path):
    turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    rows = [
        {"messages": [{"role": "system", "content": "S"}, *turns]},
        {"messages": turns[:1]},
        {"messages": [{"role": "robot", "content": "x"}, turns[1]]},
        {"messages": [turns[0], {"role": "assistant", "content": " "}]},
        {"messages": [turns[0], {"role": "assistant", "content": 7}]},
        {"messages": [turns[1]]},
        {"messages": []},
        {"instruction": "Q", "output": "A"},  # another format in a messages source
        {"messages": [turns[0], {"role": "assistant"}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    kept, report = clean_rows(read_rows(str(path)))
    assert kept == [{"messages": [{"role": "system", "content": "S"}, *turns]}] and report.format == "messages"
    assert dict(report.dropped) == {
        "not_ending_with_assistant": 1,
        "unknown_role": 1,
        "empty_content": 1,
        "non_text_content": 1,
        "no_user_turn": 1,
        "missing_messages": 2,
        "bad_turn": 1,
    }
    sharegpt = [
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
            ]
        },
        {"conversations": [{"from": "bot", "value": "A"}]},
    ]
    kept, report = clean_rows(sharegpt)
    assert kept == [{"messages": [{"role": "system", "content": "S"}, *turns]}]
    assert report.format == "conversations" and dict(report.dropped) == {"unknown_role": 1}
    assert "1/2 conversations rows kept" in report.summary()


def test_messages_rows_train_through_the_alpaca_template(tokenizer, tmp_path):
    """With the seed's template a conversation's last answer is learnt, earlier turns fold into the input."""
    from train.config import DataConfig
    from train.prepare import prepare_data

    conversation = [
        {"role": "user", "content": "Does screen time hurt sleep?"},
        {"role": "assistant", "content": "It can."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Blue light."},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": conversation}) for _ in range(4)) + "\n")
    train, evals, report = prepare_data(DataConfig(source=str(path), eval_size=1), tokenizer)
    assert len(train) == 3 and len(evals) == 1 and report.format == "messages"
    item = train[0]
    learnt = [t for t, label in zip(item["input_ids"], item["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(learnt) == "Blue light.</s>"
    assert "Assistant: It can." in tokenizer.decode(item["input_ids"])
