"""Continuous batching (cxrlite.runtime.batching): several sequences decoded together give each
the tokens it gets alone; cancelling one leaves the others unchanged; a slot's cache never leaks
into the next request; state stays bounded over many requests; scoring and the vision tower batch
too."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import llama_cpp
import numpy as np
import psutil
import pytest
from runtime_testkit import random_pixels

from cxrlite.data.prompts import FINDINGS_PROMPT
from cxrlite.runtime import Runtime
from cxrlite.runtime.vision_batch import VisionBatcher

TOKENS = 16
SLOTS = 4
QUESTIONS = ["Is there a pleural effusion?", "Describe the heart size.", FINDINGS_PROMPT]


@pytest.fixture(scope="module")
def single(runtime_built):
    runtime = Runtime.from_bundle(runtime_built[2], threads=1, slots=1)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def batched(runtime_built):
    runtime = Runtime.from_bundle(runtime_built[2], threads=1, slots=SLOTS)
    yield runtime
    runtime.close()


def requests() -> list[tuple[str, np.ndarray | None]]:
    """Image and text-only requests mixed, two images asked about twice."""
    images = [random_pixels(40 + i) for i in range(3)]
    out: list[tuple[str, np.ndarray | None]] = []
    for i in range(9):
        image = images[i % 3] if i % 4 != 3 else None
        out.append((QUESTIONS[i % len(QUESTIONS)], image))
    return out


def run_together(runtime: Runtime, work: list, **kwargs) -> list:
    """Every request from its own thread, released at once so that they share steps."""
    start = threading.Barrier(len(work))

    def one(request):
        start.wait()
        return runtime.complete(request[0], request[1], max_tokens=TOKENS, **kwargs)

    with ThreadPoolExecutor(len(work)) as pool:
        return list(pool.map(one, work))


def test_batched_greedy_equals_unbatched(single, batched):
    work = requests()
    alone = [single.complete(q, image, max_tokens=TOKENS) for q, image in work]
    steps = batched.engine.steps
    together = run_together(batched, work)
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    assert all(len(c.tokens) > 0 for c in together)
    # They did share steps: far fewer than one step per token per request.
    generated = sum(len(c.tokens) for c in together)
    assert batched.engine.steps - steps < 0.6 * generated
    assert batched.engine.active == 0 and batched.engine.waiting == 0


def test_sampling_with_a_seed_is_the_same_batched(single, batched):
    work = requests()[:SLOTS]
    kwargs = {"temperature": 0.9, "top_p": 0.9, "seed": 7}
    alone = [single.complete(q, image, max_tokens=TOKENS, **kwargs) for q, image in work]
    together = run_together(batched, work, **kwargs)
    assert [c.tokens for c in together] == [c.tokens for c in alone]


def test_cancelling_one_sequence_leaves_the_others_unchanged(single, batched):
    work = requests()[:SLOTS]
    alone = [single.complete(q, image, max_tokens=TOKENS) for q, image in work]
    generations = [batched.generate(q, image, max_tokens=TOKENS) for q, image in work]
    results: list = [None] * len(work)
    first_token = threading.Event()

    def consume(i: int) -> None:
        with generations[i] as generation:
            for event in generation:
                if i == 0 and event.index == 1:
                    first_token.set()
                    generation.cancel()  # the engine drops it at its next step
            results[i] = generation.result

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert first_token.is_set()
    assert results[0].finish_reason == "cancelled" and len(results[0].tokens) < TOKENS
    assert results[0].tokens == alone[0].tokens[: len(results[0].tokens)]
    assert [r.tokens for r in results[1:]] == [a.tokens for a in alone[1:]]


def test_a_slot_is_cleared_before_reuse(runtime_built):
    """Request B after request A in the same (only) slot: B gets what it gets on a fresh runtime,
    and the slot holds B's positions only, not A's past their shared prefix."""
    bundle = runtime_built[2]
    a = ("Describe the findings in detail, every lobe.", random_pixels(50))
    b = ("Is the heart enlarged?", random_pixels(51))
    with Runtime.from_bundle(bundle, threads=1, slots=1, warmup=False) as fresh:
        want = fresh.complete(*b, max_tokens=TOKENS)
    with Runtime.from_bundle(bundle, threads=1, slots=1, warmup=False) as runtime:
        runtime.llm.llm.states = None  # no saved states: only the slot's own cells could leak
        runtime.complete(*a, max_tokens=TOKENS)
        a_keys = runtime.llm.llm.position_keys(0)
        got = runtime.complete(*b, max_tokens=TOKENS)
        llm = runtime.llm.llm
        b_keys = llm.position_keys(0)
        embeds = runtime.image_embeddings(b[1]).embeds
        pieces, _ = llm.parse(runtime.segments(runtime.prompt_ids(b[0], True), embeds))
        prompt_keys = [key for piece in pieces for key in piece.keys]
        memory = llama_cpp.llama_get_memory(llm._ctx)
        last_cell = llama_cpp.llama_memory_seq_pos_max(memory, 0)
    assert got.tokens == want.tokens
    shared = got.timings["prompt_cached_tokens"]
    assert 0 < shared < len(prompt_keys) and b_keys[:shared] == a_keys[:shared]
    # The slot holds B's prompt and answer (its last token never decoded), nothing more.
    assert b_keys == prompt_keys + got.tokens[:-1]
    assert last_cell == len(b_keys) - 1


def test_scores_batched_equal_one_at_a_time(single, batched):
    records = [(q, ["yes", "no", "left and right"], img) for q, img in requests()[:6]]
    alone = [single.option_logprobs(q, options, img) for q, options, img in records]
    together = list(batched.map(lambda r: batched.option_logprobs(*r), records))
    assert np.allclose(together, alone, atol=1e-3)


def test_map_keeps_order_and_runs_slots_at_once(batched):
    together = threading.Barrier(SLOTS, timeout=30)  # broken unless SLOTS calls run at once

    def one(i: int) -> int:
        together.wait()
        batched.complete(QUESTIONS[0], None, max_tokens=2)
        return i

    assert list(batched.map(one, range(2 * SLOTS))) == list(range(2 * SLOTS))


def test_state_stays_bounded_over_many_requests(batched):
    llm = batched.llm.llm
    process = psutil.Process()

    def one(i: int) -> int:
        question = f"{QUESTIONS[i % 3]} case {i}"  # every prompt new: no cache hit hides work
        return len(batched.complete(question, None, max_tokens=2).tokens)

    list(batched.map(one, range(100)))  # warm: allocations settle
    rss = process.memory_info().rss
    assert sum(batched.map(one, range(1000))) > 0
    growth = process.memory_info().rss - rss
    assert batched.engine.active == 0 and batched.engine.waiting == 0
    assert all(slot.handle is None and not slot.todo for slot in batched.engine.slots)
    assert len(llm.states) <= llm.states.max_entries and llm.states.nbytes <= llm.states.max_bytes
    assert not batched._open_threads
    assert growth < 64 << 20, f"resident memory grew by {growth / 2**20:.1f} MiB"


def test_vision_batcher_runs_waiting_images_together():
    calls: list[int] = []
    gate = threading.Event()

    def encode(pixels: np.ndarray) -> np.ndarray:
        calls.append(len(pixels))
        gate.wait(5)
        return pixels.reshape(len(pixels), -1)[:, :4] * 2

    batcher = VisionBatcher(encode, max_batch=8)
    images = [np.full((1, 2, 2), i, np.float32) for i in range(6)]
    keys = [f"k{i}" for i in range(5)] + ["k0"]  # the last one repeats the first
    with ThreadPoolExecutor(6) as pool:
        futures = [
            pool.submit(batcher.encode, img, key) for img, key in zip(images, keys, strict=True)
        ]
        while sum(calls) < 1:
            threading.Event().wait(0.01)
        gate.set()
        out = [f.result() for f in futures]
    assert calls[0] == 1 and sum(calls) == 5  # the first alone, then the waiting ones together
    assert len(calls) <= 3
    for i in range(5):
        assert np.array_equal(out[i], np.full(4, 2.0 * i, np.float32))
    assert np.array_equal(out[5], out[0])  # the same key is encoded once


def test_vision_batcher_hands_errors_to_every_waiter():
    def encode(pixels: np.ndarray) -> np.ndarray:
        raise RuntimeError("the tower failed")

    batcher = VisionBatcher(encode)
    with pytest.raises(RuntimeError, match="the tower failed"):
        batcher.encode(np.zeros((1, 2, 2), np.float32), "a")
    assert batcher.stats()["batches"] == 1


def test_the_server_runs_a_worker_per_slot_and_batches_requests(single, batched):
    import httpx
    from server_testkit import chat_body, live_server, phantom_png

    from cxrlite.server import create_app

    images = [phantom_png(60 + i) for i in range(3)] + [None] * 3
    want = [
        single.complete("Describe the findings.", image, max_tokens=TOKENS).text for image in images
    ]
    app = create_app(batched)
    steps = batched.engine.steps
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert app.state.scheduler.workers == SLOTS
        start = threading.Barrier(len(images))

        def ask(image):
            start.wait()
            body = chat_body(batched.model_id, image, max_tokens=TOKENS, temperature=0)
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(len(images)) as pool:
            got = list(pool.map(ask, images))
    assert got == want
    assert batched.engine.steps - steps < len(images) * TOKENS * 0.6  # steps were shared


def test_a_long_prefill_is_chunked_between_the_others_tokens(runtime_built, single):
    """With 8 rows a step, a new 60-position prompt takes several steps, and a sequence already
    generating gets a token at each of them instead of waiting for the whole prefill."""
    from server_testkit import gated

    from cxrlite.runtime import LlamaCppBackend

    bundle = single.bundle
    llm = LlamaCppBackend(bundle.variant_file("llm", "gguf-f32"), "gguf-f32", n_ctx=256,
                          n_threads=1, slots=2, n_batch=8)  # fmt: skip
    runtime = Runtime(bundle, single.vision, llm, single.tokenizer)
    try:
        long_prompt = ("Describe the findings " * 8).strip()
        image = random_pixels(70)
        first = runtime.generate(QUESTIONS[0], None, max_tokens=40)
        events = iter(first)
        with gated(runtime, free_steps=2) as gate, ThreadPoolExecutor(1) as pool:
            got = [next(events).token_id for _ in range(3)]
            assert gate.stepping.wait(30)  # the first sequence is held between two tokens
            steps = runtime.engine.steps
            second = pool.submit(runtime.complete, long_prompt, image, max_tokens=4)
            while runtime.engine.waiting == 0 and not second.done():
                threading.Event().wait(0.005)
            gate.gate.set()  # the second joins at the next step
            got += [e.token_id for e in events if e.token_id is not None]
            second = second.result()
        shared_steps = runtime.engine.steps - steps
        n_prefill = second.usage["prompt_tokens"] - second.timings["prompt_cached_tokens"]
        alone_steps = (len(got) - 3) + -(-n_prefill // 8) + len(second.tokens)
        assert n_prefill > 40 and shared_steps < alone_steps  # the prefill chunks shared steps
        assert got == single.complete(QUESTIONS[0], None, max_tokens=40).tokens
        assert second.tokens == single.complete(long_prompt, image, max_tokens=4).tokens
    finally:
        runtime.close()
