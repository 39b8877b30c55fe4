"""Next-action evaluation: given a trajectory up to an assistant turn, does the model take the
reference's action (the same tool calls with the same arguments, or no call and the same answer)?

Prompts are training's own: each row is encoded exactly as for training (sftcore.masking, so the
same template handling, fallbacks, reasoning and --overflow window for turns whose history does not
fit), and the prompt of a turn is its sample's tokens before the turn's trained span. The tool-call
syntax is the template's own, learnt from how it renders a probe call (`tool_call_syntax`):
- a JSON object with "name" and "arguments" or "parameters" (Qwen, Hermes, Llama-3.1, Mistral's
  list, and sftcore's `<tool_call>` JSON fallback for templates without tool calls);
- the name, then a JSON object of arguments (DeepSeek, gpt-oss);
- GLM's `<arg_key>`/`<arg_value>` pairs.

The metrics (``summarize``) are over evaluated turns; the report keys are the ones the README lists.
"""

from __future__ import annotations

import json
import logging
import random
import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sftcore.attention import unpacked_attention
from sftcore.data import THINK_CLOSE, THINK_OPEN, DataError, parse_row
from sftcore.masking import FULL_HISTORY, EncodeOptions, encode_conversation
from sftcore.sources import read_jsonl
from sftcore.templates import adapt_to_template, template_support, tokenizer_key

logger = logging.getLogger(__name__)

_PROBE_NAME, _PROBE_KEY, _PROBE_VALUE, _PROBE_ANSWER = "probe_tool", "probe_key", "probe value 7", "Probe answer 42."
_PROBE_ROW = {
    "input": json.dumps([{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Do it."}]),
    "output": [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_1", "function": {"name": _PROBE_NAME, "arguments": {_PROBE_KEY: _PROBE_VALUE}}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
        {"role": "assistant", "content": _PROBE_ANSWER},
    ],
}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] | None  # None: the model wrote arguments that do not parse as a JSON object


@dataclass(frozen=True)
class ToolCallSyntax:
    """How a template writes tool calls, and where the answer starts in a turn without them."""

    kind: str  # "json", "name_json" or "xml_args"
    anchor: str = ""  # name_json: the text right before the name
    between: str = ""  # name_json: the text between the name and the arguments
    answer_prefix: str = ""  # what precedes the content in an answer turn (gpt-oss's final channel)
    stop_ids: tuple[int, ...] = ()  # the tokens a turn ends with (tool call or answer), and EOS


@dataclass
class EvalTurn:
    """One assistant turn to predict."""

    line: int  # the row's line number (1-based)
    turn: int  # ordinal among the row's evaluated turns
    prompt_ids: list[int]
    reference_text: str  # the turn as training trains it (decoded, special tokens kept)
    reference_calls: list[ToolCall]
    reference_answer: str  # the turn's text content
    last: bool  # the row's last assistant turn
    history: str  # full, window or window_no_system (sftcore.masking)


@dataclass
class RowTurns:
    turns: list[EvalTurn] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows or turns not evaluated


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _calls_of(messages: list[dict[str, Any]]) -> list[ToolCall]:
    return [
        ToolCall(c["function"]["name"], c["function"]["arguments"]) for m in messages for c in m.get("tool_calls", [])
    ]


def row_turns(row: dict[str, Any], line: int, tokenizer: Any, options: EncodeOptions) -> RowTurns:
    """The evaluated turns of one row: every trained assistant turn that fits options.max_seq_length
    with its prompt (a shortened history where training would use one)."""
    conv = parse_row(row, options.train_on, options.data_format)
    tc = adapt_to_template(conv, template_support(tokenizer))
    encoded = encode_conversation(conv, tokenizer, options)
    turn_messages = [k for k, trained in enumerate(tc.trained) if trained]
    last_assistant = max(k for k, m in enumerate(tc.messages) if m["role"] == "assistant")
    result = RowTurns()
    for sample in encoded.samples:
        for ordinal, (first, end) in zip(sample.turns, sample.spans, strict=True):
            message = turn_messages[ordinal]
            sources = [m for m in tc.sources[message] if m["role"] == "assistant"]
            result.turns.append(
                EvalTurn(
                    line=line,
                    turn=ordinal,
                    prompt_ids=sample.input_ids[:first],
                    reference_text=_decode(tokenizer, sample.input_ids[first:end]),
                    reference_calls=_calls_of(sources),
                    reference_answer="\n\n".join(m["content"] for m in sources if m.get("content")),
                    last=message == last_assistant,
                    history=sample.history,
                )
            )
    if encoded.dropped_turns:
        result.skipped["turn_too_long"] = encoded.dropped_turns
    result.turns.sort(key=lambda t: t.turn)
    return result


_syntaxes: dict[tuple, ToolCallSyntax] = {}


def tool_call_syntax(tokenizer: Any) -> ToolCallSyntax:
    """The template's tool-call syntax, learnt once per template from its render of a probe call (and
    checked: parsing the probe turn must give back the probe call)."""
    key = (tokenizer.chat_template, *tokenizer_key(tokenizer))
    if key in _syntaxes:
        return _syntaxes[key]
    probe = row_turns(_PROBE_ROW, 0, tokenizer, EncodeOptions())
    call_text, answer_text = probe.turns[0].reference_text, probe.turns[1].reference_text
    stops = {tokenizer(text, add_special_tokens=False)["input_ids"][-1] for text in (call_text, answer_text)}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    answer_prefix = _strip_reasoning(answer_text).split(_PROBE_ANSWER)[0]
    common = {"answer_prefix": answer_prefix, "stop_ids": tuple(sorted(stops))}
    candidates = [ToolCallSyntax("xml_args", **common)] if "<arg_key>" in call_text else []
    candidates.append(ToolCallSyntax("json", **common))
    name_at = call_text.find(_PROBE_NAME)
    args_at = call_text.find("{", name_at)
    if name_at >= 0 and args_at >= 0:
        before = call_text[:name_at]
        # the anchor starts at the last special token before the name (a second call repeats that much)
        specials = [before.rfind(t) for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab())]
        start = max([at for at in specials if at >= 0], default=max(0, len(before) - 24))
        anchor = before[start:] or before[-24:]
        between = call_text[name_at + len(_PROBE_NAME) : args_at]
        candidates.append(ToolCallSyntax("name_json", anchor=anchor, between=between, **common))
    expected = [ToolCall(_PROBE_NAME, {_PROBE_KEY: _PROBE_VALUE})]
    syntax = next((s for s in candidates if parse_tool_calls(call_text, s) == expected), None)
    if syntax is None:
        raise DataError(
            f"cannot learn this chat template's tool-call syntax: its probe call renders as {call_text!r:.300}",
            "template_error",
        )
    _syntaxes[key] = syntax
    return syntax


def _strip_reasoning(text: str) -> str:
    return re.sub(re.escape(THINK_OPEN) + ".*?" + re.escape(THINK_CLOSE), "", text, flags=re.DOTALL)


def _as_arguments(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


_DECODER = json.JSONDecoder()
_NAME_FIELD = re.compile(r'\{\s*"name"\s*:\s*"([^"]+)"')


def _json_calls(text: str) -> list[ToolCall]:
    """Every {"name", "arguments"/"parameters"} object (alone or in a list) in the text; an object that
    starts like one but does not parse is a call with invalid arguments."""
    calls, at = [], 0
    while True:
        at = min((i for i in (text.find("{", at), text.find("[", at)) if i >= 0), default=-1)
        if at < 0:
            return calls
        try:
            value, end = _DECODER.raw_decode(text, at)
        except json.JSONDecodeError:
            broken = _NAME_FIELD.match(text, at)
            if broken:
                calls.append(ToolCall(broken.group(1), None))
                at = broken.end()
            else:
                at += 1
            continue
        found = [
            ToolCall(item["name"], _as_arguments(item.get("arguments", item.get("parameters", {}))))
            for item in (value if isinstance(value, list) else [value])
            if isinstance(item, dict) and isinstance(item.get("name"), str)
        ]
        calls += found
        at = end if found else at + 1


def _xml_calls(text: str) -> list[ToolCall]:
    calls = []
    for name, body in re.findall(r"<tool_call>\s*([^\s<]+)\s*(.*?)(?:</tool_call>|$)", text, flags=re.DOTALL):
        arguments: dict[str, Any] = {}
        for key, value in re.findall(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", body, re.DOTALL):
            try:
                arguments[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                arguments[key.strip()] = value  # GLM writes string values bare
        calls.append(ToolCall(name, arguments))
    return calls


def _name_json_calls(text: str, syntax: ToolCallSyntax) -> list[ToolCall]:
    calls = []
    pattern = re.escape(syntax.anchor) + r"([^\s<>{}\"]+?)" + re.escape(syntax.between)
    for match in re.finditer(pattern, text):
        try:
            value, _ = _DECODER.raw_decode(text, match.end())
        except json.JSONDecodeError:
            value = None
        calls.append(ToolCall(match.group(1), value if isinstance(value, dict) else None))
    return calls


def parse_tool_calls(text: str, syntax: ToolCallSyntax) -> list[ToolCall]:
    """The tool calls in a generated turn (reasoning left out)."""
    text = _strip_reasoning(text)
    if syntax.kind == "xml_args":
        return _xml_calls(text)
    if syntax.kind == "name_json":
        return _name_json_calls(text, syntax)
    return _json_calls(text)


def answer_text(text: str, syntax: ToolCallSyntax, tokenizer: Any) -> str:
    """A generated turn's answer: after reasoning and the template's answer prefix, before the stop."""
    text = _strip_reasoning(text)
    if syntax.answer_prefix.strip() and syntax.answer_prefix in text:
        text = text.split(syntax.answer_prefix, 1)[1]
    for stop in syntax.stop_ids:
        text = text.split(tokenizer.convert_ids_to_tokens(stop), 1)[0]
    return text.strip()


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def _pairs(calls: list[ToolCall]) -> list[tuple[str, str, str]]:
    return sorted(
        (c.name, key, json.dumps(value, sort_keys=True)) for c in calls for key, value in (c.arguments or {}).items()
    )


def _f1(reference: list, generated: list) -> float:
    if not reference and not generated:
        return 1.0
    remaining, hits = list(generated), 0
    for item in reference:
        if item in remaining:
            remaining.remove(item)
            hits += 1
    return 2 * hits / (len(reference) + len(generated))


def score_turn(turn: EvalTurn, generated: str, stopped: bool, syntax: ToolCallSyntax, tokenizer: Any) -> dict:
    """The per-turn record (one line of --output_jsonl)."""
    calls = parse_tool_calls(generated, syntax)
    reference = turn.reference_calls
    names = sorted(c.name for c in calls) == sorted(c.name for c in reference)

    def canonical(cs: list[ToolCall]) -> list[str]:
        return sorted(json.dumps([c.name, c.arguments], sort_keys=True) for c in cs)

    record = {
        "line": turn.line,
        "turn": turn.turn,
        "prompt_tokens": len(turn.prompt_ids),
        "history": turn.history,
        "reference": turn.reference_text,
        "generation": generated,
        "stopped": stopped,
        "reference_calls": [[c.name, c.arguments] for c in reference],
        "generated_calls": [[c.name, c.arguments] for c in calls],
        "arguments_valid": [c.arguments is not None for c in calls],
    }
    if reference:
        record |= {
            "tool_name_match": names,
            "arguments_exact_match": names and canonical(calls) == canonical(reference),
            "argument_f1": _f1(_pairs(reference), _pairs(calls)),
        }
    else:
        record["no_call_match"] = not calls
    if turn.last and not reference and turn.reference_answer:
        answer = answer_text(generated, syntax, tokenizer)
        record["final_answer_match"] = normalize_answer(answer) == normalize_answer(turn.reference_answer)
    return record


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[dict]) -> dict[str, Any]:
    """The report: the README's keys, a per-tool breakdown (by the reference's first tool name)."""
    with_calls = [r for r in records if r["reference_calls"]]
    without = [r for r in records if not r["reference_calls"]]
    valid = [v for r in records for v in r["arguments_valid"]]
    finals = [r["final_answer_match"] for r in records if "final_answer_match" in r]
    per_tool: dict[str, list[dict]] = defaultdict(list)
    for r in with_calls:
        per_tool[r["reference_calls"][0][0]].append(r)
    return {
        "turns": len(records),
        "tool_call_turns": len(with_calls),
        "tool_name_accuracy": _mean([r["tool_name_match"] for r in with_calls]),
        "arguments_exact_match": _mean([r["arguments_exact_match"] for r in with_calls]),
        "arguments_valid_json": _mean(valid),
        "argument_f1": _mean([r["argument_f1"] for r in with_calls]),
        "no_call_accuracy": _mean([r["no_call_match"] for r in without]),
        "final_answer_match": _mean(finals),
        "stop_rate": _mean([r["stopped"] for r in records]),
        "per_tool": {
            name: {
                "turns": len(rs),
                "tool_name_accuracy": _mean([r["tool_name_match"] for r in rs]),
                "arguments_exact_match": _mean([r["arguments_exact_match"] for r in rs]),
                "argument_f1": _mean([r["argument_f1"] for r in rs]),
            }
            for name, rs in sorted(per_tool.items())
        },
    }


Generator = Callable[[list[EvalTurn]], list[tuple[str, bool]]]


def hf_generator(
    model: Any, tokenizer: Any, syntax: ToolCallSyntax, max_new_tokens: int, batch_tokens: int
) -> Generator:
    """Greedy, batched generation with transformers (KV cache), prompts left-padded in batches of
    similar length holding about batch_tokens tokens; each result is (text, stopped on a stop token)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else syntax.stop_ids[0]
    device = next(model.parameters()).device

    def generate(turns: list[EvalTurn]) -> list[tuple[str, bool]]:
        order = sorted(range(len(turns)), key=lambda i: len(turns[i].prompt_ids))
        results: list[tuple[str, bool]] = [("", False)] * len(turns)
        start = 0
        while start < len(order):
            longest = len(turns[order[start]].prompt_ids) + max_new_tokens
            size = 1
            while start + size < len(order) and (size + 1) * (
                len(turns[order[start + size]].prompt_ids) + max_new_tokens
            ) <= max(batch_tokens, longest):
                size += 1
            batch = [turns[i] for i in order[start : start + size]]
            width = max(len(t.prompt_ids) for t in batch)
            ids = torch.tensor([[pad] * (width - len(t.prompt_ids)) + t.prompt_ids for t in batch], device=device)
            mask = torch.tensor(
                [[0] * (width - len(t.prompt_ids)) + [1] * len(t.prompt_ids) for t in batch], device=device
            )
            with torch.no_grad(), unpacked_attention(model):
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=list(syntax.stop_ids),
                    pad_token_id=pad,
                )
            for i, row in zip(order[start : start + size], out[:, width:].tolist(), strict=True):
                stop_at = next((n for n, t in enumerate(row) if t in syntax.stop_ids), None)
                kept = row if stop_at is None else row[: stop_at + 1]
                results[i] = (_decode(tokenizer, kept), stop_at is not None)
            start += size
        return results

    return generate


def collect_turns(
    path: str, tokenizer: Any, options: EncodeOptions, rows: range | None, max_rows: int | None, seed: int
) -> tuple[list[EvalTurn], Counter]:
    """The turns of the file's rows (0-based indices among its non-blank lines in ``rows``; a seeded
    sample of max_rows of them), and counts: rows and turns not evaluated, by reason, and turns whose
    prompt has a shortened history (as training would shorten it: --overflow window)."""
    lines = [r for r in read_jsonl(path) if r.row is not None or r.error is not None]
    chosen = list(rows if rows is not None else range(len(lines)))
    chosen = [i for i in chosen if i < len(lines)]
    if max_rows is not None and max_rows < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, max_rows))
    turns, skipped = [], Counter()
    for index in chosen:
        result = lines[index]
        try:
            if result.error is not None:
                raise result.error
            found = row_turns(result.row, result.line, tokenizer, options)
        except DataError as e:
            skipped[f"rows_not_evaluated: {e.reason}"] += 1
            logger.warning("%s:%d: not evaluated: %s", result.file, result.line, e)
            continue
        turns += found.turns
        for reason, count in found.skipped.items():
            skipped[f"turns_not_evaluated: {reason}"] += count
        skipped["turns_with_shortened_history"] += sum(t.history != FULL_HISTORY for t in found.turns)
    return turns, +skipped


def evaluate_turns(turns: list[EvalTurn], generate: Generator, syntax: ToolCallSyntax, tokenizer: Any) -> list[dict]:
    """The per-turn records, in the turns' order."""
    generations = generate(turns)
    return [
        score_turn(turn, text, stopped, syntax, tokenizer)
        for turn, (text, stopped) in zip(turns, generations, strict=True)
    ]
