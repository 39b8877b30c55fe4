"""The token contract as an independent oracle for the tests.

For every trained turn k of a row (sftcore.masking's docstring states the contract):
- the sample's tokens before the turn are ``tokenizer(apply_chat_template(messages[:k],
  add_generation_prompt=True, tools=...), add_special_tokens=False)``: the inference prompt, rendered and
  tokenized here on its own, in the template's default mode, its thinking mode for a turn with
  reasoning, or its mode without reasoning (named where used);
- the trained tokens are the turn's text tokenized on its own, the text found independently of
  sftcore: the last ``{% generation %}`` block of a hand-tagged twin template, or the template's own
  markers scanned in its render through the turn (``target`` functions below);
- nothing else is trained, every trained turn is in exactly one sample, and turns share a sample exactly
  where each one's prompt starts with the one before and its tokens.

The messages are the row after sftcore's documented adaptations to the template
(``sftcore.templates.adapt_to_template``); each adaptation a row needed is named in the result, so a test
can say which ones a family relies on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from sftcore import IGNORE_INDEX
from sftcore.data import THINK_CLOSE, THINK_OPEN, parse_row
from sftcore.masking import FULL_HISTORY, EncodeOptions, encode_conversation
from sftcore.templates import TemplateConversation, adapt_to_template, render, template_support

# (tokenizer, adapted conversation, index of the turn's message, thinking mode) -> the text the model writes
Target = Callable[[Any, TemplateConversation, int, "bool | None"], str]


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tagged_target(tagged_template: str) -> Target:
    """The turn's text: the last {% generation %} block of the tagged twin's render through the turn,
    found by transformers' own assistant-mask machinery."""

    def target(tokenizer: Any, tc: TemplateConversation, message: int, thinking: bool | None) -> str:
        out = tokenizer.apply_chat_template(
            tc.messages[: message + 1],
            tools=tc.tools,
            chat_template=tagged_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        mask, tokens = list(out["assistant_masks"]), list(out["input_ids"])
        end = max(i for i, m in enumerate(mask) if m) + 1
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        return tokenizer.decode(tokens[start:end])

    return target


def scanned_target(region: str, next_role_stops: dict[str, str] | None = None) -> Target:
    """The turn's text: its region of the template's own markers (``region``'s group 1) in the template's
    render through the turn, the one after the regions of the conversation before it. ``next_role_stops``:
    turns end with no end-of-turn token and the model stops by writing the token that opens the next
    message (GLM): that token, by the next message's role (a user message where the row ends)."""

    def target(tokenizer: Any, tc: TemplateConversation, message: int, thinking: bool | None) -> str:
        text = render(tokenizer, tc.messages[: message + 1], tc.tools, add_generation_prompt=False, thinking=thinking)
        before = render(tokenizer, tc.messages[:message], tc.tools, False, thinking) if message else ""
        turn = list(re.finditer(region, text, re.DOTALL))[len(re.findall(region, before, re.DOTALL))].group(1)
        if next_role_stops:
            following = tc.messages[message + 1]["role"] if message + 1 < len(tc.messages) else "user"
            turn = turn.rstrip() + next_role_stops[following]
        return turn

    return target


CHATML = r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)"
# template -> (the model-written region of an assistant turn in the template's own render, next_role_stops)
REGIONS = {
    "Qwen-Qwen3-0.6B": (CHATML, None),
    "Qwen-QwQ-32B": (r"<\|im_start\|>assistant\n(?:<think>\n(?:</think>)?)?(.*?<\|im_end\|>)", None),
    "qwen25": (CHATML, None),
    # after tool output DeepSeek-R1 renders the turn without an assistant header
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": (
        r"(?:<｜Assistant｜>(?:<think>\n(?:</think>)?)?|<｜tool▁outputs▁end｜>)(.*?<｜end▁of▁sentence｜>)",
        None,
    ),
    "deepseek-ai-DeepSeek-V3.1": (
        r"(?:<｜Assistant｜>(?:<think></think>|<think>)?|<｜tool▁output▁end｜>(?!<｜tool▁output▁begin｜>))"
        r"(.*?<｜end▁of▁sentence｜>)",
        None,
    ),
    "meta-llama-Llama-3.1-8B-Instruct": (
        r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n(.*?<\|eot_id\|>)",
        None,
    ),
    "mistralai-Mistral-Nemo-Instruct-2407": (
        r"(?:\[/INST\]|\[/TOOL_RESULTS\])((?:(?!\[TOOL_RESULTS\]|\[INST\]).)*?</s>)",
        None,
    ),
    "google-gemma-2-2b-it": (r"<start_of_turn>model\n(.*?<end_of_turn>)", None),
    "microsoft-Phi-3.5-mini-instruct": (r"<\|assistant\|>\n(.*?<\|end\|>)", None),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": (CHATML, None),
    "openai-gpt-oss-120b": (
        r"<\|start\|>assistant(.*?(?:<\|return\|>|<\|call\|>|<\|end\|>(?!<\|start\|>assistant)))",
        None,
    ),
    "GLM-4.6": (
        r"<\|assistant\|>(.*?)(?=<\|user\|>|<\|observation\|>|<\|assistant\|>|<\|system\|>|$)",
        {"user": "<|user|>", "tool": "<|observation|>", "assistant": "<|assistant|>", "system": "<|system|>"},
    ),
    "ibm-granite-granite-3.3-2B-Instruct": (
        r"<\|start_of_role\|>assistant<\|end_of_role\|>(.*?<\|end_of_text\|>)",
        None,
    ),
    "HuggingFaceTB-SmolLM3-3B": (CHATML, None),
    # a tool-call turn ends with its action block: the template gives it no end-of-turn token
    "CohereForAI-c4ai-command-r-plus-tool_use": (
        r"<\|START_OF_TURN_TOKEN\|><\|CHATBOT_TOKEN\|>(.*?(?:<\|END_OF_TURN_TOKEN\|>|\]```))",
        None,
    ),
}


def template_target(template: str) -> Target:
    region, next_role_stops = REGIONS[template]
    return scanned_target(region, next_role_stops)


def _prompt(tokenizer: Any, tc: TemplateConversation, message: int, thinking: bool | None) -> str:
    return render(tokenizer, tc.messages[:message], tc.tools, add_generation_prompt=True, thinking=thinking)


def _with_opened_think_block(prompt: str, text: str, reasoning: str | None) -> tuple[str, bool]:
    """Where the prompt opens a think block the turn's render does not show (DeepSeek-R1 strips reasoning;
    an always-thinking prompt before a turn without any), the model writes its reasoning (or none) there
    and closes the block: (text, whether that happened)."""
    if not prompt.rstrip().endswith(THINK_OPEN) or (reasoning and reasoning.strip() in text):
        return text, False
    if text.lstrip().startswith(THINK_CLOSE):
        return (reasoning or "") + text, True
    return (reasoning or "") + (f"\n{THINK_CLOSE}\n\n" if prompt.endswith("\n") else THINK_CLOSE) + text, True


def row_adaptations(tc: TemplateConversation, support: Any, conv: Any) -> set[str]:
    """The documented adaptations (sftcore.templates) this row needed under this template."""
    messages = conv.messages
    calls = any(m.get("tool_calls") for m in messages)
    named = {
        "tool_calls_written_as_text": calls and not support.tool_calls,
        "tool_arguments_as_json_string": calls and support.tool_calls and support.tool_arguments == "json",
        "tool_call_ids_of_nine_characters": calls and support.tool_call_ids,
        "tool_results_as_user_messages": any(m["role"] == "tool" for m in messages) and not support.tool_role,
        "tools_in_the_system_prompt": bool(conv.tools) and not support.tools,
        "system_prompt_in_the_first_user_message": messages[0]["role"] == "system" and not support.system_role,
        "same_role_messages_merged": any(len(s) > 1 and len({m["role"] for m in s}) == 1 for s in tc.sources),
    }
    return {name for name, needed in named.items() if needed}


def check_token_contract(
    tokenizer: Any, row: dict, target: Target, options: EncodeOptions | None = None
) -> dict[int, set[str]]:
    """Assert the token contract for every trained turn of the row's full-history samples; returns, per
    trained turn (ordinal), the adaptations it needed (row-level ones included)."""
    options = options or EncodeOptions()
    conv = parse_row(row, options.train_on)
    support = template_support(tokenizer)
    tc = adapt_to_template(conv, support)
    encoded = encode_conversation(conv, tokenizer, options)
    trained = [k for k, is_trained in enumerate(tc.trained) if is_trained]
    common = row_adaptations(tc, support, conv)
    seen: dict[int, set[str]] = {}
    expected: dict[int, list[int]] = {}  # ordinal -> prompt + target tokens (for the partition check)
    for sample in encoded.samples:
        inside = {i for first, last in sample.spans for i in range(first, last)}
        assert all(
            (label == token) if i in inside else (label == IGNORE_INDEX)
            for i, (token, label) in enumerate(zip(sample.input_ids, sample.labels, strict=True))
        ), "trained exactly the turns' tokens"
        for ordinal, (first, last) in zip(sample.turns, sample.spans, strict=True):
            assert ordinal not in seen, f"assistant turn {ordinal + 1} is trained twice"
            message = trained[ordinal]
            reasoning = tc.reasoning[message]
            names = set(common)
            seen[ordinal] = names
            if sample.history != FULL_HISTORY:
                names.add("history_shortened")
                continue
            # its thinking mode for a turn with reasoning; else the default mode, or the one without reasoning
            for mode in [True] if reasoning is not None else [None, False]:
                prompt_text = _prompt(tokenizer, tc, message, mode)
                prompt = ids(tokenizer, prompt_text)
                if prompt == sample.input_ids[:first]:
                    break
            else:
                raise AssertionError(f"assistant turn {ordinal + 1}: the tokens before it are not its inference prompt")
            if mode is False:
                names.add("mode_without_reasoning")
            text, closed = _with_opened_think_block(prompt_text, target(tokenizer, tc, message, mode), reasoning)
            if closed:
                names.add("think_block_closed_by_the_turn")
            eos = tokenizer.eos_token
            if eos and eos in text[:-1]:
                text = text[: text.index(eos) + len(eos)]
                names.add("turn_ends_at_eos")
            wanted = ids(tokenizer, text)
            got = sample.input_ids[first:last]
            assert got == wanted, (
                f"assistant turn {ordinal + 1}: trained {tokenizer.decode(got)!r}, the contract says "
                f"{tokenizer.decode(wanted)!r}"
            )
            expected[ordinal] = prompt + wanted
    assert sorted(seen) == list(range(len(trained))), "every trained turn is in a sample"
    # Turns share a sample exactly where the later one's prompt continues the earlier one.
    where = {ordinal: n for n, sample in enumerate(encoded.samples) for ordinal in sample.turns}
    for ordinal in range(len(trained) - 1):
        if ordinal in expected and ordinal + 1 in expected:
            joined = expected[ordinal + 1][: len(expected[ordinal])] == expected[ordinal]
            assert joined == (where[ordinal] == where[ordinal + 1]), f"turns {ordinal + 1}-{ordinal + 2}"
    return seen


# --- rows with what the real data lacks, made from real rows (deterministically) ---


def _assistants(row: dict) -> list[dict]:
    return [m for m in row["output"] if isinstance(m, dict) and m.get("role") == "assistant"]


def edge_rows(tau: list[dict], fire: list[dict]) -> dict[str, dict]:
    """Real rows turned into the shapes the contract must hold for: reasoning on every turn, answers that
    start with spaces or a newline, parallel tool calls (two consecutive calls merged into one message), a
    tools list."""
    rows = {}
    reasoning = json.loads(json.dumps(tau[0]))
    for n, message in enumerate(_assistants(reasoning)):
        message["reasoning_content"] = f"Step {n + 1}: check what the policy allows before acting."
    rows["reasoning"] = reasoning
    spaced = json.loads(json.dumps(fire[0]))
    for n, message in enumerate(_assistants(spaced)):
        message["content"] = ("\n" if n % 2 else "    ") + message["content"]
    rows["leading_whitespace"] = spaced
    parallel = json.loads(json.dumps(next(r for r in tau if _has_consecutive_calls(r))))
    parallel["output"] = _merge_consecutive_calls(parallel["output"])
    rows["parallel_tool_calls"] = parallel
    with_tools = json.loads(json.dumps(tau[1]))
    names = sorted({c["function"]["name"] for m in _assistants(with_tools) for c in m.get("tool_calls") or []})
    with_tools["tools"] = [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": f"The airline's {name.replace('_', ' ')} tool.",
                "parameters": {"type": "object", "properties": {}, "required": []},
            },
        }
        for name in names
    ]
    rows["tools_list"] = with_tools
    return rows


def _has_consecutive_calls(row: dict) -> bool:
    return _merge_consecutive_calls(row["output"]) != row["output"]


def _merge_consecutive_calls(output: list[dict]) -> list[dict]:
    """[call A, result A, call B, result B] -> [calls A and B, result A, result B] (the first such pair)."""
    for i in range(len(output) - 3):
        a, ra, b, rb = output[i : i + 4]
        if (
            a.get("tool_calls")
            and b.get("tool_calls")
            and ra["role"] == rb["role"] == "tool"
            and not a.get("content")
            and not b.get("content")
        ):
            merged = dict(a, tool_calls=a["tool_calls"] + b["tool_calls"])
            return output[:i] + [merged, ra, rb] + output[i + 4 :]
    return output
