"""Served models from Hugging Face-format checkpoints: which architecture a load spec names,
building it straight onto the device, and the ServedModel faces (decoder, encoder).

The architecture comes from the folder's config.json (`model_type`, else `architectures`),
or, for a single weights file, from `parameters.architecture` or the tensor names. The
seed's `model_type` stays the public word: decoders load as `transformer`, encoders as
`encoder`. `parameters` given in the request must agree with config.json (SpecError naming
the field). Weights go from disk into the module's own parameters (hf.load_weights): the
module is built with uninitialised memory on the target device and dtype first, so no
throwaway initialisation and no second copy."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import bert, hf
from .attention_context import NoCache
from .base import Output, Prepared, ServedModel, module_bytes, token_rows
from .paged import PagedDecoder
from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig
from .layers import quantize_linears, quantized_bytes
from .spec import SpecError, compute_dtype, flag, no_init, tensor_cores
from .tokenizer import Tokenizer, load_tokenizer

ARCHITECTURES = {"llama": (Llama, LlamaConfig), "mistral": (Llama, LlamaConfig), "qwen2": (Llama, LlamaConfig),
                 "gpt2": (GPT2, GPT2Config), "bert": (bert.Bert, bert.BertConfig)}
ENCODERS = ("bert",)
# Hugging Face class names -> architecture, for a config.json without model_type
_CLASS_PREFIXES = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "GPT2": "gpt2", "Bert": "bert"}
# request parameters checked against the architecture's config (the config attribute of the same name)
SIZE_PARAMETERS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")


def _family_of_config(cfg: dict) -> str:
    family = cfg.get("model_type")
    if family is None:
        for cls in cfg.get("architectures") or []:
            family = next((f for prefix, f in _CLASS_PREFIXES.items() if str(cls).startswith(prefix)), None)
            if family:
                break
    if family not in ARCHITECTURES:
        raise SpecError("model_path", f"config.json model_type {family!r} is not supported; supported: "
                                      f"{', '.join(ARCHITECTURES)}")
    return family


def _family_of_names(names: list[str]) -> str | None:
    for name in names:
        if name.endswith("wte.weight"):
            return "gpt2"
        if name.endswith("embeddings.word_embeddings.weight"):
            return "bert"
        if name.endswith("self_attn.q_proj.weight"):
            return "llama"
    return None


def _config_from_parameters(family: str, p: dict, names: list[str]) -> dict:
    """A config.json for a single weights file, from the request's parameters."""
    def need(name):
        if name not in p:
            raise SpecError(f"parameters.{name}", f"parameters.{name} is required to load a {family} "
                                                 "weights file without config.json")
        return p[name]

    hidden, heads = need("hidden_size"), need("num_heads")
    if family == "gpt2":
        return {"model_type": "gpt2", "vocab_size": need("vocab_size"), "n_embd": hidden, "n_layer": need("num_layers"),
                "n_head": heads, "n_inner": p.get("intermediate_size"),
                "n_positions": p.get("max_position_embeddings", 1024)}
    common = {"model_type": family, "vocab_size": need("vocab_size"), "hidden_size": hidden,
              "num_hidden_layers": need("num_layers"), "num_attention_heads": heads,
              "intermediate_size": p.get("intermediate_size", 4 * hidden)}
    if family == "bert":
        return common | {"max_position_embeddings": p.get("max_position_embeddings", 512)}
    return common | {"num_key_value_heads": p.get("num_kv_heads", heads),
                     "rope_theta": p.get("rope_theta", 10000.0),
                     "max_position_embeddings": p.get("max_position_embeddings", 4096),
                     "tie_word_embeddings": not any(n == "lm_head.weight" for n in names)}


def architecture_of(spec: dict) -> tuple[str, dict, str | None] | None:
    """(architecture, config.json, folder or None) for a pretrained checkpoint, else None
    (the home families of transformer.py / encoder.py)."""
    path = spec.get("model_path")
    params = spec.get("parameters") or {}
    wanted = params.get("architecture")
    if wanted is not None and wanted not in ARCHITECTURES:
        raise SpecError("parameters.architecture", f"parameters.architecture {wanted!r} is not one of "
                                                   f"{', '.join(ARCHITECTURES)}")
    if hf.is_folder(path):
        cfg = hf.read_config(path)
        family = _family_of_config(cfg)
        if wanted is not None and wanted != family:
            raise SpecError("parameters.architecture", f"parameters.architecture is {wanted!r} but the "
                                                       f"checkpoint's config.json says {family!r}")
        return family, cfg, path
    if not path:
        return None
    names = hf.tensor_names(path) if wanted is not None or path.endswith((".bin", ".safetensors")) else []
    family = wanted or _family_of_names(names)
    if family is None:
        return None
    return family, _config_from_parameters(family, params, names), None


def _check_parameters(spec: dict, family: str, config) -> None:
    params = spec.get("parameters") or {}
    for name in SIZE_PARAMETERS:
        if name in params and params[name] != getattr(config, name):
            raise SpecError(f"parameters.{name}", f"parameters.{name} is {params[name]!r} but the checkpoint's "
                                                  f"config.json gives {getattr(config, name)!r} ({family})")


def _max_length(spec: dict, family: str, config, cfg: dict) -> int:
    limit = config.max_position_embeddings
    if family in ("mistral", "qwen2") and cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        limit = min(limit, cfg["sliding_window"])  # no sliding-window attention here: stay inside one window
    value = spec.get("max_sequence_length")
    if value is None:
        return limit
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise SpecError("max_sequence_length", f"max_sequence_length must be an integer in [1, {limit}] "
                                               f"for this {family} checkpoint, got {value!r}")
    return value


def _empty_module(family: str, cfg: dict, spec: dict, device: torch.device):
    """(the architecture's module with uninitialised weights on `device` in the compute dtype,
    its config, the dtype); on the meta device it holds shapes only."""
    module_cls, config_cls = ARCHITECTURES[family]
    try:
        config = config_cls.from_hf(cfg)
    except (KeyError, TypeError) as exc:
        raise SpecError("model_path", f"config.json lacks or mis-types a field the {family} architecture "
                                      f"needs: {exc}") from None
    _check_parameters(spec, family, config)
    dtype = compute_dtype(spec, device)
    with torch.device(device), no_init():
        return module_cls(config).to(dtype), config, dtype


def build_module(family: str, cfg: dict, spec: dict, device: torch.device):
    """The architecture's module with the checkpoint's weights, on `device` in the compute dtype."""
    module, config, dtype = _empty_module(family, cfg, spec, device)
    module.reset_buffers()
    body, head = module.weight_targets()
    tied = () if head or family == "bert" else ("lm_head.weight",)
    # weights_path: weights trained here (runtime training's save_path) for this folder's config
    hf.load_weights(body, head, spec.get("weights_path") or spec["model_path"], module.PREFIXES,
                    module.IGNORED + tied)
    return module.eval(), config, dtype


def _token_lists(input_data, vocab_size: int, limit: int) -> list[torch.Tensor]:
    """Rows of token ids: a rectangular matrix, or (from input_text) a list of rows of any lengths."""
    if isinstance(input_data, list) and input_data and all(isinstance(r, list) for r in input_data) \
            and len({len(r) for r in input_data}) > 1:
        return [token_rows([row], vocab_size, limit)[0] for row in input_data]
    return list(token_rows(input_data, vocab_size, limit))


class PretrainedModel(ServedModel):
    """What both faces share: the checkpoint, its tokenizer and its limits."""

    def __init__(self, spec: dict, device: torch.device, family: str, cfg: dict, folder: str | None):
        self.family = family
        self.device = device
        self.tensor_cores = flag(spec, "enable_tensor_cores")
        self.module, self.config, self.dtype = build_module(family, cfg, spec, device)
        self.max_length = self.config.max_sequence_length = _max_length(spec, family, self.config, cfg)
        self.tokenizer: Tokenizer | None = load_tokenizer(folder, cfg) if folder else None
        self.quantize = flag(spec, "enable_quantization")

    def _rows(self, input_data) -> list[torch.Tensor]:
        return _token_lists(input_data, self.config.vocab_size, self.max_length)

    def data_rows(self, data) -> torch.Tensor:
        return token_rows(data, self.config.vocab_size, self.max_length)

    def weights_to_save(self, module) -> tuple[dict[str, torch.Tensor], str]:
        """(the checkpoint's own names -> tensors, the spec key the saved file goes under):
        trained weights are written in Hugging Face names and load as `weights_path` beside
        the folder, which keeps the config and tokenizer."""
        body, head = _architecture(module).weight_targets()
        return ({name: (t.tensor.t() if t.transposed else t.tensor).detach().cpu().contiguous()
                 for name, t in (body | head).items()}, "weights_path")


class PretrainedDecoder(PretrainedModel, PagedDecoder):
    """A GPT-2 / Llama-family checkpoint served like every decoder (models/paged.py: the
    generation engine's face, options, the dense reference); generation also stops at the
    checkpoint's end-of-sequence ids (generation_config.json > config.json > the tokenizer's)."""

    def __init__(self, spec, device, family, cfg, folder):
        super().__init__(spec, device, family, cfg, folder)
        eos = self.tokenizer.eos_ids if self.tokenizer else hf_eos_ids(cfg)
        self.eos_ids = frozenset(eos)
        if self.quantize:
            quantize_linears(self.module)

    def prompt_rows(self, input_data) -> list[torch.Tensor]:
        return self._rows(input_data)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, V] float32 (one causal forward, no cache)."""
        b, s = input_ids.shape
        positions = torch.arange(s, device=self.device).expand(b, s)
        return self.module(input_ids.to(self.device), positions, NoCache(causal=True))


class PretrainedEncoder(PretrainedModel):
    """Token ids -> one pooled vector per row (sentence-transformers pooling when the folder
    has it, else parameters.pooling mean | cls and parameters.normalize)."""

    model_type = "encoder"
    trainable = optimizable = True

    def __init__(self, spec, device, family, cfg, folder):
        super().__init__(spec, device, family, cfg, folder)
        self.module = bert.SentenceEncoder(self.module, *pooling_of(spec, folder)).eval()
        if self.quantize:
            quantize_linears(self.module)

    @property
    def output_width(self) -> int:
        return self.config.hidden_size  # pooled vectors

    def prepare(self, input_data, options: dict) -> Prepared:
        rows = self._rows(input_data)
        longest = max(r.numel() for r in rows)
        padded = torch.stack([F.pad(r, (0, longest - r.numel())) for r in rows])  # right-padded
        options = dict(options or {})
        options["_lengths"] = [r.numel() for r in rows]
        return Prepared(tensor=padded, options=options, batch_key=("tokens",), rows=len(rows))

    @torch.inference_mode()
    def run(self, batch: list[Prepared]) -> list[Output]:
        s = max(p.tensor.shape[1] for p in batch)
        tokens = torch.cat([F.pad(p.tensor, (0, s - p.tensor.shape[1])) for p in batch]).to(self.device)
        lengths = torch.tensor([n for p in batch for n in p.options["_lengths"]], device=self.device)
        with tensor_cores(self.tensor_cores, self.device):
            pooled = self.module(tokens, lengths)                                          # [B, C]
        return [Output(output_data=part.cpu().numpy(), tokens_generated=0)
                for part in pooled.split([p.rows for p in batch])]


def _architecture(module):
    """The architecture module inside a served module (the encoder wraps its Bert)."""
    return module.bert if isinstance(module, bert.SentenceEncoder) else module


def hf_eos_ids(cfg: dict) -> list[int]:
    eos = cfg.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    return [int(e) for e in eos if isinstance(e, int)]


def pooling_of(spec: dict, folder: str | None) -> tuple[str, bool]:
    """From a sentence-transformers folder (modules.json, 1_Pooling/config.json, a Normalize
    module), else parameters.pooling (mean | cls, default mean) and parameters.normalize."""
    params = spec.get("parameters") or {}
    modules_path = Path(folder) / "modules.json" if folder else None
    if modules_path is not None and modules_path.is_file():
        try:
            modules = json.loads(modules_path.read_text())
        except (OSError, ValueError) as exc:
            raise SpecError("model_path", f"modules.json could not be read: {exc}") from None
        kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m.get("path", "") for m in modules if isinstance(m, dict)}
        pooling = "mean"
        if "Pooling" in kinds:
            pool_cfg = hf.read_json(Path(folder) / kinds["Pooling"] / "config.json")
            modes = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode_") and v]
            if modes not in (["pooling_mode_cls_token"], ["pooling_mode_mean_tokens"]):
                raise SpecError("model_path", f"1_Pooling/config.json asks for pooling {modes}; supported: "
                                              "exactly one of pooling_mode_cls_token / pooling_mode_mean_tokens")
            pooling = "cls" if modes == ["pooling_mode_cls_token"] else "mean"
        return pooling, "Normalize" in kinds
    pooling = params.get("pooling", "mean")
    if pooling not in bert.POOLINGS:
        raise SpecError("parameters.pooling", f"parameters.pooling must be one of {', '.join(bert.POOLINGS)}, "
                                              f"got {pooling!r}")
    normalize = params.get("normalize", False)
    if not isinstance(normalize, bool):
        raise SpecError("parameters.normalize", f"parameters.normalize must be true or false, got {normalize!r}")
    return pooling, normalize


def planned_bytes(spec: dict) -> int | None:
    """The bytes of parameters and buffers the checkpoint a spec names will take once built
    (its config on the meta device: no weights read, no memory used); None when the spec names
    a home architecture."""
    found = architecture_of(spec)
    if found is None:
        return None
    family, cfg, _ = found
    module = _empty_module(family, cfg, spec, torch.device("meta"))[0]
    return quantized_bytes(module) if flag(spec, "enable_quantization") else module_bytes(module)


def build(spec: dict, device: torch.device, model_type: str) -> ServedModel | None:
    """The pretrained model a load spec names, or None when it names a home architecture."""
    found = architecture_of(spec)
    if found is None:
        return None
    family, cfg, folder = found
    kind = "encoder" if family in ENCODERS else "transformer"
    if kind != model_type:
        raise SpecError("model_type", f"the checkpoint is a {family} {'encoder' if kind == 'encoder' else 'decoder'}: "
                                      f"load it with model_type {kind!r}, not {model_type!r}")
    if spec.get("model_path") is None:
        raise SpecError("model_path", "a pretrained architecture needs model_path")
    face = PretrainedEncoder if kind == "encoder" else PretrainedDecoder
    return face(spec, device, family, cfg, folder)
