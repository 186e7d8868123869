"""A whole-model training step: ``fastlora bench --model NAME``.

A Llama-shaped decoder is built from a config (random weights, nothing downloaded) and trained one
step (forward, backward, AdamW) with LoRA r=16 on q, k, v, o, gate, up and down, by each provider:

- ``floor``: the frozen model without LoRA, its backward run down to the input embeddings (so it
  does the dX work every LoRA step does, and nothing else);
- ``peft``: PEFT's ``get_peft_model``;
- ``fastlora``: ``fastlora.apply_lora``;
- ``fastlora-from-peft``: the PEFT model made to compute through fastlora (``fastlora.from_peft``);
- ``fastlora-dora`` and ``peft-dora``: DoRA (``apply_lora(use_dora=True)``, PEFT's
  ``LoraConfig(use_dora=True)``), the magnitudes starting equal in both.

Every provider starts from the same weights and sees the same batch; tokens/s, the ratio of its
step time to the floor's, its speedup over PEFT (DoRA providers: over peft-dora), fastlora-dora's
time over fastlora's (``x lora``) and its peak memory are reported. Timing as the layer bench
(fastlora/bench.py): CUDA events on a GPU, interleaved rounds on the CPU.

With a 4-bit base (``--base nf4``/``fp4``, QLoRA) the seven projections of every LoRA provider hold
their weights in bitsandbytes' 4-bit format (blocks of 64, nested absmax; the same bytes for
all): ``peft`` and ``fastlora-from-peft`` in bitsandbytes' Linear4bit, ``fastlora`` in fastlora's;
the floor stays the 16-bit frozen model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .bench import fmt_number, sample_stats, text_table

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROVIDERS = ("floor", "peft", "fastlora", "fastlora-from-peft", "fastlora-dora", "peft-dora")
DORA_PROVIDERS = ("fastlora-dora", "peft-dora")
# ``fastlora bench --model NAME --dora``'s providers
DORA_DEFAULT = ("floor", "fastlora", "fastlora-dora", "peft-dora")
# name: (hidden, intermediate, heads, kv heads, layers, vocab). The vocabulary is small on purpose:
# the step is the decoder layers' (a 128k-word head would be a third of a few-layer model's time
# and is the same for every provider).
MODELS = {
    "tiny": (256, 688, 4, 2, 2, 1024),
    "llama3-8b": (4096, 14336, 32, 8, 4, 4096),
}


@dataclass
class ModelRow:
    model: str
    layers: int
    tokens: int
    rank: int
    dtype: str
    provider: str
    status: str
    ms: float = math.nan
    ms_p20: float = math.nan
    ms_p80: float = math.nan
    tokens_per_s: float = math.nan
    ratio_to_floor: float = math.nan
    speedup_over_peft: float = math.nan  # DoRA providers: over peft-dora
    ratio_to_lora: float = math.nan      # fastlora-dora: over fastlora (LoRA)
    peak_mb: float = math.nan
    note: str = ""
    base: str = "dense"


def _config(name: str, layers: int | None):
    import transformers

    hidden, inter, heads, kv, n_layers, vocab = MODELS[name]
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter,
                                    num_attention_heads=heads, num_key_value_heads=kv,
                                    num_hidden_layers=layers or n_layers, vocab_size=vocab,
                                    max_position_embeddings=8192)


def to_4bit(model: torch.nn.Module, quant_type: str, kind: str) -> torch.nn.Module:
    """Replace the TARGETS projections of ``model`` by 4-bit ones holding their weights (blocks of
    64, nested absmax), in place: fastlora's Linear4bit (``kind="fastlora"``) or bitsandbytes'
    (``kind="bitsandbytes"``, the model then marked as loaded in 4 bits, as PEFT expects). A
    projection whose rows are not a multiple of 64 stays 16-bit (the tiny model's down_proj)."""
    from .bench import bnb_linear4bit
    from .linear4bit import Linear4bit
    from .quant4bit import quantize

    for path, module in list(model.named_modules()):
        if (path.rpartition(".")[2] in TARGETS and isinstance(module, torch.nn.Linear)
                and module.in_features % 64 == 0):
            w4 = quantize(module.weight.detach(), quant_type, 64, double_quant=True)
            bias = None if module.bias is None else module.bias.detach()
            new = Linear4bit(w4, bias) if kind == "fastlora" else bnb_linear4bit(w4, bias)
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, new)
    if kind != "fastlora":
        model.is_loaded_in_4bit = True
    return model


def _build(provider: str, config, dtype, device, rank: int, base: str = "dense"):
    """(model, trainable parameters) for ``provider``, from the same seeded weights."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    if provider == "floor":
        return model, []
    dora = provider in DORA_PROVIDERS
    if base != "dense":
        model = to_4bit(model, base, "fastlora" if provider == "fastlora" else "bitsandbytes")
    if provider in ("fastlora", "fastlora-dora"):
        import fastlora
        model = fastlora.apply_lora(model, TARGETS, r=rank, alpha=2 * rank, use_dora=dora)
    else:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                           target_modules=TARGETS, use_dora=dora))
        if provider == "fastlora-from-peft":
            import fastlora
            fastlora.from_peft(model)
    # every provider starts from the same non-zero adapters (B = 0 would hide the B-side work) and
    # DoRA's magnitudes from ||W_n|| each off by up to 1% (A, B, m in the same order in both)
    g = torch.Generator().manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            if p.dim() == 1:  # a magnitude
                p.mul_((1 + 0.01 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model, params


def _step_fn(model, params, embeds, labels):
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        x = embeds.detach().requires_grad_(True)  # the backward runs down to the embeddings
        loss = model(inputs_embeds=x, labels=labels).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def run(name: str, providers: list[str], device: torch.device, dtype: torch.dtype, *,
        tokens: int, seq: int, rank: int = 16, layers: int | None = None, cpu_rounds: int = 5,
        progress=None, base: str = "dense") -> list[ModelRow]:
    config = _config(name, layers)
    batch = max(1, tokens // seq)
    g = torch.Generator().manual_seed(2)
    embeds = (torch.randn(batch, seq, config.hidden_size, generator=g) * 0.02).to(device, dtype)
    labels = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
    dname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
             torch.float64: "fp64"}[dtype]
    fields = dict(model=name, layers=config.num_hidden_layers, tokens=batch * seq, rank=rank, dtype=dname,
                  base=base)
    rows, steps = {}, {}
    for p in providers:
        if progress:
            progress(f"model {name}: building {p}")
        try:
            model, params = _build(p, config, dtype, device, rank, base)
            step = _step_fn(model, params, embeds, labels)
            step()  # warm-up: compiles kernels, allocates optimizer state
            step()
        except Exception as e:  # a provider that cannot run is reported, not fatal
            rows[p] = ModelRow(**fields, provider=p, status="error", note=f"{type(e).__name__}: {e}"[:200])
            continue
        rows[p] = ModelRow(**fields, provider=p, status="ok")
        steps[p] = step
        if device.type == "cuda":
            import triton.testing

            if progress:
                progress(f"model {name}: timing {p}")
            med, p20, p80 = triton.testing.do_bench(step, warmup=0, rep=300, quantiles=[0.5, 0.2, 0.8])
            rows[p].ms, rows[p].ms_p20, rows[p].ms_p80 = med, p20, p80
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            rows[p].peak_mb = torch.cuda.max_memory_allocated() / 2**20
            del model, params, step
            steps[p] = None
            torch.cuda.empty_cache()
    if device.type != "cuda":
        samples = {p: [] for p, s in steps.items() if s is not None}
        for _ in range(cpu_rounds):  # interleaved: one sample of each provider per round
            for p in samples:
                t0 = time.perf_counter()
                steps[p]()
                samples[p].append((time.perf_counter() - t0) * 1e3)
        for p, ms in samples.items():
            rows[p].ms, rows[p].ms_p20, rows[p].ms_p80 = sample_stats(ms)
    ok = {p: r for p, r in rows.items() if r.status == "ok"}
    for p, r in ok.items():
        r.tokens_per_s = r.tokens / (r.ms * 1e-3)
        if "floor" in ok:
            r.ratio_to_floor = r.ms / ok["floor"].ms
        peer = "peft-dora" if p in DORA_PROVIDERS else "peft"
        if peer in ok:
            r.speedup_over_peft = ok[peer].ms / r.ms
        if p == "fastlora-dora" and "fastlora" in ok:
            r.ratio_to_lora = r.ms / ok["fastlora"].ms
    return [rows[p] for p in providers if p in rows]


def format_table(rows: list[ModelRow], env: dict) -> str:
    head = (f"fastlora bench --model | {env['machine']} ({env['device']}) | torch {env['torch']} | "
            f"triton {env['triton']} | commit {env['commit']} | {env['date']}")
    dora = any(r.provider in DORA_PROVIDERS for r in rows)
    four_bit = any(r.base != "dense" for r in rows)
    cols = ["model", "layers", "tokens", "r", "dtype", *(["base"] if four_bit else []), "provider", "ms",
            "p20-p80", "tokens/s", "x floor", "x peft", *(["x lora"] if dora else []), "peak MB", "status"]
    lines = [[r.model, str(r.layers), str(r.tokens), str(r.rank), r.dtype,
              *([r.base] if four_bit else []), r.provider,
              fmt_number(r.ms, ".4g"), f"{fmt_number(r.ms_p20, '.4g')}-{fmt_number(r.ms_p80, '.4g')}",
              fmt_number(r.tokens_per_s, ".4g"), fmt_number(r.ratio_to_floor, ".3f"),
              fmt_number(r.speedup_over_peft, ".2f"), *([fmt_number(r.ratio_to_lora, ".3f")] if dora else []),
              fmt_number(r.peak_mb, ".0f"),
              r.status + (f" ({r.note})" if r.note else "")] for r in rows]
    return text_table(head, cols, lines)


def plot(path: str, rows: list[ModelRow]):
    """Tokens/s per provider as bars, the floor's as a line; saved to ``path``. Returns the figure."""
    from .bench import pyplot

    plt = pyplot()
    ok = [r for r in rows if r.status == "ok"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar([r.provider for r in ok], [r.tokens_per_s for r in ok], color="tab:blue")
    floor = [r for r in ok if r.provider == "floor"]
    if floor:
        ax.axhline(floor[0].tokens_per_s, color="gray", lw=0.8, label="floor")
        ax.legend(fontsize=7)
    if ok:
        r = ok[0]
        ax.set_title(f"{r.model}, {r.layers} layers, {r.tokens} tokens, r={r.rank} {r.dtype}", fontsize=9)
    ax.set_xlabel("provider")
    ax.set_ylabel("training tokens / s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig
