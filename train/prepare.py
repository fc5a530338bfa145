"""From a data source to tokenised train and eval items, with one report of what was dropped."""

from __future__ import annotations

from mistral_qa.data import DataReport, DataSourceError, clean_rows, read_rows, split_rows, tokenize_rows
from mistral_qa.templates import PromptTemplate, TemplateError, load_template

from .config import DataConfig


def data_template(cfg: DataConfig, tokenizer) -> PromptTemplate:
    """data.template over the base model's tokenizer; a template it cannot render fails here, before
    any row is read (launch.check_data runs this on the driver, before Ray Train starts)."""
    try:
        return load_template(cfg.template, tokenizer)
    except TemplateError as err:
        raise DataSourceError(str(err)) from None


def prepare_data(cfg: DataConfig, tokenizer) -> tuple[list[dict], list[dict], DataReport]:
    template = data_template(cfg, tokenizer)
    rows = read_rows(cfg.source)
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    good, report = clean_rows(rows)
    train_rows, eval_rows = split_rows(good, cfg.eval_size, cfg.split_seed)
    train_items, train_report = tokenize_rows(tokenizer, train_rows, cfg.max_length, cfg.loss_on, template)
    eval_items, eval_report = tokenize_rows(tokenizer, eval_rows, cfg.max_length, cfg.loss_on, template)
    report.dropped.update(train_report.dropped)
    report.dropped.update(eval_report.dropped)
    report.kept = len(train_items) + len(eval_items)
    if not train_items or not eval_items:
        split = "training" if not train_items else "evaluation"
        raise DataSourceError(
            f"no {split} rows left in data.source {cfg.source!r}: {report.summary()}; "
            f"over_max_length counts rows longer than data.max_length={cfg.max_length} tokens"
        )
    return train_items, eval_items, report
