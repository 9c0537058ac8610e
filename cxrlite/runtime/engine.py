"""`Runtime`: a bundle's vision and LLM backends, the embedding cache and the prompt encoding.

    rt = Runtime.from_bundle("bundle/")
    for event in rt.generate("Describe the findings.", image="study.dcm", max_tokens=128):
        print(event.text, end="")
    rt.report("study.dcm")  # {"findings", "impression", "labels", "variants", "timings", ...}

Prompts are encoded with the bundle's own tokenizer (`format_prompt` + `encode(...,
add_special_tokens=False)`) and split at the single image token, whose place the image
embeddings take: llama.cpp never tokenizes a prompt (it spaces special tokens differently).

Threads. Image decoding and preprocessing run in the caller's thread; the vision tower encodes
the images of every caller waiting for it as one batch (`VisionBatcher`), so a request's image
work overlaps others' decoding. The LLM belongs to the decode engine's thread
(cxrlite.runtime.batching): every generation and scoring request is a sequence there, decoded
together with the others in its `slots`. A thread runs one generation at a time: one that starts
a second while its first is unfinished gets a RuntimeError rather than a deadlock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrlite.bundle import Bundle, Key, Kind, load_bundle
from cxrlite.data.prompts import FINDINGS_PROMPT, checklist_text
from cxrlite.device import resolve_device
from cxrlite.imaging.decode import DecodedImage, load_image
from cxrlite.imaging.errors import ImageError
from cxrlite.imaging.preprocess import preprocess
from cxrlite.model.findings import FINDINGS_HEAD_FILE, FindingsReader, findings_text
from cxrlite.runtime.batching import DecodeEngine, SequenceRequest
from cxrlite.runtime.cache import DEFAULT_MAX_BYTES, EmbeddingCache, bytes_key, pixels_key
from cxrlite.runtime.generation import Completion, Generation, ms
from cxrlite.runtime.llm import LLMBackend, open_llm
from cxrlite.runtime.plan import (
    BackendError,
    Choice,
    plan_llm,
    plan_slots,
    plan_threads,
    plan_vision,
    probe_hardware,
    reference_checkpoint,
)
from cxrlite.runtime.sampling import SamplingParams
from cxrlite.runtime.vision import VisionBackend, open_vision
from cxrlite.runtime.vision_batch import DEFAULT_MAX_BATCH, VisionBatcher

logger = logging.getLogger(__name__)

Prompt = str | Sequence[dict[str, Any]]  # a user message, or chat messages
MAX_DEFAULT_CTX = 4096


@dataclass
class ImageEmbeddings:
    """An encoded image; passing it as `image` reuses it (no decode, no cache lookup)."""

    embeds: np.ndarray  # float32 [n_image_tokens, n_embd], read-only when cached
    cache_hit: bool
    preprocess_ms: float
    vision_ms: float


Image = str | os.PathLike | bytes | DecodedImage | np.ndarray | ImageEmbeddings


class Runtime:
    def __init__(
        self,
        bundle: Any,
        vision: VisionBackend,
        llm: LLMBackend,
        tokenizer: Any,
        *,
        cache: EmbeddingCache | None = None,
        choices: dict[str, Choice] | None = None,
        prefix_cache: bool = True,
        findings_head: FindingsReader | None = None,
    ) -> None:
        self.bundle, self.vision, self.llm, self.tokenizer = bundle, vision, llm, tokenizer
        # States the findings checklist from the image embeddings (`findings`); None: the LLM.
        self.findings_head = findings_head
        # Reuse the KV cache of the prompt prefix shared with the previous sequence (llama.cpp
        # backends): a repeated image costs one prefill position instead of the whole prompt.
        self.prefix_cache = prefix_cache
        self.config = bundle.config
        self.pre = bundle.preprocess
        self.model_id = bundle.path.name
        self.cache = cache if cache is not None else EmbeddingCache()
        self.choices = choices or {}
        self.image_token_id = int(self.config.image_token_id)
        self.stop_ids = {
            t for t in (tokenizer.eos_token_id, self.config.llm.eos_token_id) if t is not None
        }
        self._open_threads: set[int] = set()  # threads with an unfinished generation
        self._open_lock = threading.Lock()
        self.vision_batcher = VisionBatcher(self._encode_batch, _max_vision_batch(vision))
        self.engine = DecodeEngine(llm)
        self.parallelism: dict[str, Any] = {}  # threads and slots, and why (from_bundle)

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | os.PathLike,
        *,
        vision_backend: str = "auto",
        vision_variant: str | None = None,
        llm_backend: str = "auto",
        llm_variant: str | None = None,
        n_gpu_layers: int | None = None,
        threads: int | None = None,
        checkpoint: str | os.PathLike | None = None,
        cache_size: int = 256,
        cache_bytes: int = DEFAULT_MAX_BYTES,
        warmup: bool = True,
        n_ctx: int | None = None,
        kv_type: str = "f16",
        flash_attn: bool | None = None,
        verify: bool | str = True,
        prefix_cache: bool = True,
        device: str | None = None,
        slots: int | None = 1,
        batch_invariant: bool = True,
    ) -> Runtime:
        """Open a bundle with backends chosen from its defaults and this machine (see
        cxrlite.runtime.plan), each overridable. `n_gpu_layers` None offloads every layer when
        llama.cpp can and a GPU is present. `checkpoint` replaces the manifest's source path for
        the torch reference. `kv_type="f32", flash_attn=False` is llama.cpp's exact f32 path.
        `prefix_cache` keeps the KV cache of a prompt prefix shared with the previous generation
        (llama.cpp backends; outputs are the same either way, only prefill gets shorter).
        `device` is where the PyTorch backends (torch reference, GPTQ) run: None picks CUDA when
        present (cxrlite.device.resolve_device). `slots`: sequences the llama.cpp backend decodes
        together (continuous batching; the PyTorch backends have one); None chooses from the
        machine, as `threads` None does (cxrlite.runtime.plan.plan_slots, plan_threads).
        `batch_invariant` (llama.cpp on a CPU): a request's output is the same whatever else is
        decoded with it; False lets llama.cpp repack weights for faster CPU kernels whose
        rounding depends on the batch."""
        from cxrlite.model.tokenizer import load_tokenizer

        bundle = load_bundle(bundle_dir, verify=verify)
        vision_variants = bundle.vision_variants
        wants_trt = vision_backend in ("auto", "tensorrt") and any(
            v.kind == Kind.TENSORRT for v in vision_variants.values()
        )
        hw = probe_hardware(tensorrt=wants_trt)
        v_choice = plan_vision(
            vision_variants, bundle.default.get(Key.VISION), hw, vision_backend, vision_variant
        )
        l_choice = plan_llm(
            bundle.llm_variants,
            bundle.default.get(Key.LLM),
            hw,
            llm_backend,
            llm_variant,
            bundle.quality,
        )
        torch_device = None
        if l_choice.backend in ("torch", "gptq") or v_choice.backend == "torch":
            torch_device = resolve_device(device, purpose="inference").device
        reference = None
        if "torch" in (v_choice.backend, l_choice.backend):
            reference = _load_reference(
                bundle, checkpoint, threads, torch_device, vision_only=l_choice.backend != "torch"
            )
        if n_gpu_layers is None:
            n_gpu_layers = -1 if hw.cuda and hw.llama_gpu_offload else 0
        threads, threads_why = plan_threads(hw, threads)
        slots, slots_why = plan_slots(
            hw, slots, gpu=n_gpu_layers != 0, batching=l_choice.backend == "llama.cpp"
        )
        cfg = bundle.config
        vision = open_vision(bundle, v_choice, threads=threads, tower=reference)
        llm = open_llm(
            bundle,
            l_choice,
            n_ctx=n_ctx or min(cfg.llm.max_position_embeddings, MAX_DEFAULT_CTX),
            threads=threads,
            n_gpu_layers=n_gpu_layers,
            kv_type=kv_type,
            flash_attn=flash_attn,
            reference_llm=getattr(reference, "llm", None),
            device=torch_device,
            slots=slots,
            batch_invariant=batch_invariant,
        )
        runtime = cls(
            bundle,
            vision,
            llm,
            load_tokenizer(bundle.tokenizer_dir),
            cache=EmbeddingCache(cache_size, cache_bytes),
            choices={"vision": v_choice, "llm": l_choice},
            prefix_cache=prefix_cache,
            findings_head=_findings_head(bundle),
        )
        runtime.parallelism = {
            "threads": {"value": threads, "reason": threads_why},
            "slots": {"value": llm.slots, "reason": slots_why},
        }
        logger.info(
            "runtime: vision %s on %s (%s), llm %s on %s (%s)",
            vision.name, vision.device, v_choice.reason, llm.name, llm.device, l_choice.reason,
        )  # fmt: skip
        logger.info("runtime: %d threads (%s); %d slots (%s)", threads, threads_why, llm.slots,
                    slots_why)  # fmt: skip
        if warmup:
            runtime.warmup()
        return runtime

    def warmup(self, n_tokens: int = 2) -> dict[str, float]:
        """One dummy image through the vision tower and a few tokens through the LLM (first-call
        costs: graph optimisation, allocations, kernel selection). The cache is left untouched."""
        c, s = self.pre.channels, self.pre.image_size
        result = self.complete(
            "Warm-up.", np.zeros((c, s, s), np.float32), max_tokens=n_tokens, use_cache=False
        )
        logger.info("warm-up done in %.0f ms", result.timings["total_ms"])
        return result.timings

    def close(self) -> None:
        if self.engine.close():
            self.llm.close()
        else:  # freeing the context under a running decode would crash the process
            logger.warning("the decode engine did not stop; the LLM is left to the process exit")

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def variants(self) -> dict[str, str]:
        return {"vision": self.vision.name, "llm": self.llm.name}

    def info(self) -> dict[str, Any]:
        """What a health or models route shows: variants, devices, why they were chosen."""
        return {
            "model": self.model_id,
            "variants": self.variants,
            "devices": {"vision": self.vision.device, "llm": self.llm.device},
            "reasons": {k: c.reason for k, c in self.choices.items()},
            "n_ctx": self.llm.n_ctx,
            "slots": self.llm.slots,
            "parallelism": self.parallelism,
            "n_image_tokens": self.config.n_image_tokens,
            "cache": self.cache.stats(),
        }

    # --- images -----------------------------------------------------------------------------

    def prepare_image(self, image: Image) -> np.ndarray:
        """float32 [C, S, S] model pixels from a path, bytes, DecodedImage, decoded HxW pixels in
        [0, 1], or already preprocessed [C, S, S] pixels. Bad images raise ImageError."""
        expected = (self.pre.channels, self.pre.image_size, self.pre.image_size)
        if isinstance(image, np.ndarray) and image.ndim == 3:
            if image.shape != expected or not np.isfinite(image).all():
                raise ImageError("pixels", f"expected finite float32 {list(expected)} pixels")
            return np.ascontiguousarray(image, dtype=np.float32)
        if isinstance(image, np.ndarray):
            gray, source = image, "pixels"
        elif isinstance(image, DecodedImage):
            gray, source = image.pixels, "image"
        elif isinstance(image, str | os.PathLike | bytes | bytearray | memoryview):
            source = "upload" if isinstance(image, bytes | bytearray | memoryview) else str(image)
            try:
                gray = load_image(image).pixels
            except OSError as e:
                raise ImageError(source, f"cannot read the file ({e.strerror or e})") from None
        else:
            raise TypeError(
                f"image must be a path, bytes, DecodedImage or array, not {type(image)}"
            )
        try:
            return preprocess(gray, self.pre)
        except ValueError as e:
            raise ImageError(source, str(e)) from None

    def image_embeddings(
        self, image: Image, *, use_cache: bool = True, file_key: str | None = None
    ) -> ImageEmbeddings:
        """The image's embeddings, from the cache when its pixels were seen before. `file_key`
        (`file_key(raw)`) names the file the image was decoded from (bytes input is its own
        file), so that the same file sent again skips decoding as well (`lookup_file`)."""
        if isinstance(image, ImageEmbeddings):
            return image
        if file_key is None and isinstance(image, bytes | bytearray | memoryview):
            file_key = self.file_key(image)
        if use_cache and file_key is not None:
            found = self.lookup_file(file_key)
            if found is not None:
                return found
        t0 = time.perf_counter()
        pixels = self.prepare_image(image)
        key = pixels_key(pixels, self.vision.name)
        t1 = time.perf_counter()
        embeds = self.cache.get(key) if use_cache else None
        hit = embeds is not None
        if embeds is None:
            # encoded with the other images waiting; the same study asked twice, once
            embeds = self.vision_batcher.encode(pixels, key)
            if use_cache:
                embeds = self.cache.put(key, embeds)
        if use_cache and file_key is not None:
            self.cache.add_alias(file_key, key)
        return ImageEmbeddings(
            embeds, hit, ms(t1 - t0), 0.0 if hit else ms(time.perf_counter() - t1)
        )

    def file_key(self, raw: bytes | bytearray | memoryview) -> str:
        """The embedding cache's key for a file's bytes (hashed once per request)."""
        return bytes_key(raw, self.vision.name)

    def lookup_file(self, file_key: str) -> ImageEmbeddings | None:
        """The cached embeddings of a file seen before (same bytes), without decoding it."""
        t0 = time.perf_counter()
        found = self.cache.get_alias(file_key)
        if found is None:
            return None
        return ImageEmbeddings(found[1], True, ms(time.perf_counter() - t0), 0.0)

    def _encode_batch(self, pixels: np.ndarray) -> np.ndarray:
        out = self.vision.encode(pixels)
        want = (len(pixels), self.config.n_image_tokens, self.config.llm.hidden_size)
        if out.shape != want:
            raise BackendError(
                f"vision backend {self.vision.name} returned {out.shape}, not {want}"
            )
        return out

    # --- prompts ----------------------------------------------------------------------------

    def prompt_ids(self, prompt: Prompt, with_image: bool) -> list[int]:
        """Token ids of the generation prompt, with one image token iff `with_image`."""
        from cxrlite.model.tokenizer import encode_prompt_text, format_prompt

        if isinstance(prompt, str):
            text = format_prompt(self.tokenizer, prompt, with_image)
        else:
            text = self.tokenizer.apply_chat_template(
                list(prompt), tokenize=False, add_generation_prompt=True
            )
        ids = encode_prompt_text(self.tokenizer, text, self.config)
        n_images = ids.count(self.image_token_id)
        if n_images != int(with_image):
            raise ValueError(
                f"the prompt holds {n_images} image tokens; expected {int(with_image)} "
                "(the image is given separately, not written into the text)"
            )
        return ids

    def segments(self, ids: Sequence[int], embeds: np.ndarray | None) -> list[Any]:
        if embeds is None:
            return [list(ids)]
        at = list(ids).index(self.image_token_id)
        return [s for s in (list(ids[:at]), embeds, list(ids[at + 1 :])) if len(s)]

    # --- generation -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _llm_session(self) -> Iterator[None]:
        """One open generation per thread: a second would wait for a slot its own first holds."""
        me = threading.get_ident()
        with self._open_lock:
            if me in self._open_threads:
                raise RuntimeError(
                    "this thread's previous generation is unfinished: consume or close() it first"
                )
            self._open_threads.add(me)
        try:
            yield
        finally:
            with self._open_lock:
                self._open_threads.discard(me)

    def generate(
        self,
        prompt: Prompt,
        image: Image | None = None,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] = (),
        use_cache: bool = True,
        prefix_cache: bool | None = None,
        cancelled: threading.Event | None = None,
        answer_prefix: str = "",
    ) -> Generation:
        """Stream a completion (see `Generation`). The image is decoded and encoded here, so a
        bad image raises ImageError before any token; the LLM runs as the caller iterates.
        `use_cache` is the image embedding cache; `prefix_cache` (None: the runtime's setting)
        the KV reuse of a shared prompt prefix, reported as timings["prompt_cached_tokens"].
        `answer_prefix` opens the answer (the tokens after it are generated; it is not part of
        the text generated)."""
        started = time.perf_counter()
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple([stop] if isinstance(stop, str) else stop or ()),
            stop_token_ids=tuple(stop_token_ids),
        )
        timings = {"preprocess_ms": 0.0, "vision_ms": 0.0}
        embeds, cache_hit = None, None
        if image is not None:
            found = self.image_embeddings(image, use_cache=use_cache)
            embeds, cache_hit = found.embeds, found.cache_hit
            timings.update(preprocess_ms=found.preprocess_ms, vision_ms=found.vision_ms)
        from cxrlite.model.tokenizer import answer_prefix_ids

        ids = self.prompt_ids(prompt, with_image=image is not None)
        ids += answer_prefix_ids(self.tokenizer, answer_prefix)
        pieces, total = self.llm.parse(self.segments(ids, embeds))
        if total >= self.llm.n_ctx:
            raise ValueError(
                f"the prompt takes {total} positions; the context has {self.llm.n_ctx}"
            )
        request = SequenceRequest(
            pieces,
            total,
            sampling=params,
            stop_ids=frozenset(self.stop_ids | set(params.stop_token_ids)),
            prefix_cache=self.prefix_cache if prefix_cache is None else prefix_cache,
        )
        return Generation(
            engine=self.engine,
            request=request,
            tokenizer=self.tokenizer,
            session=self._llm_session,
            started=started,
            timings=timings,
            cache_hit=cache_hit,
            cancelled=cancelled,
        )

    def complete(self, prompt: Prompt, image: Image | None = None, **kwargs: Any) -> Completion:
        """`generate` run to the end: text, token ids, finish reason, timings, usage."""
        with self.generate(prompt, image, **kwargs) as generation:
            return generation.collect()

    def findings(self, image: Image, *, prompt: Prompt | None = None, **kwargs: Any) -> Completion:
        """A study's findings, asked with `prompt` (None: the model's own findings prompt, else
        cxrlite's). With a findings head (cxrlite.model.findings) the head states the checklist
        and the LLM writes the prose after it; the text holds both, less the prose sentences that
        contradict the checklist (`findings_text`). `kwargs` are `generate`'s."""
        own = self.config.report_prompts
        prompt = prompt or (own["findings"] if own else FINDINGS_PROMPT)
        if self.findings_head is None:
            return self.complete(prompt, image, **kwargs)
        found = self.image_embeddings(image, use_cache=kwargs.get("use_cache", True))
        stated = self.findings_head.decisions(found.embeds)
        done = self.complete(prompt, found, answer_prefix=checklist_text(stated), **kwargs)
        return dataclasses.replace(done, text=findings_text(stated, done.text))

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """`fn(item)` for each item, up to `slots` at once (their sequences decoded together by
        the engine), results in the items' order: a folder of studies, an evaluation set."""
        if self.llm.slots == 1:
            yield from map(fn, items)
            return
        with ThreadPoolExecutor(self.llm.slots, thread_name_prefix="cxrlite-map") as pool:
            yield from pool.map(fn, items)

    def report(
        self, image: Image, *, max_tokens: int = 128, cancelled: threading.Event | None = None
    ) -> dict[str, Any]:
        """The draft report of one study (cxrlite.runtime.report.draft_report)."""
        from cxrlite.runtime.report import draft_report

        return draft_report(self, image, max_tokens=max_tokens, cancelled=cancelled)

    # --- scoring ----------------------------------------------------------------------------

    def option_logprobs(
        self, prompt: str, options: Sequence[str], image: Image | None = None
    ) -> list[float]:
        """Sum of each option's answer-token log-probabilities (its EOS included): the prompt as
        generation encodes it, the answer as training appends it (encode_answer)."""
        from cxrlite.model.tokenizer import encode_answer

        embeds = self.image_embeddings(image).embeds if image is not None else None
        segments = self.segments(self.prompt_ids(prompt, with_image=embeds is not None), embeds)
        prompt_pieces, n_prompt = self.llm.parse(segments)  # parsed (the image hashed) once
        # One after the other: each finds the prompt's KV cache the previous one left in its
        # slot, so the prompt is decoded once and each option costs its own tokens only.
        return [
            float(self._score(prompt_pieces, n_prompt, encode_answer(self.tokenizer, o)).sum())
            for o in options
        ]

    def score(self, segments: Sequence[Any], answer_ids: Sequence[int]) -> np.ndarray:
        """Each answer token's log-probability after the prompt `segments`."""
        return self._score(*self.llm.parse(segments), answer_ids)

    def _score(self, prompt: list[Any], n_prompt: int, answer_ids: Sequence[int]) -> np.ndarray:
        answer = [int(t) for t in answer_ids]
        if not answer:
            raise ValueError("score needs at least one answer token")
        pieces = list(prompt)
        if len(answer) > 1:
            pieces += self.llm.parse([answer[:-1]])[0]
        total = n_prompt + len(answer) - 1
        if total > self.llm.n_ctx:
            raise ValueError(f"{total} positions exceed the context of {self.llm.n_ctx}")
        request = SequenceRequest(
            pieces, total, answer_ids=answer, n_prompt=n_prompt, prefix_cache=self.prefix_cache
        )
        with self._llm_session():
            return self.engine.submit(request).result()

    def text_logprobs(self, text: str) -> np.ndarray:
        """Log-probability of each token of `text` after BOS (text only), at most n_ctx."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)[: self.llm.n_ctx - 1]
        if not ids:
            raise ValueError("text_logprobs needs non-empty text")
        return self.score([[self.tokenizer.bos_token_id]], ids)

    def perplexity(self, texts: Sequence[str]) -> dict[str, float]:
        """Token-level perplexity pooled over texts: exp(-sum log p / n tokens)."""
        total, n = 0.0, 0
        for text in texts:
            if text and text.strip():
                logp = self.text_logprobs(text)
                total, n = total + float(logp.sum()), n + len(logp)
        if n == 0:
            raise ValueError("perplexity needs at least one non-empty text")
        return {"perplexity": float(np.exp(-total / n)), "n_tokens": n, "n_texts": len(texts)}


def _findings_head(bundle: Bundle) -> FindingsReader | None:
    head = bundle.config.findings_head
    return FindingsReader.load(bundle.file(FINDINGS_HEAD_FILE), head) if head else None


def _max_vision_batch(vision: VisionBackend) -> int:
    """Images one vision call may take: a TensorRT engine's profile bounds it."""
    runner = getattr(vision, "runner", None)
    return min(DEFAULT_MAX_BATCH, getattr(runner, "max_batch", DEFAULT_MAX_BATCH))


def _load_reference(
    bundle: Any,
    checkpoint: str | os.PathLike | None,
    threads: int | None,
    device: Any,
    vision_only: bool,
) -> Any:
    """The bundle's source model (CXRVLM, fp32, on `device`) for the torch backends, loaded once
    for both; only its vision tower (VisionTower, fp32 on the CPU) when the LLM is not torch."""
    import torch

    from cxrlite.model.checkpoint import load, load_vision_tower

    path: Path = reference_checkpoint(bundle, checkpoint)
    if threads:
        torch.set_num_threads(threads)  # process-wide: torch has no per-model thread count
    if vision_only:
        return load_vision_tower(path)
    model, _, _ = load(path, device=device)
    return model
