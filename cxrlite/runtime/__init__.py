"""cxrlite.runtime: a bundle's vision tower and LLM, ready to answer.

    from cxrlite.runtime import Runtime
    rt = Runtime.from_bundle("bundle/")                       # backends from bundle + hardware
    rt.complete("Describe the findings.", image="cxr.dcm")   # Completion(text, tokens, timings..)
    for event in rt.generate("...", image=b"...png bytes"):  # streamed TokenEvents
        ...
    rt.report("cxr.dcm")                                      # findings, impression, labels

Modules: plan (which backends), vision / llm (backends), cache (image embeddings by content),
sampling (greedy / top-p / top-k, stop strings), generation (the token loop), engine (Runtime).
"""

from cxrlite.runtime.cache import EmbeddingCache, pixels_key
from cxrlite.runtime.engine import ImageEmbeddings, Runtime
from cxrlite.runtime.generation import Completion, Generation, TokenEvent
from cxrlite.runtime.llm import LlamaCppBackend, LLMBackend, TorchLLMBackend
from cxrlite.runtime.plan import BackendError, Choice, Hardware, plan_llm, plan_vision
from cxrlite.runtime.sampling import Sampler, SamplingParams, TextStream
from cxrlite.runtime.vision import OnnxVision, TensorRTVision, TorchVision, VisionBackend

__all__ = [
    "BackendError",
    "Choice",
    "Completion",
    "EmbeddingCache",
    "Generation",
    "Hardware",
    "ImageEmbeddings",
    "LLMBackend",
    "LlamaCppBackend",
    "OnnxVision",
    "Runtime",
    "Sampler",
    "SamplingParams",
    "TensorRTVision",
    "TextStream",
    "TokenEvent",
    "TorchLLMBackend",
    "TorchVision",
    "VisionBackend",
    "pixels_key",
    "plan_llm",
    "plan_vision",
]
