"""Typed, self-validating configuration of the cxrlite model (vision encoder, bridger, LLM).

Every config checks its own shapes in `__post_init__` and raises ValueError naming the field, so a
bad preset or a hand-edited config.json fails at load time, not deep inside a matmul.
`count_parameters` computes parameter counts from shapes alone, which is how the real-size presets
(1B/7B) are sized without building them in memory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from cxrlite.data.prompts import CHECKLIST_TERMS
from cxrlite.imaging.preprocess import PreprocessConfig


@dataclass(frozen=True)
class VisionFamily:
    """A ViT family transformers implements: its classes, and what its outputs hold."""

    config_class: str
    model_class: str
    model_types: tuple[str, ...]  # config.json model_type values of local folders
    has_cls: bool  # a CLS token leads the sequence (LLaVA's "default" strategy drops it)
    final_norm: str  # attribute path of the encoder's last LayerNorm


# kind -> family. A new ViT family is a row here (and its parameter count below).
VISION_FAMILIES = {
    "siglip": VisionFamily(
        "SiglipVisionConfig", "SiglipVisionModel", ("siglip_vision_model", "siglip"), False,
        "post_layernorm",
    ),
    "clip": VisionFamily(
        "CLIPVisionConfig", "CLIPVisionModel", ("clip_vision_model", "clip"), True,
        "post_layernorm",
    ),
    # DINOv2 (RAD-DINO, LLaVA-Rad's BiomedCLIP-CXR trunk): LayerScale, no pooling head.
    "dinov2": VisionFamily("Dinov2Config", "Dinov2Model", ("dinov2",), True, "layernorm"),
}  # fmt: skip
VISION_KINDS = tuple(VISION_FAMILIES)


@dataclass(frozen=True)
class LLMFamily:
    """A decoder family transformers implements, and what running it elsewhere must know."""

    config_class: str
    model_class: str
    gguf_arch: str  # the gguf.MODEL_ARCH member llama.cpp runs it as
    # llama.cpp's "llama" rope rotates adjacent dims, HF's Llama the two halves: q/k rows are
    # reordered for it. Gemma runs with NEOX-style rope in llama.cpp, as in HF: nothing to do.
    permute_rotary: bool
    # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w, so the GGUF holds w + 1.
    norm_shift: float
    # Gemma 3 lets an image's tokens attend to each other both ways (the rest stays causal).
    bidirectional_image: bool


# arch -> family. A new decoder family is a row here (its config fields, GGUF keys elsewhere).
LLM_FAMILIES = {
    "llama": LLMFamily("LlamaConfig", "LlamaForCausalLM", "LLAMA", True, 0.0, False),
    "gemma3": LLMFamily("Gemma3TextConfig", "Gemma3ForCausalLM", "GEMMA3", False, 1.0, True),
}
LLM_ARCHS = tuple(LLM_FAMILIES)
# Gemma 3 makes every 6th layer global and the others sliding-window (its `layer_types`).
GEMMA3_GLOBAL_EVERY = 6
# "mlp": LLaVA's projector; "qformer": BLIP-2's; "gemma3": Gemma 3's (average-pool the patch grid
# to `tokens_per_image`, RMSNorm, one projection).
BRIDGER_KINDS = ("mlp", "qformer", "gemma3")
# cxrlite's own chat format, LLaVA's Vicuna v1, or "own": the chat template a published model's
# tokenizer carries (MAIRA-2's), used as it is.
PROMPT_TEMPLATES = ("cxr-chat-v1", "vicuna-v1", "own")
# How a rendered prompt becomes ids: in one call, the text carrying its BOS ("whole"); in one
# call with the tokenizer adding its special tokens, as transformers' processors do
# ("tokenizer"); or LLaVA's tokenizer_image_token: each chunk between image tokens encoded on its
# own, one BOS, the image id put between ("chunks"). The image token is a special token of the
# tokenizer in the first two.
PROMPT_ENCODINGS = ("whole", "tokenizer", "chunks")
REPORT_PARTS = ("findings", "impression")
DEFAULT_IMAGE_TOKEN = "<image>"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}",
        )


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    _require(not unknown, f"{cls.__name__}: unknown field(s) {unknown}")
    try:
        return cls(**data)
    except TypeError as e:  # a missing required field
        raise ValueError(f"{cls.__name__}: {e}") from None


@dataclass(frozen=True)
class VisionConfig:
    """A ViT from transformers (SigLIP or CLIP vision tower); `pretrained` is a local folder."""

    kind: str = "siglip"
    image_size: int = 64
    patch_size: int = 16
    num_channels: int = 1
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 64
    # Index into hidden_states (0 = patch embeddings). LLaVA reads the penultimate layer (-2) of a
    # pretrained tower; a tower trained from scratch here uses its last layer (-1).
    feature_layer: int = -1
    # Apply the encoder's final LayerNorm to the selected features (MAIRA-2 reads DINOv2's
    # normed last_hidden_state); LLaVA-style models read the raw hidden state.
    feature_norm: bool = False
    # SigLIP's attention-pooling head; LLaVA-style models never read it.
    use_head: bool = False
    # None: transformers' default for the kind (SigLIP gelu_pytorch_tanh, CLIP quick_gelu)
    hidden_act: str | None = None
    layer_norm_eps: float | None = None
    pretrained: str | None = None

    def __post_init__(self) -> None:
        _require(
            self.kind in VISION_KINDS,
            f"VisionConfig.kind must be one of {VISION_KINDS}, got {self.kind!r}",
        )
        _positive(self, "image_size", "patch_size", "num_channels", "hidden_size", "num_layers")
        _positive(self, "num_heads", "intermediate_size")
        # A remainder is allowed: the strided patch conv drops it, as SigLIP-SO400M/14 at 384 px
        # does (27 x 27 patches, 6 px unused).
        _require(
            self.image_size >= self.patch_size,
            f"VisionConfig: image_size {self.image_size} is smaller than patch_size {self.patch_size}",
        )
        _require(
            self.hidden_size % self.num_heads == 0,
            f"VisionConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}",
        )
        _require(
            self.kind != "dinov2" or self.intermediate_size % self.hidden_size == 0,
            f"VisionConfig: DINOv2's MLP width is a whole multiple of hidden_size "
            f"({self.hidden_size}), got intermediate_size {self.intermediate_size}",
        )
        # hidden_states has num_layers + 1 entries (embeddings first); 0 would be raw patches.
        _require(
            -self.num_layers <= self.feature_layer <= self.num_layers and self.feature_layer != 0,
            f"VisionConfig.feature_layer {self.feature_layer} must select one of the {self.num_layers} "
            f"encoder layers (1..{self.num_layers} or -1..-{self.num_layers})",
        )

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def select_strategy(self) -> str:
        """LLaVA's name for what is kept: a CLS token is dropped ("default"); SigLIP has none."""
        return "default" if VISION_FAMILIES[self.kind].has_cls else "full"


@dataclass(frozen=True)
class BridgerConfig:
    """MLP projector (LLaVA) or Q-Former with learned queries (BLIP-2 / CheXagent)."""

    kind: str = "mlp"
    # Linear layers of the MLP projector, GELU between: 2 is LLaVA-1.5's mlp2x_gelu, 4 MAIRA-2's.
    mlp_layers: int = 2
    # Gemma 3's projector: image tokens after pooling (a square number; 256 in Gemma 3)
    tokens_per_image: int = 256
    num_queries: int = 8
    num_layers: int = 2
    num_heads: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128

    def __post_init__(self) -> None:
        _require(
            self.kind in BRIDGER_KINDS,
            f"BridgerConfig.kind must be one of {BRIDGER_KINDS}, got {self.kind!r}",
        )
        _positive(self, "mlp_layers", "tokens_per_image")
        side = math.isqrt(self.tokens_per_image)
        _require(
            self.kind != "gemma3" or side * side == self.tokens_per_image,
            f"BridgerConfig.tokens_per_image must be a square number, got {self.tokens_per_image}",
        )
        if self.kind == "qformer":
            _positive(
                self, "num_queries", "num_layers", "num_heads", "hidden_size", "intermediate_size"
            )
            _require(
                self.hidden_size % self.num_heads == 0,
                f"BridgerConfig: Q-Former hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}",
            )


@dataclass(frozen=True)
class LLMConfig:
    """Decoder shapes of a family in LLM_FAMILIES (Llama by default); `pretrained` is a local
    folder."""

    arch: str = "llama"
    vocab_size: int = 384
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 192
    max_position_embeddings: int = 256
    # None: hidden_size / num_heads (Gemma 3 sets its own)
    head_dim: int | None = None
    rope_theta: float = 10000.0
    # transformers' rope_parameters beyond the default rotary (rope_type, factor...), or None;
    # Gemma 3 applies it to its global layers only
    rope_scaling: dict[str, Any] | None = None
    # Gemma 3: the window of its sliding-window layers, and their own rope base
    sliding_window: int | None = None
    rope_local_theta: float | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = 3
    pretrained: str | None = None

    def __post_init__(self) -> None:
        _require(
            self.arch in LLM_ARCHS, f"LLMConfig.arch must be one of {LLM_ARCHS}, got {self.arch!r}"
        )
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")
        _positive(self, "intermediate_size", "max_position_embeddings")
        if self.head_dim is None:
            _require(
                self.hidden_size % self.num_heads == 0,
                f"LLMConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                f"{self.num_heads}",
            )
        else:
            _positive(self, "head_dim")
        gemma3 = self.arch == "gemma3"
        _require(
            gemma3 == (self.sliding_window is not None) == (self.rope_local_theta is not None),
            "LLMConfig: sliding_window and rope_local_theta are given for Gemma 3 and only for it",
        )
        if gemma3:
            _positive(self, "sliding_window")
            _require(self.rope_local_theta > 0, "LLMConfig.rope_local_theta must be > 0")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"LLMConfig: num_kv_heads {self.num_kv_heads} does not divide num_heads {self.num_heads}",
        )
        _require(self.rope_theta > 0, f"LLMConfig.rope_theta must be > 0, got {self.rope_theta}")
        _require(
            self.rms_norm_eps > 0, f"LLMConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}"
        )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            _require(
                value is None or 0 <= value < self.vocab_size,
                f"LLMConfig.{name} {value} is outside the vocabulary (size {self.vocab_size})",
            )

    @property
    def head_size(self) -> int:
        """The width of one attention head: `head_dim`, or hidden_size / num_heads."""
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass(frozen=True)
class FindingsHeadConfig:
    """A linear read of the image embeddings that states the findings checklist
    (cxrlite.model.findings): one logit per observation, stated present at or above its
    threshold. Fitted after training (train/findings_head.py); imported models have none."""

    observations: tuple[str, ...] = tuple(CHECKLIST_TERMS)
    thresholds: tuple[float, ...] = (0.0,) * len(CHECKLIST_TERMS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "observations", tuple(self.observations))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        unknown = sorted(set(self.observations) - set(CHECKLIST_TERMS))
        _require(
            bool(self.observations) and not unknown,
            f"FindingsHeadConfig.observations must be checklist findings "
            f"({list(CHECKLIST_TERMS)}), got {list(self.observations)}",
        )
        _require(
            len(self.thresholds) == len(self.observations)
            and all(math.isfinite(t) for t in self.thresholds),
            f"FindingsHeadConfig: one finite threshold per observation "
            f"({len(self.observations)}), got {list(self.thresholds)}",
        )


def default_preprocess(vision: VisionConfig) -> dict[str, Any]:
    """Preprocessing that matches the vision tower: its input size, channels, [-1, 1] range."""
    return PreprocessConfig(
        image_size=vision.image_size, channels=vision.num_channels, mean=0.5, std=0.5
    ).to_dict()


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    bridger: BridgerConfig = field(default_factory=BridgerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # A PreprocessConfig dict (cxrlite.imaging.preprocess); None means default_preprocess(vision).
    preprocess: dict[str, Any] | None = None
    image_token: str = DEFAULT_IMAGE_TOKEN
    # Set once a tokenizer is bound (cxrlite.model.tokenizer.bind_tokenizer).
    image_token_id: int | None = None
    prompt_template: str = "cxr-chat-v1"
    prompt_encoding: str = "whole"
    # The model's own report prompts ({"findings": text, "impression": text or None}); None uses
    # cxrlite's (cxrlite.data.prompts). A None part is a task the model was not trained for.
    report_prompts: dict[str, str | None] | None = None
    # States the findings checklist from the image embeddings (None: the LLM writes it).
    findings_head: FindingsHeadConfig | None = None

    def __post_init__(self) -> None:
        parts = (
            ("vision", VisionConfig),
            ("bridger", BridgerConfig),
            ("llm", LLMConfig),
            ("findings_head", FindingsHeadConfig),
        )
        for name, cls in parts:
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, _from_dict(cls, getattr(self, name)))
        _require(bool(self.image_token), "ModelConfig.image_token must be a non-empty string")
        _require(
            self.prompt_template in PROMPT_TEMPLATES,
            f"ModelConfig.prompt_template must be one of {PROMPT_TEMPLATES}, got {self.prompt_template!r}",
        )
        _require(
            self.prompt_encoding in PROMPT_ENCODINGS,
            f"ModelConfig.prompt_encoding must be one of {PROMPT_ENCODINGS}, "
            f"got {self.prompt_encoding!r}",
        )
        # A chunk-encoded prompt may use an id past the vocabulary for the image (LLaVA's -200):
        # its positions hold image embeddings and are never looked up.
        id_limit = self.llm.vocab_size + (1 if self.prompt_encoding == "chunks" else 0)
        _require(
            self.image_token_id is None or 0 <= self.image_token_id < id_limit,
            f"ModelConfig.image_token_id {self.image_token_id} is outside the vocabulary "
            f"(size {self.llm.vocab_size})",
        )
        if self.report_prompts is not None:
            _require(
                isinstance(self.report_prompts, dict)
                and set(self.report_prompts) == set(REPORT_PARTS)
                and isinstance(self.report_prompts["findings"], str)
                and all(v is None or isinstance(v, str) for v in self.report_prompts.values()),
                f"ModelConfig.report_prompts must give {REPORT_PARTS} (a findings prompt, an "
                f"impression prompt or null), got {self.report_prompts!r}",
            )
        pre = self.preprocess if self.preprocess is not None else default_preprocess(self.vision)
        pre = PreprocessConfig.from_dict(dict(pre)).to_dict()  # validates it
        _require(
            pre["image_size"] == self.vision.image_size
            and pre["channels"] == self.vision.num_channels,
            f"ModelConfig.preprocess gives {pre['channels']}x{pre['image_size']}px images but the "
            f"vision encoder takes {self.vision.num_channels}x{self.vision.image_size}px",
        )
        object.__setattr__(self, "preprocess", pre)
        if self.bridger.kind == "gemma3":
            per_side = self.vision.image_size // self.vision.patch_size
            pooled = math.isqrt(self.bridger.tokens_per_image)
            _require(
                per_side % pooled == 0 and self.vision.select_strategy == "full",
                f"ModelConfig: Gemma 3's projector pools a CLS-free {per_side}x{per_side} patch "
                f"grid to {pooled}x{pooled}; the grid must divide evenly",
            )

    @property
    def n_image_tokens(self) -> int:
        """How many positions one image fills in the LLM sequence."""
        if self.bridger.kind == "qformer":
            return self.bridger.num_queries
        if self.bridger.kind == "gemma3":
            return self.bridger.tokens_per_image
        return self.vision.n_patches

    @property
    def image_embedding_size(self) -> int:
        """The numbers one image's embeddings hold (what a findings head reads)."""
        return self.n_image_tokens * self.llm.hidden_size

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


# --- presets -------------------------------------------------------------------------------------

# name -> (vision, bridger, llm); get_preset assembles the ModelConfig (and its preprocessing).
PRESETS: dict[str, tuple[VisionConfig, BridgerConfig, LLMConfig]] = {}


def _register(name: str, vision: VisionConfig, bridger: BridgerConfig, llm: LLMConfig) -> None:
    PRESETS[name] = (vision, bridger, llm)


# fmt: off
# Tests: the whole four-stage recipe trains in seconds on a CPU.
_register(
    "tiny",
    VisionConfig(kind="siglip", image_size=64, patch_size=16, num_channels=1, hidden_size=32,
                 num_layers=2, num_heads=2, intermediate_size=64, feature_layer=-1),
    BridgerConfig(kind="mlp", num_queries=4, num_layers=1, num_heads=2, hidden_size=32,
                  intermediate_size=64),
    LLMConfig(vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=192, max_position_embeddings=256),
)
# CPU demo: learns the phantom findings in minutes on two cores.
_register(
    "small",
    VisionConfig(kind="siglip", image_size=128, patch_size=16, num_channels=1, hidden_size=128,
                 num_layers=4, num_heads=2, intermediate_size=512, feature_layer=-1),
    BridgerConfig(kind="mlp", num_queries=16, num_layers=2, num_heads=4, hidden_size=128,
                  intermediate_size=512),
    LLMConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
              intermediate_size=768, max_position_embeddings=512),
)
# Real-size shapes: CLIP ViT-B/16 + a Llama-3.2-1B-shaped decoder (LLaVA-Rad scale).
_register(
    "vitb16-llama1b",
    VisionConfig(kind="clip", image_size=224, patch_size=16, num_channels=3, hidden_size=768,
                 num_layers=12, num_heads=12, intermediate_size=3072, feature_layer=-2),
    BridgerConfig(kind="mlp", num_queries=64, num_layers=2, num_heads=12, hidden_size=768,
                  intermediate_size=3072),
    LLMConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
              intermediate_size=8192, max_position_embeddings=8192, rope_theta=500000.0,
              tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
              pad_token_id=None),
)
# Real-size shapes: SigLIP-SO400M/14 at 384 px + a Llama-2-7B-shaped decoder (LLaVA-1.5 scale).
_register(
    "so400m-llama7b",
    VisionConfig(kind="siglip", image_size=384, patch_size=14, num_channels=3, hidden_size=1152,
                 num_layers=27, num_heads=16, intermediate_size=4304, feature_layer=-2),
    BridgerConfig(kind="mlp", num_queries=128, num_layers=2, num_heads=16, hidden_size=768,
                  intermediate_size=3072),
    LLMConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
              intermediate_size=11008, max_position_embeddings=4096, tie_word_embeddings=False,
              pad_token_id=None),
)
# Real-size shapes of LLaVA-Rad: DINOv2 ViT-B/14 at 518 px (1369 image tokens, the
# second-to-last block's output) + its 2-layer projector + Vicuna-7B v1.5.
_register(
    "dinov2b14-vicuna7b",
    VisionConfig(kind="dinov2", image_size=518, patch_size=14, num_channels=3, hidden_size=768,
                 num_layers=12, num_heads=12, intermediate_size=3072, feature_layer=-2,
                 hidden_act="gelu", layer_norm_eps=1e-6),
    BridgerConfig(kind="mlp", mlp_layers=2),
    LLMConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
              intermediate_size=11008, max_position_embeddings=4096, tie_word_embeddings=False,
              pad_token_id=0),
)
# Real-size shapes of MedGemma 4B: SigLIP-SO400M/14 at 896 px (its last layer through the final
# norm), Gemma 3's projector pooling 64 x 64 patches to 256 tokens, the Gemma 3 4B decoder.
_register(
    "siglip896-gemma3-4b",
    VisionConfig(kind="siglip", image_size=896, patch_size=14, num_channels=3, hidden_size=1152,
                 num_layers=27, num_heads=16, intermediate_size=4304, feature_layer=-1,
                 feature_norm=True, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    BridgerConfig(kind="gemma3", tokens_per_image=256),
    LLMConfig(arch="gemma3", vocab_size=262208, hidden_size=2560, num_layers=34, num_heads=8,
              num_kv_heads=4, head_dim=256, intermediate_size=10240,
              max_position_embeddings=131072, rope_theta=1000000.0,
              rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=1024,
              rope_local_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
              bos_token_id=2, eos_token_id=106, pad_token_id=0),
)
# fmt: on
# The real-size presets by the short names `cxrlite bench --shape` takes.
SHAPES = {
    "1b": "vitb16-llama1b",
    "7b": "so400m-llama7b",
    "llava-rad": "dinov2b14-vicuna7b",
    "medgemma": "siglip896-gemma3-4b",
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset's ModelConfig; `vision`/`bridger`/`llm` overrides are dicts merged into the preset.

    get_preset("tiny", bridger={"kind": "qformer"}, llm={"num_layers": 1})
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    vision, bridger, llm = PRESETS[name]
    parts = {"vision": vision, "bridger": bridger, "llm": llm}
    for key in ("vision", "bridger", "llm"):
        change = overrides.pop(key, None)
        if isinstance(change, dict):
            unknown = sorted(set(change) - {f.name for f in fields(parts[key])})
            _require(not unknown, f"get_preset: unknown {key} field(s) {unknown}")
            parts[key] = dataclasses.replace(parts[key], **change)
        elif change is not None:
            parts[key] = change
    return _from_dict(ModelConfig, {**parts, **overrides})


# --- parameter counts from shapes ------------------------------------------------------------------


def _vision_parameters(v: VisionConfig) -> int:
    h, i = v.hidden_size, v.intermediate_size
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * (2 * h)  # attn, mlp, 2 LayerNorms
    patch = v.num_channels * v.patch_size**2 * h
    if v.kind == "clip":
        # no conv bias; CLS embedding and its position; pre- and post-LayerNorm
        embeddings = patch + h + (v.n_patches + 1) * h
        return embeddings + v.num_layers * layer + 2 * (2 * h)
    if v.kind == "dinov2":
        # conv bias; CLS and mask tokens; positions with CLS; two LayerScales a layer; final norm
        embeddings = patch + h + 2 * h + (v.n_patches + 1) * h
        return embeddings + v.num_layers * (layer + 2 * h) + 2 * h
    embeddings = patch + h + v.n_patches * h
    head = 0
    if v.use_head:  # probe + nn.MultiheadAttention + LayerNorm + MLP
        head = h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h)
    return embeddings + v.num_layers * layer + 2 * h + head


def _bridger_parameters(b: BridgerConfig, vision_width: int, llm_width: int) -> int:
    if b.kind == "gemma3":  # RMSNorm + projection, no bias
        return vision_width + vision_width * llm_width
    if b.kind == "mlp":
        first = vision_width * llm_width + llm_width
        return first + (b.mlp_layers - 1) * (llm_width * llm_width + llm_width)
    h, i = b.hidden_size, b.intermediate_size
    self_attn = 4 * (h * h + h) + 2 * h
    cross_attn = 2 * (h * h + h) + 2 * (vision_width * h + h) + 2 * h
    ffn = (h * i + i) + (i * h + h) + 2 * h
    queries = b.num_queries * h
    return (
        queries
        + 2 * h
        + b.num_layers * (self_attn + cross_attn + ffn)
        + (h * llm_width + llm_width)
    )


def _llm_parameters(m: LLMConfig) -> int:
    h, q, kv = m.hidden_size, m.num_heads * m.head_size, m.num_kv_heads * m.head_size
    # Gemma 3 adds norms after attention and around the MLP, and q/k norms
    norms = 4 * h + 2 * m.head_size if m.arch == "gemma3" else 2 * h
    layer = 2 * h * q + 2 * h * kv + 3 * h * m.intermediate_size + norms
    head = 0 if m.tie_word_embeddings else m.vocab_size * h
    return m.vocab_size * h + m.num_layers * layer + h + head


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts per part, from shapes alone (exactly what the built model holds)."""
    vision = _vision_parameters(cfg.vision)
    bridger = _bridger_parameters(cfg.bridger, cfg.vision.hidden_size, cfg.llm.hidden_size)
    llm = _llm_parameters(cfg.llm)
    head = cfg.findings_head
    findings = (cfg.image_embedding_size + 1) * len(head.observations) if head else 0
    total = vision + bridger + llm + findings
    return {
        "vision": vision,
        "bridger": bridger,
        "llm": llm,
        "findings_head": findings,
        "total": total,
    }
