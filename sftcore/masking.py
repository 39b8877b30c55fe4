"""Rows into training samples whose labels mark exactly the tokens the model writes, under the model's
own chat template (no ``{% generation %}`` tags needed), by token id.

The token contract, for every trained turn k:

- the sample's tokens before the turn are ``tokenizer(apply_chat_template(messages[:k],
  add_generation_prompt=True, tools=...), add_special_tokens=False)``: the inference prompt, tokenized
  on its own (after the documented adaptations of sftcore.templates);
- the trained tokens are the turn's text tokenized on its own: what the model generates after that
  prompt, through its stop token (sftcore.turns says what that text is);
- nothing else is trained. A prompt token is never trained, even where the one-string render would
  merge it with the turn's first characters (QwQ's ``<think>\n`` before ``\n</think>``), or where a
  marker swallows the whitespace after it (Phi's ``<|assistant|>``).

Turns share a sample where each one's prompt starts with the tokens of the sample so far (templates
that keep earlier turns verbatim, tokenizers that split them alike once more text follows): the row is
then one sample. Where the template rewrites history (Qwen3 keeps reasoning only after the last user
message; gpt-oss ends only the newest final answer with ``<|return|>``; Mistral moves the system
prompt into the last user turn) or the tokenizer splits an earlier turn differently inside the longer
text, the next turn starts a sample of its own, so that every turn is trained in exactly the tokens it
has at inference and in no other. ``history_rewrites="refuse"`` refuses such rows instead. The token
overhead is counted: ``row_tokens`` (the row as one sequence) against the samples' tokens.

Length (``max_seq_length``): turns whose sample does not fit follow ``overflow``: ``window`` trains
them with the system prompt, the first user message and recent history (without the system prompt
if even that does not fit); ``truncate`` drops them. A shortened history is shared by consecutive
turns, so that their samples share one prefix (one prefix tree, or one sample where the template
keeps history): it resumes where the first of them keeps ``1 - window_slack`` of the room for recent
history, and the turns after it use the same start while they fit (``window_slack`` 0: each turn
the most recent history that fits, alone). A turn that does not fit on
its own is dropped. All of it is counted, and text a template drops (e.g. Llama-3's assistant text
beside a tool call), or tool calls written in sftcore's fallback format for a template that renders
none, is reported by reason: nothing is lost or changed silently.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from typing import Any

from sftcore.data import Conversation, DataError, parse_row
from sftcore.templates import (
    TemplateConversation,
    TemplateSupport,
    adapt_to_template,
    template_support,
    tokenizer_key,
)
from sftcore.turns import Turn, common_prefix_length, dropped_by_template, render_turn

IGNORE_INDEX = -100
HISTORY_REWRITES = ("split", "refuse")
OVERFLOW = ("window", "truncate")
FULL_HISTORY, WINDOW, WINDOW_NO_SYSTEM = "full", "window", "window_no_system"
_WINDOW_OMISSIONS = {
    WINDOW: ("history_shortened", "is trained with the system prompt, the first user message and recent history"),
    WINDOW_NO_SYSTEM: ("system_prompt_left_out", "is trained without the system prompt, which alone does not fit"),
}


@dataclass(frozen=True)
class EncodeOptions:
    """How rows become training sequences (set from TrainConfig: --max_seq_length, --history_rewrites,
    --overflow, --train_on, --window_slack, --tree_packing, --data_format). ``trees``: a row's samples
    are then merged into prefix trees (sftcore.trees); the samples themselves do not depend on it."""

    max_seq_length: int | None = None
    history_rewrites: str = "split"
    overflow: str = "window"
    train_on: str = "all"
    window_slack: float = 0.5
    trees: bool = False
    data_format: str = "auto"  # the rows' shape (sftcore.data.row_format)


@dataclass
class Sample:
    """One training sequence: input_ids, and labels that are -100 except on trained tokens."""

    input_ids: list[int]
    labels: list[int]
    turns: list[int]  # trained turns, as ordinals among the row's trained turns (0-based)
    history: str  # FULL_HISTORY, WINDOW (recent history that fits) or WINDOW_NO_SYSTEM
    reasoning: list[tuple[int, int]] = field(default_factory=list)  # [first, last) token ranges of trained reasoning
    spans: list[tuple[int, int]] = field(default_factory=list)  # [first, last) tokens of each turn, as in turns


@dataclass
class EncodedRow:
    samples: list[Sample]
    row_tokens: int  # tokens of the row as one sequence through its last trained turn
    trained_turns: int
    windowed_turns: int  # trained with a shortened history (--overflow window)
    dropped_turns: int  # turns that fit nowhere (not trained)
    # (reason, what): what of the row is not in the samples as the row has it: a turn too long to fit, the
    # history left out so that a turn fits, text the template drops
    omissions: list[tuple[str, str]]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.samples)

    @property
    def num_trained(self) -> int:
        return sum(sum(label != IGNORE_INDEX for label in s.labels) for s in self.samples)

    def stats(self) -> dict[str, Any]:
        """The counts LineCounts.add_row takes."""
        return {
            "samples": len(self.samples),
            "tokens": self.num_tokens,
            "trained_tokens": self.num_trained,
            "row_tokens": self.row_tokens,
            "trained_turns": self.trained_turns,
            "windowed_turns": self.windowed_turns,
            "dropped_turns": self.dropped_turns,
            "omissions": self.omissions,
        }


@dataclass
class _Tokenized:
    ids: list[int]
    starts: list[int]  # each token's first character in its text
    ends: list[int]

    def span(self, begin: int, end: int) -> tuple[int, int]:
        """[first, last) indices of the tokens whose characters overlap [begin, end)."""
        first = bisect.bisect_right(self.ends, begin)
        return first, max(first, bisect.bisect_left(self.starts, end))


def _tokenize(tokenizer: Any, text: str, shift: int = 0) -> _Tokenized:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    return _Tokenized(list(encoding["input_ids"]), [s + shift for s, _ in offsets], [e + shift for _, e in offsets])


@dataclass
class _TurnTokens:
    """A turn under the token contract: its inference prompt tokenized on its own, then its text tokenized
    on its own (what the model generates, through its stop token)."""

    turn: Turn
    context: list[int]
    text: _Tokenized

    @property
    def ids(self) -> list[int]:
        return self.context + self.text.ids

    def continues(self, earlier: _TurnTokens) -> bool:
        """Whether this turn's prompt starts with the earlier turn's prompt and tokens: then one sequence
        trains both, each in exactly its own inference context."""
        n = len(earlier.context) + len(earlier.text.ids)
        return len(self.context) >= n and self.context[:n] == earlier.ids


def _chains(turns: list[_TurnTokens]) -> list[list[_TurnTokens]]:
    """Runs of consecutive turns each of whose prompt continues the one before: trainable together in one
    sample. A run ends where the template rewrites history (Qwen3 drops earlier reasoning, gpt-oss ends
    only the newest answer with <|return|>, Mistral moves the system prompt) or where the tokenizer splits
    an earlier turn differently once more text follows it (a prompt token that merges with the turn's
    first characters, a marker that swallows the whitespace after it)."""
    runs: list[list[_TurnTokens]] = []
    for turn in turns:
        if runs and turn.continues(runs[-1][-1]):
            runs[-1].append(turn)
        else:
            runs.append([turn])
    return runs


_splitting_ids: dict[tuple, tuple[frozenset[int], frozenset[int]]] = {}


def _special_split_ids(tokenizer: Any) -> tuple[frozenset[int], frozenset[int]]:
    """Special tokens after which the tokenization of a text does not depend on what precedes them (the
    fast tokenizer splits the text at added tokens first): (those that keep the text after them, those
    that swallow the whitespace after them, Phi's role tokens). Checked once per tokenizer and kind on a
    few texts; a kind is empty where that does not hold (e.g. a pre-tokenizer that marks the start of
    every piece differently)."""
    key = tokenizer_key(tokenizer)
    if key not in _splitting_ids:
        tails = [" hello world", "\nHello,  world", 'héllo {"a": 1}', "  two"]
        kinds = []
        for rstrip in (False, True):
            special = {
                i
                for i, token in tokenizer.added_tokens_decoder.items()
                if token.special and token.rstrip == rstrip and not token.lstrip and not token.normalized
            }
            marker = next((tokenizer.convert_ids_to_tokens(i) for i in sorted(special)), None)
            independent = marker is not None and all(
                _tokenize(tokenizer, "say" + marker + tail).ids
                == _tokenize(tokenizer, "say" + marker).ids + _tokenize(tokenizer, after).ids
                for tail in tails
                for after in [tail.lstrip() if rstrip else tail]
            )
            kinds.append(frozenset(special if independent else ()))
        _splitting_ids[key] = (kinds[0], kinds[1])
    return _splitting_ids[key]


class _RowTokenizer:
    """Tokenizes the many overlapping texts of one row (each turn's prompt, windows that share the system
    prompt): a new text reuses the tokens of an earlier one up to the last special token inside their
    common beginning (and the whitespace it swallows), and only the rest is tokenized. Exact: see
    _special_split_ids."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.split_ids, self.swallowing_ids = _special_split_ids(tokenizer)
        self.done: list[tuple[str, _Tokenized]] = []

    def __call__(self, text: str) -> _Tokenized:
        cut, reused = 0, _Tokenized([], [], [])
        for earlier, tokens in self.done[-4:]:
            common = common_prefix_length(earlier, text)
            j = bisect.bisect_right(tokens.ends, common) - 1  # last token that ends within the common part
            while j >= 0 and tokens.ids[j] not in self.split_ids and tokens.ids[j] not in self.swallowing_ids:
                j -= 1
            end = tokens.ends[j] if j >= 0 else 0
            if j >= 0 and tokens.ids[j] in self.swallowing_ids:
                end += len(text[end:]) - len(text[end:].lstrip())  # the whitespace it swallows in this text
            if j >= 0 and end > cut:
                cut, n = end, j + 1
                reused = _Tokenized(tokens.ids[:n], tokens.starts[:n], tokens.ends[:n])
        rest = _tokenize(self.tokenizer, text[cut:], shift=cut)
        tokens = _Tokenized(reused.ids + rest.ids, reused.starts + rest.starts, reused.ends + rest.ends)
        self.done.append((text, tokens))
        return tokens

    def turn(self, turn: Turn) -> _TurnTokens:
        return _TurnTokens(turn, self(turn.context).ids, _tokenize(self.tokenizer, turn.text))


def _sample(run: list[_TurnTokens], tc: TemplateConversation, history: str) -> Sample:
    """The sample for a run of turns: the last turn's prompt and text; every turn's text tokens trained."""
    ids = run[-1].ids
    labels = [IGNORE_INDEX] * len(ids)
    spans, reasoning = [], []
    for turn in run:
        first = len(turn.context)
        last = first + len(turn.text.ids)
        labels[first:last] = ids[first:last]
        spans.append((first, last))
        shown = (tc.reasoning[turn.turn.message] or "").strip()
        at = turn.turn.text.find(shown) if shown else -1
        if at >= 0:
            begin, end = turn.text.span(at, at + len(shown))
            reasoning.append((first + begin, first + end))
    return Sample(
        input_ids=ids,
        labels=labels,
        turns=[t.turn.ordinal for t in run],
        history=history,
        reasoning=reasoning,
        spans=spans,
    )


@dataclass
class _Head:
    """What a shortened history keeps before its recent messages."""

    history: str  # WINDOW or WINDOW_NO_SYSTEM
    messages: list[int]  # indices into the template conversation
    replaced: dict[int, dict]  # messages shown in another form (the first one without a folded system prompt)


class _Windows:
    """Shortened histories for turns whose full history does not fit: the system prompt, the first user
    message and recent history; failing that, the same without the system prompt. A history is shared
    by consecutive turns (see the module docstring: ``slack``).

    Where the history resumes is first estimated from the messages' sizes (their tokens, plus the
    template's per message on this row), then settled with exact renders near the budget: long
    candidates that could never fit are neither rendered nor tokenized."""

    def __init__(
        self,
        tokenizer: Any,
        tokenize: _RowTokenizer,
        tc: TemplateConversation,
        support: TemplateSupport,
        budget: int,
        full: int,
        slack: float,
    ):
        """``full``: the tokens of the whole conversation as one sample, to calibrate the size estimate."""
        self.tokenizer, self.tokenize, self.tc, self.support, self.budget = tokenizer, tokenize, tc, support, budget
        self.slack = slack
        self.sizes = self._sizes(tc.messages)
        # the template's own tokens per message (headers, end-of-turn), on average over this row
        self.overhead = (full - sum(self.sizes)) / len(self.sizes)
        systems = []
        for k, m in enumerate(tc.messages):
            if m["role"] != "system":
                break
            systems.append(k)
        first_user = next((k for k, m in enumerate(tc.messages) if m["role"] == "user"), None)
        user = [first_user] if first_user is not None else []
        self.heads = [_Head(WINDOW, systems + user, {})]
        if systems:
            self.heads.append(_Head(WINDOW_NO_SYSTEM, user, {}))
        elif tc.first_without_system is not None:  # a template without system role: it opens the first message
            self.heads.append(_Head(WINDOW_NO_SYSTEM, [0], {0: tc.first_without_system}))
            self.replaced_size = self._sizes([tc.first_without_system])[0]

    def _sizes(self, messages: list[dict]) -> list[int]:
        texts = [json.dumps(m, ensure_ascii=False) for m in messages]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    @staticmethod
    def _view(head: _Head, start: int, message: int) -> list[int]:
        return [k for k in head.messages if k < start] + list(range(start, message + 1))

    def _fitting(self, head: _Head, start: int, turn: Turn) -> _TurnTokens | None:
        view = self._view(head, start, turn.message)
        try:
            rendered = render_turn(
                self.tokenizer, self.tc, self.support, view, turn.message, turn.ordinal, head.replaced
            )
        except DataError:  # the template refuses this cut of the conversation
            return None
        tokens = self.tokenize.turn(rendered)
        return tokens if len(tokens.ids) <= self.budget else None

    def _estimate(self, head: _Head, start: int, message: int) -> float:
        sizes = [self.replaced_size if k in head.replaced else self.sizes[k] for k in self._view(head, start, message)]
        return sum(sizes) + self.overhead * len(sizes)

    def _may_fit(self, head: _Head, start: int, message: int) -> bool:
        return self._estimate(head, start, message) <= 1.1 * self.budget + 16  # estimates are within ~10%

    def samples(self, turns: list[Turn]) -> tuple[list[Sample], list[Turn]]:
        """(samples, turns that fit in no window)."""
        samples, unfit, i = [], [], 0
        while i < len(turns):
            found = self._shortest_cut(turns[i])
            i += 1
            if found is None:
                unfit.append(turns[i - 1])
                continue
            head, start, first = found
            run = [first]
            # Later turns keep this start while they fit: in the run where each one's prompt continues
            # it, else in a sample of their own over the same start (the same prefix tree).
            while i < len(turns) and self._may_fit(head, start, turns[i].message):
                following = self._fitting(head, start, turns[i])
                if following is None:
                    break
                if not following.continues(run[-1]):
                    samples.append(_sample(run, self.tc, head.history))
                    run = []
                run.append(following)
                i += 1
            samples.append(_sample(run, self.tc, head.history))
        return samples, unfit

    def _shortest_cut(self, turn: Turn) -> tuple[_Head, int, _TurnTokens] | None:
        """(head, start, rendered turn) with the most recent history that fits (the earliest start the size
        estimate allows, then exact renders, one start earlier or later at a time), then started later
        by the slack."""
        for full_head in self.heads:
            head = _Head(full_head.history, [k for k in full_head.messages if k < turn.message], full_head.replaced)
            starts = [
                k
                for k in range(max(head.messages, default=-1) + 1, turn.message + 1)
                if self.tc.messages[k]["role"] in ("user", "assistant")  # never a tool result without its call
            ]
            if not starts or not self._may_fit(head, starts[-1], turn.message):
                continue  # not even the turn alone fits with this head
            k = next(
                (n for n, start in enumerate(starts) if self._estimate(head, start, turn.message) <= self.budget),
                len(starts) - 1,
            )
            fitting = self._fitting(head, starts[k], turn)
            if fitting:  # more history while it still fits
                while k > 0 and self._may_fit(head, starts[k - 1], turn.message):
                    earlier = self._fitting(head, starts[k - 1], turn)
                    if not earlier:
                        break
                    k, fitting = k - 1, earlier
            else:  # less history until it fits
                while not fitting and k + 1 < len(starts):
                    k += 1
                    fitting = self._fitting(head, starts[k], turn)
            if fitting:
                return self._slackened(head, starts, k, turn, fitting)
        return None

    def _slackened(
        self, head: _Head, starts: list[int], k: int, turn: Turn, fitting: _TurnTokens
    ) -> tuple[_Head, int, _TurnTokens]:
        """The first start from starts[k] on that leaves the slack's share of the room for recent history
        (the budget less the turn with the least history) to the turns after this one."""
        least = self._estimate(head, starts[-1], turn.message)
        goal = self.budget - self.slack * (self.budget - least)
        later = next((n for n in range(k, len(starts)) if self._estimate(head, starts[n], turn.message) <= goal), k)
        if self.slack and later > k:
            slackened = self._fitting(head, starts[later], turn)
            if slackened:  # the template may refuse that cut
                return head, starts[later], slackened
        return head, starts[k], fitting


def encode_conversation(conv: Conversation, tokenizer: Any, options: EncodeOptions | None = None) -> EncodedRow:
    """The conversation as training samples (see the module docstring). Raises DataError for a row the
    template cannot render, or (reason ``too_long``) one of which no turn fits."""
    options = options or EncodeOptions()
    support = template_support(tokenizer)
    tc = adapt_to_template(conv, support)
    turn_messages = [k for k, trained in enumerate(tc.trained) if trained]
    full = [
        render_turn(tokenizer, tc, support, list(range(message + 1)), message, ordinal)
        for ordinal, message in enumerate(turn_messages)
    ]
    tokenize = _RowTokenizer(tokenizer)
    runs = _chains([tokenize.turn(turn) for turn in full])
    if len(runs) > 1 and options.history_rewrites == "refuse":
        earlier, later = runs[0][-1].turn, runs[1][0].turn
        why = (
            "the tokenizer splits it differently once more text follows it"
            if later.context.startswith(earlier.sample_text)
            else "the chat template renders it differently once later turns follow (it rewrites history, e.g. "
            "drops reasoning from earlier turns)"
        )
        raise DataError(
            f"assistant turn {earlier.ordinal + 1} is not a prefix of the next turn's prompt: {why}, so the row is "
            "not one sequence; drop --history_rewrites refuse to train each turn in its own context",
            "template_rewrites_history",
        )
    omissions = dropped_by_template(full, tc)
    calls = sum(len(m.get("tool_calls", [])) for m in conv.messages)
    if calls and not support.tool_calls:
        what = f"{calls} tool call(s) written as <tool_call> JSON in the text: the chat template renders no tool calls"
        omissions.append(("template_no_native_tool_calls", what))
    row_tokens = len(tokenize(full[-1].whole).ids)

    budget = options.max_seq_length
    samples, overflow = [], []
    for run in runs:
        fitting = [t for t in run if budget is None or len(t.ids) <= budget]  # a prefix: each continues the last
        if fitting:
            samples.append(_sample(fitting, tc, FULL_HISTORY))
        overflow += [t.turn for t in run[len(fitting) :]]

    windowed = 0
    if overflow and options.overflow == "window":
        windows = _Windows(tokenizer, tokenize, tc, support, budget, row_tokens, options.window_slack)
        window_samples, overflow = windows.samples(overflow)
        for sample in window_samples:
            reason, what = _WINDOW_OMISSIONS[sample.history]
            omissions += [(reason, f"assistant turn {t + 1} {what}") for t in sample.turns]
        samples += window_samples
        windowed = sum(len(s.turns) for s in window_samples)
        samples.sort(key=lambda s: s.turns[0])
    for turn in overflow:
        omissions.append(("turn_too_long", f"assistant turn {turn.ordinal + 1} does not fit max_seq_length={budget}"))
    if not samples:
        raise DataError(
            f"too long: no assistant turn fits max_seq_length={budget} (the row is {row_tokens} tokens"
            + ("" if options.overflow == "window" else "; --overflow window would train turns with recent history")
            + ")",
            "too_long",
        )
    samples = [s for s in samples if any(label != IGNORE_INDEX for label in s.labels)]
    if not samples:
        raise DataError("no trained tokens: the template renders the assistant turns as empty", "no_trained_tokens")

    return EncodedRow(
        samples=samples,
        row_tokens=row_tokens,
        trained_turns=sum(len(s.turns) for s in samples),
        windowed_turns=windowed,
        dropped_turns=len(overflow),
        omissions=omissions,
    )


def encode_row(row: dict, tokenizer: Any, options: EncodeOptions | None = None) -> EncodedRow:
    """Tokenize one row with the tokenizer's chat template into training samples.

    Each sample's ``input_ids`` are the template's own tokens; ``labels[i] == input_ids[i]`` where
    trained and -100 elsewhere (the model shifts). Raises DataError (with a ``reason`` code) for
    invalid rows and rows left with nothing to train."""
    options = options or EncodeOptions()
    return encode_conversation(parse_row(row, options.train_on, options.data_format), tokenizer, options)
